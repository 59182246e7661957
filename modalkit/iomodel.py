"""Input/output models: HTTP envelopes, queue records, and the batch job's chunk and summary models.

Example:
    >>> from pydantic import BaseModel
    >>> from modalkit.iomodel import AsyncInputModel
    >>> class TextIn(BaseModel):
    ...     text: str
    >>> AsyncInputModel[TextIn](message={"text": "hi"}, success_queue="done").message.text
    'hi'
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, Generic, Literal, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from modalkit.settings import BatchConfig, JobConfig

__all__ = [
    "OUTPUT_ENVELOPE",
    "AsyncInputModel",
    "AsyncOutputModel",
    "ByteRange",
    "ChunkPiece",
    "ChunkResult",
    "ChunkSpec",
    "CsvCut",
    "CsvRows",
    "DelayedFailureOutputModel",
    "ErrorBody",
    "Extent",
    "FailureRecord",
    "IdOccurrence",
    "InferenceOutputModel",
    "JobSpec",
    "JobStatus",
    "JobSummary",
    "RepeatedId",
    "RowGroups",
    "Stage",
    "StageSeconds",
    "SuccessRecord",
    "SyncInputModel",
    "describe_validation_error",
    "json_template",
    "truncate_failure_input",
]

T = TypeVar("T", bound=BaseModel)

#: Where a record failed: parsing its bytes, validating it against the input model, or a pipeline stage.
Stage = Literal["parse", "validate", "preprocess", "predict", "postprocess"]


class AsyncOutputModel(BaseModel):
    """The answer to an async request: the id to follow the job with."""

    job_id: str = Field(description="Id of the asynchronous job (see GET /jobs/{job_id}).")


class AsyncInputModel(BaseModel, Generic[T]):
    """An async request: the message plus where its result goes.

    Unknown fields are rejected.
    """

    model_config = ConfigDict(extra="forbid")

    message: T = Field(description="The input for the pipeline.")
    success_queue: str = Field("", description="Queue for the success record; empty = none.")
    failure_queue: str = Field("", description="Queue for the failure record; empty = none.")
    meta: dict[str, Any] = Field(default_factory=dict, description="Carried unchanged into the queue record.")


class SyncInputModel(BaseModel, Generic[T]):
    """A synchronous request: just the message. Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")

    message: T = Field(description="The input for the pipeline.")


#: The InferenceOutputModel fields that describe the outcome, not the result: never part of a success row or of a
#: success record's ``output``.
OUTPUT_ENVELOPE: set[str] = {"status", "error", "meta"}


class InferenceOutputModel(BaseModel):
    """Base of every pipeline output model.

    Subclasses add their fields (``label``, ``score``...). ``status``, ``error`` and ``meta`` are the envelope: a
    pipeline leaves them at their defaults; modalkit fills ``status``/``error`` for inputs that failed and, for an
    async request, ``meta`` with the request's.
    """

    model_config = ConfigDict(extra="allow")

    status: str = Field("success", description="`success`, or `error` for an input that failed.")
    error: str | None = Field(None, description="What went wrong, for an input that failed.")
    meta: dict[str, Any] = Field(default_factory=dict, description="The async request's meta, carried through.")


class DelayedFailureOutputModel(InferenceOutputModel):
    """A failure answered through a queue: carries the original request (kept from the original modalkit)."""

    original_message: AsyncInputModel[Any]


#: The fields an error body and a failure record share (one definition, one description).
ErrorType = Annotated[
    str, Field(description="Class name of the error, e.g. ValidationError, JSONDecodeError, Unauthorized, Overloaded.")
]
_ERROR_TEXT = "What went wrong, naming the file, position and field where known, and what to do next where it helps."
ErrorText = Annotated[str, Field(description=_ERROR_TEXT)]
#: A record id: the value of the job's ``id_field`` as the input had it (a string or an integer), else a string.
RecordId = Annotated[str | int, Field(description="The record's id: a string or an integer, as the input had it.")]


class ErrorBody(BaseModel):
    """The one shape of every error a client sees: an HTTP error body, and the error part of a failure record.

    ``stage`` names the pipeline stage a record failed in; it is None for errors that are not a record's
    (a missing key, a full server).
    """

    status: Literal["error"] = "error"
    stage: Stage | None = Field(
        None, description="parse, validate, preprocess, predict, postprocess; None when no record stage."
    )
    error_type: ErrorType
    error: ErrorText


class SuccessRecord(BaseModel):
    """Body of a message on the success queue."""

    job_id: str
    record_id: RecordId
    status: Literal["success"] = "success"
    output: dict[str, Any] = Field(description="The output model's fields, without status, error and meta.")
    meta: dict[str, Any] = Field(default_factory=dict)


class FailureRecord(BaseModel):
    """Body of a message on the failure queue, and a row of ``_failures/part-NNNNN.jsonl``.

    Its ``status``, ``stage``, ``error_type`` and ``error`` are an :class:`ErrorBody` (with a stage always).
    """

    job_id: str
    record_id: RecordId
    status: Literal["error"] = "error"
    stage: Stage = Field(description="parse, validate, preprocess, predict or postprocess.")
    error_type: ErrorType
    error: ErrorText
    input: Any = Field(None, description="The record as read (parsed JSON, CSV row as a dict, or the raw line).")
    meta: dict[str, Any] = Field(default_factory=dict)
    input_truncated: bool = Field(
        False,
        exclude_if=lambda cut: not cut,
        description="Present (true) only when a queue with a size limit got just the start of the input, as text "
        "(a batch job's failure file holds it whole).",
    )


#: A cut input keeps at most this many characters.
MAX_CUT_INPUT_CHARS = 16 * 1024


def truncate_failure_input(body: str, max_bytes: int) -> str | None:
    """A failure record's body cut to fit ``max_bytes`` (UTF-8): its input becomes the start of the input's text
    plus ``...``, and ``input_truncated`` is true. None when ``body`` is not a failure record, or does not fit even
    without its input. For queues with a size limit and nowhere to put a larger body.

    Example:
        >>> body = FailureRecord(job_id="j", record_id=1, stage="validate", error_type="E", error="bad",
        ...                      input="x" * 5000).model_dump_json()
        >>> cut = FailureRecord.model_validate_json(truncate_failure_input(body, 1024))
        >>> cut.input_truncated, cut.input[-3:]
        (True, '...')
    """
    try:
        record = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(record) is not dict or record.get("status") != "error" or "input" not in record:
        return None
    value = record["input"]
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    rest = len(orjson.dumps({**record, "input": "...", "input_truncated": True}))
    # a character takes at most 6 bytes in JSON (a control character escaped as \u00XX)
    keep = min(MAX_CUT_INPUT_CHARS, (max_bytes - rest) // 6)
    if keep < 0:
        return None
    return orjson.dumps({**record, "input": text[:keep] + "...", "input_truncated": True}).decode()


def json_template(model: type[BaseModel], slots: Sequence[str]) -> bytes:
    """A ``model`` record's JSON object as a ``bytes`` %-template, for loops that build records as bytes.

    The fields named in ``slots`` (in the model's field order) become ``%s`` placeholders for JSON values; every
    other field is written with its default. The keys come from the model, so a renamed field fails here.

    Example:
        >>> json_template(SuccessRecord, ["job_id", "record_id", "output", "meta"]) % (b'"j"', b"7", b"{}", b"{}")
        b'{"job_id":"j","record_id":7,"status":"success","output":{},"meta":{}}'

    Raises:
        ValueError: a slot is not a field of the model, the slots are out of order, or a field outside the slots
            has no default.
    """
    fields = model.model_fields
    order = [name for name in fields if name in slots]
    if order != list(slots):
        raise ValueError(f"{model.__name__}: slots {list(slots)} must be fields, in field order ({list(fields)})")
    parts = []
    for name, info in fields.items():
        key = orjson.dumps(name).replace(b"%", b"%%")
        if name in slots:
            parts.append(key + b":%s")
        elif info.is_required() or info.default_factory is not None:
            raise ValueError(f"{model.__name__}.{name} has no plain default: make it a slot")
        elif not (info.exclude_if is not None and info.exclude_if(info.default)):
            parts.append(key + b":" + orjson.dumps(info.default).replace(b"%", b"%%"))
    return b"{" + b",".join(parts) + b"}"


def _declared(section: type[BaseModel], name: str) -> Any:
    """The field ``name`` of a settings section, to declare the same field on another model (a copy: pydantic
    completes a field with the annotation it is given, which must not change the section's own)."""
    return copy.copy(section.model_fields[name])


class JobSpec(BaseModel):
    """What every chunk of a batch job shares: where results go and how records are read and reported.

    The job parameters are ``JobConfig``'s fields (and ``BatchConfig.max_batch_size``) as declared there: the same
    type, default, bounds and description, so a spec holds nothing the settings would refuse.
    """

    model_config = ConfigDict(frozen=True)

    job_id: str
    input_uri: str
    output_uri: str
    model_name: str
    id_field: str | None = _declared(JobConfig, "id_field")
    output_format: Literal["jsonl", "parquet"] = _declared(JobConfig, "output_format")
    success_queue: str | None = _declared(JobConfig, "success_queue")
    failure_queue: str | None = _declared(JobConfig, "failure_queue")
    max_batch_size: int = _declared(BatchConfig, "max_batch_size")
    chunk_size: ByteSize = _declared(JobConfig, "chunk_size")
    max_failure_rate: float = _declared(JobConfig, "max_failure_rate")
    backend: Literal["local", "modal"] = _declared(JobConfig, "backend")
    prefetch_batches: int = _declared(JobConfig, "prefetch_batches")


class ByteRange(BaseModel):
    """JSONL: the lines that start in ``[start, end)`` of the file (a line running over ``end`` is read whole)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["bytes"] = "bytes"
    start: int = Field(0, ge=0, description="First byte; the chunk owns the lines that start in [start, end).")
    end: int | None = Field(None, ge=1, description="End byte (exclusive); None = the end of the file.")


class CsvCut(BaseModel):
    """How a CSV file was cut at line ends (``split_csv``): what a chunk needs to prove it starts at a record."""

    model_config = ConfigDict(frozen=True)

    first_start: int = Field(ge=0, description="Where the file's first range starts (right after the header).")
    step: int = Field(ge=1, description="Bytes between cut points.")
    part: int = Field(ge=0, description="Which range of the file this is: 0 for the first.")


class CsvRows(BaseModel):
    """CSV: the rows that start in ``[start, end)``, with the file's column names; cut only with ``split_csv``."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["csv"] = "csv"
    header: tuple[str, ...] = Field(min_length=1, description="The column names, read from the file's first line.")
    start: int = Field(0, ge=0, description="First byte (after the header line for the first range).")
    end: int | None = Field(None, ge=1, description="End byte (exclusive); None = the end of the file.")
    cut: CsvCut | None = Field(None, description="Set when the file is cut into several ranges; None = one range.")


class RowGroups(BaseModel):
    """Parquet: whole row groups (never split), and the file's row index of the first row they hold."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["row_groups"] = "row_groups"
    groups: tuple[int, ...] = Field(min_length=1, description="The row groups, in file order.")
    first_row: int = Field(0, ge=0, description="The index in the file of the chunk's first row.")


#: Which part of its file a chunk is: one typed extent per format family, told apart by ``kind``.
Extent = Annotated[ByteRange | CsvRows | RowGroups, Field(discriminator="kind")]


class ChunkPiece(BaseModel):
    """One piece of a packed chunk after its first: a whole small file, or a range of a large one."""

    model_config = ConfigDict(frozen=True)

    uri: str = Field(description="The input file (s3://..., file://... or a local path).")
    key: str = Field(description="The file's key relative to the input root; the prefix of default record ids.")
    format: str = Field(description="The input format plug-in that reads it: jsonl, csv or parquet.")
    compression: str | None = Field(None, description="The codec the file is compressed with (gzip), if any.")
    extent: Extent = Field(description="Which part of the file: a byte range, CSV rows or Parquet row groups.")
    size: int = Field(0, ge=0, description="Approximate input bytes of the piece.")


class ChunkSpec(BaseModel):
    """A reference to one chunk of the input: which part of which file (its :data:`Extent`), and where it reads;
    a chunk packed from several small files holds the others in ``more`` (:meth:`pieces` gives them all).

    Travels between processes and to Modal workers as JSON (``model_dump(mode="json")``/``model_validate``); never
    carries record data. A chunk of one piece dumps without ``more``: its JSON is what it was before chunks were
    packed, so markers and workers of earlier versions read it as they did.

    Example:
        >>> from modalkit.iomodel import ByteRange, ChunkPiece, ChunkSpec
        >>> one = ChunkSpec(job_id="j", index=0, uri="a.jsonl", key="a.jsonl", format="jsonl", extent=ByteRange())
        >>> "more" in one.model_dump()
        False
        >>> two = one.model_copy(update={"more": (ChunkPiece(uri="b.jsonl", key="b.jsonl", format="jsonl",
        ...                                                  extent=ByteRange()),)})
        >>> [p.key for p in two.pieces()]
        ['a.jsonl', 'b.jsonl']
    """

    model_config = ConfigDict(frozen=True)

    job_id: str
    index: int = Field(ge=0, description="Chunk number N: it names the chunk's part, failure and marker files.")
    uri: str = Field(description="The input file (s3://..., file://... or a local path).")
    key: str = Field(description="The file's key relative to the input root; the prefix of default record ids.")
    format: str = Field(description="The input format plug-in that reads it: jsonl, csv or parquet.")
    compression: str | None = Field(None, description="The codec the file is compressed with (gzip), if any.")
    extent: Extent = Field(description="Which part of the file: a byte range, CSV rows or Parquet row groups.")
    size: int = Field(
        0, ge=0, description="Approximate input bytes of the chunk, all its pieces (for progress and balance)."
    )
    more: tuple[ChunkPiece, ...] = Field(
        (), description="The chunk's other pieces, in listing order, when small files were packed into it."
    )

    @model_serializer(mode="wrap")
    def _without_empty_more(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if not self.more and isinstance(data, dict):
            data.pop("more", None)  # a one-piece chunk's JSON stays what it was before packing
        return data

    def pieces(self) -> list[ChunkSpec]:
        """Every piece of the chunk, in reading order, each as a one-piece ChunkSpec of this chunk (its job id and
        index), which a format reads like any chunk."""
        return list(self._piece_views) if self.more else [self]

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()  # what goes to a worker process: the fields, not the views made of them
        state["__dict__"] = {k: v for k, v in state["__dict__"].items() if k != "_piece_views"}
        return state

    def iter_pieces(self) -> Iterator[ChunkSpec]:
        """The pieces :meth:`pieces` gives, made one by one as they are asked for (the first few of a chunk of
        1,000 without making the rest)."""
        if not self.more or "_piece_views" in self.__dict__:
            yield from self.pieces()
            return
        yield self.model_copy(update={"more": (), "size": max(0, self.size - sum(p.size for p in self.more))})
        for p in self.more:
            yield ChunkSpec.model_construct(job_id=self.job_id, index=self.index, **dict(p))

    @functools.cached_property
    def _piece_views(self) -> tuple[ChunkSpec, ...]:
        # made once a chunk (asked for four times a chunk: 15 ms each at 1,000 pieces), kept out of the fields (and
        # so out of equality and dumps); built without validating again what the chunk's own validation checked
        return tuple(self.iter_pieces())


class StageSeconds(BaseModel):
    """Seconds a chunk (or, summed, a job) spent in each stage of the engine, and the device's share of the wall.

    Each figure is the time the stage's own work took, on whichever thread ran it: ``read`` (input bytes and
    records out of the file), ``parse`` (JSON and CSV parsing, record ids, validation against the input model),
    ``preprocess``, ``predict`` and ``postprocess`` (the pipeline's three steps, retries of a split batch
    included), ``write`` (part and failure rows to local staging, and the upload of those files) and ``queue``
    (queue records spooled and sent). ``device_busy`` is ``predict`` over the wall it was measured against (the
    chunk's ``seconds``; for a job, the sum of its chunks' seconds): the share of time the device worked.
    """

    read: float = 0.0
    parse: float = 0.0
    preprocess: float = 0.0
    predict: float = 0.0
    postprocess: float = 0.0
    write: float = 0.0
    queue: float = 0.0
    device_busy: float = Field(0.0, description="predict / wall: the share of the wall the device worked (0..1).")


class ChunkResult(BaseModel):
    """What a finished chunk reports back: counts, never data."""

    index: int
    records: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: bool = Field(False, description="True when the chunk was already committed (resume).")
    started_at: float = Field(0.0, description="When the chunk began processing (seconds since the epoch).")
    seconds: float = 0.0
    part_uri: str | None = None
    failures_uri: str | None = None
    queued_success: int = 0
    queued_failure: int = 0
    errors_by_type: dict[str, int] = Field(default_factory=dict, description="Failed records per error_type.")
    error_examples: dict[str, str] = Field(
        default_factory=dict, description="The first failure's stage and message per error_type (for the report)."
    )
    stages: StageSeconds | None = Field(
        None, description="Seconds in each stage and the device's busy share; None from a worker that does not time."
    )
    batches: int = Field(0, description="Calls of the pipeline's predict: the device's batches (halves included).")
    batched_records: int = Field(0, description="Records in those calls: over batches, the mean batch size.")
    worker: str = Field("", description="The worker that ran it: host:pid of a local worker, a Modal task's id.")
    cold_start_seconds: float = Field(
        0.0, description="On a worker's first chunk: seconds from its process start to loading the pipeline; else 0."
    )
    model_load_seconds: float = Field(0.0, description="On a worker's first chunk: seconds loading the pipeline.")
    ready_at: float = Field(0.0, description="On a worker's first chunk: when its pipeline was loaded (epoch s).")


class IdOccurrence(BaseModel):
    """Where a record is: its file's key and its position (byte offset of its line, or row index)."""

    key: str
    position: int


class RepeatedId(BaseModel):
    """An id that occurs more than once in a job: the id, how many records have it, and the first places."""

    record_id: str | int
    count: int
    occurrences: list[IdOccurrence]


class QueueTarget(BaseModel):
    """Where a batch job's queue records go: the backend, where it keeps them, and each queue's address there."""

    backend: str = Field(description="The queue backend: local, sqs, memory, or a registered name.")
    location: str = Field(description="Where that backend keeps records: the SQLite file, the SQS endpoint...")
    success_queue: str | None = Field(None, description="The success queue: its name, or its URL on SQS.")
    failure_queue: str | None = Field(None, description="The failure queue: its name, or its URL on SQS.")


class JobSummary(BaseModel):
    """The summary of a batch job: the flow's return value, the ``--json`` line, ``_manifest.json``'s top level."""

    job_id: str
    records: int
    succeeded: int
    failed: int
    chunks: int
    chunks_skipped: int
    seconds: float
    records_per_s: float
    output_uri: str
    status: Literal["completed", "failed"] = "completed"
    failure_rate: float = 0.0
    input_uri: str = ""
    model_name: str = ""
    files_skipped: int = Field(0, description="Input files left out because a name on their path starts with _ or .")
    duplicate_ids: int = Field(
        0, description="How many ids occur more than once anywhere in the job (only ids from the id_field can)."
    )
    duplicate_examples: list[RepeatedId] = Field(
        default_factory=list, description="The first repeated ids in job order, each with its first places."
    )
    queues: QueueTarget | None = Field(None, description="Where the queue records went; None: the job names no queue.")
    stage_seconds: dict[str, float] | None = Field(
        None,
        description="Seconds in each stage (read, parse, preprocess, predict, postprocess, write, queue), summed over "
        "the timed chunks, those of earlier runs included; None when no chunk was timed.",
    )
    device_busy_fraction: float | None = Field(
        None, description="The timed chunks' predict seconds over their seconds: the share of time the device worked."
    )
    chunk_seconds: float | None = Field(
        None, description="The timed chunks' seconds, summed: what stage shares and the busy fraction are of."
    )
    timed_chunks: int = Field(0, description="How many chunks the stage timings cover (their workers timed them).")
    bottleneck: Literal["device", "host"] | None = Field(
        None, description="device: it was busy most of the time; host: it waited on the host stages."
    )
    bottleneck_note: str | None = Field(
        None, description="The bottleneck in a sentence: the busy share, the slowest host stage, what to do."
    )
    device_seconds: float = Field(0.0, description="Seconds the devices were busy: the chunks' predict, summed.")
    container_seconds: float = Field(
        0.0, description="Seconds the containers (local workers) were up and billed: busy plus every idle second."
    )
    device_idle_seconds: dict[str, float] | None = Field(
        None,
        description="Seconds the devices were idle, by cause: cold_start, model_load, host_wait (inside chunks), "
        "between_chunks, after_last; None before any chunk ran.",
    )
    mean_batch_size: float = Field(0.0, description="Records per call of predict (against max_batch_size).")
    max_batch_size: int = Field(0, description="The job's max_batch_size: the most records per call of predict.")
    records_per_device_second: float = Field(0.0, description="Records over device_seconds.")
    cost_usd: float = Field(0.0, description="container_seconds x price_usd_per_hour / 3600; 0 with no price.")
    cost_per_1000: float = Field(0.0, description="Dollars per 1,000 records: cost_usd / records x 1000.")
    cost_per_1000_succeeded: float = Field(0.0, description="Dollars per 1,000 succeeded records (all the cost).")
    cost_failed_usd: float = Field(0.0, description="The failed records' share of cost_usd.")
    price_usd_per_hour: float = Field(0.0, description="The price of one container (local worker) per hour.")
    price_source: str = Field("", description="Where that price came from (app_settings.pricing).")
    cost_note: str | None = Field(
        None, description="Where the money went, and what to do about its largest idle share."
    )


class JobStatus(BaseModel):
    """State of an async online job, as GET /jobs/{job_id} returns it."""

    job_id: str
    status: Literal["queued", "running", "success", "error", "unknown"]
    result: dict[str, Any] | None = None
    error: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict, description="The async request's meta, as it was sent.")


def describe_validation_error(exc: ValidationError) -> str:
    """``field 'text': Field required; field 'score': Input should be a valid number`` (first five)."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"field '{loc}': {err['msg']}" if loc else err["msg"])
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
