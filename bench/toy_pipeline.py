"""The W1 toy model of ../shared/bench as an InferencePipeline (the same model the bare loops run).

The model module is loaded from MODALKIT_SHARED_BENCH (default: ../shared/bench beside the repo), so the
comparison uses the reference harness's own code, unchanged.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from modalkit.inference_pipeline import InferencePipeline
from modalkit.iomodel import InferenceOutputModel

SHARED_BENCH = Path(os.environ.get("MODALKIT_SHARED_BENCH", Path(__file__).resolve().parents[2] / "shared" / "bench"))


class Row(BaseModel):
    id: int
    text: str


class Scored(InferenceOutputModel):
    id: int
    label: int
    score: float


def _toy_model() -> Any:
    spec = importlib.util.spec_from_file_location("toy_model", SHARED_BENCH / "toy_model.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"no toy_model.py in {SHARED_BENCH}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ToyPipeline(InferencePipeline):
    """W1's toy text model: hashed n-gram features, a seeded linear layer, softmax."""

    input_model = Row
    output_model = Scored

    def __init__(
        self, model_name: str, all_model_data_folder: str, common_settings: dict[str, Any], *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(model_name, all_model_data_folder, common_settings)
        self._model = _toy_model()
        self._model.predict_batch([{"id": 0, "text": "warm up"}])

    def preprocess(self, input_list: list[Row]) -> dict[str, Any]:
        return {"ids": [r.id for r in input_list], "texts": [r.text for r in input_list]}

    def predict(self, input_list: list[Row], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        ids, labels, scores = self._model.predict_arrays(preprocessed_data["ids"], preprocessed_data["texts"])
        return {"ids": ids, "labels": labels.tolist(), "scores": scores.tolist()}

    def postprocess(self, input_list: list[Row], raw_output: dict[str, Any]) -> list[Scored]:
        return [
            Scored(id=i, label=lab, score=s)
            for i, lab, s in zip(raw_output["ids"], raw_output["labels"], raw_output["scores"], strict=True)
        ]
