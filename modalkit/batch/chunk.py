"""process_chunk: one chunk from input bytes to part file, failure file, queue records and commit marker.

Runs where the model runs (a local worker process or a Modal container). For each sub-batch of
``max_batch_size`` records: parse (JSON), pick the record id, validate against the pipeline's ``input_model``,
run the pipeline through the isolated runner, write success rows and failure rows, spool queue records. At the end
the part file and the failure file are moved into place (one object each), then the spooled queue records are sent
(so a queue never holds a record that no output file holds), and the commit marker ``_chunks/NNNNN.json`` is
written last: a chunk with a marker is done and is skipped when the job runs again. Counts go back, never data.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from modalkit.batch.crashes import CrashLog, CrashPlan, run_guarded
from modalkit.batch.formats import Unreadable, format_named
from modalkit.batch.layout import OutputLayout
from modalkit.batch.queueing import RecordSender, dedup_id, read_journal
from modalkit.batch.storage import Store, default_store
from modalkit.batch.writers import ENVELOPE, FailureWriter, Success, open_part_writer, record_id_type
from modalkit.exceptions import ConfigError
from modalkit.inference_pipeline import InferencePipeline, RecordError, run_isolated
from modalkit.iomodel import ChunkResult, ChunkSpec, Extent, JobSpec, RowGroups, describe_validation_error
from modalkit.queues import QueueBackend

__all__ = ["REPLAY_ID_KEY", "ChunkProcessor", "marker_identity", "process_chunk", "read_marker"]

#: A record holding this key takes its value as its record id (replayed failures keep their original ids).
REPLAY_ID_KEY = "__modalkit_record_id__"
MAX_INPUT_CHARS = 100_000
#: A chunk reports its failures by error_type (for the job's report) for at most this many types, each with the
#: first failure's stage and message cut to MAX_EXAMPLE_CHARS; the failure files hold every failure.
MAX_ERROR_TYPES = 20
MAX_EXAMPLE_CHARS = 300

#: A failure record's queue body over this many bytes carries only the start of its input (``input_truncated``),
#: so that no record is too large for a queue (SQS takes 256 KiB) whatever the input; the failure file has it all.
MAX_QUEUE_BODY = 128 * 1024
MAX_QUEUED_INPUT_CHARS = 16 * 1024


class ChunkProcessor:
    """Processes chunks with one loaded pipeline; build it once per worker and call :meth:`process` per chunk.

    Args:
        pipeline: The loaded pipeline; it must declare ``input_model`` and ``output_model``.
        queue_backend: Where success/failure records go (needed when a job names queues).
        store: Where chunks are read and results written; default: the process's store.
    """

    def __init__(
        self, pipeline: InferencePipeline, queue_backend: QueueBackend | None = None, store: Store | None = None
    ) -> None:
        self.pipeline = pipeline
        self.store = store or default_store()
        self.input_model, self.output_model = type(pipeline).require_schemas()
        self.queue_backend = queue_backend
        self.validate_one: Callable[[Any], BaseModel] = self.input_model.__pydantic_validator__.validate_python
        self.validate_many: Callable[[list[Any]], list[BaseModel]] = TypeAdapter(
            list[self.input_model]  # type: ignore[name-defined]
        ).validate_python

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
            run.format.prove_start(chunk, lambda: set(layout.committed_indices(store)), store)  # before any commit
            if counts["records"]:  # a chunk that owns no record (a cut inside one long line) leaves only its marker
                store.upload_file(run.part_path, layout.part(chunk.index))
                store.upload_file(run.failures_path, layout.failures(chunk.index))
            if sender is not None:  # the records go out only now that the files holding them are durable
                sender.close()
        except BaseException:
            if sender is not None:
                sender.abort()
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        result = ChunkResult(
            index=chunk.index,
            records=counts["records"],
            succeeded=counts["succeeded"],
            failed=counts["failed"],
            started_at=round(started_at, 3),
            seconds=round(time.perf_counter() - started, 3),
            part_uri=layout.part(chunk.index) if counts["records"] else None,
            failures_uri=layout.failures(chunk.index) if counts["records"] else None,
            queued_success=sender.sent["success"] if sender else 0,
            queued_failure=sender.sent["failure"] if sender else 0,
            errors_by_type=run.errors_by_type,
            error_examples=run.error_examples,
        )
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


#: The cyclic garbage collector's first threshold while a chunk runs (Python's default is 700).
GC_THRESHOLD = 50_000


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """Collect cyclic garbage less often while a chunk runs.

    A chunk builds millions of short-lived objects (records, pydantic models, their dicts) that reference counting
    frees at once; at the default threshold the collector runs every 700 allocations anyway and scans them all.
    Measured on the benchmark's toy pipeline: building an output model cost 5.9 us at 700 and 2.8 us at 50,000;
    callgrind over a 20,000-record chunk: 6.64G instructions without it, 6.53G with it.
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


def marker_identity(job_id: str, chunk: ChunkSpec) -> dict[str, Any]:
    """What a commit marker says it commits: the job, the file's key and the chunk's extent (which part of it)."""
    return {"job_id": job_id, "key": chunk.key, "extent": chunk.extent.model_dump(mode="json")}


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
        theirs = {k: data.get(k) for k in ("job_id", "key", "extent")}
        try:
            extent = _EXTENT.validate_python(theirs["extent"])
        except ValidationError:
            return False, theirs
        return (theirs["job_id"], theirs["key"], extent) == (job_id, chunk.key, chunk.extent), theirs
    mine = _legacy_identity(job_id, chunk)
    # markers written before row_groups and first_row were recorded hold only the job, key and byte range
    theirs = {k: data.get(k, mine[k] if k in ("row_groups", "first_row") else None) for k in mine}
    return theirs == mine, theirs


def read_marker(marker_uri: str, job_id: str, chunk: ChunkSpec, store: Store) -> ChunkResult:
    """The result a commit marker recorded, as a skipped chunk's result (resume).

    A marker is honoured only when it commits this very chunk of this very job: the same job id, file key and
    extent. A marker written before extents were typed (flat ``start``/``end``/``row_groups``/``first_row``) is
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
    return f"job {identity.get('job_id')}, {identity.get('key')} {part}"


class _ChunkRun:
    """The state of one chunk being processed (kept off the processor so a worker can run chunk after chunk)."""

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
        self.format = format_named(chunk.format)
        self.part_path = os.path.join(staging, "part")
        self.failures_path = os.path.join(staging, "failures")
        self.failed = 0
        self.succeeded = 0
        self.ordinal = 0
        self.errors_by_type: dict[str, int] = {}
        self.error_examples: dict[str, str] = {}
        self._job_json = orjson.dumps(job.job_id)
        self._fail_lines: list[bytes] = []
        #: the ids seen in this chunk and where they were, when ids come from the data (the job's id_field); ids keep
        #: their type here (a str() per int id cost ~8% of a job), and _first_across_types catches 7 and "7"
        self._seen: dict[Any, int] | None = {} if job.id_field is not None else None
        self._id_type: type | None = None  # the one type of the chunk's ids so far; None once there are two

    def execute(self) -> dict[str, int]:
        job, chunk = self.job, self.chunk
        with contextlib.ExitStack() as closing:  # both files are closed even when closing one of them raises
            failures = FailureWriter(self.failures_path, f"the failure file of chunk {chunk.index}")
            closing.callback(failures.close)
            part = open_part_writer(
                job.output_format, self.part_path, self.proc.output_model, f"the part file of chunk {chunk.index}",
                record_id_type(self.proc.input_model, job.id_field),
            )  # fmt: skip
            closing.callback(part.close)
            for positions, payloads in self.format.read(chunk, job.max_batch_size, self.proc.store):
                successes = self._sub_batch(positions, payloads)
                part.write(successes)
                self.succeeded += len(successes)
                failures.write(self._fail_lines)
                self._fail_lines = []
                if self.sender is not None:
                    self.sender.end_window(self.ordinal)
        return {"records": self.ordinal, "succeeded": self.succeeded, "failed": self.failed}

    def _where(self, pos: int) -> str:
        # the chunk's format, not the key's suffix (which may be upper case)
        return f"{self.chunk.key} at {self.format.position} {pos}"

    def _first_across_types(self, record_id: Any, pos: int) -> int:
        """Where an id was first seen as the other JSON type (7 for "7", "7" for 7), else ``pos``. Runs for the
        chunk's first id, and for every id once the chunk has held both types (while it holds one, never)."""
        if self._seen is not None and len(self._seen) == 1:
            self._id_type = type(record_id)  # the first id
            return pos
        self._id_type = None
        assert self._seen is not None
        if type(record_id) is int:
            return self._seen.get(str(record_id), pos)
        text = str(record_id)
        if text.lstrip("-").isdigit() and str(int(text)) == text:
            return self._seen.get(int(text), pos)
        return pos

    def _duplicate(self, ordinal: int, record_id: Any, pos: int, first: int, data: Any) -> None:
        """A record whose id an earlier record of the chunk has: it fails, so no id is in the output twice."""
        reason = f"record id {record_id!r} is already the id of the record at {self._where(first)}"
        error = RecordError("validate", "DuplicateRecordId", reason)
        # its own dedup id: a queue that drops repeats must not drop this failure record as one
        self._fail(ordinal, record_id, pos, error, data, f"{dedup_id(self.job.job_id, record_id)}@{pos}")

    def _fail(
        self, ordinal: int, record_id: Any, pos: int, error: RecordError, data: Any, dedup: str | None = None
    ) -> None:
        """One failure row, also the failure queue's record: built once from the error's fields."""
        if isinstance(data, bytes):
            data = data.decode("utf-8", errors="replace").rstrip("\r\n")
        if isinstance(data, str) and len(data) > MAX_INPUT_CHARS:
            data = data[:MAX_INPUT_CHARS] + "..."
        record = {
            "job_id": self.job.job_id,
            "record_id": record_id,
            "status": "error",
            "stage": error.stage,
            "error_type": error.error_type,
            "error": f"{self._where(pos)}: {error.error}",
            "input": data,
            "meta": {"key": self.chunk.key, "position": pos},
        }
        body = orjson.dumps(record, default=str)
        self._fail_lines.append(body + b"\n")
        self.failed += 1
        count = self.errors_by_type.get(error.error_type)
        if count is not None:
            self.errors_by_type[error.error_type] = count + 1
        elif len(self.errors_by_type) < MAX_ERROR_TYPES:
            self.errors_by_type[error.error_type] = 1
            self.error_examples[error.error_type] = f"{error.stage}: {record['error']}"[:MAX_EXAMPLE_CHARS]
        if self.sender is not None:
            if len(body) > MAX_QUEUE_BODY:  # the file keeps the whole input; the queue gets its start
                text = data if isinstance(data, str) else orjson.dumps(data, default=str).decode()
                body = orjson.dumps({**record, "input": text[:MAX_QUEUED_INPUT_CHARS] + "...", "input_truncated": True})
            self.sender.add("failure", ordinal, dedup or dedup_id(self.job.job_id, record_id), body)

    def _sub_batch(self, positions: list[int], payloads: list[Any]) -> list[Success]:
        key = self.chunk.key
        id_field = self.job.id_field
        seen = self._seen
        loads = orjson.loads
        ids: list[Any] = []
        datas: list[Any] = []
        kept: list[tuple[int, int, Any]] = []  # (ordinal, position, raw data) of the records that parsed
        ordinal = self.ordinal
        for pos, payload in zip(positions, payloads, strict=True):
            if type(payload) is bytes:
                try:
                    data = loads(payload)
                except orjson.JSONDecodeError as exc:
                    error = _json_error(payload, pos, exc)
                    self._fail(ordinal, f"{key}:{pos}", pos, error, payload)
                    ordinal += 1
                    continue
            elif type(payload) is Unreadable:
                error = RecordError("parse", payload.error_type, payload.error)
                self._fail(ordinal, f"{key}:{pos}", pos, error, payload.raw.rstrip("\r\n"))
                ordinal += 1
                continue
            else:
                data = payload
            if type(data) is dict and id_field is not None and REPLAY_ID_KEY not in data:
                record_id = data.get(id_field)  # the common case inline; _record_id says why any other is bad
                if type(record_id) is not str and type(record_id) is not int:
                    record_id = self._record_id(data, key, pos, id_field)
            else:
                record_id = self._record_id(data, key, pos, id_field)
            if type(record_id) is _BadId:
                self._fail(ordinal, f"{key}:{pos}", pos, RecordError("validate", "InvalidRecordId", record_id.reason),
                           data)  # fmt: skip
                ordinal += 1
                continue
            if seen is not None:  # ids from the data must be unique; 7 and "7" are one id on a queue
                first = seen.setdefault(record_id, pos)
                if first == pos and type(record_id) is not self._id_type:
                    first = self._first_across_types(record_id, pos)
                if first != pos:
                    self._duplicate(ordinal, record_id, pos, first, data)
                    ordinal += 1
                    continue
            ids.append(record_id)
            datas.append(data)
            kept.append((ordinal, pos, data))
            ordinal += 1
        self.ordinal = ordinal
        models, ids, kept = self._validate(datas, ids, kept)
        if not models:
            return []
        pipeline = self.proc.pipeline
        if self.crash_log is None:
            return self._outcomes(ids, kept, run_isolated(pipeline, models))
        positions = [pos for _, pos, _ in kept]
        outcomes = run_guarded(lambda some: run_isolated(pipeline, some), models, positions, self.crash_log)
        return self._outcomes(ids, kept, outcomes)

    def _validate(
        self, datas: list[Any], ids: list[Any], kept: list[tuple[int, int, Any]]
    ) -> tuple[list[BaseModel], list[Any], list[tuple[int, int, Any]]]:
        """Validate a sub-batch in one call; only when it holds an invalid record, record by record."""
        try:
            return self.proc.validate_many(datas), ids, kept
        except ValidationError:
            pass
        validate_one = self.proc.validate_one
        models, good_ids, good_kept = [], [], []
        for data, record_id, item in zip(datas, ids, kept, strict=True):
            try:
                models.append(validate_one(data))
            except ValidationError as exc:
                ordinal, pos, raw = item
                self._fail(ordinal, record_id, pos, RecordError("validate", "ValidationError",
                                                                describe_validation_error(exc)), raw)  # fmt: skip
                continue
            good_ids.append(record_id)
            good_kept.append(item)
        return models, good_ids, good_kept

    def _record_id(self, data: Any, key: str, pos: int, id_field: str | None) -> Any:
        if type(data) is not dict:
            return _BadId(f"the record is a JSON {type(data).__name__}, not an object")
        if REPLAY_ID_KEY in data:
            return data.pop(REPLAY_ID_KEY)
        if id_field is None:
            return f"{key}:{pos}"
        value = data.get(id_field)
        if type(value) is str or type(value) is int:
            return value
        if value is None:
            return _BadId(f"the record has no '{id_field}' field (the job's id_field)")
        return _BadId(f"'{id_field}' is a {type(value).__name__}; record ids must be str or int")

    def _outcomes(self, ids: list[Any], kept: list[tuple[int, int, Any]], outcomes: list[Any]) -> list[Success]:
        """The successes of a sub-batch (their queue records handed to the sender); failures to the failure rows."""
        serializer = self.proc.output_model.__pydantic_serializer__
        sender = self.sender
        job_id = self.job.job_id
        successes: list[Success] = []
        for record_id, (ordinal, pos, data), outcome in zip(ids, kept, outcomes, strict=True):
            if type(outcome) is RecordError:
                self._fail(ordinal, record_id, pos, outcome, data)
                continue
            body = serializer.to_json(outcome, exclude=ENVELOPE)
            successes.append(Success(record_id, outcome, body))
            if sender is not None:
                meta = orjson.dumps({"key": self.chunk.key, "position": pos})
                message = b'{"job_id":%s,"record_id":%s,"status":"success","output":%s,"meta":%s}' % (
                    self._job_json, orjson.dumps(record_id), body, meta)  # fmt: skip
                sender.add("success", ordinal, dedup_id(job_id, record_id), message)
        return successes


class _BadId:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def process_chunk(
    job: JobSpec,
    chunk: ChunkSpec,
    pipeline: InferencePipeline,
    queue_backend: QueueBackend | None = None,
    store: Store | None = None,
) -> ChunkResult:
    """Process one chunk with ``pipeline``: see :class:`ChunkProcessor` (which a worker keeps between chunks)."""
    return ChunkProcessor(pipeline, queue_backend, store).process(job, chunk)
