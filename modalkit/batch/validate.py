"""The dry run of a batch job (``modalkit validate``): every check a job makes before it starts, and a sample of
its records, each reported with what it found; nothing is written.

The checks, in order: ``config`` (the model entry and its pipeline's import path), ``pipeline`` (it imports,
declares its schemas and loads: the constructor runs), ``input`` (listed and planned, as the job would),
``records`` (a sample parses and validates against the pipeline's ``input_model``), ``id_field`` (present in the
first records), ``queues`` (they exist; where their records would go) and ``output`` (the job could claim it:
:func:`~modalkit.batch.job.plan_job`, every check a job makes before its claim; and no run of the job holds its
lease now). A check that cannot run because
one before it failed is left out.

Example:
    >>> from modalkit.settings import Settings
    >>> result = validate_job(Settings.load(), "data/", "results/", None, JobConfig())  # doctest: +SKIP
    >>> [(c.name, c.status) for c in result.checks]  # doctest: +SKIP
    [('config', 'ok'), ('pipeline', 'ok'), ('input', 'ok'), ('records', 'ok'), ('id_field', 'ok'), ...]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from modalkit.batch.job import check_job_queues, find_committed, plan_job
from modalkit.batch.lease import running_run
from modalkit.batch.planning import list_dataset, plan_chunks
from modalkit.batch.sampling import MissingIdField, SampledRecord, check_id_field, sample_records
from modalkit.batch.storage import Store, default_store
from modalkit.exceptions import ModalkitError
from modalkit.inference_pipeline import InferencePipeline, import_pipeline, load_pipeline
from modalkit.iomodel import ChunkSpec, describe_validation_error
from modalkit.settings import JobConfig, Settings

__all__ = ["DEFAULT_SAMPLE", "Check", "Validation", "validate_job"]

#: Records sampled by default (the first records of up to ten files).
DEFAULT_SAMPLE = 200
#: Problems shown per check.
EXAMPLES = 5

Status = Literal["ok", "warning", "problem"]


@dataclass
class Check:
    """One check: its name, ``ok``/``warning``/``problem``, what it found, and the first problems it saw."""

    name: str
    status: Status
    detail: str
    examples: list[str] = field(default_factory=list)


@dataclass
class Validation:
    """What :func:`validate_job` found."""

    checks: list[Check] = field(default_factory=list)

    @property
    def would_start(self) -> bool:
        """A job would start: no check that a job makes before it starts has a problem."""
        return not any(c.status == "problem" and c.name != "records" for c in self.checks)

    @property
    def would_fail(self) -> bool:
        """The sample's failure rate passes ``max_failure_rate``: a job would likely fail."""
        return any(c.status == "problem" and c.name == "records" for c in self.checks)

    def add(self, name: str, status: Status, detail: str, examples: list[str] | None = None) -> None:
        self.checks.append(Check(name, status, detail, examples or []))


def validate_job(
    settings: Settings,
    input_uri: str,
    output_uri: str | None,
    model_name: str | None,
    config: JobConfig,
    *,
    sample: int = DEFAULT_SAMPLE,
    store: Store | None = None,
) -> Validation:
    """Every check a job over ``input_uri`` into ``output_uri`` would make before it starts, and ``sample`` of its
    records parsed and validated. Writes nothing (the pipeline's constructor runs: it may read its weights).
    Without ``output_uri`` the claim is not checked."""
    store = store or default_store()
    result = Validation()
    pipeline_cls = _config_and_pipeline(result, settings, model_name)
    chunks = _input(result, input_uri, config, store)
    if chunks is not None:
        _records(result, chunks, pipeline_cls, config, sample, store)
        _id_field(result, chunks, config, store)
    _queues(result, settings, config)
    if output_uri is None:
        result.add("output", "warning", "not given: pass OUTPUT_URI to check that a job could claim it")
    elif not any(c.status == "problem" for c in result.checks if c.name not in ("records", "id_field")):
        _output(result, settings, input_uri, output_uri, model_name, config, store)  # what it checks first passed
    return result


def _config_and_pipeline(
    result: Validation, settings: Settings, model_name: str | None
) -> type[InferencePipeline] | None:
    try:
        name, entry = settings.model_settings.entry(model_name)
    except ModalkitError as exc:
        result.add("config", "problem", str(exc))
        return None
    if entry.pipeline is None:
        where = f"model_settings.model_entries.{name}.pipeline"
        result.add("config", "problem", f"{where} is not set: batch jobs need the import path")
        return None
    result.add("config", "ok", f"model {name}, pipeline {entry.pipeline}")
    try:
        pipeline_cls = import_pipeline(entry.pipeline, where=f"model_settings.model_entries.{name}.pipeline")
        input_model, _ = pipeline_cls.require_schemas()
        pipeline_cls.validate_parameters(entry.kwargs, f"model_settings.model_entries.{name}")
        started = time.perf_counter()
        load_pipeline(settings, name, pipeline_cls)
    except ModalkitError as exc:
        result.add("pipeline", "problem", str(exc))
        return None
    except Exception as exc:  # the user's constructor: anything it raises is the answer
        result.add("pipeline", "problem", f"{entry.pipeline} failed to load: {type(exc).__name__}: {exc}")
        return None
    fields = ", ".join(input_model.model_fields)
    seconds = time.perf_counter() - started
    result.add("pipeline", "ok", f"imports and loads ({seconds:.1f} s); records are {input_model.__name__}({fields})")
    return pipeline_cls


def _input(result: Validation, input_uri: str, config: JobConfig, store: Store) -> list[ChunkSpec] | None:
    skipped: list[str] = []
    try:
        files = list_dataset(input_uri.rstrip("/"), skipped, store=store)
        chunks = plan_chunks(files, int(config.chunk_size), split_csv=config.split_csv, store=store)
    except ModalkitError as exc:
        result.add("input", "problem", str(exc))
        return None
    size = sum(f.size for f in files)
    more = f"; {len(skipped)} skipped (names starting with _ or .)" if skipped else ""
    result.add("input", "ok", f"{len(files)} file(s), {size:,} bytes, {len(chunks)} chunk(s){more}")
    return chunks


def _records(
    result: Validation,
    chunks: list[ChunkSpec],
    pipeline_cls: type[InferencePipeline] | None,
    config: JobConfig,
    sample: int,
    store: Store,
) -> None:
    try:
        records = sample_records(chunks, sample, store)
    except ModalkitError as exc:
        result.add("records", "problem", str(exc))
        return
    if not records:
        result.add("records", "ok", "the input holds no records")
        return
    problems = [f"{r.where}: {reason}" for r in records if (reason := _why_not(r, pipeline_cls)) is not None]
    files = len({r.key for r in records})
    against = f" against {pipeline_cls.require_schemas()[0].__name__}" if pipeline_cls else ""
    if not problems:
        result.add("records", "ok", f"{len(records)} records from {files} file(s) parse and validate{against}")
        return
    rate = len(problems) / len(records)
    head = f"{len(problems)} of {len(records)} records from {files} file(s) would fail ({rate:.0%})"
    if rate > config.max_failure_rate:
        tail = f", more than max_failure_rate {config.max_failure_rate:.0%}: a job would fail"
        result.add("records", "problem", head + tail, problems[:EXAMPLES])
    else:
        result.add("records", "warning", head + "; they would go to the failure files", problems[:EXAMPLES])


def _why_not(record: SampledRecord, pipeline_cls: type[InferencePipeline] | None) -> str | None:
    """Why the job would fail ``record`` before its pipeline sees it, or None."""
    if record.error is not None:
        return record.error
    if not isinstance(record.data, dict):
        return f"the record is a JSON {type(record.data).__name__}, not an object"
    if pipeline_cls is None:
        return None
    data: Any = record.data
    try:
        pipeline_cls.require_schemas()[0].model_validate(data)
    except ValidationError as exc:
        return describe_validation_error(exc)
    return None


def _id_field(result: Validation, chunks: list[ChunkSpec], config: JobConfig, store: Store) -> None:
    if config.id_field is None:
        result.add("id_field", "ok", "none: records are named <file key>:<position>")
        return
    try:
        check_id_field(chunks, config.id_field, store)
    except MissingIdField as exc:
        result.add("id_field", "problem", exc.describe(""))
        return
    except ModalkitError as exc:
        result.add("id_field", "problem", str(exc))
        return
    result.add("id_field", "ok", f"{config.id_field!r} is in the first records")


def _queues(result: Validation, settings: Settings, config: JobConfig) -> None:
    try:
        target = check_job_queues(settings, config)
    except ModalkitError as exc:
        result.add("queues", "problem", str(exc))
        return
    if target is None:
        result.add("queues", "ok", "none named")
        return
    named = ", ".join(f"{role} {q}" for role, q in (("success", target.success_queue),
                                                    ("failure", target.failure_queue)) if q)  # fmt: skip
    result.add("queues", "ok", f"{target.backend}: {target.location} ({named})")


def _output(
    result: Validation,
    settings: Settings,
    input_uri: str,
    output_uri: str,
    model_name: str | None,
    config: JobConfig,
    store: Store,
) -> None:
    try:
        plan = plan_job(settings, input_uri, output_uri, model_name, config, store)
    except MissingIdField:  # the last check of plan_job: the output passed (the id field is reported above)
        result.add("output", "ok", f"{output_uri}: a job could claim it")
        return
    except ModalkitError as exc:
        result.add("output", "problem", str(exc))
        return
    running = running_run(store, output_uri)
    if running is not None:
        result.add("output", "problem", running)
        return
    done = find_committed(plan, store)
    if done:
        detail = f"{output_uri} holds this job ({plan.job.job_id}): {len(done)} of {len(plan.chunks)} chunks done"
        result.add("output", "ok", detail + "; a run resumes")
    else:
        result.add("output", "ok", f"{output_uri}: job {plan.job.job_id} could claim it")
