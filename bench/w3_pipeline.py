"""W3's model of ../shared/bench as an InferencePipeline: W1's toy model with its linear layer on the simulated device.

``preprocess`` is the harness's ``toy_model.featurize`` (host work: hashing word n-grams, given as the pipeline's
``host_stages()``, so that a worker with ``job_config.host_workers`` above 1 runs it in host processes); ``predict``
runs the features through ``sim_device.device().run``, the simulated accelerator that holds a device lock and waits
with the GIL released, as a host thread waits on a kernel. The device lives in the process that runs ``predict`` (the
local worker); it writes its busy seconds to ``$W3_STATS_DIR`` after every batch, which ``bench/w3.py`` reads back.

Both harness modules are loaded from MODALKIT_SHARED_BENCH (default: ../shared/bench beside the repo), unchanged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, ClassVar

from toy_pipeline import Row, Scored

from modalkit.inference_pipeline import InferencePipeline

SHARED_BENCH = Path(os.environ.get("MODALKIT_SHARED_BENCH", Path(__file__).resolve().parents[2] / "shared" / "bench"))


def _harness() -> tuple[Any, Any]:
    """The harness's toy_model and sim_device modules (sim_device imports toy_model by name)."""
    if str(SHARED_BENCH) not in sys.path:
        sys.path.insert(0, str(SHARED_BENCH))
    import sim_device
    import toy_model

    return toy_model, sim_device


class Featurize:
    """W3's host stages: the harness's featurize, with nothing of the device (a worker's host processes run it)."""

    def preprocess(self, input_list: list[Row]) -> dict[str, Any]:
        toy, _ = _harness()  # sim_device's module only; its device is made on first use, in predict
        return {"x": toy.featurize([r.text for r in input_list])}


class W3Pipeline(InferencePipeline):
    """W3: featurize on the host, the linear layer and softmax on one simulated device."""

    input_model = Row
    output_model = Scored
    # the device runs predict only; featurizing is host work (EXEC's executor reads this)
    device_stages: ClassVar[tuple[str, ...]] = ("predict",)

    def __init__(
        self, model_name: str, all_model_data_folder: str, common_settings: dict[str, Any], *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(model_name, all_model_data_folder, common_settings)
        self._toy, self._sim = _harness()
        self._toy.featurize(["warm up"])

    def preprocess(self, input_list: list[Row]) -> dict[str, Any]:
        return {"x": self._toy.featurize([r.text for r in input_list])}

    def host_stages(self) -> Featurize:
        return Featurize()

    def predict(self, input_list: list[Row], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        labels, scores = self._sim.device().run(preprocessed_data["x"])
        return {"labels": labels.tolist(), "scores": scores.tolist()}

    def postprocess(self, input_list: list[Row], raw_output: dict[str, Any]) -> list[Scored]:
        return [
            Scored(id=r.id, label=lab, score=s)
            for r, lab, s in zip(input_list, raw_output["labels"], raw_output["scores"], strict=True)
        ]
