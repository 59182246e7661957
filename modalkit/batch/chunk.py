"""process_chunk: one chunk from input bytes to part file, failure file, queue records and commit marker.

Runs where the model runs (a local worker process or a Modal container). For each sub-batch of
``max_batch_size`` records: parse (JSON), pick the record ids (:mod:`~modalkit.batch.record_ids`), validate
against the pipeline's ``input_model``, run the pipeline through the isolated runner, write success rows and failure
rows (:mod:`~modalkit.batch.failure_log`), spool queue records; the steps of consecutive sub-batches overlap on
three threads, ``predict`` on the calling one (:mod:`~modalkit.batch.overlap`; ``job.prefetch_batches``). At the
end the part file (when records succeeded) and the failure file (when records failed) are moved into place, one
object each (nothing empty is written; the marker's ``part_uri`` and ``failures_uri`` say which were), with an
``id_field`` the id hashes (:mod:`~modalkit.batch.repeats`) beside them, then the spooled queue records are sent
(so a queue never holds a record that no output file holds), and the commit marker ``_chunks/NNNNN.json`` is
written last: a chunk with a marker is done and is skipped when the job runs again. Counts and stage timings go
back, never data.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from modalkit.batch.crashes import CrashLog, CrashPlan, run_guarded, spans
from modalkit.batch.failure_log import FailureLog, FailureRows
from modalkit.batch.formats import Unreadable, format_named
from modalkit.batch.host_pool import HostPool, HostProcessLost
from modalkit.batch.layout import OutputLayout
from modalkit.batch.overlap import Overlap, SubBatch, ThreadSeconds
from modalkit.batch.queueing import RecordSender, dedup_id, read_journal
from modalkit.batch.readahead import read_ahead
from modalkit.batch.record_ids import REPLAY_ID_KEY, IdPolicy, Parsed, Rejected
from modalkit.batch.repeats import IdHashes
from modalkit.batch.storage import Store, default_store
from modalkit.batch.worker_start import WorkerStart, worker_id
from modalkit.batch.writers import FailureWriter, PartWriter, Success, open_part_writer, record_id_type
from modalkit.exceptions import ConfigError
from modalkit.inference_pipeline import InferencePipeline, RecordError, StageClock, run_isolated
from modalkit.iomodel import (
    OUTPUT_ENVELOPE,
    ChunkResult,
    ChunkSpec,
    Extent,
    JobSpec,
    RowGroups,
    StageSeconds,
    SuccessRecord,
    describe_validation_error,
    json_template,
)
from modalkit.queues import QueueBackend

__all__ = ["REPLAY_ID_KEY", "ChunkProcessor", "marker_identity", "process_chunk", "read_marker"]

log = logging.getLogger(__name__)

#: Success records are built as bytes in the loop, from the record model's field names.
SUCCESS_BODY = json_template(SuccessRecord, ("job_id", "record_id", "output", "meta"))


class ChunkProcessor:
    """Processes chunks with one loaded pipeline; build it once per worker and call :meth:`process` per chunk.

    :meth:`process` runs ``predict`` (and the pipeline's other ``device_stages``) on the thread that calls it, the
    thread that loaded the model; with ``job.prefetch_batches`` above 0 (``job_config.prefetch_batches``, default
    2) it runs the host steps of the sub-batches before and after the one the device runs on two helper threads
    (:mod:`~modalkit.batch.overlap`), and with ``host_workers`` above 1 their ``preprocess`` in host processes
    (:mod:`~modalkit.batch.host_pool`). Either way the chunk writes the same bytes in the same order.

    Each result's ``stages`` (:class:`~modalkit.iomodel.StageSeconds`) says where the chunk's time went, timed once
    a sub-batch (never per record) on the thread that did the work. With ``prefetch_batches: 0`` every step runs on
    the calling thread, and the stages add up to the chunk's ``seconds`` within 10% or 20 ms, whichever is more
    (the rest: opening the files, the journal and the commit's checks). With the stages overlapped they add up to
    more than the wall (that is the point); ``device_busy`` (``predict`` over the wall) is then the share of the
    chunk the device worked, and :attr:`last_threads` says for each thread how long it was busy, how long it waited
    for the others and how long it lived: busy plus waiting is its life, within the same tolerance.

    Args:
        pipeline: The loaded pipeline; it must declare ``input_model`` and ``output_model``.
        queue_backend: Where success/failure records go (needed when a job names queues).
        store: Where chunks are read and results written; default: the process's store.
        overlap: True: overlap the stages of every chunk (with ``prefetch_batches`` above 0); False: never; None
            (default): measure it on the first chunks.
        host_workers: CPUs that feed this worker's device (``job_config.host_workers``). Above 1, and when the
            pipeline's ``host_stages()`` gives its host stages, that many host processes validate and preprocess
            the sub-batches of overlapped chunks (:mod:`~modalkit.batch.host_pool`), started now, once; 1: the
            host stages run on this process's helper threads.
    """

    def __init__(
        self,
        pipeline: InferencePipeline,
        queue_backend: QueueBackend | None = None,
        store: Store | None = None,
        overlap: bool | None = None,
        host_workers: int = 1,
        cpus: float | None = None,
    ) -> None:
        self.pipeline = pipeline
        #: the CPUs this worker has to itself (a machine's over its workers, a container's), None when not known:
        #: a ``predict`` that keeps them busy leaves overlap nothing to run on
        self.cpus = cpus
        #: True: overlap the stages of every chunk (with ``prefetch_batches`` above 0); False: never; None: measure
        #: it on the first chunks (see ``_ChunkRun._choose_and_run``)
        self.forced_overlap = overlap
        #: what the measurement chose, kept for the later chunks
        self.learned_overlap: bool | None = None
        self.store = store or default_store()
        self.input_model, self.output_model = type(pipeline).require_schemas()
        self.queue_backend = queue_backend
        self.validate_one: Callable[[Any], BaseModel] = self.input_model.__pydantic_validator__.validate_python
        self.validate_many: Callable[[list[Any]], list[BaseModel]] = TypeAdapter(
            list[self.input_model]  # type: ignore[name-defined]
        ).validate_python
        #: the last chunk's threads ("feeder", "device", "finisher"): busy, waiting and alive seconds of each; empty
        #: when its steps ran one after another
        self.last_threads: dict[str, ThreadSeconds] = {}
        #: the process's CPU seconds in ``predict`` while the last chunk ran its sub-batches one after another
        #: (over ``predict``'s seconds, what :func:`overlap_from_cpu` reads)
        self.last_predict_cpu = 0.0
        #: who runs the chunks (their results say, for the job's accounting of each worker's time)
        self.worker = worker_id()
        #: the worker's start (cold start and model load seconds, when it was ready), reported with the first chunk
        #: it commits
        self.unreported_start = (0.0, 0.0, 0.0)

        self.host_workers = host_workers
        #: the host processes, when this worker has them
        self.host: HostPool | None = None
        self._host_stages = self._host_stages_of(pipeline) if host_workers > 1 else None
        if self._host_stages is not None:
            self.host = HostPool(self._host_stages, self.input_model, host_workers)

    def started(self, start: WorkerStart[Any]) -> None:
        """Note what this worker's start took, for its first chunk's result."""
        self.unreported_start = (start.cold_start_seconds, start.model_load_seconds, start.ready_at)

    @staticmethod
    def _host_stages_of(pipeline: InferencePipeline) -> Any:
        """What the pipeline runs in host processes; None when it runs its host stages in its own process."""
        if "preprocess" in type(pipeline).device_stages:
            return None
        return pipeline.host_stages()

    def live_host(self) -> HostPool | None:
        """The host processes, ready; started again when one of them is gone (a chunk that stopped early closes
        them). None when this worker has none, or they could not start (then the host stages run here)."""
        if self._host_stages is None:
            return None
        if self.host is None or not self.host.alive():
            if self.host is not None:
                self.host.close()
            self.host = HostPool(self._host_stages, self.input_model, self.host_workers)
        try:
            self.host.wait_ready()
        except HostProcessLost as exc:
            log.warning("%s; the host stages run in the worker's own process from now on", exc)
            self.host.close()
            self.host = self._host_stages = None
        return self.host

    def close(self) -> None:
        """Stop the host processes (a worker's process ending stops them too)."""
        if self.host is not None:
            self.host.close()
            self.host = None

    @property
    def overlap(self) -> bool | None:
        """Whether this processor's chunks overlap their stages: forced, learned, or None (not known yet). With host
        processes, always (unless forced off): ``preprocess`` then runs on other cores, whatever ``predict`` holds,
        and a probe would time the host processes' first calls (their imports) against warm in-process ones."""
        if self.forced_overlap is not None:
            return self.forced_overlap
        return True if self._host_stages is not None else self.learned_overlap

    def process(self, job: JobSpec, chunk: ChunkSpec, crash: CrashPlan | None = None) -> ChunkResult:
        """Run one chunk; returns its counts (``skipped`` when it was committed before).

        ``crash`` is given by a runner that can find a record that kills its worker (:mod:`modalkit.batch.crashes`).

        Raises:
            StorageError, QueueError: the chunk could not be read or its results not written or sent (the flow
                retries the transient ones; nothing is committed, so a retry starts the chunk over).
            ConfigError: the job names queues and this processor has no queue backend.
        """
        layout = OutputLayout(job.output_uri, job.output_format)
        marker_uri = layout.marker(chunk.index)
        store = self.store
        if store.exists(marker_uri):  # a guard: the flow skips committed chunks before it sends them anywhere
            return read_marker(marker_uri, job.job_id, chunk, store)
        started, started_at = time.perf_counter(), time.time()
        staging = store.local_staging_dir(layout.part(chunk.index))
        sender = None
        try:
            sender = self._sender(job, chunk, layout.journal(chunk.index), staging)
            run = _ChunkRun(self, job, chunk, staging, sender, CrashLog(crash) if crash is not None else None)
            try:
                with _fewer_collections():
                    counts = run.execute()
            finally:
                if run.crash_log is not None:
                    run.crash_log.close()
                self.last_threads = run.threads
                self.last_predict_cpu = sum(c.predict_cpu for c in run.alone)
            committed = _once(lambda: set(layout.committed_indices(store)))
            for piece in chunk.pieces():  # before any commit
                format_named(piece.format).prove_start(piece, committed, store)
            uploading = time.perf_counter()
            # nothing empty is written: no part file without a success, no failure file without a failure (the
            # marker says which it wrote); a chunk that owns no record (a cut inside one long line) leaves only its
            # marker
            for count, path, uri in ((counts["succeeded"], run.part_path, layout.part(chunk.index)),
                                     (counts["failed"], run.failures_path, layout.failures(chunk.index))):  # fmt: skip
                if count:
                    store.upload_file(path, uri)
                elif counts["records"]:  # one that an earlier attempt wrote (lost before its marker) would be read
                    store.delete(uri)  # as this chunk's: one existence check (S3: a HEAD), nothing written
            if counts["records"] and run.hashes is not None:  # before the marker: every committed chunk has its ids
                run.hashes.write(layout.ids(chunk.index), store)
            sending = time.perf_counter()
            if sender is not None:  # the records go out only now that the files holding them are durable
                sender.close()
            sent = time.perf_counter()
        except BaseException:
            if sender is not None:
                sender.abort()
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        seconds = time.perf_counter() - started
        result = ChunkResult(
            index=chunk.index,
            records=counts["records"],
            succeeded=counts["succeeded"],
            failed=counts["failed"],
            started_at=round(started_at, 3),
            seconds=round(seconds, 3),
            part_uri=layout.part(chunk.index) if counts["succeeded"] else None,
            failures_uri=layout.failures(chunk.index) if counts["failed"] else None,
            queued_success=sender.sent["success"] if sender else 0,
            queued_failure=sender.sent["failure"] if sender else 0,
            errors_by_type=run.failures.errors_by_type,
            error_examples=run.failures.error_examples,
            stages=_stage_seconds(run.clocks, sending - uploading, sent - sending, seconds),
            batches=sum(clock.batches for clock in run.clocks),
            batched_records=sum(clock.batched for clock in run.clocks),
            worker=self.worker,
            cold_start_seconds=self.unreported_start[0],
            model_load_seconds=self.unreported_start[1],
            ready_at=self.unreported_start[2],
        )
        self.unreported_start = (0.0, 0.0, 0.0)
        marker = {**marker_identity(job.job_id, chunk), **result.model_dump()}
        store.write_bytes(marker_uri, orjson.dumps(marker, option=orjson.OPT_INDENT_2))
        if sender is not None:  # committed: the journal (of this attempt or of an interrupted one) is not needed
            store.delete(layout.journal(chunk.index))
        return result

    def _sender(self, job: JobSpec, chunk: ChunkSpec, journal_uri: str, staging: str) -> RecordSender | None:
        if not (job.success_queue or job.failure_queue):
            return None
        if self.queue_backend is None:
            raise ConfigError("the job names queues but this worker has no queue backend (queue_config.backend)")
        return RecordSender(
            self.queue_backend,
            job.success_queue,
            job.failure_queue,
            journal_uri,
            group_id=f"{job.job_id}-{chunk.index:05d}",
            skip_before=read_journal(journal_uri, self.store),
            spool_dir=staging,
            store=self.store,
        )


def _stage_seconds(clocks: list[StageClock], upload: float, send: float, wall: float) -> StageSeconds:
    """The chunk's stage seconds: every thread's, added up, plus the upload of its files (``write``) and the sending
    of its queue records (``queue``) once they are durable."""
    total: dict[str, float] = {name: 0.0 for name in StageSeconds.model_fields if name != "device_busy"}
    for clock in clocks:
        for name, spent in clock.seconds.items():
            total[name] += spent
    total["write"] += upload
    total["queue"] += send
    busy = min(1.0, total["predict"] / wall) if wall > 0 else 0.0
    return StageSeconds(**{name: round(spent, 4) for name, spent in total.items()}, device_busy=round(busy, 4))


#: The cyclic garbage collector's first threshold while a chunk runs (Python's default is 700).
GC_THRESHOLD = 50_000


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """Collect cyclic garbage less often while a chunk runs.

    A chunk builds millions of short-lived objects (records, pydantic models, their dicts) that reference counting
    frees at once; at the default threshold the collector runs every 700 allocations anyway and scans them all,
    which slows building each output model (bench/RESULTS.md has the numbers).
    """
    before = gc.get_threshold()
    gc.set_threshold(max(before[0], GC_THRESHOLD), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def _json_error(line: bytes, pos: int, exc: orjson.JSONDecodeError) -> RecordError:
    """Why a line is not a JSON record: invalid UTF-8 (at which byte of the file), or the parser's message."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        return RecordError("parse", "UnicodeDecodeError", f"invalid UTF-8 at byte {pos + bad.start} ({bad.reason})")
    try:  # the standard library says it better ("Unterminated string starting at ...", not "control character")
        json.loads(line.rstrip(b"\r\n"))
    except json.JSONDecodeError as plain:
        return RecordError("parse", "JSONDecodeError", f"invalid JSON: {plain.msg} (column {plain.colno})")
    except RecursionError:
        pass
    return RecordError("parse", "JSONDecodeError", f"invalid JSON: {exc}")


def _once(fn: Callable[[], set[int]]) -> Callable[[], set[int]]:
    """``fn``, called at most once (a listing that several pieces may ask for)."""
    found: list[set[int]] = []

    def call() -> set[int]:
        if not found:
            found.append(fn())
        return found[0]

    return call


def marker_identity(job_id: str, chunk: ChunkSpec) -> dict[str, Any]:
    """What a commit marker says it commits: the job, the file's key and the chunk's extent (which part of it), and
    for a packed chunk its other pieces (``more``: each one's key and extent). A one-piece chunk's identity is what
    it was before chunks were packed."""
    identity: dict[str, Any] = {"job_id": job_id, "key": chunk.key, "extent": chunk.extent.model_dump(mode="json")}
    if chunk.more:
        more = chunk.model_dump(mode="json", include={"more": True})["more"]  # one call: 1,000 dumps took 0.1 s
        identity["more"] = [{"key": p["key"], "extent": p["extent"]} for p in more]
    return identity


def _more_of(data: Any) -> list[tuple[Any, Extent]] | None:
    """The ``more`` pieces a marker names, as (key, extent) pairs; None when they are not pieces."""
    if not isinstance(data, list):
        return None
    try:
        return [(p.get("key"), _EXTENT.validate_python(p.get("extent"))) for p in data]
    except (AttributeError, ValidationError):
        return None


_EXTENT: TypeAdapter[Extent] = TypeAdapter(Extent)


def _legacy_identity(job_id: str, chunk: ChunkSpec) -> dict[str, Any]:
    """The identity a marker written before chunks had typed extents holds: job, key, byte range, row groups."""
    extent = chunk.extent
    if isinstance(extent, RowGroups):
        start, end, groups, first_row = 0, None, list(extent.groups), extent.first_row
    else:
        start, end, groups, first_row = extent.start, extent.end, [], 0
    return {"job_id": job_id, "key": chunk.key, "start": start, "end": end, "row_groups": groups,
            "first_row": first_row}  # fmt: skip


def _commits(data: Any, job_id: str, chunk: ChunkSpec) -> tuple[bool, dict[str, Any]]:
    """Whether marker ``data`` commits ``chunk`` of job ``job_id``, and the identity it holds (for the message)."""
    if not isinstance(data, dict):
        return False, {"job_id": None}
    if "extent" in data:
        theirs = {k: data.get(k) for k in ("job_id", "key", "extent", "more")}
        mine = marker_identity(job_id, chunk)
        if all(data.get(k) == v for k, v in mine.items()) and ("more" in mine or not data.get("more")):
            return True, theirs  # as this version writes it: equal as JSON (1,000 pieces validated took 20 ms)
        try:
            extent = _EXTENT.validate_python(theirs["extent"])
        except ValidationError:
            return False, theirs
        more = _more_of(theirs.pop("more") or [])
        if more:
            theirs["more"] = data["more"]
        pieces = [(p.key, p.extent) for p in chunk.more]
        return (theirs["job_id"], theirs["key"], extent, more) == (job_id, chunk.key, chunk.extent, pieces), theirs
    if chunk.more:
        return False, {k: data.get(k) for k in ("job_id", "key", "start", "end")}
    mine = _legacy_identity(job_id, chunk)
    # markers written before row_groups and first_row were recorded hold only the job, key and byte range
    theirs = {k: data.get(k, mine[k] if k in ("row_groups", "first_row") else None) for k in mine}
    return theirs == mine, theirs


def read_marker(marker_uri: str, job_id: str, chunk: ChunkSpec, store: Store) -> ChunkResult:
    """The result a commit marker recorded, as a skipped chunk's result (resume).

    A marker is honoured only when it commits this very chunk of this very job: the same job id, file key and
    extent, and for a packed chunk the same other pieces (keys and extents, in order). A marker written before
    extents were typed (flat ``start``/``end``/``row_groups``/``first_row``) is
    compared on those fields, as it was then.

    Raises:
        ConfigError: the marker is not valid JSON, or it belongs to another job or another chunk (a job planned
            with other parameters, or an output whose ``_job.json`` was deleted): never a skip.
    """
    try:
        data = orjson.loads(store.read_bytes(marker_uri))
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{marker_uri} is not a commit marker (invalid JSON: {exc}); delete it or use another "
                          "output") from None  # fmt: skip
    same, theirs = _commits(data, job_id, chunk)
    if not same:
        mine = marker_identity(job_id, chunk)
        raise ConfigError(
            f"{marker_uri} commits {_describe(theirs)}, not chunk {chunk.index} of this run ({_describe(mine)}): the "
            "output holds results of another job or of other parameters; use another output or delete that one"
        )
    fields = {k: v for k, v in data.items() if k in ChunkResult.model_fields}
    return ChunkResult(**{**fields, "index": chunk.index, "skipped": True})


def _describe(identity: dict[str, Any]) -> str:
    extent = identity.get("extent")
    where: dict[str, Any] = extent if isinstance(extent, dict) else identity
    if where.get("groups") or where.get("row_groups"):
        part = f"row groups {list(where.get('groups') or where.get('row_groups') or [])}"
    else:
        part = f"bytes {where.get('start')}-{'end' if where.get('end') is None else where['end']}"
    more = identity.get("more")
    files = f" and {len(more)} more file{'s' if len(more) > 1 else ''}" if isinstance(more, list) and more else ""
    return f"job {identity.get('job_id')}, {identity.get('key')} {part}{files}"


class _Piece:
    """One file (or range of one) of the chunk being read, with what its records need: its format, how its rows
    are fitted to the input model, and its id policy (ids from positions name its key)."""

    __slots__ = ("fitter", "format", "ids", "key", "spec")

    def __init__(self, run: _ChunkRun, spec: ChunkSpec) -> None:
        self.spec = spec
        self.key = spec.key
        self.format = format_named(spec.format)
        #: how a record read as text (a CSV row) is fitted to the input model; None for typed formats
        self.fitter = self.format.fitter(spec, run.proc.input_model, run.job.id_field)
        self.ids = IdPolicy(run.job.job_id, spec.key, run.job.id_field, self.where, run.hashes)

    def where(self, pos: int) -> str:
        # the piece's format, not the key's suffix (which may be upper case)
        return f"{self.key} at {self.format.position} {pos}"


#: A run of consecutive records of one piece in a sub-batch: the piece, their positions and their payloads.
_Segment = tuple[_Piece, list[int], list[Any]]


class _SubBatch(SubBatch):
    """A sub-batch of the chunk: besides its inputs, each piece's share of them (ids and parsed records), its
    failure rows, its success queue records and the ordinal of the first record after it."""

    __slots__ = ("end", "prepared", "rows", "successes", "to_queue")

    def __init__(
        self, models: list[Any], prepared: list[tuple[_Piece, list[Any], list[Parsed]]], rows: FailureRows, end: int
    ) -> None:
        super().__init__(models)
        self.prepared = prepared
        self.rows = rows
        self.end = end
        self.successes: list[Success] = []
        #: each success's (ordinal, file key, position, record id, output json), for the success queue
        self.to_queue: list[tuple[int, str, int, Any, bytes]] = []

    def ordinals(self) -> list[int]:
        return [ordinal for _, _, kept in self.prepared for ordinal, _, _ in kept]


#: Sub-batches a chunk runs one after another, then as many overlapped, to learn which way is faster.
PROBE_BATCHES = 24
#: How much faster overlapped sub-batches must run to be chosen (the threads cost memory and hand-offs).
OVERLAP_GAIN = 1.1
#: The first sub-batches a chunk runs one after another: the first warms up, the others time ``predict``'s CPU.
WAIT_PROBE_BATCHES = 4
#: Under this share of ``predict``'s wall in the process's CPU, ``predict`` waits on a device (or a remote call):
#: overlapping the host's stages with it pays, and the chunk overlaps without timing both ways.
WAIT_CPU_SHARE = 0.5


#: Under this many CPUs left idle while ``predict`` runs (the worker's CPUs less its share), overlap has no CPU to
#: run the host's stages on: they would only take turns with ``predict``. Half a CPU, as ``WAIT_CPU_SHARE``: the
#: share is measured on a machine the other workers and the job's own process share, and a worker's share of one
#: CPU falls to two thirds under them, so a worker with one CPU overlaps exactly when ``predict`` waits.
SPARE_CPUS = 0.5


def overlap_from_cpu(cpu_share: float | None, cpus: float | None) -> bool | None:
    """What a ``predict`` that kept the process's CPU busy ``cpu_share`` of its wall (one sub-batch at a time)
    decides on a worker with ``cpus`` CPUs (None: not known): True, overlap (under ``WAIT_CPU_SHARE``: it mostly
    waited on something off this host's CPU, a device); False, one sub-batch after another (it keeps busy all but
    ``SPARE_CPUS`` of them: W1's model, two workers on two CPUs, overlapped ran 20% slower); None, neither: time
    both ways."""
    if cpu_share is None:
        return None
    if cpu_share < WAIT_CPU_SHARE:
        return True
    if cpus is not None and cpu_share > cpus - SPARE_CPUS:
        return False
    return None


class _Counted:
    """An iterator that says when it has run out (a probe's ``islice`` of it cannot)."""

    __slots__ = ("exhausted", "items")

    def __init__(self, items: Iterator[list[_Segment]]) -> None:
        self.items = items
        self.exhausted = False

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> list[_Segment]:
        try:
            return next(self.items)
        except StopIteration:
            self.exhausted = True
            raise


class _ChunkRun:
    """The state of one chunk being processed (kept off the processor so a worker can run chunk after chunk).

    The chunk's pieces (one file, or several small ones packed) are read one after the other into sub-batches of
    ``max_batch_size`` records that may span pieces, so the pipeline sees full batches however small the files.
    Each sub-batch goes through the same steps: parse, ids (each piece's id policy), validate, piece by piece; run
    the pipeline once for the whole sub-batch; then the successes become part rows and success records; every
    record that fails at a step goes to the sub-batch's failure rows, under its own file. A record's ordinal counts
    the records of the whole chunk, across pieces.

    With ``job.prefetch_batches`` above 0 the steps of consecutive sub-batches overlap on three threads
    (:mod:`~modalkit.batch.overlap`); with 0, or once a worker has died on the chunk (so that the crash finder's
    breadcrumbs name one sub-batch), they run one sub-batch after another on the calling thread. Both write the same
    bytes.
    """

    def __init__(
        self,
        proc: ChunkProcessor,
        job: JobSpec,
        chunk: ChunkSpec,
        staging: str,
        sender: RecordSender | None,
        crash_log: CrashLog | None = None,
    ) -> None:
        self.proc = proc
        self.crash_log = crash_log
        self.job = job
        self.chunk = chunk
        self.sender = sender
        self.part_path = os.path.join(staging, "part")
        self.failures_path = os.path.join(staging, "failures")
        self.succeeded = 0
        self.ordinal = 0
        #: the hashes of the ids from the data (with an id_field) of every piece, for the job-wide repeat check
        self.hashes = IdHashes(chunk.key) if job.id_field is not None else None
        self._first = _Piece(self, chunk.pieces()[0])
        self.failures = FailureLog(job.job_id, queued=sender is not None)
        self._job_json = orjson.dumps(job.job_id)
        self._store: Store = proc.store
        self._part: PartWriter | None = None
        self._failure_writer: FailureWriter | None = None
        #: every thread's stage seconds (one clock when the stages do not overlap)
        self.clocks: list[StageClock] = []
        #: the clocks of the sub-batches run one after another
        self.alone: list[StageClock] = []
        #: with overlapping stages, each thread's busy, waiting and alive seconds
        self.threads: dict[str, ThreadSeconds] = {}
        self._in_flight: dict[int, str] = {}  # the breadcrumb spans of each sub-batch in the pipeline
        self._in_flight_lock = threading.Lock()

    def execute(self) -> dict[str, int]:
        job, chunk = self.job, self.chunk
        with contextlib.ExitStack() as closing:  # both files are closed even when closing one of them raises
            self._failure_writer = FailureWriter(self.failures_path, f"the failure file of chunk {chunk.index}")
            closing.callback(self._failure_writer.close)
            part = open_part_writer(
                job.output_format, self.part_path, self.proc.output_model, f"the part file of chunk {chunk.index}",
                record_id_type(self.proc.input_model, job.id_field),
            )  # fmt: skip
            self._part = part
            closing.callback(part.close)
            ahead = read_ahead(self.proc.store, chunk)  # many small remote files: fetched side by side
            if ahead is not None:
                closing.callback(ahead.close)
                self._store = ahead
            crash_plan = self.crash_log.plan if self.crash_log is not None else None
            source = _Counted(self.read())
            if not job.prefetch_batches or (crash_plan is not None and crash_plan.deaths):
                self._one_after_another(source)
            elif self.proc.overlap is not None:
                self._run(source, self.proc.overlap)
            else:
                self._choose_and_run(source)
        return {"records": self.ordinal, "succeeded": self.succeeded, "failed": self.failures.failed}

    def _choose_and_run(self, source: _Counted) -> None:
        """Overlap the stages only where it pays. ``WAIT_PROBE_BATCHES`` sub-batches one after another first: a
        ``predict`` that leaves the process's CPU idle while it runs (it waits on a device) overlaps the rest at
        once; one that keeps the worker's CPUs busy runs the rest one after another (:func:`overlap_from_cpu`).
        Otherwise ``PROBE_BATCHES`` sub-batches one after another (those included), as many overlapped, the
        rest the faster way: a ``predict`` that holds the interpreter (a model computed in Python, or a CPU library
        that keeps the GIL) gains nothing from overlap and loses to the threads' hand-offs (W1's model on one
        worker: 28% slower), while one computing in a library that releases the GIL may gain where cores are free.
        The choice is kept by the worker for its later chunks."""
        began, records = time.perf_counter(), self.ordinal
        self._run(itertools.islice(source, 1), False)  # a pipeline's first call is often slower: not timed
        if source.exhausted:
            return
        self._run(itertools.islice(source, WAIT_PROBE_BATCHES - 1), False)
        if source.exhausted or self.ordinal == records:  # a chunk too small to tell: nothing learned
            return
        choice = overlap_from_cpu(self.clocks[-1].predict_cpu_share(), self.proc.cpus)
        if choice is not None:
            self.proc.learned_overlap = choice
            self._run(source, choice)
            return
        rates = []
        for overlap in (False, True):
            self._run(itertools.islice(source, PROBE_BATCHES - (0 if overlap else WAIT_PROBE_BATCHES)), overlap)
            if source.exhausted or self.ordinal == records:
                return
            rates.append((self.ordinal - records) / max(time.perf_counter() - began, 1e-9))
            began, records = time.perf_counter(), self.ordinal
        choice = rates[1] > rates[0] * OVERLAP_GAIN
        self.proc.learned_overlap = choice
        self._run(source, choice)

    def _run(self, source: Iterator[list[_Segment]], overlap: bool) -> None:
        """``source``'s sub-batches, their stages overlapped or one after another."""
        if not overlap:
            self._one_after_another(source)
            return
        host = self.proc.live_host()
        depth = self.job.prefetch_batches if host is None else max(self.job.prefetch_batches, host.size + 1)
        run = Overlap(self.proc.pipeline, self, depth, *self._crash_hooks(), source=source, host=host)
        self.clocks += [*run.clocks.values(), run.host_clock]
        run.run()
        for name, spent in run.threads.items():  # summed over the runs of a chunk
            before = self.threads.get(name, ThreadSeconds(0.0, 0.0, 0.0))
            self.threads[name] = ThreadSeconds(*(a + b for a, b in zip(before, spent, strict=True)))

    def _one_after_another(self, source: Iterator[list[_Segment]]) -> None:
        """Each sub-batch through every step before the next is read, on this thread."""
        clock = StageClock()
        self.clocks.append(clock)
        self.alone.append(clock)
        seconds, perf = clock.seconds, time.perf_counter
        while True:
            began = perf()
            raw = next(source, None)
            read = perf()
            seconds["read"] = seconds.get("read", 0.0) + read - began
            if raw is None:
                return
            batch = self.parse(raw)
            parsed = perf()
            seconds["parse"] = seconds.get("parse", 0.0) + parsed - read
            if batch.models:
                batch.outcomes = self._run_pipeline(batch, clock)
            written = perf()
            self.write(batch)
            queued = perf()
            self.queue(batch)
            seconds["write"] = seconds.get("write", 0.0) + queued - written
            seconds["queue"] = seconds.get("queue", 0.0) + perf() - queued

    def _run_pipeline(self, batch: _SubBatch, clock: StageClock) -> list[Any]:
        pipeline = self.proc.pipeline
        if self.crash_log is None:
            return run_isolated(pipeline, batch.models, clock)
        # records by their ordinal: unique in the chunk (positions repeat across its files)
        return run_guarded(lambda some: run_isolated(pipeline, some, clock), batch.models, batch.ordinals(),
                           self.crash_log)  # fmt: skip

    def _crash_hooks(self) -> tuple[Callable[[SubBatch], None] | None, Callable[[SubBatch], None] | None]:
        """With a crash log, the breadcrumb names the records of every sub-batch in the pipeline at once."""
        if self.crash_log is None:
            return None, None
        log = self.crash_log

        def enter(batch: SubBatch) -> None:
            assert isinstance(batch, _SubBatch)
            with self._in_flight_lock:
                self._in_flight[id(batch)] = spans(batch.ordinals())
                log.note_spans("batch", " ".join(self._in_flight.values()))

        def leave(batch: SubBatch) -> None:
            with self._in_flight_lock:
                self._in_flight.pop(id(batch), None)
                log.note_spans("batch", " ".join(self._in_flight.values()))

        return enter, leave

    # --- the steps of a sub-batch (overlap.Work) -----------------------------------------------------------------

    def read(self) -> Iterator[list[_Segment]]:
        """The chunk's records in sub-batches of ``max_batch_size``, each a list of segments (one per piece it
        spans), read piece after piece."""
        size = self.job.max_batch_size
        store = self._store
        segments: list[_Segment] = []
        count = 0
        for n, spec in enumerate(self.chunk.pieces()):
            piece = self._first if n == 0 else _Piece(self, spec)
            for positions, payloads in piece.format.read(spec, size, store):
                while positions:
                    room = size - count
                    if len(positions) <= room:
                        segments.append((piece, positions, payloads))
                        count += len(positions)
                        positions = []
                    else:
                        segments.append((piece, positions[:room], payloads[:room]))
                        count = size
                        positions, payloads = positions[room:], payloads[room:]
                    if count == size:
                        yield segments
                        segments, count = [], 0
        if segments:
            yield segments

    def parse(self, segments: list[_Segment]) -> _SubBatch:
        """A sub-batch parsed, its ids assigned and its records validated; the records that fail, logged."""
        first = segments[0][0]
        rows = self.failures.rows(first.key, first.where)
        prepared: list[tuple[_Piece, list[Any], list[Parsed]]] = []
        models: list[BaseModel] = []
        for piece, positions, payloads in segments:
            rows.use(piece.key, piece.where)
            parsed, rejected = self._parse(piece, positions, payloads)
            ids, kept, bad_ids = piece.ids.assign(parsed)
            if bad_ids:  # failure rows in record order, as the records came
                rejected = sorted(rejected + bad_ids, key=lambda r: r.ordinal) if rejected else bad_ids
            for reject in rejected:
                rows.add(*reject)
            valid, ids, kept = self._validate(piece, ids, kept, rows)
            if valid:
                models.extend(valid)
                prepared.append((piece, ids, kept))
        return _SubBatch(models, prepared, rows, self.ordinal)

    def write(self, batch: SubBatch) -> None:
        """A sub-batch's outcomes made rows: successes to the part file, failures to the failure file."""
        assert isinstance(batch, _SubBatch)
        assert self._part is not None
        assert self._failure_writer is not None
        outcomes = batch.outcomes
        if outcomes is not None:
            start = 0
            for piece, ids, kept in batch.prepared:
                self._outcomes(batch, piece, ids, kept, outcomes[start : start + len(kept)])
                start += len(kept)
        self._part.write(batch.successes)
        self.succeeded += len(batch.successes)
        self.failures.take(batch.rows)
        self._failure_writer.write(batch.rows.lines)

    def records(self, batch: SubBatch) -> list[Any]:
        """A sub-batch's records as parsed and fitted, one per input model, in order."""
        assert isinstance(batch, _SubBatch)
        return [data for _, _, kept in batch.prepared for _, _, data in kept]

    def queue(self, batch: SubBatch) -> None:
        """A sub-batch's queue records spooled, as one window."""
        sender = self.sender
        if sender is None:
            return
        assert isinstance(batch, _SubBatch)
        for ordinal, dedup, body in batch.rows.queue:
            sender.add("failure", ordinal, dedup, body)
        job_id, job_json, dumps = self.job.job_id, self._job_json, orjson.dumps
        for ordinal, key, pos, record_id, output in batch.to_queue:
            message = SUCCESS_BODY % (job_json, dumps(record_id), output, dumps({"key": key, "position": pos}))
            sender.add("success", ordinal, dedup_id(job_id, key, pos), message)
        sender.end_window(batch.end)

    def _parse(self, piece: _Piece, positions: list[int], payloads: list[Any]) -> tuple[list[Parsed], list[Rejected]]:
        """The records of a segment as data, numbered in the chunk; those that do not parse, rejected."""
        loads = orjson.loads
        fit = piece.fitter.fit if piece.fitter is not None else None
        position_id = piece.ids.position_id
        parsed: list[Parsed] = []
        rejected: list[Rejected] = []
        ordinal = self.ordinal
        for pos, payload in zip(positions, payloads, strict=True):
            if type(payload) is bytes:
                try:
                    parsed.append((ordinal, pos, loads(payload)))
                except orjson.JSONDecodeError as exc:
                    error = _json_error(payload, pos, exc)
                    rejected.append(Rejected(ordinal, position_id(pos), pos, error, payload))
            elif type(payload) is Unreadable:
                error = RecordError("parse", payload.error_type, payload.error)
                rejected.append(Rejected(ordinal, position_id(pos), pos, error, payload.raw.rstrip("\r\n")))
            elif fit is not None:
                parsed.append((ordinal, pos, fit(payload)))
            else:
                parsed.append((ordinal, pos, payload))
            ordinal += 1
        self.ordinal = ordinal
        return parsed, rejected

    def _validate(
        self, piece: _Piece, ids: list[Any], kept: list[Parsed], rows: FailureRows
    ) -> tuple[list[BaseModel], list[Any], list[Parsed]]:
        """Validate a segment in one call; only when it holds an invalid record, record by record."""
        try:
            return self.proc.validate_many([data for _, _, data in kept]), ids, kept
        except ValidationError:
            pass
        validate_one = self.proc.validate_one
        models, good_ids, good_kept = [], [], []
        for record_id, record in zip(ids, kept, strict=True):
            ordinal, pos, data = record
            try:
                models.append(validate_one(data))
            except ValidationError as exc:
                described = describe_validation_error(exc)
                if piece.fitter is not None:
                    described = piece.fitter.describe(data, described)
                error = RecordError("validate", "ValidationError", described)
                rows.add(ordinal, record_id, pos, error, data)
                continue
            good_ids.append(record_id)
            good_kept.append(record)
        return models, good_ids, good_kept

    def _outcomes(
        self, batch: _SubBatch, piece: _Piece, ids: list[Any], kept: list[Parsed], outcomes: list[Any]
    ) -> None:
        """The successes of one piece's records in a sub-batch (and their success queue records); failures to the
        sub-batch's failure rows."""
        serializer = self.proc.output_model.__pydantic_serializer__
        rows, successes = batch.rows, batch.successes
        to_queue = batch.to_queue if self.sender is not None else None
        key = piece.key
        rows.use(key, piece.where)
        for record_id, (ordinal, pos, data), outcome in zip(ids, kept, outcomes, strict=True):
            if type(outcome) is RecordError:
                rows.add(ordinal, record_id, pos, outcome, data)
                continue
            body = serializer.to_json(outcome, exclude=OUTPUT_ENVELOPE)
            successes.append(Success(record_id, outcome, body))
            if to_queue is not None:
                to_queue.append((ordinal, key, pos, record_id, body))


def process_chunk(
    job: JobSpec,
    chunk: ChunkSpec,
    pipeline: InferencePipeline,
    queue_backend: QueueBackend | None = None,
    store: Store | None = None,
) -> ChunkResult:
    """Process one chunk with ``pipeline``: see :class:`ChunkProcessor` (which a worker keeps between chunks)."""
    return ChunkProcessor(pipeline, queue_backend, store).process(job, chunk)
