"""A batch job as a whole: planning with every check done before anything is written, and the manifest at the end.

:func:`plan_job` fails fast, writing nothing, when the input does not exist or holds unreadable files, the model
is unknown or its pipeline cannot be imported or declares no schemas, a named queue does not exist, the output
already belongs to another job, or the ``id_field`` is in none of the input's first records.
:func:`start_job` then claims the output (``_job.json``), and :func:`finalize_job` gathers the chunk results into
the summary and ``_manifest.json``.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from modalkit.batch.chunk import read_marker
from modalkit.batch.cost import Rate, rate_for
from modalkit.batch.efficiency import job_cost
from modalkit.batch.layout import OutputLayout
from modalkit.batch.planning import job_id_for, list_dataset, plan_chunks
from modalkit.batch.repeats import find_repeats, resolve_examples
from modalkit.batch.sampling import check_id_field
from modalkit.batch.storage import Store, default_store, is_remote
from modalkit.batch.timings import sum_stages
from modalkit.exceptions import ConfigError, ModalkitError
from modalkit.inference_pipeline import import_pipeline
from modalkit.iomodel import ChunkResult, ChunkSpec, IdOccurrence, JobSpec, JobSummary, QueueTarget, RepeatedId
from modalkit.queues import check_queues, create_backend, describe_target
from modalkit.settings import JobConfig, Settings
from modalkit.settings_errors import invalid_values

__all__ = [
    "InvalidJobParameters",
    "JobPlan",
    "check_job_queues",
    "dispatch_order",
    "errors_by_type",
    "finalize_job",
    "find_committed",
    "plan_job",
    "resolve_job_config",
    "start_job",
]

#: Commit markers read at once when a job resumes (S3 GETs are slow one by one, fast side by side).
MARKER_READERS = 16
#: Error types the manifest names with their counts and first example (the rest are counted in ``error_types``).
MANIFEST_ERROR_TYPES = 20
#: Failed chunks the manifest names with their error, and how much of each error (the rest are counted).
MANIFEST_FAILED_CHUNKS, MANIFEST_ERROR_CHARS = 100, 500


class JobPlan(BaseModel):
    """The job and its chunks (references only)."""

    job: JobSpec
    chunks: list[ChunkSpec]
    total_bytes: int
    #: keys under the input that are not part of the dataset (names starting with ``_`` or ``.``)
    skipped_files: list[str] = []
    #: the pipeline's version (its class attribute ``version``, or the model entry's): part of the job id
    pipeline_version: str | None = None
    #: where the job's queue records go (None: it names no queue)
    queues: QueueTarget | None = None
    #: the price of one of its containers (local workers), from app_settings.pricing (None: no price)
    rate: Rate | None = None


def resolve_job_config(settings: Settings, names: Mapping[str, str] | None = None, **overrides: Any) -> JobConfig:
    """``app_settings.job_config`` with the non-None ``overrides`` applied and validated (bounds included).

    Args:
        names: How each parameter is named to the caller (the CLI passes ``--chunk-size`` for ``chunk_size``).

    Raises:
        ConfigError: one line per bad value, naming the parameter, the value and what is allowed.
    """
    values = settings.app_settings.job_config.model_dump()
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return JobConfig.model_validate(values)
    except ValidationError as exc:
        raise InvalidJobParameters(invalid_values(exc, JobConfig, names)) from None


class InvalidJobParameters(ConfigError):
    """Job parameters out of their bounds; ``lines`` has one per bad value (name, value, what is allowed)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("invalid job parameter: " + "\ninvalid job parameter: ".join(lines))
        self.lines = lines


def plan_job(
    settings: Settings,
    input_uri: str,
    output_uri: str,
    model_name: str | None,
    config: JobConfig,
    store: Store | None = None,
) -> JobPlan:
    """Check everything, list the input and cut it into chunks, through ``store`` (default: the process's).
    Writes nothing.

    Raises:
        ConfigError: unknown model, unusable pipeline, bad parameters, an output owned by another job.
        StorageError: the input does not exist or cannot be read.
        QueueError: a named queue does not exist.
    """
    name, entry = settings.model_settings.entry(model_name)
    if entry.pipeline is None:
        raise ConfigError(f"model_settings.model_entries.{name}.pipeline is not set: batch jobs need the import path")
    pipeline_cls = import_pipeline(entry.pipeline, where=f"model_settings.model_entries.{name}.pipeline")
    pipeline_cls.require_schemas()
    pipeline_cls.validate_parameters(entry.kwargs, f"model_settings.model_entries.{name}")  # a typo fails here
    rate = rate_for(settings, config.backend)  # a GPU type the price table does not know fails here
    input_uri, output_uri = input_uri.rstrip("/"), output_uri.rstrip("/")
    store = store or default_store()
    _check_uris(store, input_uri, output_uri, config.backend)
    queues = check_job_queues(settings, config)
    skipped: list[str] = []
    files = list_dataset(input_uri, skipped, store=store)
    version = entry.version or (None if pipeline_cls.version is None else str(pipeline_cls.version))
    identity = {"output_uri": output_uri, "pipeline": entry.pipeline, **config.identity()}
    if version is not None:  # an unversioned pipeline keeps the ids its jobs had before versions existed
        identity["pipeline_version"] = version
    job_id = job_id_for(files, name, identity)
    _check_owner(store, output_uri, job_id, version)
    parameters = {field: getattr(config, field) for field in JobSpec.model_fields if field in JobConfig.model_fields}
    job = JobSpec(
        job_id=job_id,
        input_uri=input_uri,
        output_uri=output_uri,
        model_name=name,
        max_batch_size=settings.app_settings.batch_config.max_batch_size,
        **parameters,
    )
    chunks = plan_chunks(files, int(config.chunk_size), job_id, split_csv=config.split_csv, store=store)
    check_id_field(chunks, config.id_field, store)  # a typo in id_field fails here, not in every record
    return JobPlan(job=job, chunks=chunks, total_bytes=sum(f.size for f in files), skipped_files=skipped,
                   queues=queues, pipeline_version=version, rate=rate)  # fmt: skip


def _check_uris(store: Store, input_uri: str, output_uri: str, backend: str) -> None:
    inp, out = _normal(store, input_uri), _normal(store, output_uri)
    if out == inp or out.startswith(inp + "/"):
        raise ConfigError(f"output {output_uri} is inside the input {input_uri}; write results somewhere else")
    if backend == "modal":
        local = [u for u in (input_uri, output_uri) if not is_remote(u)]
        if local:
            raise ConfigError(
                f"backend 'modal' runs in the cloud and cannot reach the local path(s) {', '.join(local)}; "
                "use s3:// URIs (or --backend local)"
            )


def _normal(store: Store, uri: str) -> str:
    return uri.rstrip("/") if is_remote(uri) else store.filesystem(uri)[1].rstrip("/")


def check_job_queues(settings: Settings, config: JobConfig) -> QueueTarget | None:
    """The job's queues exist; returns where their records will go (None: the job names no queue).

    Raises:
        ConfigError: the job names queues and ``queue_config.backend`` is ``none``.
        QueueError: a named queue does not exist.
    """
    queues = [q for q in (config.success_queue, config.failure_queue) if q]
    if not queues:
        return None
    backend = create_backend(settings.app_settings.queue_config)
    if backend is None:
        raise ConfigError(f"the job names queue(s) {', '.join(queues)} but app_settings.queue_config.backend is 'none'")
    check_queues(backend, queues)  # raises QueueError naming a missing queue
    success, failure = config.success_queue, config.failure_queue
    return QueueTarget(
        backend=settings.app_settings.queue_config.backend,
        location=describe_target(backend, queues[0])[0],
        success_queue=describe_target(backend, success)[1] if success else None,
        failure_queue=describe_target(backend, failure)[1] if failure else None,
    )


def _check_owner(store: Store, output_uri: str, job_id: str, version: str | None = None) -> None:
    """The output is this job's, or empty (a replay's ``_replay/`` input aside): never another's, never foreign."""
    layout = OutputLayout(output_uri)
    claim = _read_claim(store, layout)
    if claim is None:
        replay_dir = layout.replay_dir.rsplit("/", 1)[-1]
        # a replay's input, and hidden files (.DS_Store, .gitkeep), are not results
        entries = store.list_names(output_uri, folders=True)
        claim_name = layout.job_claim.rsplit("/", 1)[-1]
        if claim_name in entries:  # a run of a job claimed it between the read and the listing (two started at once)
            _check_owner(store, output_uri, job_id, version)
            return
        foreign = [name for name in entries if name != replay_dir and not name.startswith(".")]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ConfigError(
                f"output {output_uri} holds files ({shown}) but no {claim_name}: it is not a modalkit job's output, "
                "or its claim was deleted; use an empty output (modalkit never writes into one it cannot tell is "
                "its own)"
            )
        return
    if claim.get("job_id") != job_id:
        raise _claimed_by_another(output_uri, claim, job_id, version)


def _read_claim(store: Store, layout: OutputLayout) -> dict[str, Any] | None:
    claim_uri = layout.job_claim
    if not store.exists(claim_uri):
        return None
    try:
        claim = orjson.loads(store.read_bytes(claim_uri))
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{claim_uri} is not valid JSON; delete it or use another output") from exc
    if not isinstance(claim, dict):
        raise ConfigError(f"{claim_uri} is not a job claim; delete it or use another output")
    return claim


def _claimed_by_another(output_uri: str, claim: dict[str, Any], job_id: str, version: str | None) -> ConfigError:
    if claim.get("pipeline_version") != version:
        return ConfigError(
            f"output {output_uri} holds job {claim.get('job_id')} of pipeline version "
            f"{_version_name(claim.get('pipeline_version'))}; this run is pipeline version {_version_name(version)} "
            "(a new version never reuses another version's chunks): write to a new output, or rerun only that "
            f"job's failures with the new version: modalkit replay {output_uri} NEW_OUTPUT_URI"
        )
    return ConfigError(
        f"output {output_uri} already holds job {claim.get('job_id')} (input {claim.get('input_uri')}, "
        f"model {claim.get('model_name')}); this run is job {job_id}: use another output or delete that one"
    )


def start_job(plan: JobPlan, store: Store | None = None) -> None:
    """Claim the output for this job (``_job.json``) through ``store`` (default: the process's); the first thing a
    job writes.

    The claim is created atomically (only when no claim exists), then read back: of two jobs started at once on
    one output exactly one gets it, and the other stops before writing anything. A run of the same job (a resume)
    finds its own claim and goes on.

    Raises:
        ConfigError: another job claimed the output first.
    """
    layout = OutputLayout(plan.job.output_uri)
    claim = {
        **plan.job.model_dump(),
        "pipeline_version": plan.pipeline_version,
        "chunks": len(plan.chunks),
        "created_at": _now(),
    }
    store = store or default_store()
    if store.create_exclusive(layout.job_claim, orjson.dumps(claim, option=orjson.OPT_INDENT_2)):
        return
    existing = _read_claim(store, layout) or {}
    if existing.get("job_id") != plan.job.job_id:
        raise _claimed_by_another(plan.job.output_uri, existing, plan.job.job_id, plan.pipeline_version)


def find_committed(
    plan: JobPlan, store: Store | None = None, known: Mapping[int, ChunkResult] | None = None
) -> dict[int, ChunkResult]:
    """The chunks of ``plan`` already committed (resume): their results, read from their markers through ``store``
    (default: the process's).

    The output's ``_chunks/`` folder is listed once and every marker in it is read, but those of ``known``: results
    read from these markers before (a marker, once written, does not change). A job run again sends these chunks
    nowhere: no worker, no Modal call.

    Raises:
        ConfigError: a marker commits a chunk of another job, of another range, or one this plan does not have.
    """
    layout = OutputLayout(plan.job.output_uri, plan.job.output_format)
    chunks = {chunk.index: chunk for chunk in plan.chunks}
    store = store or default_store()
    found = layout.committed_indices(store)
    foreign = sorted(i for i in found if i not in chunks)
    if foreign:
        raise ConfigError(
            f"{layout.marker(foreign[0])} commits a chunk this run does not have (it plans {len(chunks)} chunks): "
            f"the output {layout.root} holds results of another job or of other parameters; use another output or "
            "delete that one"
        )
    known = known or {}
    done = {index: known[index] for index in found if index in known}
    unread = [index for index in found if index not in known]
    if not unread:
        return done
    if not is_remote(plan.job.output_uri):  # local markers: threads would only take turns holding the interpreter
        return {**done, **{i: read_marker(layout.marker(i), plan.job.job_id, chunks[i], store) for i in unread}}
    with concurrent.futures.ThreadPoolExecutor(min(MARKER_READERS, len(unread))) as pool:
        results = pool.map(
            lambda index: read_marker(layout.marker(index), plan.job.job_id, chunks[index], store), unread
        )
        return {**done, **{result.index: result for result in results}}


def dispatch_order(chunks: Sequence[ChunkSpec]) -> list[ChunkSpec]:
    """The order chunks are sent in: largest first, so that small chunks fill the tail of the job."""
    return sorted(chunks, key=lambda c: (-c.size, c.index))


def finalize_job(
    plan: JobPlan,
    results: Sequence[ChunkResult],
    seconds: float,
    failed_chunks: int | Sequence[tuple[int, str]] = 0,
    store: Store | None = None,
) -> JobSummary:
    """Sum the chunk results into the summary, write ``_manifest.json`` through ``store`` (default: the process's)
    and return the summary.

    ``failed_chunks`` is how many chunks failed after their retries, or those chunks as ``(index, error)`` pairs
    (the manifest names the first hundred). The manifest holds the summary, the totals and the failures by error
    type, never one entry per chunk: each chunk's own result is in its commit marker, so its size does not grow
    with the number of chunks. ``status`` is ``failed`` when chunks failed or the failure rate passed
    ``max_failure_rate``. With an
    ``id_field``, the ids that occur more than once anywhere in the job (every chunk's, committed before or now)
    are counted and the first few named (:mod:`~modalkit.batch.repeats`). The chunks' stage seconds are summed
    with the device's busy share and the bottleneck (:mod:`~modalkit.batch.timings`; none when no chunk was timed).
    """
    job = plan.job
    store = store or default_store()
    records = sum(r.records for r in results)
    failed = sum(r.failed for r in results)
    fresh = sum(r.records for r in results if not r.skipped)
    rate = failed / records if records else 0.0
    chunk_errors = [] if isinstance(failed_chunks, int) else list(failed_chunks)
    failed_count = failed_chunks if isinstance(failed_chunks, int) else len(chunk_errors)
    status = "failed" if failed_count or rate > job.max_failure_rate else "completed"
    timings = sum_stages(results)  # the chunks' stage seconds, those committed by an earlier run included
    bill = job_cost(results, plan.rate, ended_at=time.time(), max_batch_size=job.max_batch_size, backend=job.backend)
    summary = JobSummary(
        job_id=job.job_id,
        records=records,
        succeeded=sum(r.succeeded for r in results),
        failed=failed,
        chunks=len(plan.chunks),
        chunks_skipped=sum(1 for r in results if r.skipped),
        seconds=round(seconds, 3),
        records_per_s=round(fresh / seconds, 1) if seconds > 0 else 0.0,
        output_uri=job.output_uri,
        status=status,
        failure_rate=round(rate, 6),
        input_uri=job.input_uri,
        model_name=job.model_name,
        files_skipped=len(plan.skipped_files),
        queues=plan.queues,
        **(timings.summary_fields() if timings is not None else {}),
        max_batch_size=job.max_batch_size,
        **(bill.summary_fields() if results else {}),
    )
    if job.id_field is not None:
        earlier = _earlier_repeats(job, summary, results, store)
        summary.duplicate_ids, summary.duplicate_examples = earlier or _repeated_ids(job, results, store)
    manifest = {
        **summary.model_dump(),
        "chunks_failed": failed_count,
        "failed_chunk_errors": [
            {"index": i, "error": e[:MANIFEST_ERROR_CHARS]} for i, e in sorted(chunk_errors)[:MANIFEST_FAILED_CHUNKS]
        ],
        "queued_success": sum(r.queued_success for r in results),
        "queued_failure": sum(r.queued_failure for r in results),
        "parameters": job.model_dump(),
        "finished_at": _now(),
        **_aggregates(results),
    }
    store.write_bytes(OutputLayout(job.output_uri).manifest, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    store.remove_staging_dirs(job.output_uri)  # of workers killed mid-chunk in this run or an earlier one
    return summary


def errors_by_type(results: Sequence[ChunkResult]) -> tuple[Counter[str], dict[str, str]]:
    """Failed records of ``results`` by error type, and the first example of each in chunk order."""
    by_type: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for result in sorted(results, key=lambda r: r.index):
        by_type.update(result.errors_by_type)
        for error_type, example in result.error_examples.items():
            examples.setdefault(error_type, example)
    return by_type, examples


def _aggregates(results: Sequence[ChunkResult]) -> dict[str, Any]:
    """What the manifest says of the chunks as a whole, in a size that does not grow with their number (each
    chunk's own result is in its commit marker): failed records by error type with the first example of each, and
    when the first chunk started."""
    by_type, examples = errors_by_type(results)
    started = [r.started_at for r in results if r.started_at]
    return {
        "errors_by_type": dict(by_type.most_common(MANIFEST_ERROR_TYPES)),
        "error_examples": {t: examples[t] for t, _ in by_type.most_common(MANIFEST_ERROR_TYPES) if t in examples},
        "error_types": len(by_type),
        "first_chunk_started_at": min(started) if started else None,
    }


def _earlier_repeats(
    job: JobSpec, summary: JobSummary, results: Sequence[ChunkResult], store: Store
) -> tuple[int, list[RepeatedId]] | None:
    """The repeated ids the manifest of an earlier run counted, when this run ran no chunk and that one counted
    over the same chunks: the same job, every chunk committed (none failed), the same records. Markers never
    change once written, so the count would be the same; a finished job run again does not merge its id hashes
    again (0.3 s for 100,000 records). None when it must count them itself."""
    if not results or not all(r.skipped for r in results):
        return None
    try:
        earlier = orjson.loads(store.read_bytes(OutputLayout(job.output_uri).manifest))
        same = (
            earlier.get("job_id") == job.job_id
            and earlier.get("chunks") == summary.chunks
            and earlier.get("chunks_failed") == 0
            and earlier.get("records") == summary.records
            and isinstance(earlier.get("duplicate_ids"), int)
        )
        if not same:
            return None
        return earlier["duplicate_ids"], [RepeatedId.model_validate(e) for e in earlier.get("duplicate_examples", [])]
    except (ModalkitError, ValueError):  # no manifest, or one this version cannot read: count them
        return None


def _repeated_ids(job: JobSpec, results: Sequence[ChunkResult], store: Store) -> tuple[int, list[RepeatedId]]:
    """How many ids occur more than once in the job's chunks, and the first few with their places."""
    layout = OutputLayout(job.output_uri, job.output_format)
    with_records = [r.index for r in results if r.records]
    found = find_repeats({i: layout.ids(i) for i in with_records}, store, sum(r.records for r in results))
    parts = {i: [layout.part(i), layout.failures(i)] for i in {r.places[0][0] for r in found.examples}}
    examples = [
        RepeatedId(
            record_id=record_id,
            count=repeat.count,
            occurrences=[IdOccurrence(key=key, position=pos) for _, key, pos in repeat.places],
        )
        for record_id, repeat in resolve_examples(found.examples, parts, store)
    ]
    return found.count, examples


def _version_name(version: object) -> str:
    return "(none)" if version is None else repr(str(version))


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
