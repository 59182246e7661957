"""A batch job as a whole: planning with every check done before anything is written, and the manifest at the end.

:func:`plan_job` fails fast, writing nothing, when the input does not exist or holds unreadable files, the model
is unknown or its pipeline cannot be imported or declares no schemas, a named queue does not exist, or the output
already belongs to another job. :func:`start_job` then claims the output (``_job.json``), and
:func:`finalize_job` gathers the chunk results into the summary and ``_manifest.json``.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from modalkit.batch import storage
from modalkit.batch.chunk import read_marker
from modalkit.batch.layout import OutputLayout
from modalkit.batch.planning import job_id_for, list_dataset, plan_chunks
from modalkit.exceptions import ConfigError
from modalkit.inference_pipeline import import_pipeline
from modalkit.iomodel import ChunkResult, ChunkSpec, JobSpec, JobSummary
from modalkit.queues import check_queues, create_backend
from modalkit.settings import JobConfig, Settings
from modalkit.settings_errors import invalid_values

__all__ = [
    "InvalidJobParameters",
    "JobPlan",
    "dispatch_order",
    "finalize_job",
    "find_committed",
    "plan_job",
    "resolve_job_config",
    "start_job",
]

#: Commit markers read at once when a job resumes (S3 GETs are slow one by one, fast side by side).
MARKER_READERS = 16


class JobPlan(BaseModel):
    """The job and its chunks (references only)."""

    job: JobSpec
    chunks: list[ChunkSpec]
    total_bytes: int


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

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.lines,))


def plan_job(settings: Settings, input_uri: str, output_uri: str, model_name: str | None, config: JobConfig) -> JobPlan:
    """Check everything, list the input and cut it into chunks. Writes nothing.

    Raises:
        ConfigError: unknown model, unusable pipeline, bad parameters, an output owned by another job.
        StorageError: the input does not exist or cannot be read.
        QueueError: a named queue does not exist.
    """
    name, entry = settings.model_settings.entry(model_name)
    if entry.pipeline is None:
        raise ConfigError(f"model_settings.model_entries.{name}.pipeline is not set: batch jobs need the import path")
    import_pipeline(entry.pipeline, where=f"model_settings.model_entries.{name}.pipeline").require_schemas()
    input_uri, output_uri = input_uri.rstrip("/"), output_uri.rstrip("/")
    _check_uris(input_uri, output_uri, config.backend)
    _check_queues(settings, config)
    files = list_dataset(input_uri)
    params = {
        "output_uri": output_uri,
        "chunk_size": int(config.chunk_size),
        "split_csv": config.split_csv,
        "id_field": config.id_field,
        "output_format": config.output_format,
        "success_queue": config.success_queue,
        "failure_queue": config.failure_queue,
        "pipeline": entry.pipeline,
    }
    job_id = job_id_for(files, name, params)
    _check_owner(output_uri, job_id)
    job = JobSpec(
        job_id=job_id,
        input_uri=input_uri,
        output_uri=output_uri,
        model_name=name,
        id_field=config.id_field,
        output_format=config.output_format,
        success_queue=config.success_queue,
        failure_queue=config.failure_queue,
        max_batch_size=settings.app_settings.batch_config.max_batch_size,
        chunk_size=int(config.chunk_size),
        max_failure_rate=config.max_failure_rate,
        backend=config.backend,
    )
    chunks = plan_chunks(files, int(config.chunk_size), job_id, split_csv=config.split_csv)
    return JobPlan(job=job, chunks=chunks, total_bytes=sum(f.size for f in files))


def _check_uris(input_uri: str, output_uri: str, backend: str) -> None:
    inp, out = _normal(input_uri), _normal(output_uri)
    if out == inp or out.startswith(inp + "/"):
        raise ConfigError(f"output {output_uri} is inside the input {input_uri}; write results somewhere else")
    if backend == "modal":
        local = [u for u in (input_uri, output_uri) if not storage.is_remote(u)]
        if local:
            raise ConfigError(
                f"backend 'modal' runs in the cloud and cannot reach the local path(s) {', '.join(local)}; "
                "use s3:// URIs (or --backend local)"
            )


def _normal(uri: str) -> str:
    return uri.rstrip("/") if storage.is_remote(uri) else storage.filesystem(uri)[1].rstrip("/")


def _check_queues(settings: Settings, config: JobConfig) -> None:
    queues = [q for q in (config.success_queue, config.failure_queue) if q]
    if not queues:
        return
    backend = create_backend(settings.app_settings.queue_config)
    if backend is None:
        raise ConfigError(f"the job names queue(s) {', '.join(queues)} but app_settings.queue_config.backend is 'none'")
    check_queues(backend, queues)  # raises QueueError naming a missing queue


def _check_owner(output_uri: str, job_id: str) -> None:
    claim_uri = OutputLayout(output_uri).job_claim
    if not storage.exists(claim_uri):
        return
    try:
        claim = orjson.loads(storage.read_bytes(claim_uri))
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{claim_uri} is not valid JSON; delete it or use another output") from exc
    if claim.get("job_id") != job_id:
        raise ConfigError(
            f"output {output_uri} already holds job {claim.get('job_id')} (input {claim.get('input_uri')}, "
            f"model {claim.get('model_name')}); this run is job {job_id}: use another output or delete that one"
        )


def start_job(plan: JobPlan) -> None:
    """Claim the output for this job (``_job.json``); the first thing a job writes."""
    claim_uri = OutputLayout(plan.job.output_uri).job_claim
    if storage.exists(claim_uri):
        return
    claim = {**plan.job.model_dump(), "chunks": len(plan.chunks), "created_at": _now()}
    storage.write_bytes(claim_uri, orjson.dumps(claim, option=orjson.OPT_INDENT_2))


def find_committed(plan: JobPlan) -> dict[int, ChunkResult]:
    """The chunks of ``plan`` already committed (resume): their results, read from their markers.

    The output's ``_chunks/`` folder is listed once; only the markers of this plan's chunks are read. A job run
    again sends these chunks nowhere: no worker, no Modal call.
    """
    layout = OutputLayout(plan.job.output_uri, plan.job.output_format)
    wanted = {chunk.index for chunk in plan.chunks}
    found = [i for i in map(OutputLayout.marker_index, storage.list_names(layout.chunks_dir)) if i in wanted]
    if not found:
        return {}
    with concurrent.futures.ThreadPoolExecutor(min(MARKER_READERS, len(found))) as pool:
        results = pool.map(lambda index: read_marker(layout.marker(index), index), found)
        return {result.index: result for result in results}


def dispatch_order(chunks: Sequence[ChunkSpec]) -> list[ChunkSpec]:
    """The order chunks are sent in: largest first, so that small chunks fill the tail of the job."""
    return sorted(chunks, key=lambda c: (-c.size, c.index))


def finalize_job(plan: JobPlan, results: Sequence[ChunkResult], seconds: float, failed_chunks: int = 0) -> JobSummary:
    """Sum the chunk results into the summary, write ``_manifest.json`` and return the summary.

    ``status`` is ``failed`` when chunks failed or the failure rate passed ``max_failure_rate``.
    """
    job = plan.job
    records = sum(r.records for r in results)
    failed = sum(r.failed for r in results)
    fresh = sum(r.records for r in results if not r.skipped)
    rate = failed / records if records else 0.0
    status = "failed" if failed_chunks or rate > job.max_failure_rate else "completed"
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
    )
    manifest = {
        **summary.model_dump(),
        "chunks_failed": failed_chunks,
        "queued_success": sum(r.queued_success for r in results),
        "queued_failure": sum(r.queued_failure for r in results),
        "parameters": job.model_dump(),
        "finished_at": _now(),
        "chunk_results": [r.model_dump() for r in sorted(results, key=lambda r: r.index)],
    }
    storage.write_bytes(OutputLayout(job.output_uri).manifest, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return summary


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
