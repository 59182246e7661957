"""The pipelined chunk executor (``job_config.prefetch_batches``): the same bytes as one sub-batch after another,
per-record isolation while the other sub-batches flow, predict on the calling thread, Ctrl-C, bounded memory, and
stage timings that add up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pipelines import PoisonAwareSentiment
from pydantic import BaseModel
from support import interrupt

from modalkit.batch.chunk import ChunkProcessor
from modalkit.batch.planning import list_dataset, plan_chunks
from modalkit.inference_pipeline import InferencePipeline
from modalkit.iomodel import ChunkResult, ChunkSpec, InferenceOutputModel, JobSpec
from modalkit.task_queue import MemoryBackend

JOB_ID = "job0123456789abc"
ROOT = Path(__file__).resolve().parents[2]


def jsonl(*records: Any) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def make_job(tmp_path: Path, out: str, **kwargs: Any) -> JobSpec:
    return JobSpec(job_id=JOB_ID, input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / out), model_name="m",
                   **kwargs)  # fmt: skip


def one_chunk(tmp_path: Path, files: dict[str, bytes]) -> ChunkSpec:
    for name, data in files.items():
        path = tmp_path / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (chunk,) = plan_chunks(list_dataset(str(tmp_path / "in")), 10**9, JOB_ID)
    return chunk


def outputs(out: Path) -> dict[str, bytes]:
    """Every file of a job's output but the marker's timings, by path."""
    found = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.parent.name == "_chunks":
                marker = json.loads(data)
                for timing in ("started_at", "seconds", "stages"):
                    marker.pop(timing)
                data = json.dumps(marker, sort_keys=True).replace(str(out), "OUT").encode()
            found[str(path.relative_to(out))] = data
    return found


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory: pytest.TempPathFactory) -> PoisonAwareSentiment:
    return PoisonAwareSentiment("sentiment", str(tmp_path_factory.mktemp("models")), {})


TEXTS = ["great value, works well", "terrible, broke in a day", "it is fine", "love it", "never again"]


# --- 1. the same bytes, in the same order --------------------------------------------------------------------


@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
def test_overlapped_stages_write_the_same_bytes_and_queue_records_as_one_sub_batch_after_another(
    tmp_path: Path, sentiment: PoisonAwareSentiment, output_format: str
) -> None:
    a = [{"id": f"a{i}", "text": TEXTS[i % 5]} for i in range(40)]
    a[5]["text"] = "POISON-PRE here"
    a[13]["text"] = "POISON-PREDICT here"
    a[22]["text"] = "POISON-POST here"
    a[30] = {"id": "a30", "text": ""}  # invalid: min_length
    lines = [json.dumps(r).encode() for r in a]
    lines[17] = b'{"id": "a17", "text": '  # not JSON
    b = [{"id": f"b{i}", "text": TEXTS[i % 3]} for i in range(7)]
    b[2]["text"] = "POISON-PREDICT too"
    csv = b"id,text\n" + b"".join(f'c{i},"{TEXTS[i % 4]}"\n'.encode() for i in range(9))
    chunk = one_chunk(tmp_path, {"a.jsonl": jsonl(*lines), "b.jsonl": jsonl(*b), "c.csv": csv})
    assert len(chunk.pieces()) == 3  # a packed chunk: sub-batches span files

    results: dict[int, ChunkResult] = {}
    queues: dict[int, dict[str, list[str]]] = {}
    for depth in (0, 2):
        backend = MemoryBackend()
        job = make_job(tmp_path, f"out{depth}", max_batch_size=4, prefetch_batches=depth, output_format=output_format,
                       success_queue="ok", failure_queue="bad")  # fmt: skip
        processor = ChunkProcessor(sentiment, backend, overlap=True)
        results[depth] = processor.process(job, chunk)
        queues[depth] = {q: backend.messages(q) for q in ("ok", "bad")}
        assert bool(processor.last_threads) == (depth > 0)  # the stages did overlap at depth 2

    assert (results[2].records, results[2].succeeded, results[2].failed) == (56, 50, 6)
    assert outputs(tmp_path / "out2") == outputs(tmp_path / "out0")
    assert queues[2] == queues[0]
    stages = ["preprocess", "predict", "parse", "postprocess", "validate", "predict"]  # a5, a13, a17, a22, a30, b2
    assert [json.loads(m)["stage"] for m in queues[2]["bad"]] == stages
    assert results[2].errors_by_type == results[0].errors_by_type
    assert results[2].error_examples == results[0].error_examples


# --- 2. a poison record in a prefetched sub-batch fails alone --------------------------------------------------


class _Text(BaseModel):
    text: str


class _Out(InferenceOutputModel):
    upper: str


class StageThreads(InferencePipeline):
    """Upper-cases texts; a text holding "PRE", "PREDICT" or "POST" makes that stage raise for its whole batch.
    Records which thread ran each stage, and when each stage of each batch began (batches by their first text)."""

    input_model = _Text
    output_model = _Out
    predict_seconds = 0.0

    def __init__(self) -> None:
        super().__init__("threads", "models", {})
        self.threads: dict[str, set[int]] = {"preprocess": set(), "predict": set(), "postprocess": set()}
        self.began: list[tuple[str, str, int]] = []

    def _note(self, stage: str, batch: list[_Text]) -> None:
        self.threads[stage].add(threading.get_ident())
        self.began.append((stage, batch[0].text, len(batch)))

    def preprocess(self, input_list: list[_Text]) -> dict[str, Any]:
        self._note("preprocess", input_list)
        if any(t.text.startswith("PRE ") for t in input_list):
            raise ValueError("cannot preprocess PRE")
        return {"texts": [t.text for t in input_list]}

    def predict(self, input_list: list[_Text], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        self._note("predict", input_list)
        time.sleep(self.predict_seconds)
        if any(t.text.startswith("PREDICT ") for t in input_list):
            raise ArithmeticError("cannot predict PREDICT")
        return {"upper": [t.upper() for t in preprocessed_data["texts"]]}

    def postprocess(self, input_list: list[_Text], raw_output: dict[str, Any]) -> list[_Out]:
        self._note("postprocess", input_list)
        if any(t.text.startswith("POST ") for t in input_list):
            raise KeyError("cannot postprocess POST")
        return [_Out(upper=u) for u in raw_output["upper"]]


class SlowStageThreads(StageThreads):
    predict_seconds = 0.05


class DeviceTokens(StageThreads):
    device_stages = ("preprocess", "predict")


def test_a_poison_record_in_a_prefetched_sub_batch_fails_alone_while_the_next_ones_flow(tmp_path: Path) -> None:
    texts = [f"t{i}" for i in range(40)]
    texts[13] = "PRE t13"  # sub-batch 3 (of 10 of 4): preprocessed ahead, while sub-batch 2 is on the device
    chunk = one_chunk(tmp_path, {"a.jsonl": jsonl(*({"text": t} for t in texts))})
    pipeline = SlowStageThreads()
    job = make_job(tmp_path, "out", max_batch_size=4, prefetch_batches=2)
    result = ChunkProcessor(pipeline, overlap=True).process(job, chunk)

    assert (result.records, result.succeeded, result.failed) == (40, 39, 1)
    (failure,) = [json.loads(line) for line in (tmp_path / "out" / "_failures" / "part-00000.jsonl").read_bytes()
                  .splitlines()]  # fmt: skip
    assert (failure["input"]["text"], failure["stage"], failure["error_type"]) == ("PRE t13", "preprocess",
                                                                                  "ValueError")  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "out" / "part-00000.jsonl").read_bytes().splitlines()]
    assert [r["upper"] for r in rows] == [t.upper() for t in texts if t != "PRE t13"]  # in input order
    # the sub-batch after it (t16..t19) was preprocessed before its records (t12..t15) were tried again in halves
    began = [(first, size) for stage, first, size in pipeline.began if stage == "preprocess"]
    assert began.index(("t12", 4)) < began.index(("t16", 4)) < began.index(("t12", 2))


# --- 3. predict on the thread that loaded the model --------------------------------------------------------------


@pytest.mark.parametrize(
    ("pipeline_cls", "on_caller"), [(StageThreads, {"predict"}), (DeviceTokens, {"preprocess", "predict"})]
)
def test_predict_and_the_device_stages_run_on_the_thread_that_called_process_and_the_rest_on_helpers(
    tmp_path: Path, pipeline_cls: type[StageThreads], on_caller: set[str]
) -> None:
    texts = [f"t{i}" for i in range(30)]
    texts[6], texts[11], texts[21] = "PRE 6", "PREDICT 11", "POST 21"  # each split and retried: where predict may run
    chunk = one_chunk(tmp_path, {"a.jsonl": jsonl(*({"text": t} for t in texts))})
    pipeline = pipeline_cls()
    result = ChunkProcessor(pipeline, overlap=True).process(
        make_job(tmp_path, "out", max_batch_size=4, prefetch_batches=2), chunk
    )

    assert (result.succeeded, result.failed) == (27, 3)
    me = threading.get_ident()
    for stage, idents in pipeline.threads.items():
        if stage in on_caller:
            assert idents == {me}, stage
        else:
            assert me in idents, stage  # the retries of the failed sub-batches
            assert len(idents) == 2, stage  # and one helper thread for the rest


# --- 4. Ctrl-C ---------------------------------------------------------------------------------------------------

_INTERRUPTED = """
import sys, time
from pathlib import Path
from pydantic import BaseModel
from modalkit.batch.chunk import ChunkProcessor
from modalkit.batch.planning import list_dataset, plan_chunks
from modalkit.inference_pipeline import InferencePipeline
from modalkit.iomodel import InferenceOutputModel, JobSpec

slow, base = sys.argv[1], Path(sys.argv[2])

class In(BaseModel):
    text: str

class Out(InferenceOutputModel):
    n: int

class Slow(InferencePipeline):
    input_model, output_model = In, Out
    def preprocess(self, input_list):
        time.sleep(0.5 if slow == "preprocess" else 0)
        return {}
    def predict(self, input_list, preprocessed_data):
        (base / "started").touch()
        time.sleep(0.5 if slow == "predict" else 0)
        return {}
    def postprocess(self, input_list, raw_output):
        time.sleep(0.5 if slow == "postprocess" else 0)
        return [Out(n=len(i.text)) for i in input_list]

(chunk,) = plan_chunks(list_dataset(str(base / "in")), 10**9, "job")
job = JobSpec(job_id="job", input_uri=str(base / "in"), output_uri=str(base / "out"), model_name="m",
              max_batch_size=2, prefetch_batches=2)
ChunkProcessor(Slow("slow", "models", {}), overlap=True).process(job, chunk)
"""


@pytest.mark.parametrize("slow", ["preprocess", "predict", "postprocess"])
def test_ctrl_c_stops_a_long_overlapped_chunk_within_a_second_or_two(tmp_path: Path, slow: str) -> None:
    one_chunk(tmp_path, {"a.jsonl": jsonl(*({"text": f"t{i}"} for i in range(2000)))})  # minutes of work
    script = tmp_path / "interrupted.py"
    script.write_text(textwrap.dedent(_INTERRUPTED), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), slow, str(tmp_path)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # the helpers busy too
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    stderr, stopped = interrupt(proc)
    assert proc.returncode != 0
    assert b"KeyboardInterrupt" in stderr
    assert stopped < 2.0  # a stage already running (0.5 s here) finishes; nothing after it starts
    assert not (tmp_path / "out" / "_chunks").exists()  # nothing committed


# --- 5. memory stays flat -----------------------------------------------------------------------------------------


class _Big(BaseModel):
    """An input record that counts how many of its kind are alive, and the most there ever were."""

    text: str
    live: ClassVar[int] = 0
    peak: ClassVar[int] = 0
    lock: ClassVar[threading.Lock] = threading.Lock()

    def model_post_init(self, context: Any) -> None:
        with _Big.lock:
            _Big.live += 1
            _Big.peak = max(_Big.peak, _Big.live)
        weakref.finalize(self, _Big._gone)

    @staticmethod
    def _gone() -> None:
        with _Big.lock:
            _Big.live -= 1


class _Size(InferenceOutputModel):
    size: int


class BigRecords(InferencePipeline):
    """Large records; the device is slow, so the feeder runs as far ahead as it may."""

    input_model = _Big
    output_model = _Size

    def preprocess(self, input_list: list[_Big]) -> dict[str, Any]:
        return {}

    def predict(self, input_list: list[_Big], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.01)
        return {}

    def postprocess(self, input_list: list[_Big], raw_output: dict[str, Any]) -> list[_Size]:
        return [_Size(size=len(r.text)) for r in input_list]


@pytest.mark.parametrize("depth", [1, 3])
def test_a_chunk_of_large_records_at_prefetch_depth_n_holds_at_most_n_plus_2_sub_batches(
    tmp_path: Path, depth: int
) -> None:
    big = "x" * 100_000
    chunk = one_chunk(tmp_path, {"big.jsonl": jsonl(*({"text": big} for _ in range(30 * 8)))})  # 30 sub-batches
    _Big.live = _Big.peak = 0
    result = ChunkProcessor(BigRecords("big", "models", {}), overlap=True).process(
        make_job(tmp_path, "out", max_batch_size=8, prefetch_batches=depth), chunk
    )
    assert result.succeeded == 240
    assert _Big.peak <= (depth + 2) * 8  # ~0.8 MB a sub-batch: flat however long the chunk
    assert _Big.peak > depth * 8  # and it did read ahead


# --- 6. stage timings ----------------------------------------------------------------------------------------------


class Timed(InferencePipeline):
    """Each stage takes a known time per batch (sleeping, as a device or an I/O-bound step does)."""

    input_model = _Text
    output_model = _Out

    def preprocess(self, input_list: list[_Text]) -> dict[str, Any]:
        time.sleep(0.004)
        return {}

    def predict(self, input_list: list[_Text], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.010)
        return {}

    def postprocess(self, input_list: list[_Text], raw_output: dict[str, Any]) -> list[_Out]:
        time.sleep(0.004)
        return [_Out(upper=t.text.upper()) for t in input_list]


def test_stage_timings_add_up_to_the_chunk_wall_and_show_the_device_busier_with_overlap(tmp_path: Path) -> None:
    chunk = one_chunk(tmp_path, {"a.jsonl": jsonl(*({"text": f"t{i}"} for i in range(30 * 8)))})  # 30 sub-batches
    processor = ChunkProcessor(Timed("timed", "models", {}), overlap=True)
    results = {}
    for depth in (0, 2):
        results[depth] = processor.process(make_job(tmp_path, f"out{depth}", max_batch_size=8,
                                                    prefetch_batches=depth), chunk)  # fmt: skip
        threads = processor.last_threads
        if depth == 0:
            assert threads == {}
        else:  # each thread: its work plus its waiting for the others is its life, which is the chunk's at most
            assert set(threads) == {"feeder", "device", "finisher"}
            for name, spent in threads.items():
                assert abs(spent.busy + spent.waiting - spent.alive) <= max(0.1 * spent.alive, 0.02), name
                assert spent.alive <= results[depth].seconds + 0.001, name

    sequential, overlapped = results[0], results[2]
    assert sequential.stages is not None
    assert overlapped.stages is not None
    for stages in (sequential.stages, overlapped.stages):
        assert 0.30 <= stages.predict < 0.6  # 30 x 10 ms
        assert 0.12 <= stages.preprocess < 0.4  # 30 x 4 ms
        assert 0.12 <= stages.postprocess < 0.4
        assert min(stages.read, stages.parse, stages.write) > 0
        assert stages.queue < 0.005  # no queue named
    work = sequential.stages.model_dump(exclude={"device_busy"})
    assert abs(sum(work.values()) - sequential.seconds) <= max(0.1 * sequential.seconds, 0.02)
    assert sequential.stages.device_busy == pytest.approx(sequential.stages.predict / sequential.seconds, abs=0.01)
    # overlapped, the device waits for no host stage: busier, and the chunk shorter
    assert overlapped.stages.device_busy > sequential.stages.device_busy + 0.15
    assert overlapped.seconds < sequential.seconds


# --- 7. overlap only where it pays -------------------------------------------------------------------------------


def _spin(seconds: float) -> None:
    """Work that holds the interpreter (pure Python), as a model computed on the CPU in Python does."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class DeviceBound(InferencePipeline):
    """Host work in preprocess (holding the interpreter), predict waiting on a device (the GIL released)."""

    input_model = _Text
    output_model = _Out

    def preprocess(self, input_list: list[_Text]) -> dict[str, Any]:
        _spin(0.004)
        return {}

    def predict(self, input_list: list[_Text], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.005)
        return {}

    def postprocess(self, input_list: list[_Text], raw_output: dict[str, Any]) -> list[_Out]:
        return [_Out(upper=t.text.upper()) for t in input_list]


class HostBound(DeviceBound):
    """predict computed in Python on this CPU: it holds the interpreter the whole time, so nothing can overlap it."""

    def preprocess(self, input_list: list[_Text]) -> dict[str, Any]:
        return {}

    def predict(self, input_list: list[_Text], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        _spin(0.008)
        return {}


@pytest.mark.parametrize(("pipeline", "overlaps"), [(DeviceBound, True), (HostBound, False)])
def test_a_worker_overlaps_the_stages_only_of_a_pipeline_whose_predict_waits_on_a_device(
    tmp_path: Path, pipeline: type[InferencePipeline], overlaps: bool
) -> None:
    chunk = one_chunk(tmp_path, {"a.jsonl": jsonl(*({"text": f"t{i}"} for i in range(60 * 4)))})  # 60 sub-batches
    processor = ChunkProcessor(pipeline("p", "models", {}))  # the default: measured on the first chunk

    result = processor.process(make_job(tmp_path, "out", max_batch_size=4, prefetch_batches=2), chunk)

    assert processor.learned_overlap is overlaps
    assert result.succeeded == 240
    assert bool(processor.last_threads) is True  # it ran overlapped at least while it measured


class DeviceBoundSeen(DeviceBound):
    """DeviceBound, noting the thread that preprocesses each sub-batch (the calling thread runs them one after
    another; the feeder thread runs them overlapped)."""

    threads: ClassVar[list[str]] = []

    def preprocess(self, input_list: list[_Text]) -> dict[str, Any]:
        self.threads.append(threading.current_thread().name)
        return super().preprocess(input_list)


def test_a_predict_that_waits_on_a_device_is_overlapped_after_four_sub_batches_one_after_another(
    tmp_path: Path,
) -> None:
    """Its ``predict`` takes almost no CPU of the process while it runs: the device, not the host, is what it waits
    on, so the worker need not also time 24 sub-batches each way (a probe the device idled through)."""
    DeviceBoundSeen.threads.clear()
    chunk = one_chunk(tmp_path, {"a.jsonl": jsonl(*({"text": f"t{i}"} for i in range(60 * 4)))})  # 60 sub-batches
    processor = ChunkProcessor(DeviceBoundSeen("p", "models", {}))

    result = processor.process(make_job(tmp_path, "out", max_batch_size=4, prefetch_batches=2), chunk)

    assert processor.learned_overlap is True
    assert result.succeeded == 240
    here = threading.current_thread().name
    assert DeviceBoundSeen.threads[:4] == [here] * 4
    assert here not in DeviceBoundSeen.threads[4:]
    assert len(DeviceBoundSeen.threads) == 60


class HostBoundSeen(HostBound):
    """HostBound, noting the thread that preprocesses each sub-batch."""

    threads: ClassVar[list[str]] = []

    def preprocess(self, input_list: list[_Text]) -> dict[str, Any]:
        self.threads.append(threading.current_thread().name)
        return {}


def test_a_predict_that_keeps_the_workers_cpu_busy_runs_every_sub_batch_one_after_another_without_timing_overlap(
    tmp_path: Path,
) -> None:
    """A worker with one CPU (two workers on two cores) whose ``predict`` keeps it busy has no CPU to overlap the
    host's stages on: its first 4 sub-batches show it, and no sub-batch runs overlapped to measure what would only
    be slower (W1 on two workers: both chose overlap by timing, and the job ran 20% slower)."""
    HostBoundSeen.threads.clear()
    chunk = one_chunk(tmp_path, {"a.jsonl": jsonl(*({"text": f"t{i}"} for i in range(60 * 4)))})  # 60 sub-batches
    processor = ChunkProcessor(HostBoundSeen("p", "models", {}), cpus=1.0)

    result = processor.process(make_job(tmp_path, "out", max_batch_size=4, prefetch_batches=2), chunk)

    assert processor.learned_overlap is False
    assert result.succeeded == 240
    assert HostBoundSeen.threads == [threading.current_thread().name] * 60
    assert processor.last_threads == {}  # no thread of an overlapped run
