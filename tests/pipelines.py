"""Pipelines for tests. Importable by path (``pipelines:PoisonAwareSentiment``) from worker processes too.

``PoisonAwareSentiment`` is the example sentiment model plus poison markers: a text containing ``POISON-PRE``,
``POISON-PREDICT`` or ``POISON-POST`` makes that stage raise for any batch holding it, the way a real model chokes
on one bad record.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from modalkit.examples.sentiment import Review, SentimentPipeline


class PoisonAwareSentiment(SentimentPipeline):
    """The sentiment pipeline, with stages that raise on poison markers."""

    def preprocess(self, input_list: list[Review]) -> dict[str, Any]:
        if any("POISON-PRE" in r.text and "POISON-PREDICT" not in r.text for r in input_list):
            raise ValueError("preprocess cannot tokenise a POISON-PRE text")
        return super().preprocess(input_list)

    def predict(self, input_list: list[Review], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        if any("POISON-PREDICT" in r.text for r in input_list):
            raise RuntimeError("predict failed on a POISON-PREDICT text")
        return super().predict(input_list, preprocessed_data)

    def postprocess(self, input_list: list[Review], raw_output: dict[str, Any]) -> list[Any]:
        if any("POISON-POST" in r.text for r in input_list):
            raise KeyError("postprocess lost a POISON-POST output")
        return super().postprocess(input_list, raw_output)


class FirstGpuBroken(PoisonAwareSentiment):
    """The sentiment pipeline, except that the first one built in this process sits on a broken GPU: every batch it
    predicts fails with a CUDA error. Later ones (new containers) work."""

    built: ClassVar[list[FirstGpuBroken]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broken = not FirstGpuBroken.built
        FirstGpuBroken.built.append(self)

    def predict(self, input_list: list[Review], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().predict(input_list, preprocessed_data)


class BrokenGpuInOneWorker(PoisonAwareSentiment):
    """The sentiment pipeline, except in the one worker process that first claims the marker file named by the
    ``TEST_GPU_MARKER`` environment variable: there every batch fails with a CUDA error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            os.close(os.open(os.environ["TEST_GPU_MARKER"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            self.broken = True
        except FileExistsError:
            self.broken = False

    def predict(self, input_list: list[Review], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().predict(input_list, preprocessed_data)
