"""What a job will take before it runs (``modalkit estimate``): a calibration sample through the real chunk engine
here, and the whole job's wall time and cost modelled from it.

1. **Plan** the input as the job would (:func:`~modalkit.batch.job.plan_job`: the same checks, listing and
   chunks; nothing is read but headers and footers). Planning counts bytes, not records.
2. **Sample**: about ``sample`` records in a few windows (:data:`SAMPLE_WINDOWS`) spread over the input by bytes
   (a byte range of a large file, or consecutive small files packed as the job packs them), each cut by the input
   format's own planner. A whole CSV file (without ``split_csv``), a compressed file or a Parquet row group
   cannot be cut smaller, so such a window may hold more records. An input no larger than the sample is run whole.
3. **Calibrate**: each window is a chunk run by :class:`~modalkit.batch.chunk.ChunkProcessor` with the pipeline
   loaded here, into a temporary output that is removed afterwards; no queue record is sent. Each window runs
   twice, its stages one after another and overlapped, as a worker's first chunk probes both; the job is modelled
   the way the job would choose (overlap when ``predict`` waits on a device, the process's CPU mostly idle while
   it runs, else when overlap is at least ``OVERLAP_GAIN`` faster). From the engine's
   :class:`~modalkit.iomodel.StageSeconds` come the seconds per record of each stage, the bottleneck
   (:func:`~modalkit.batch.timings.find_bottleneck`) and the bytes per record.
4. **Model** the job: records = the plan's bytes / the sample's bytes per record (an estimate, not a count,
   unless the sample was the whole input); each planned chunk takes its records times the seconds per record
   (overlapped: the busiest thread's, which is what bounds it once the threads are full) plus the per-chunk cost
   measured; the chunks go largest first to as many lanes as the job has workers (local: its worker count, not
   more than its chunks; Modal: ``--max-containers``) and no faster than this machine's cores run them; a worker
   starts first (local: a process start and the model load, both measured here; Modal: a cold start, assumed,
   and the model load measured here). Cost is the billed seconds times :func:`~modalkit.batch.cost.rate_for`'s
   rate (one worker's or one container's): for ``local`` the job's wall times its workers (they hold their share
   of the machine throughout), for ``modal`` every container's seconds from its start to its last chunk.

Example:
    >>> from modalkit.settings import Settings
    >>> found = estimate_job(Settings.load(), "data/", None, JobConfig(), sample=5000)  # doctest: +SKIP
    >>> found.summary()  # doctest: +SKIP
    {'records': 200123, 'seconds': 21.4, 'cost_usd': 0.0, 'cost_per_1000': 0.0, 'bottleneck': 'host', ...}
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import heapq
import multiprocessing
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from modalkit.batch.chunk import (
    OVERLAP_GAIN,
    PROBE_BATCHES,
    WAIT_PROBE_BATCHES,
    ChunkProcessor,
    overlap_from_cpu,
)
from modalkit.batch.cost import rate_for
from modalkit.batch.formats import InputFile
from modalkit.batch.job import JobPlan, dispatch_order, plan_job
from modalkit.batch.planning import list_dataset, plan_chunks
from modalkit.batch.sampling import first_records
from modalkit.batch.storage import Store, default_store
from modalkit.batch.timings import STAGES, Bottleneck, find_bottleneck
from modalkit.exceptions import ConfigError
from modalkit.inference_pipeline import load_pipeline
from modalkit.iomodel import ChunkResult, ChunkSpec, JobSpec, StageSeconds
from modalkit.settings import JobConfig, Settings
from modalkit.spawn_guard import spawning

__all__ = [
    "DEFAULT_SAMPLE",
    "MODAL_COLD_START_S",
    "SAMPLE_WINDOWS",
    "Calibration",
    "EmptyInput",
    "Estimate",
    "JobModel",
    "ModeRun",
    "Sample",
    "calibrate",
    "estimate_job",
    "model_job",
    "sample_windows",
]

#: Records in the calibration sample unless ``--sample`` says.
DEFAULT_SAMPLE = 5000
#: Windows the sample is spread over (fewer when the input has less to spread over).
SAMPLE_WINDOWS = 4
#: A Modal container's start before its model loads (image pulled, Python started): assumed, not measured.
MODAL_COLD_START_S = 10.0
#: Bytes per record assumed to size the windows when the input's head does not tell (Parquet positions are rows).
GUESSED_RECORD_BYTES = 200


class EmptyInput(ConfigError):
    """The input holds no records: there is nothing to estimate."""


@dataclass(frozen=True)
class ModeRun:
    """The sample's windows run one way (overlapped or not): their results and what the process spent."""

    results: list[ChunkResult]
    cpu_seconds: float
    #: overlapped only: the busiest thread's seconds, summed over the windows (what bounds a full pipeline)
    busiest_seconds: float = 0.0
    #: one after another only: the process's CPU seconds while ``predict`` ran
    predict_cpu: float = 0.0

    @property
    def records(self) -> int:
        return sum(r.records for r in self.results)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.results)

    @property
    def stage_seconds(self) -> float:
        return sum(sum(getattr(r.stages, s) for s in STAGES) for r in self.results if r.stages is not None)

    def stages(self) -> StageSeconds:
        totals = {s: sum(getattr(r.stages, s) for r in self.results if r.stages is not None) for s in STAGES}
        seconds = self.seconds
        return StageSeconds(**totals, device_busy=min(1.0, totals["predict"] / seconds) if seconds > 0 else 0.0)

    def predict_cpu_share(self) -> float | None:
        """The process's CPU seconds over ``predict``'s wall (one after another): under one half, ``predict``
        waits on a device (:func:`~modalkit.batch.chunk.overlap_from_cpu`)."""
        predict = sum(r.stages.predict for r in self.results if r.stages is not None)
        return self.predict_cpu / predict if predict > 0 else None

    def rate(self) -> float:
        """Records per second of the windows' walls."""
        return self.records / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Calibration:
    """What the sample measured here.

    Attributes:
        sample: The windows run, and the bytes of the input each stands for.
        sequential, overlapped: The windows run each way (``overlapped`` None when ``prefetch_batches`` is 0).
        overlap: The way the job would run its chunks: overlapped when ``predict`` waits on a device, else the
            faster by ``OVERLAP_GAIN``.
        load_seconds: The pipeline's constructor, in a calibration process.
        start_seconds: A calibration process's spawn to its pipeline loaded (a local worker's start).
        batch_size: The job's ``max_batch_size`` (a worker's first chunk probes in sub-batches of it).
        processes: How many processes ran the sample side by side (each ran all of it).
        cpus: The CPUs each of the job's workers has to itself (None: not known).
    """

    sample: Sample
    sequential: ModeRun
    overlapped: ModeRun | None
    overlap: bool
    load_seconds: float
    start_seconds: float
    batch_size: int
    processes: int = 1
    cpus: float | None = None

    @property
    def early(self) -> bool | None:
        """What a worker's first chunk decides from ``predict``'s CPU share after ``WAIT_PROBE_BATCHES``
        sub-batches, without timing both ways (:func:`~modalkit.batch.chunk.overlap_from_cpu`); None when it
        times both ways, or never overlaps (``prefetch_batches`` 0)."""
        if self.overlapped is None:
            return None
        return overlap_from_cpu(self.sequential.predict_cpu_share(), self.cpus)

    @property
    def waits(self) -> bool:
        """``predict`` waits on a device: the first chunk overlaps after ``WAIT_PROBE_BATCHES`` sub-batches."""
        return self.early is True

    @property
    def busy_cpus(self) -> bool:
        """``predict`` keeps a worker's CPUs busy: the first chunk runs one after another from the start."""
        return self.early is False

    @property
    def chosen(self) -> ModeRun:
        return self.overlapped if self.overlap and self.overlapped is not None else self.sequential

    @property
    def records(self) -> int:
        """The sample's records (each process ran all of them)."""
        return self.sequential.records // self.processes

    @property
    def windows(self) -> list[ChunkSpec]:
        return self.sample.windows

    @property
    def whole_input(self) -> bool:
        """The sample was the whole input: its records are a count, not an estimate."""
        return self.sample.whole

    @property
    def bytes(self) -> int:
        return sum(w.size for w in self.windows)

    def input_records(self) -> int:
        """The input's records: counted when the sample was the whole input, else each window's records per byte
        times the bytes it stands for."""
        if self.whole_input:
            return self.records
        per_window = [0] * len(self.windows)
        for result in self.sequential.results:
            per_window[result.index] += result.records
        return round(sum(share * records / self.processes / window.size
                         for share, records, window in zip(self.sample.shares, per_window, self.windows, strict=True)
                         if window.size))  # fmt: skip

    def record_seconds(self, overlap: bool) -> float:
        """Seconds a record adds to its chunk's wall, one way or the other (the per-chunk cost apart)."""
        run = self.overlapped if overlap and self.overlapped is not None else self.sequential
        if run.records == 0:
            return 0.0
        work = run.busiest_seconds if run is self.overlapped else min(run.seconds, run.stage_seconds)
        return work / run.records

    def chunk_seconds(self) -> float:
        """What a chunk costs whatever its records (files opened, its commit): the windows' walls beyond their
        stages, run one after another, per window."""
        run = self.sequential
        return max(0.0, run.seconds - run.stage_seconds) / max(1, len(run.results))

    def bottleneck(self) -> Bottleneck | None:
        """What bounds the job's chunks, the way it runs them: the device when it is busy most of the time a
        record takes (overlapped: of the busiest thread's time, which bounds the chunk once the threads are full;
        the sample's short windows spend more of their wall filling and draining them than a job's chunk does)."""
        run = self.chosen
        wall = run.busiest_seconds if run is self.overlapped else run.seconds
        stages = run.stages()
        busy = min(1.0, stages.predict / wall) if wall > 0 else 0.0
        return find_bottleneck(stages.model_copy(update={"device_busy": busy}), wall)

    def cpu_per_wall(self) -> float:
        """Cores one worker keeps busy, the way the job runs (process CPU over wall)."""
        run = self.chosen
        return run.cpu_seconds / run.seconds if run.seconds > 0 else 1.0


@dataclass(frozen=True)
class JobModel:
    """Where the whole job is to run: ``local`` with ``workers`` processes on ``cores`` cores, beside the job's own
    process (``orchestrator_cpu_s`` of CPU: importing Prefect, running the flow), or ``modal`` with ``workers``
    containers (of ``gpu``), ``cold_start_s`` before each loads its model."""

    backend: str
    workers: int
    cores: int
    gpu: str | None = None
    cold_start_s: float = 0.0
    orchestrator_cpu_s: float = 0.0


@dataclass(frozen=True)
class Estimate:
    """The whole job, modelled: records (estimated), wall seconds, cost, the bottleneck, the assumptions."""

    records: int
    seconds: float
    cost_usd: float
    usd_per_second: float
    billed_seconds: float
    bottleneck: Bottleneck | None
    sample_records: int
    chunks: int
    total_bytes: int
    model: JobModel
    calibration: Calibration
    plan_seconds: float
    start_seconds: float
    rate_source: str = ""
    assumptions: list[str] = field(default_factory=list)

    @property
    def cost_per_1000(self) -> float:
        return self.cost_usd / self.records * 1000 if self.records else 0.0

    def summary(self) -> dict[str, Any]:
        """The ``--json`` line: ``records``, ``seconds``, ``cost_usd``, ``cost_per_1000``, ``bottleneck`` (``device``
        or ``host``, as a job's summary says it) and ``sample_records``."""
        return {
            "records": self.records,
            "seconds": round(self.seconds, 1),
            "cost_usd": round(self.cost_usd, 6),
            "cost_per_1000": round(self.cost_per_1000, 6),
            "bottleneck": self.bottleneck.kind if self.bottleneck else None,
            "sample_records": self.sample_records,
        }


# --- the sample ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """The calibration sample: its windows (chunks; ``size`` is their planned bytes), the bytes of the input each
    one stands for (the input cut into equal stretches, one around each window), and whether they are the whole
    input."""

    windows: list[ChunkSpec]
    shares: list[float]
    whole: bool


def sample_windows(
    files: Sequence[InputFile], chunks: Sequence[ChunkSpec], sample: int, split_csv: bool, store: Store
) -> Sample:
    """About ``sample`` records of the input in up to :data:`SAMPLE_WINDOWS` windows spread over it by bytes, or
    the whole input (its planned chunks) when it is no larger than the sample.

    Each window is planned by the input's formats at the window's size: a byte range of a file larger than the
    window (the one holding the window's target byte), or the files from the target's on packed up to it. Each
    stands for an equal stretch of the input's bytes, however many bytes it holds itself (a whole CSV file may
    hold more than its share), so that records are estimated stretch by stretch."""
    total = sum(c.size for c in chunks)
    record_bytes = _head_record_bytes(chunks, store)
    wanted = sample * record_bytes
    if wanted >= total:
        return Sample(list(chunks), [float(c.size) for c in chunks], True)
    count = max(1, min(SAMPLE_WINDOWS, sample))
    window = max(1, wanted // count)
    starts = list(_cumulative(f.size for f in files))
    windows: list[ChunkSpec] = []
    shares: list[float] = []
    seen: dict[tuple[str, str], int] = {}
    for n in range(count):
        target = int(total * (n + 0.5) / count)
        at = min(len(files) - 1, bisect.bisect_right(starts, target) - 1)
        chunk = _window_at(files, at, target - starts[at], window, split_csv, store)
        if chunk is None:
            continue
        identity = (chunk.key, chunk.extent.model_dump_json())
        if identity in seen:  # two stretches met the same window: it stands for both
            shares[seen[identity]] += total / count
            continue
        seen[identity] = len(windows)
        windows.append(chunk.model_copy(update={"index": len(windows)}))
        shares.append(total / count)
    return Sample(windows, shares, False)


def _window_at(
    files: Sequence[InputFile], at: int, offset: int, window: int, split_csv: bool, store: Store
) -> ChunkSpec | None:
    """The window holding byte ``offset`` of file ``at``: its planned part there, or, for a file smaller than the
    window, the files from it on packed into one chunk as the job packs small files."""
    if files[at].size > window:  # cut into equal parts as near the window's size as the file allows
        size = -(-files[at].size // max(1, round(files[at].size / window)))
        parts = plan_chunks([files[at]], size, split_csv=split_csv, store=store)
        ends = list(_cumulative(p.size for p in parts))[1:]
        return parts[min(len(parts) - 1, bisect.bisect_right(ends, offset))] if parts else None
    group: list[InputFile] = []
    size = 0
    for f in files[at:]:
        if group and size + f.size > window:
            break
        group.append(f)
        size += f.size
    parts = plan_chunks(group, window, split_csv=split_csv, store=store)
    return parts[0] if parts else None


def _cumulative(sizes: Any) -> Any:
    total = 0
    yield 0
    for size in sizes:
        total += size
        yield total


def _head_record_bytes(chunks: Sequence[ChunkSpec], store: Store) -> int:
    """Bytes per record of the input's head (the first records of its first piece), to size the windows; a guess
    when positions are rows (Parquet) or the head holds fewer than two records."""
    head = next(iter(chunks[0].iter_pieces()))
    if head.format == "parquet":
        return GUESSED_RECORD_BYTES
    records = first_records(head, 200, store)
    if len(records) < 2:
        return max(1, head.size)
    return max(1, (records[-1].position - records[0].position) // (len(records) - 1))


# --- the calibration ----------------------------------------------------------------------------------------------


def calibrate(
    settings: Settings, job: JobSpec, sample: Sample, processes: int = 1, cpus: float | None = None
) -> Calibration:
    """Run ``sample``'s windows through the chunk engine in ``processes`` fresh worker processes at once (as many
    as the job runs side by side here: they share the cores as its workers will), each loading the pipeline and
    running every window one way and the other into a temporary output (removed), sending nothing; see the
    module's docstring.

    Raises:
        ConfigError: the pipeline failed to load, or a worker failed (its error, in one line).
    """
    scratch = tempfile.mkdtemp(prefix="modalkit-estimate-")
    try:
        job = job.model_copy(update={"output_uri": scratch, "success_queue": None, "failure_queue": None,
                                     "job_id": "estimate"})  # fmt: skip
        found = _in_workers(settings, job, sample.windows, max(1, processes))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    runs: dict[bool, list[_WindowRun]] = {}
    for child in found:
        for way, results in child.runs.items():
            runs.setdefault(way, []).extend(results)
    sequential = _mode_run(runs[False])
    overlapped = _mode_run(runs[True]) if True in runs else None
    early = overlap_from_cpu(sequential.predict_cpu_share(), cpus)  # as a worker's first chunk chooses
    if overlapped is None:
        overlap = False
    elif early is not None:
        overlap = early
    else:
        overlap = overlapped.rate() > sequential.rate() * OVERLAP_GAIN
    return Calibration(
        sample, sequential, overlapped, overlap, max(c.load_seconds for c in found),
        max(c.started_seconds for c in found), job.max_batch_size, len(found), cpus,
    )  # fmt: skip


#: one window run one way: its result, the process's CPU seconds, the busiest thread's seconds (overlapped), the
#: process's CPU seconds in ``predict`` (one after another)
_WindowRun = tuple[ChunkResult, float, float, float]


@dataclass(frozen=True)
class _ChildRuns:
    """What one calibration process measured: seconds from its spawn to its pipeline loaded, the load alone, and
    each way's windows (result, CPU seconds, busiest thread's seconds)."""

    started_seconds: float
    load_seconds: float
    runs: dict[bool, list[_WindowRun]]


#: How long a calibration process may take, its start and model load included.
CALIBRATION_TIMEOUT_S = 1800.0


def _in_workers(settings: Settings, job: JobSpec, windows: list[ChunkSpec], processes: int) -> list[_ChildRuns]:
    """The calibration run in ``processes`` spawned processes that start the windows together (a barrier after
    each has loaded the pipeline); their results, or the first one's error raised."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    results = context.Queue()
    spawned = time.time()
    children = [context.Process(target=_calibrate_child, args=(settings, job, windows, barrier, results, spawned),
                                daemon=True, name=f"modalkit-estimate-{n}") for n in range(processes)]  # fmt: skip
    with spawning():  # a Ctrl-C now neither cuts a start in half nor reaches the children: this process stops them
        for child in children:
            child.start()
    found: list[_ChildRuns] = []
    try:
        for _ in children:
            try:
                outcome = results.get(timeout=CALIBRATION_TIMEOUT_S)
            except queue.Empty:
                raise ConfigError(f"the calibration sample took over {CALIBRATION_TIMEOUT_S:.0f} s; "
                                  "try a smaller --sample") from None  # fmt: skip
            if isinstance(outcome, str):
                barrier.abort()
                raise ConfigError(outcome)
            found.append(outcome)
    finally:
        for child in children:  # stopped before every child answered (Ctrl-C, an error): not waited for
            child.join(timeout=5 if len(found) == len(children) else 0)
            if child.is_alive():
                child.terminate()
                child.join()
        results.close()
    return found


def _calibrate_child(
    settings: Settings, job: JobSpec, windows: list[ChunkSpec], barrier: Any, results: Any, spawned: float
) -> None:
    """In a calibration process: load the pipeline, wait for the others, run the first window both ways to warm up
    (a pipeline's and the engine's first sub-batches are slower: not kept), then each window both ways (the order
    alternates), and put what it measured (or its error) on ``results``."""
    try:
        began = time.perf_counter()
        pipeline = load_pipeline(settings, job.model_name)
        loaded = time.time()
        load_seconds = time.perf_counter() - began
        barrier.wait()
        store = default_store()
        ways = [False, True] if job.prefetch_batches else [False]
        runs: dict[bool, list[_WindowRun]] = {way: [] for way in ways}
        for n, window in enumerate([windows[0], *windows]):  # the first, twice: its first run warms up, unkept
            for way in ways if n % 2 == 0 else ways[::-1]:
                out = os.path.join(job.output_uri, f"{os.getpid()}-{n}-{'overlapped' if way else 'sequential'}")
                run = _run_window(pipeline, job.model_copy(update={"output_uri": out}), window, way, store)
                if n:
                    runs[way].append(run)
        results.put(_ChildRuns(loaded - spawned, load_seconds, runs))
    except threading.BrokenBarrierError:
        results.put("another calibration process failed")
    except Exception as exc:  # the user's pipeline: anything it raises is the answer
        results.put(f"the calibration sample failed: {type(exc).__name__}: {exc}")
        with contextlib.suppress(Exception):
            barrier.abort()


def _run_window(pipeline: Any, job: JobSpec, window: ChunkSpec, overlap: bool, store: Store) -> _WindowRun:
    """One window as one chunk; its result, the process's CPU seconds, the busiest thread's seconds, and the
    process's CPU seconds in ``predict`` (one after another)."""
    processor = ChunkProcessor(pipeline, None, store, overlap=overlap)
    cpu = time.process_time()
    result = processor.process(job, window)
    cpu = time.process_time() - cpu
    busiest = max((t.busy for t in processor.last_threads.values()), default=result.seconds)
    return result, cpu, busiest, processor.last_predict_cpu


def _mode_run(runs: list[_WindowRun]) -> ModeRun:
    return ModeRun([r for r, *_ in runs], sum(c for _, c, _, _ in runs), sum(b for _, _, b, _ in runs),
                   sum(p for *_, p in runs))  # fmt: skip


# --- the model ----------------------------------------------------------------------------------------------------


def model_job(
    plan: JobPlan, calibration: Calibration, model: JobModel, usd_per_second: float, plan_seconds: float
) -> Estimate:
    """The whole job's records, wall seconds and cost from the calibration (see the module's docstring)."""
    chunks = plan.chunks
    total = sum(c.size for c in chunks)
    records = calibration.input_records()
    per_byte = records / total if total else 0.0
    lanes = max(1, min(model.workers, len(chunks)))
    finish = _schedule(chunks, per_byte, calibration, lanes)
    makespan = max(finish, default=0.0)
    if model.backend == "local":  # the workers share this machine's cores with the job's own process
        busy = sum(finish) * calibration.cpu_per_wall() + model.orchestrator_cpu_s
        makespan = max(makespan, busy / max(1, model.cores))
    if model.backend == "local":  # the first worker starts while the job is planned
        start = calibration.start_seconds
        seconds = max(plan_seconds, start) + makespan
    else:
        start = model.cold_start_s + calibration.load_seconds
        seconds = plan_seconds + start + makespan
    # local: the job holds its workers' share of the machine for its whole wall; modal: each container is billed
    # from its start to its last chunk
    billed = seconds * model.workers if model.backend == "local" else sum(start + f for f in finish)
    bottleneck = calibration.bottleneck()
    return Estimate(
        records=records, seconds=seconds, cost_usd=billed * usd_per_second, usd_per_second=usd_per_second,
        billed_seconds=billed, bottleneck=bottleneck, sample_records=calibration.records, chunks=len(chunks),
        total_bytes=total, model=model, calibration=calibration, plan_seconds=plan_seconds, start_seconds=start,
    )  # fmt: skip


def _schedule(chunks: Sequence[ChunkSpec], per_byte: float, calibration: Calibration, lanes: int) -> list[float]:
    """Each lane's busy seconds: the chunks largest first, each to the lane free first; a lane's first chunk
    runs ``WAIT_PROBE_BATCHES`` sub-batches one after another when ``predict`` waits on a device, else probes both
    ways for ``PROBE_BATCHES`` sub-batches each, before it runs the chosen way, as a worker does."""
    if calibration.overlapped is None:
        probe = 0
    elif calibration.early is not None:
        probe = WAIT_PROBE_BATCHES * calibration.batch_size
    else:
        probe = 2 * PROBE_BATCHES * calibration.batch_size
    free = [(0.0, lane) for lane in range(lanes)]
    busy = [0.0] * lanes
    started = [False] * lanes
    chosen = calibration.record_seconds(calibration.overlap)
    for chunk in dispatch_order(chunks):
        at, lane = heapq.heappop(free)
        records = chunk.size * per_byte
        took = calibration.chunk_seconds() + records * chosen
        if not started[lane] and calibration.early is not None:  # these one after another
            took += min(records, probe) * (calibration.record_seconds(False) - chosen)
        elif not started[lane] and probe:
            probed = min(records, probe) / 2
            took += probed * (calibration.record_seconds(False) + calibration.record_seconds(True) - 2 * chosen)
        started[lane] = True
        busy[lane] += took
        heapq.heappush(free, (at + took, lane))
    return busy


# --- the whole -----------------------------------------------------------------------------------------------------


def estimate_job(
    settings: Settings,
    input_uri: str,
    model_name: str | None,
    config: JobConfig,
    *,
    sample: int = DEFAULT_SAMPLE,
    gpu: str | None = None,
    max_containers: int | None = None,
    orchestrator_cpu: Callable[[], float] | None = None,
    store: Store | None = None,
    modal_slots: int | None = None,
) -> Estimate:
    """Plan ``input_uri`` as a job would, run a calibration sample of about ``sample`` records here, and model the
    whole job on ``config.backend`` (``gpu`` and ``max_containers`` for ``modal``). ``orchestrator_cpu`` measures
    the CPU seconds the job's own process spends beside local workers (the caller's: the library never imports
    Prefect); it is called only when the job's workers fill this machine's cores. ``modal_slots``: the containers
    of a Modal job when neither ``max_containers``, ``job_config.concurrency`` nor ``deployment_config.max_containers``
    says (the caller passes the Modal runner's default: the engine imports no runner; None: one).

    Raises:
        EmptyInput: the input holds no records.
        ConfigError, StorageError, QueueError: what the job itself would refuse to start with.
    """
    store = store or default_store()
    began = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="modalkit-estimate-plan-")
    try:  # the job's own checks and plan, into an output that is never written
        plan = plan_job(settings, input_uri, scratch, model_name, config.model_copy(update={"backend": "local"}),
                        store)  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    files = list_dataset(plan.job.input_uri, store=store)
    plan_seconds = time.perf_counter() - began
    if not plan.chunks or not sum(c.size for c in plan.chunks):
        raise EmptyInput(f"input {input_uri} holds no records (its files are empty): there is nothing to estimate")
    windows = sample_windows(files, plan.chunks, sample, config.split_csv, store)
    model = _job_model(settings, config, gpu, max_containers, modal_slots)
    rate = rate_for(settings, model.backend, gpu)  # an unknown GPU type fails before the sample runs
    side_by_side = min(model.workers, model.cores, len(plan.chunks)) if model.backend == "local" else 1
    if model.backend == "local" and side_by_side >= model.cores and orchestrator_cpu is not None:
        model = dataclasses.replace(model, orchestrator_cpu_s=orchestrator_cpu())
    cpus = model.cores / model.workers if model.backend == "local" else settings.app_settings.deployment_config.cpu
    calibration = calibrate(settings, plan.job, windows, side_by_side, cpus)
    if calibration.records == 0:
        raise EmptyInput(f"input {input_uri} holds no records in its sample: there is nothing to estimate")
    found = model_job(plan, calibration, model, rate.usd_per_second, plan_seconds)
    return _with_assumptions(found, rate.source, plan, sample)


def _job_model(
    settings: Settings, config: JobConfig, gpu: str | None, max_containers: int | None, modal_slots: int | None
) -> JobModel:
    cores = _cores()
    if config.backend == "modal":
        deployment = settings.app_settings.deployment_config
        containers = max_containers or config.concurrency or deployment.max_containers or modal_slots or 1
        configured = deployment.gpu if isinstance(deployment.gpu, str) or deployment.gpu is None else deployment.gpu[0]
        return JobModel("modal", containers, cores, gpu or configured, MODAL_COLD_START_S)
    workers = config.local_workers or cores
    return JobModel("local", workers, cores, None)


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _with_assumptions(found: Estimate, source: str, plan: JobPlan, sample: int) -> Estimate:
    cal, model = found.calibration, found.model
    lines = []
    if not cal.whole_input and cal.records > 2 * sample:
        lines.append(f"sample: {cal.records:,} records, more than the {sample:,} asked: a window cannot be "
                     "cut smaller than a compressed file, a CSV file (without split_csv) or a Parquet row "
                     "group")  # fmt: skip
    if cal.whole_input:
        lines.append(f"records: counted (the sample was the whole input, {cal.records:,} records)")
    else:
        per = cal.bytes / cal.records
        lines.append(f"records: estimated from the bytes per record of the sample's windows ({per:,.0f} on "
                     f"average; {cal.records:,} records in {len(cal.windows)} window(s) spread over the input), "
                     "each for its stretch of the input: not counted")  # fmt: skip
    if cal.overlapped is None:
        lines.append("stages: one after another (prefetch_batches: 0)")
    else:
        way = "overlapped" if cal.overlap else "one after another"
        if cal.waits:
            share = cal.sequential.predict_cpu_share() or 0.0
            lines.append(f"stages: overlapped (predict waits on a device: the process's CPU was busy "
                         f"{share:.0%} of predict's time; a worker overlaps after {WAIT_PROBE_BATCHES} sub-batches "
                         "one after another)")  # fmt: skip
        elif cal.busy_cpus:
            share = cal.sequential.predict_cpu_share() or 0.0
            lines.append(f"stages: one after another (predict keeps the CPU busy, {share:.0%} of its time, with "
                         f"{cal.cpus:.1f} CPU(s) a worker: overlap would only take turns with it)")  # fmt: skip
        else:
            lines.append(f"stages: {way} (the sample ran both ways; a worker runs the faster, overlap when it is "
                         f"{OVERLAP_GAIN:.1f}x or more)")  # fmt: skip
    if model.backend == "local":
        at_once = min(model.workers, found.chunks)
        lines.append(f"{model.workers} local worker(s) on {model.cores} core(s) ({at_once} at once for "
                     f"{found.chunks:,} chunk(s)), the sample run by {cal.processes} side by side as they would share "
                     f"the cores; a worker's start measured here: {cal.start_seconds:.1f} s (the model load "
                     f"{cal.load_seconds:.1f} s of it), while the job is planned")  # fmt: skip
        if model.orchestrator_cpu_s:
            lines.append(f"the job's own process: {model.orchestrator_cpu_s:.1f} s of CPU beside the workers "
                         "(importing Prefect and the flow, measured here)")  # fmt: skip
    else:
        lines.append(f"{model.workers} Modal container(s) of {model.gpu or 'CPU'}: cold start assumed "
                     f"{model.cold_start_s:.0f} s, model load as here ({cal.load_seconds:.1f} s), and each stage as "
                     "fast as on this machine (a GPU's predict is faster: measure it there)")  # fmt: skip
    if plan.job.success_queue or plan.job.failure_queue:
        lines.append("queues: not measured (the sample sends nothing); the job's queue stage adds to it")
    lines.append(f"price: {source}" if source else "price: none applies")
    return Estimate(**{**found.__dict__, "rate_source": source, "assumptions": lines})
