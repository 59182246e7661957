"""Flow ``batch-inference``: an input dataset to scored results, success/failure records and a summary.

Orchestration only: fill a dated partition's ``{date}`` into the URIs (:mod:`modalkit.batch.partition`), plan the
chunks, skip those an earlier run committed (they are sent nowhere), run the rest on the job's runner through
``concurrency`` lanes (one Prefect task run each, ``chunk-lane-00``..., pulling chunks largest first, each chunk
retried on transient errors with exponential backoff: the run's task runs grow with its concurrency, not with its
chunks), report progress (a Prefect progress artifact, and ``on_progress`` when given), write the
manifest, publish a summary table artifact and a markdown report, emit ``modalkit.job.completed`` or
``modalkit.job.failed`` (the summary as its payload) for automations, and return the summary. Record failures do not
fail the flow unless their rate passes ``max_failure_rate``; a chunk that fails after its retries does (a rerun
resumes from the committed chunks).

A run is named ``batch-inference/<model>/<date>`` and tagged ``model:<name>``, ``backend:<name>`` and, when a
deployment started it, ``deployment:<name>``.

    prefect deployment run 'batch-inference/nightly'
    modalkit batch s3://bucket/reviews/ s3://bucket/scored/
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, ParamSpec, TypeVar, cast

from prefect import Flow, flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from flows.monitoring import emit_job_event, job_report, label_run, summary_rows
from modalkit.ast_guard import install as install_ast_guard
from modalkit.batch.job import JobPlan, dispatch_order, resolve_job_config
from modalkit.batch.layout import OutputLayout
from modalkit.batch.lease import JobLease
from modalkit.batch.partition import fill_partition, is_template, partition_date
from modalkit.batch.progress import JobProgress
from modalkit.batch.replay import finished_message, replay_command
from modalkit.batch.storage import Store, default_store
from modalkit.exceptions import JobFailed, StorageError, is_retryable
from modalkit.iomodel import ChunkResult, JobSummary
from modalkit.runners import ChunkRunner, RunnerFactory, open_runner
from modalkit.runners.base import JobStarter, StartedJob
from modalkit.runners.lanes import ChunkFailed, ChunkLanes
from modalkit.settings import JobConfig, Settings, parameter_help, run_parameters
from tasks.chunk_lane import chunk_lane
from tasks.finalize import finalize
from tasks.plan import claim_output, committed_chunks, plan_chunks

PROGRESS_EVERY_SECONDS = 1.0
#: How often a run waiting on its chunks looks whether it still holds the job's lease.
LEASE_CHECK_SECONDS = 1.0
P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger(__name__)

__all__ = [
    "JobFailed",
    "batch_inference",
    "build_batch_flow",
    "describe_run_parameters",
]  # JobFailed lives in modalkit.exceptions


def describe_run_parameters(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` with each job parameter it takes described in its docstring's ``Args`` as declared on ``JobConfig``
    (:func:`~modalkit.settings.parameter_help`): Prefect shows these descriptions beside the parameters."""
    taken = inspect.signature(fn).parameters
    lines = [f"    {name}: {parameter_help(field)}" for name, field in run_parameters().items() if name in taken]
    head, args, rest = inspect.cleandoc(fn.__doc__ or "").partition("Args:\n")
    entries, blank, tail = rest.partition("\n\n")
    fn.__doc__ = head + (args or "\n\nArgs:\n") + "\n".join([*filter(None, [entries]), *lines]) + blank + tail
    return fn


def build_batch_flow(
    runner_factory: RunnerFactory = open_runner,
    start_job: JobStarter | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
) -> Flow[..., dict[str, Any]]:
    """The ``batch-inference`` flow, running its chunks on the runners ``runner_factory`` makes.

    ``batch_inference`` below is this flow with the defaults (the local worker pool or the deployed Modal
    worker). Callers that own where chunks run (tests with an in-process Modal stand-in) build their own.

    Args:
        runner_factory: Opens the job's runner, when the flow plans the job itself.
        start_job: The job, already started: ``modalkit batch`` plans it and starts its first chunks before
            Prefect is imported, and hands over the plan, the runner, the chunks committed before and the start
            time. When None, the flow plans the job itself (tasks ``plan-chunks``, ``claim-output``,
            ``find-committed``): the input is listed once either way.
        on_progress: Told where the job stands after each chunk (the CLI's progress bar); its errors are logged,
            never allowed to break the job.
    """
    install_ast_guard()  # the flow merges id hashes on threads (NumPy parses .npy headers): CPython 3.11.7's bug

    @flow(name="batch-inference", log_prints=False)
    @describe_run_parameters
    def batch_inference(
        input_uri: str,
        output_uri: str,
        model_name: str | None = None,
        backend: Literal["local", "modal"] | None = None,
        chunk_size: str | None = None,
        concurrency: int | None = None,
        id_field: str | None = None,
        success_queue: str | None = None,
        failure_queue: str | None = None,
        max_failure_rate: float | None = None,
        output_format: Literal["jsonl", "parquet"] | None = None,
        config: str | None = None,
        date: str | None = None,
    ) -> dict[str, Any]:
        """Score every record under ``input_uri`` into ``output_uri``.

        Args:
            input_uri: The dataset: s3://bucket/prefix/, file:///dir or a local path; may hold {date}.
            output_uri: Where the part files, the failures and the manifest go; may hold {date}.
            model_name: The model in model_settings.model_entries. Default: model_settings.default_model.
            config: The YAML settings layers, comma-separated. Default: MODALKIT_CONFIG or ./modalkit.yaml.
            date: The night {date} stands for (YYYY-MM-DD), for a backfill. Default: the run's scheduled date (UTC).

        The job parameters (``backend``, ``chunk_size``, ...) are described in ``Args`` as declared on ``JobConfig``
        (:func:`describe_run_parameters`); left empty, each takes its value from ``app_settings.job_config``.
        ``{date}`` or ``{date:%Y/%m/%d}`` in either URI is the night the run reads: the UTC date of the flow run's
        scheduled start, or ``date`` (``YYYY-MM-DD``) for a backfill.

        Returns:
            The summary: job_id, records, succeeded, failed, chunks, chunks_skipped, seconds, records_per_s,
            output_uri.
        """
        job_uris = {"input_uri": input_uri, "output_uri": output_uri}
        try:
            return _run_job(job_uris, model_name, config, date, backend=backend, chunk_size=chunk_size,
                            concurrency=concurrency, id_field=id_field, success_queue=success_queue,
                            failure_queue=failure_queue, max_failure_rate=max_failure_rate,
                            output_format=output_format)  # fmt: skip
        except JobFailed as exc:
            _log_failure(exc)
            emit_job_event("failed", exc.summary, str(exc), job_uris)
            raise
        except Exception as exc:
            _log_failure(exc)
            emit_job_event("failed", None, f"{type(exc).__name__}: {exc}", job_uris)
            raise

    def _run_job(
        job_uris: dict[str, str], model_name: str | None, config: str | None, date: str | None, **options: Any
    ) -> dict[str, Any]:
        # the parameters first, each a check of a few milliseconds: a bad one fails the run at its start, before
        # the pipeline is imported, the input listed or a worker started
        input_uri, output_uri = job_uris["input_uri"], job_uris["output_uri"]
        scheduled = flow_run.scheduled_start_time
        day = partition_date(date, scheduled)  # a bad date fails here, whether or not the URIs use it
        night = None
        if is_template(input_uri) or is_template(output_uri):
            night = day
            input_uri = job_uris["input_uri"] = fill_partition(input_uri, night, "input_uri")
            output_uri = job_uris["output_uri"] = fill_partition(output_uri, night, "output_uri")
        settings = Settings.load(config or None)
        job_config = resolve_job_config(settings, **options)
        model = settings.model_settings.entry(model_name)[0]
        if night is not None:
            get_run_logger().info("partition %s: reading %s, writing %s", night, input_uri, output_uri)
        store = default_store()
        label_run(model, job_config.backend, str(day))
        start = start_job or _planner(runner_factory, store)
        try:
            job = start(settings, job_config, input_uri, output_uri, model_name)
        except StorageError as exc:
            if night is None:
                raise
            raise StorageError(f"the partition for {night}: {exc}", retryable=False) from None
        replay = replay_command(output_uri, config, model_name)
        with _Released(job.lease):
            return _run_started(job, job_config, job_uris, store, replay)

    def _run_started(
        job: StartedJob, job_config: JobConfig, job_uris: dict[str, str], store: Store, replay: str
    ) -> dict[str, Any]:
        plan, runner, done = job.plan, job.runner, job.committed
        try:
            if plan.skipped_files:
                shown = ", ".join(plan.skipped_files[:5]) + (", ..." if len(plan.skipped_files) > 5 else "")
                get_run_logger().warning(
                    "skipped %d input files whose path has a name starting with '_' or '.' (not data, by the "
                    "Hadoop convention): %s", len(plan.skipped_files), shown,
                )  # fmt: skip
            get_run_logger().info(
                "job %s: %d chunks over %d bytes (%d committed before), model %s, backend %s",
                plan.job.job_id, len(plan.chunks), plan.total_bytes, len(done), plan.job.model_name,
                job_config.backend,
            )  # fmt: skip
            in_flight = job_config.concurrency or runner.slots
            tracker = _Progress(plan, on_progress)
            results, errors, not_started = _run_chunks(plan, done, runner, job_config, in_flight, tracker, job.lease)
        except BaseException:
            runner.cancel()  # an interrupt or a crash: stop the workers now, not after their chunks
            raise
        with _Closing(runner):  # the workers exit while the manifest and the artifacts are written
            failed = [(index, str(exc)) for index, exc in errors]
            summary = finalize(_unwalked(plan), results, time.perf_counter() - job.started, failed, store)
            _publish_summary(summary, errors)
            create_markdown_artifact(
                job_report(summary, results, errors, job_config.max_failure_rate),
                key=f"batch-report-{summary.job_id}",
                description=f"Report of batch job {summary.job_id}",
            )
        outcome = _outcome(summary, errors, not_started, job_config.max_failure_rate, replay)
        emit_job_event("completed", summary.model_dump(), None, job_uris)
        return outcome

    return batch_inference


batch_inference = build_batch_flow()


def _log_failure(exc: BaseException) -> None:
    """The reason a run failed, at ERROR as it ends: in the run's logs and in what ``prefect deployment run ...
    --watch`` prints (Prefect's own lines give only the final state's name there)."""
    try:
        get_run_logger().error("batch-inference failed: %s", exc)
    except Exception as error:  # never hide the run's own error behind a logging one
        log.warning("could not log the failure of the run: %s", error)


T = TypeVar("T")


def _unwalked(value: T) -> T:
    """``value`` as a task argument that Prefect passes on without walking it: Prefect walks every argument for
    futures, object by object, and a plan holds every chunk and every packed file (600,000 objects at 20,000
    files: 22 s of a no-op rerun), a packed chunk up to 1,000 files."""
    return cast(T, quote(value))


def _planner(runner_factory: RunnerFactory, store: Store) -> JobStarter:
    """The flow's own start of a job: open the runner (a local one starts its workers, and they load the model,
    while the input is listed), plan, claim the output, and list the chunks an earlier run committed (once,
    before any chunk is sent)."""

    def start(
        settings: Settings, job_config: JobConfig, input_uri: str, output_uri: str, model_name: str | None
    ) -> StartedJob:
        started = time.perf_counter()
        runner = runner_factory(settings, settings.model_settings.entry(model_name)[0], job_config)
        try:
            plan = plan_chunks(settings, input_uri, output_uri, model_name, job_config, store)
            lease = claim_output(_unwalked(plan), store, job_config.lease_seconds, _flow_run_id())
        except BaseException:
            runner.cancel()
            raise
        try:
            return StartedJob(plan, runner, committed_chunks(_unwalked(plan), store), started, lease)
        except BaseException:
            runner.cancel()
            lease.release()
            raise

    return start


def _flow_run_id() -> str | None:
    run_id = flow_run.id
    return str(run_id) if run_id else None


class _Released:
    """Releases the run's lease (if any) as the block ends, whichever way: completed, failed or interrupted."""

    def __init__(self, lease: JobLease | None) -> None:
        self.lease = lease

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        if self.lease is not None:
            self.lease.release()


class _Closing:
    """Closes a runner in a thread for the duration of the block; its error, if any, is raised at the end."""

    def __init__(self, runner: ChunkRunner) -> None:
        self.runner = runner
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._close, name="modalkit-runner-close", daemon=True)

    def _close(self) -> None:
        try:
            self.runner.close()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> None:
        self.thread.start()

    def __exit__(self, *exc: object) -> None:
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error


def _run_chunks(
    plan: JobPlan, done: dict[int, ChunkResult], runner: ChunkRunner, job_config: JobConfig, in_flight: int,
    tracker: _Progress, lease: JobLease | None = None,
) -> tuple[list[ChunkResult], list[tuple[int, BaseException]], list[int]]:  # fmt: skip
    """Run every chunk not in ``done`` through ``in_flight`` lanes (task runs ``chunk-lane-NN``) that pull them
    largest first; no lane starts a new chunk once one has failed after its retries. The committed chunks in
    ``done`` count as finished and are sent nowhere.

    The lanes put each chunk's outcome on a queue that this thread drains: progress and ``on_progress`` are told
    from here, one chunk at a time. A run that loses its lease (another run took the job over) raises
    :class:`LeaseLost` within a second; the lanes stop and the caller cancels the runner, so the chunks in flight
    stop uncommitted (the run that holds the lease redoes them) instead of sending on beside it."""
    pending = dispatch_order([chunk for chunk in plan.chunks if chunk.index not in done])
    lanes = ChunkLanes(runner, plan.job, pending, job_config.chunk_retries, job_config.retry_delay_seconds, lease)
    results: list[ChunkResult] = []
    errors: list[tuple[int, BaseException]] = []
    for chunk in plan.chunks:
        if chunk.index in done:
            results.append(done[chunk.index])
            tracker.chunk_done(chunk.size, done[chunk.index])
    running: list[Any] = [chunk_lane.submit(lanes, lane) for lane in range(min(in_flight, len(pending)))]
    ended = 0
    try:
        while ended < len(running):
            if lease is not None:
                lease.check()
            try:
                item = lanes.outcomes.get(timeout=LEASE_CHECK_SECONDS)
            except queue.Empty:
                if all(future.wrapped_future.done() for future in running) and lanes.outcomes.empty():
                    break  # a lane Prefect never ran (or one that crashed) sends no end
                continue
            if item is None:
                ended += 1  # a lane ended
                continue
            chunk, outcome = item
            if isinstance(outcome, ChunkResult):
                results.append(outcome)
                tracker.chunk_done(chunk.size, outcome)
            else:
                errors.append((chunk.index, outcome))  # its lane logged it and ends Failed
        if lease is not None:
            lease.check()  # the lanes may all have ended on a lost lease before this thread saw it
    finally:
        lanes.stop()  # an interrupt or a lost lease: no lane starts or retries a chunk
    _raise_lane_crash(running)
    not_started = lanes.not_started()
    if not_started:
        get_run_logger().error("%d chunks were not started after a chunk failed for good", len(not_started))
    tracker.finish()
    return results, errors, [chunk.index for chunk in not_started]


def _raise_lane_crash(running: list[Any]) -> None:
    """A lane that ended on anything but a failed chunk (a bug, or Prefect failing the task run) fails the job."""
    for future in running:
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, BaseException) and not isinstance(outcome, ChunkFailed):
            raise outcome


class _Progress:
    """Keeps the Prefect progress artifact (at most every second) and ``on_progress`` (every chunk) up to date."""

    def __init__(self, plan: JobPlan, on_progress: Callable[[JobProgress], None] | None) -> None:
        self.plan = plan
        self.on_progress = on_progress
        self.bytes_total = sum(c.size for c in plan.chunks) or 1
        self.bytes_done = self.chunks_done = self.records = self.failed = 0
        self._last = 0.0
        self.artifact_id = create_progress_artifact(
            progress=0.0,
            key=f"batch-progress-{plan.job.job_id}",
            description=f"Job {plan.job.job_id}: {len(plan.chunks)} chunks of {plan.job.input_uri}",
        )

    def chunk_done(self, size: int, result: ChunkResult) -> None:
        self.bytes_done += size
        self.chunks_done += 1
        self.records += result.records
        self.failed += result.failed
        if self.on_progress is not None:
            try:
                self.on_progress(self._snapshot())
            except Exception:
                log.exception("on_progress failed")
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY_SECONDS:
            self._last = now
            self._update()

    def _snapshot(self) -> JobProgress:
        return JobProgress(
            self.plan.job.job_id, self.chunks_done, len(self.plan.chunks),
            self.bytes_done, self.bytes_total, self.records, self.failed,
        )  # fmt: skip

    def _update(self) -> None:
        snap = self._snapshot()
        # by bytes, but every chunk done is 100% even when the chunks hold no bytes (empty input files)
        percent = 100.0 if snap.chunks_done == snap.chunks_total else min(snap.percent, 100.0)
        update_progress_artifact(
            self.artifact_id,
            progress=round(percent, 2),
            description=f"{snap.chunks_done}/{snap.chunks_total} chunks, {snap.records} records, {snap.failed} failed",
        )

    def finish(self) -> None:
        self._update()


def _publish_summary(summary: JobSummary, errors: list[tuple[int, BaseException]]) -> None:
    create_table_artifact(
        summary_rows(summary, errors),
        key=f"batch-summary-{summary.job_id}",
        description=f"Summary of batch job {summary.job_id}",
    )


def _outcome(
    summary: JobSummary,
    errors: list[tuple[int, BaseException]],
    not_started: list[int],
    max_failure_rate: float,
    replay: str,
) -> dict[str, Any]:
    data = summary.model_dump()
    finished_before = summary.chunks_skipped == summary.chunks and not errors
    if finished_before and summary.failed:
        # the same job run again, unchanged: every chunk was committed, nothing ran; say so and show the way on
        message = finished_message(summary.job_id, summary.chunks, summary.failed, summary.records, replay)
        if summary.status == "failed":
            raise JobFailed(message, data)
        get_run_logger().warning(message)
        return data
    if errors:
        index, first = errors[0]
        unstarted = f"; {len(not_started)} not started" if not_started else ""
        retryable = all(is_retryable(exc) for _, exc in errors)
        # the hint only where a rerun can succeed: a broken pipeline, a corrupt file or bad credentials fail again
        hint = "; run the job again to resume from the committed chunks" if retryable else ""
        raise JobFailed(
            f"job {summary.job_id}: {len(errors)} chunk(s) failed (first: chunk {index:05d}: {first}){unstarted}{hint}",
            data,
            retryable=retryable,
        )
    if summary.status == "failed":
        raise JobFailed(
            f"job {summary.job_id}: {summary.failed} of {summary.records} records failed "
            f"({summary.failure_rate:.2%}, more than max_failure_rate {max_failure_rate:.2%}); "
            f"see {OutputLayout(summary.output_uri).failures_dir}/",
            data,
        )
    return data
