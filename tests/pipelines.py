"""Pipelines for tests. Importable by path (``pipelines:PoisonAwareSentiment``) from worker processes too.

``PoisonAwareSentiment`` is the example sentiment model plus poison markers: a text containing ``POISON-PRE``,
``POISON-PREDICT`` or ``POISON-POST`` makes that stage raise for any batch holding it, the way a real model chokes
on one bad record.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, computed_field

from modalkit.examples.sentiment import Review, SentimentPipeline
from modalkit.inference_pipeline import InferencePipeline
from modalkit.iomodel import InferenceOutputModel


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


class NotesItsProcess(PoisonAwareSentiment):
    """The example model, noting the command line of the process that loads it in ``$NOTE_PROCESS_TO``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        with open("/proc/self/cmdline", "rb") as fh:
            argv = fh.read().rstrip(b"\0").split(b"\0")
        with open(os.environ["NOTE_PROCESS_TO"], "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "argv": [a.decode() for a in argv]}) + "\n")


class BrokenInit(PoisonAwareSentiment):
    """A pipeline whose constructor raises, as one does when its weights are missing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("weights.bin: no such file in the model folder")


class _Numbered(BaseModel):
    id: int
    text: str


class _Tagged(InferenceOutputModel):
    model_config = ConfigDict(extra="allow")

    label: str
    score: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def confident(self) -> bool:
        return self.score > 0.5


class TaggedSentiment(SentimentPipeline):
    """The sentiment pipeline with integer ids in, and an output that has a computed field and an extra field."""

    input_model = _Numbered
    output_model = _Tagged

    def postprocess(self, input_list: list[Any], raw_output: dict[str, Any]) -> list[Any]:
        scored = super().postprocess(input_list, raw_output)
        pairs = zip(input_list, scored, strict=True)
        return [_Tagged(label=s.label, score=s.score, words=len(r.text.split())) for r, s in pairs]


class ReturnsNothing(PoisonAwareSentiment):
    """A pipeline with a bug: postprocess returns no outputs at all."""

    def postprocess(self, input_list: list[Review], raw_output: dict[str, Any]) -> list[Any]:
        return []


class KillsItsWorker(PoisonAwareSentiment):
    """The sentiment pipeline, except that a text containing ``KILL-WORKER`` kills the process running it, as a
    segfault or an out-of-memory kill would (no exception, no cleanup)."""

    def predict(self, input_list: list[Review], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        if any("KILL-WORKER" in r.text for r in input_list):
            os._exit(139)
        return super().predict(input_list, preprocessed_data)


class LacksPostprocess(PoisonAwareSentiment):
    """A pipeline that forgot a method (abstract again)."""

    postprocess = InferencePipeline.postprocess  # type: ignore[assignment]


class _EchoIn(BaseModel):
    text: str


class _Echoed(InferenceOutputModel):
    echo: str
    label: str


class ServeProbe(PoisonAwareSentiment):
    """The sentiment pipeline for tests of ``modalkit serve``: its output echoes the text (so each caller can tell
    its own answer), and environment variables make it observable and slow:

    ``PROBE_LOG``: a file each batch's size is appended to; ``PROBE_DELAY``: seconds to sleep per batch;
    ``PROBE_GATE``: while this file exists, predict waits; ``PROBE_PIDS``: a file each batch's process id is appended
    to (which server process ran it); ``PROBE_LOADS``: a file each load of the pipeline appends its process id to.
    """

    input_model = _EchoIn
    output_model = _Echoed

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if os.environ.get("PROBE_LOADS"):
            with open(os.environ["PROBE_LOADS"], "a", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()}\n")

    def predict(self, input_list: list[Any], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        gate = os.environ.get("PROBE_GATE")
        while gate and os.path.exists(gate):
            time.sleep(0.02)
        if os.environ.get("PROBE_DELAY"):
            time.sleep(float(os.environ["PROBE_DELAY"]))
        if os.environ.get("PROBE_LOG"):
            with open(os.environ["PROBE_LOG"], "a", encoding="utf-8") as fh:
                fh.write(f"{len(input_list)}\n")
        if os.environ.get("PROBE_PIDS"):
            with open(os.environ["PROBE_PIDS"], "a", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()}\n")
        return super().predict(input_list, preprocessed_data)

    def postprocess(self, input_list: list[Any], raw_output: dict[str, Any]) -> list[Any]:
        scored = super().postprocess(input_list, raw_output)
        return [_Echoed(echo=r.text, label=s.label) for r, s in zip(input_list, scored, strict=True)]


class FailsInPredict(ServeProbe):
    """``ServeProbe`` whose predict raises what ``PROBE_RAISE`` names, whatever the record: ``cuda`` (the device is
    broken) or ``connection`` (a service the model calls is unreachable). Neither is the record's fault."""

    def predict(self, input_list: list[Any], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        kind = os.environ.get("PROBE_RAISE")
        if kind == "cuda":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if kind == "connection":
            raise ConnectionError("the feature store refused the connection")
        return super().predict(input_list, preprocessed_data)


class _Amount(BaseModel):
    amount: float
    currency: str


class _Converted(InferenceOutputModel):
    euros: float


class FlatRate(InferencePipeline):
    """A second model with a schema of its own (``amount``, ``currency``): converts an amount to euros."""

    input_model = _Amount
    output_model = _Converted

    def preprocess(self, input_list: list[_Amount]) -> dict[str, Any]:
        return {}

    def predict(self, input_list: list[_Amount], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        return {"euros": [i.amount * (1.0 if i.currency == "EUR" else 0.5) for i in input_list]}

    def postprocess(self, input_list: list[_Amount], raw_output: dict[str, Any]) -> list[Any]:
        return [_Converted(euros=e) for e in raw_output["euros"]]


class HangsOnce(PoisonAwareSentiment):
    """The sentiment pipeline, except that a batch holding a ``HANG`` text blocks forever, as a stuck read or a hung
    device would, the first time any process meets it: the flag file named by ``TEST_HANG_FLAG`` (created then, with
    the pid of the process that hangs) says it happened. Every process that meets it appends its pid to
    ``<flag>.attempts``."""

    def predict(self, input_list: list[Review], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        if any("HANG" in r.text for r in input_list):
            flag = os.environ["TEST_HANG_FLAG"]
            with open(flag + ".attempts", "a", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()}\n")
            try:
                fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return super().predict(input_list, preprocessed_data)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            while True:  # hung: only a kill ends it
                time.sleep(3600)
        return super().predict(input_list, preprocessed_data)


class HangsAlways(PoisonAwareSentiment):
    """The sentiment pipeline, except that a batch holding a ``HANG`` text blocks forever, every time; each process
    that meets it first appends its pid to the file named by ``TEST_HANG_FLAG``."""

    def predict(self, input_list: list[Review], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        if any("HANG" in r.text for r in input_list):
            with open(os.environ["TEST_HANG_FLAG"], "a", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()}\n")
            while True:
                time.sleep(3600)
        return super().predict(input_list, preprocessed_data)


class _HostIn(BaseModel):
    id: str | None = None
    text: str = Field(min_length=1)


class _HostOut(InferenceOutputModel):
    length: int
    preprocessed_by: int


class HostTokens:
    """The host stages of :class:`HostFed`: a wide array per record (so that it travels as shared memory), and the
    id of the process that made it. ``POISON-PRE`` raises; ``KILL-HOST`` kills a host process running it (and
    raises anywhere else)."""

    seconds: ClassVar[float] = 0.0  # how long preprocess takes (a sleep: the same on a busy machine)

    def __init__(self, folder: str | None = None) -> None:
        self.folder = folder

    def preprocess(self, input_list: list[_HostIn]) -> dict[str, Any]:
        time.sleep(self.seconds)
        if any("POISON-PRE" in r.text for r in input_list):
            raise ValueError("poison in preprocess")
        if any("KILL-HOST" in r.text for r in input_list):
            import multiprocessing

            if multiprocessing.current_process().name.startswith("modalkit-host"):
                if self.folder is not None:  # say so, for the test
                    with open(os.path.join(self.folder, f"host-killed-{os.getpid()}"), "w"):
                        pass
                os._exit(139)  # as a crash in a tokenizer's native code would, in a host process only
            raise ValueError("KILL-HOST preprocessed outside a host process")
        x = np.zeros((len(input_list), 8192), dtype=np.float32)
        x[:, 0] = [len(r.text) for r in input_list]
        return {"x": x, "pid": os.getpid()}


class HostFed(InferencePipeline):
    """A pipeline that runs its preprocess in host processes (``host_stages``) and waits on a 'device' in predict
    (a sleep, the interpreter free), so that a worker overlaps its stages. ``POISON-PREDICT`` raises in predict."""

    input_model = _HostIn
    output_model = _HostOut
    device_seconds: ClassVar[float] = 0.005

    def preprocess(self, input_list: list[_HostIn]) -> dict[str, Any]:
        return HostTokens().preprocess(input_list)

    def predict(self, input_list: list[_HostIn], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        time.sleep(self.device_seconds)
        if any("POISON-PREDICT" in r.text for r in input_list):
            raise ValueError("poison in predict")
        x = preprocessed_data["x"]
        return {"length": x[:, 0].astype(int).tolist(), "pid": preprocessed_data["pid"]}

    def postprocess(self, input_list: list[_HostIn], raw_output: dict[str, Any]) -> list[_HostOut]:
        return [_HostOut(length=n, preprocessed_by=raw_output["pid"]) for n in raw_output["length"]]

    def host_stages(self) -> HostTokens:
        return HostTokens()


class SlowHostTokens(HostTokens):
    seconds = 0.02


class HostBound(HostFed):
    """:class:`HostFed` whose preprocess costs as much as its predict: a worker gains from host processes (twice as
    fast with two), so its probe always chooses to overlap."""

    device_seconds = 0.02

    def preprocess(self, input_list: list[_HostIn]) -> dict[str, Any]:
        return SlowHostTokens().preprocess(input_list)

    def host_stages(self) -> HostTokens:
        os.makedirs(self.all_model_data_folder, exist_ok=True)
        return SlowHostTokens(self.all_model_data_folder)
