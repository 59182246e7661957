"""The ``modalkit`` command.

    modalkit batch INPUT_URI OUTPUT_URI [--model NAME] [--config PATH] [--backend local|modal] [--chunk-size 64MiB]
                   [--concurrency N] [--id-field FIELD] [--output-format jsonl|parquet]
                   [--success-queue Q] [--failure-queue Q] [--max-failure-rate R]
                   [--queue-backend local|sqs|memory] [--wait] [--json]
    modalkit validate INPUT_URI [OUTPUT_URI] [the options of batch] [--sample N]
    modalkit replay JOB_OUTPUT_URI NEW_OUTPUT_URI [--stage STAGE] [--model NAME] [--config PATH] [batch's options]
    modalkit estimate INPUT_URI [--model NAME] [--config PATH] [--sample N] [--gpu TYPE] [--max-containers N]
                      [--backend local|modal] [--chunk-size 64MiB] [--id-field FIELD] [--json]
    modalkit queue [NAME] [--drain]
    modalkit init [DIR]
    modalkit demo
    modalkit prefect status|stop

``batch`` runs the Prefect flow ``batch-inference`` in this process, against the API Prefect's settings name
(``PREFECT_API_URL``, the active profile, ``prefect.toml`` or ``pyproject.toml``) when one is configured, else
against a local Prefect server that modalkit starts once and keeps for later runs (:mod:`modalkit.cli_prefect`).
Options are checked before anything starts; the job is planned while its first worker starts, its other workers
start (no more than it has chunks to run), and its first chunks run while Prefect is imported (in a thread) and
connects. Exit status: 0 when the job completed, 1 when it failed, 2 when it could not start (a bad option,
configuration or input, or a run of the same job running: ``--wait`` waits for it), 130 on Ctrl-C and 143 on
SIGTERM (run the same command again to resume). With ``--json`` the last line of stdout is the summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from modalkit.settings import job_parameter, parameter_help, run_parameters

if TYPE_CHECKING:
    from modalkit.forked import Forked

__all__ = ["app", "main"]

#: When start-up phases ended (``time.time()``), written to ``$MODALKIT_STARTUP_TRACE`` when set (``make bench``).
_marks: dict[str, float] = {"process": time.time()}

app = typer.Typer(
    name="modalkit",
    help="Batch and online inference for one InferencePipeline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
prefect_app = typer.Typer(help="The local Prefect server modalkit starts when no Prefect API is configured.")
app.add_typer(prefect_app, name="prefect")
err = Console(stderr=True, soft_wrap=True)  # an error line is never broken: paths and keys stay whole

EXIT_FAILED = 1
EXIT_CANNOT_START = 2
#: How long an interrupted run may take to stop cleanly before it is cut short.
STOP_SECONDS = 8.0
#: The ``modalkit batch`` option of each run parameter (declared on ``JobConfig``), also for error lines.
OPTION_NAMES = {name: "--" + name.replace("_", "-") for name in run_parameters()}


def _job_option(name: str) -> Any:
    """The option of the run parameter ``name``: its name, metavar and help come from the declaration."""
    field = run_parameters()[name]
    return typer.Option(OPTION_NAMES[name], metavar=job_parameter(field).metavar, help=parameter_help(field))


#: ``--queue-backend``: not a flow parameter (a deployment sets app_settings.queue_config.backend in its settings);
#: for this run it replaces that setting.
QUEUE_BACKEND_OPTION = typer.Option(
    metavar="local|sqs|memory",
    help="Where --success-queue and --failure-queue records go: local (a SQLite file under "
    "queue_config.local_path; read it with `modalkit queue`), sqs, or memory (refused: its records vanish at exit). "
    "Default: app_settings.queue_config.backend.",
)


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM. A BaseException, so that neither the flow's error handling nor click's swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _prepare_prefect(verbose: bool) -> None:
    # before prefect is imported: quiet logs unless asked, no analytics
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        # Prefect logs a failed flow or task run at ERROR with the whole traceback; the CLI says what went wrong
        # in one line of its own, so keep those off the console (they still reach the Prefect API, and -v shows them)
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")


@app.command()
def batch(
    input_uri: Annotated[
        str, typer.Argument(metavar="INPUT_URI", help="Dataset: s3://bucket/prefix/, file:///dir, or a local path.")
    ],
    output_uri: Annotated[
        str, typer.Argument(metavar="OUTPUT_URI", help="Where part files, failures and the manifest go.")
    ],
    model: Annotated[
        str | None, typer.Option(metavar="NAME", help="Model in model_settings.model_entries. Default: default_model.")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(metavar="PATH", help="YAML settings file(s), comma-separated. Default: ./modalkit.yaml."),
    ] = None,
    backend: Annotated[str | None, _job_option("backend")] = None,
    chunk_size: Annotated[str | None, _job_option("chunk_size")] = None,
    concurrency: Annotated[str | None, _job_option("concurrency")] = None,
    id_field: Annotated[str | None, _job_option("id_field")] = None,
    output_format: Annotated[str | None, _job_option("output_format")] = None,
    success_queue: Annotated[str | None, _job_option("success_queue")] = None,
    failure_queue: Annotated[str | None, _job_option("failure_queue")] = None,
    max_failure_rate: Annotated[str | None, _job_option("max_failure_rate")] = None,
    date: Annotated[
        str | None,
        typer.Option(metavar="YYYY-MM-DD", help="The night {date} in the URIs stands for. Default: today (UTC)."),
    ] = None,
    queue_backend: Annotated[str | None, QUEUE_BACKEND_OPTION] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="When a run of the same job is running, wait for it to end instead of exiting 2."),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print only the summary, as one JSON line.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs.")] = False,
) -> None:
    """Run the batch-inference flow over INPUT_URI and write results to OUTPUT_URI.

    Either URI may hold {date} or {date:%Y/%m/%d} (a dated partition): filled with --date, or today in UTC.

    Exit status: 0 the job completed; 1 it failed; 2 it could not start (a bad option, configuration or input, or
    a run of the same job is running); 130 Ctrl-C and 143 SIGTERM (run the same command again to resume).
    """
    _resumes()
    _prepare_prefect(verbose)
    params = {
        "input_uri": input_uri, "output_uri": output_uri, "model_name": model, "backend": backend,
        "chunk_size": chunk_size, "concurrency": concurrency, "id_field": id_field, "output_format": output_format,
        "success_queue": success_queue, "failure_queue": failure_queue, "max_failure_rate": max_failure_rate,
        "config": config, "date": date,
    }  # fmt: skip
    summary, error = run_batch(
        params, show_progress=not json_out and err.is_terminal, queue_backend=queue_backend, wait=wait
    )
    if error is None and summary and summary["failed"] and summary["chunks_skipped"] == summary["chunks"]:
        _say_finished(summary, params)  # a finished job run again, unchanged: nothing ran; say how to go on
    _finish(summary, error, json_out)


def _say_finished(summary: dict[str, Any], params: dict[str, Any]) -> None:
    from modalkit.batch.replay import finished_message, replay_command

    replay = replay_command(summary["output_uri"], params["config"], params["model_name"])
    line = finished_message(summary["job_id"], summary["chunks"], summary["failed"], summary["records"], replay)
    err.print(escape(line), highlight=False)


def run_batch(
    params: dict[str, Any], show_progress: bool = False, queue_backend: str | None = None, wait: bool = False
) -> tuple[dict[str, Any] | None, Exception | None]:
    """Run flow ``batch-inference`` in this process; returns ``(summary, error)``. With ``wait``, a run of the same
    job that holds the job's lease is waited for instead of refusing to start.

    Before Prefect is imported: the settings and parameters are checked, the Prefect API is found (or the local
    server started, in the background), the runner starts its workers, and the job's first chunks start.

    Raises:
        Interrupted: Ctrl-C or SIGTERM; the workers have been stopped.
    """
    from modalkit.exceptions import ModalkitError

    early = _EarlyStart(params, queue_backend, wait)
    try:
        early.start()
    except ModalkitError as exc:
        early.cancel()
        return None, exc
    except BaseException:
        early.cancel()
        raise
    return _run_flow(params, early, show_progress)


def _fill_partition(params: dict[str, Any]) -> None:
    """``{date}`` in the URIs filled in place with ``date`` (or today, UTC); the flow then gets plain URIs."""
    from modalkit.batch.partition import fill_partition, is_template, partition_date

    date = params.pop("date", None)
    if is_template(params["input_uri"]) or is_template(params["output_uri"]) or date:
        day = partition_date(date, None, "--date")
        params["input_uri"] = fill_partition(params["input_uri"], day, "INPUT_URI")
        params["output_uri"] = fill_partition(params["output_uri"], day, "OUTPUT_URI")


def _plan_ahead(
    settings: Any, input_uri: str, output_uri: str, model_name: str | None, job_config: Any
) -> tuple[Any, dict[int, Any] | None]:
    """The job planned (it writes nothing), and the results of the chunks its output already commits, read before
    this run holds the job's lease (None when they could not be read: the run reads them again once it holds it,
    and reports what is wrong then)."""
    from modalkit.batch.job import find_committed, plan_job
    from modalkit.exceptions import ModalkitError

    plan = plan_job(settings, input_uri, output_uri, model_name, job_config)
    try:
        return plan, find_committed(plan)
    except ModalkitError:
        return plan, None


def _finished_before(store: Any, output_uri: str) -> bool:
    """Whether ``output_uri`` holds the manifest of a job that ended (one existence check; a storage error is left
    for planning to report)."""
    from modalkit.batch.layout import OutputLayout
    from modalkit.exceptions import StorageError

    try:
        return bool(store.exists(OutputLayout(output_uri.rstrip("/")).manifest))
    except StorageError:
        return False


#: How long ``modalkit batch`` waits for its plan before it starts importing Prefect: a plan this quick (a few files
#: plan in 0.1 s) lets every local worker be forked first (``modalkit/runners/local.py``); a slower one runs beside
#: the import.
PLAN_WAIT_S = 0.25


class _EarlyStart:
    """What ``modalkit batch`` does before its flow runs: checks, the runner, the first chunks, and meanwhile (in a
    thread) Prefect imported and its API found: the configured one, else modalkit's local server."""

    def __init__(self, params: dict[str, Any], queue_backend: str | None = None, wait: bool = False) -> None:
        self.params = params
        self.queue_backend = queue_backend  # --queue-backend: app_settings.queue_config.backend for this run
        self.wait = wait  # for the job's lease, when a run of the same job holds it
        self.runner: Any = None
        self.job: Any = None  # the StartedJob handed to the flow
        self.lease: Any = None  # this run's lease on the output (the flow releases it as it ends)
        self.managed_server = False  # the Prefect API is modalkit's local server (runs renew its lease)
        self.build_flow: Any = None  # flows.batch_inference.build_batch_flow, once Prefect is imported
        self._prefect_error: BaseException | None = None
        self._planner: Forked[tuple[Any, Any]] | None = None  # the listing and planning, in a child process
        self._prefect_thread: threading.Thread | None = None

    def start(self) -> None:
        from modalkit.batch.job import dispatch_order, find_committed, resolve_job_config, start_job
        from modalkit.batch.lease import take_lease
        from modalkit.batch.storage import default_store
        from modalkit.cli_tools import refuse_vanishing_queues, with_queue_backend
        from modalkit.forked import start_forked
        from modalkit.runners import open_runner
        from modalkit.runners.base import StartedJob
        from modalkit.runners.prestart import PrestartingRunner
        from modalkit.settings import Settings

        p = self.params
        _fill_partition(p)
        settings = with_queue_backend(Settings.load(p["config"] or None), self.queue_backend)
        overrides = {name: p[name] for name in OPTION_NAMES}
        job_config = resolve_job_config(settings, names=OPTION_NAMES, **overrides)
        refuse_vanishing_queues(settings, job_config, self.queue_backend)
        _mark("options")
        self._check_api_from_environment()
        # listing and planning run in a child process (on another core) while the first worker starts and loads
        # the model: forked now, before any thread starts (see modalkit/forked.py)
        self._planner = start_forked(
            "planning the job", _plan_ahead, settings, p["input_uri"], p["output_uri"], p["model_name"], job_config
        )
        started = time.perf_counter()
        store = default_store()
        model = settings.model_settings.entry(p["model_name"])[0]
        early_workers = None
        if job_config.backend == "local" and not _finished_before(store, p["output_uri"]):
            # one worker starts and loads the model on the other core while the job is planned (20,000 small
            # files plan in about a second); the others, if the job has chunks for them, once it is planned. Not
            # for an output that holds a finished job's manifest: run again, it mostly has nothing left to run.
            # Started while this process runs no other thread, they are forked (modalkit/runners/local.py)
            from modalkit.runners.local import LocalRunner

            self.runner = early_workers = LocalRunner(
                settings, model, job_config.local_workers, start=False, chunk_timeout_s=job_config.chunk_timeout_s
            )
            early_workers.warm(1)
        # a plan that comes at once (a few files) lets the other workers be forked too, before the thread that
        # imports Prefect starts; a longer listing (20,000 small files take about a second) goes on beside that
        # import, and the other workers are spawned once it ends
        planned_first = early_workers is not None and self._planner.ready(PLAN_WAIT_S)
        if not planned_first:
            self._start_prefect()
        plan, committed = self._planner.result()
        if early_workers is not None:
            # a job starts no more workers than it has chunks to run: a 10-record job loads its model in one
            # process, not one per CPU (chunks committed since the planner read the markers are only run by
            # fewer workers)
            ahead = len(plan.chunks) - len(committed or {})
            early_workers.warm(max(0, min(early_workers.workers, ahead) - 1))
        if planned_first:
            self._start_prefect()
        start_job(plan, store)
        self.lease = take_lease(
            store, plan.job.output_uri, plan.job.job_id, job_config.lease_seconds, wait=self.wait,
            on_wait=lambda line: err.print(line, highlight=False),
        )  # fmt: skip
        done = find_committed(plan, store, known=committed)  # one listing; the markers read ahead are not read again
        pending = dispatch_order([chunk for chunk in plan.chunks if chunk.index not in done])
        _mark("planned")
        if early_workers is None:
            inner = open_runner(settings, model, job_config)
        elif not pending:  # nothing to run: the worker loading the model is not waited for
            early_workers.cancel()
            inner = early_workers
        else:
            inner = early_workers
            early_workers.resize(min(early_workers.workers, len(pending)))
        self.runner = PrestartingRunner(inner)
        self.runner.prestart(plan.job, pending[: job_config.concurrency or self.runner.slots])
        self.job = StartedJob(plan, self.runner, done, started, self.lease)
        _mark("runner")
        self.wait_for_prefect()
        _mark("prefect_api")

    def _start_prefect(self) -> None:
        self._prefect_thread = threading.Thread(target=self._connect_prefect, name="modalkit-prefect", daemon=True)
        self._prefect_thread.start()

    @staticmethod
    def _check_api_from_environment() -> None:
        """``PREFECT_API_URL`` (Prefect's first source) must answer before any work starts; a cheap check."""
        from modalkit.cli_prefect import PrefectUnavailable, api_answers

        configured = os.environ.get("PREFECT_API_URL")
        if configured and not api_answers(configured):
            raise PrefectUnavailable(
                f"the Prefect API at {configured} does not answer; start that server, or unset PREFECT_API_URL "
                "to let modalkit run a local one"
            )

    def _connect_prefect(self) -> None:
        """In a thread: import Prefect, ask its settings for the configured API (the environment, the profile,
        prefect.toml, pyproject.toml), use it if it answers, else start or find the managed local server."""
        try:
            from flows.prefect_api import configured_api_url, use_api_url
            from modalkit.cli_prefect import PrefectUnavailable, api_answers, ensure_server

            configured = configured_api_url()
            if configured is None:
                self.managed_server = True
                server = ensure_server(on_start=lambda line: err.print(line, highlight=False))
                use_api_url(server.api_url)
            elif configured != os.environ.get("PREFECT_API_URL") and not api_answers(configured):
                raise PrefectUnavailable(
                    f"the Prefect API at {configured} (from Prefect's settings: a profile, prefect.toml or "
                    "pyproject.toml) does not answer; start that server, or remove that setting to let modalkit "
                    "run a local one"
                )
            from flows.batch_inference import build_batch_flow

            with contextlib.suppress(ImportError):
                # Prefect imports it when the flow run starts, to store the run's parameters (0.15-0.3 s): here it
                # is loaded while the job is planned in its own process
                import fastapi.encoders  # noqa: F401
            self.build_flow = build_batch_flow
        except BaseException as exc:
            self._prefect_error = exc

    def wait_for_prefect(self) -> None:
        if self._prefect_thread is not None:
            while self._prefect_thread.is_alive():  # a loop of short waits: Ctrl-C stays answered
                self._prefect_thread.join(timeout=0.2)
        if self._prefect_error is not None:
            raise self._prefect_error

    def cancel(self) -> None:
        if self._planner is not None:
            self._planner.cancel()
        if self.runner is not None:
            self.runner.cancel()
        self.release()

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()


def _run_flow(
    params: dict[str, Any], early: _EarlyStart, show_progress: bool
) -> tuple[dict[str, Any] | None, Exception | None]:
    from modalkit.cli_prefect import Lease

    try:
        with contextlib.ExitStack() as stack:
            if early.managed_server:
                from flows.prefect_api import no_heartbeats

                stack.enter_context(Lease())  # the local server stays up while this run uses it
                stack.enter_context(no_heartbeats())
            bar = stack.enter_context(_progress_bar(show_progress))
            # the flow runs the job started here (planned once, its first chunks running) and reports to the bar
            flow = early.build_flow(start_job=lambda *_: early.job, on_progress=bar)
            state: Any = flow(**params, return_state=True)
    except BaseException:
        early.cancel()
        raise
    early.release()  # the flow released it as it ended; this covers a flow that failed before it started the job
    _mark("done", write=True)
    return _flow_outcome(state)


def _flow_outcome(state: Any) -> tuple[dict[str, Any] | None, Exception | None]:
    """``(summary, error)`` of a finished flow run's state."""
    if state.is_completed():
        return state.result(), None
    outcome = state.result(raise_on_failure=False)
    error = outcome if isinstance(outcome, Exception) else RuntimeError(str(state.message))
    return getattr(error, "summary", None), error


def _mark(phase: str, write: bool = False) -> None:
    _marks[phase] = time.time()
    trace = os.environ.get("MODALKIT_STARTUP_TRACE")
    if write and trace:
        Path(trace).write_text(json.dumps(_marks), encoding="utf-8")


class _progress_bar:
    """A rich progress bar by input bytes, on stderr; a no-op when not on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Any:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]batch"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=err, transient=False,
            )  # fmt: skip
            self._progress.start()
        return self.update

    def update(self, progress: Any) -> None:
        if self._progress is None:
            return
        if self._task is None:
            self._task = self._progress.add_task("batch", total=progress.bytes_total, detail="")
        detail = f"{progress.chunks_done}/{progress.chunks_total} chunks, {progress.records:,} records"
        self._progress.update(self._task, completed=progress.bytes_done, detail=detail)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _finish(summary: dict[str, Any] | None, error: Exception | None, json_out: bool, printed: bool = False) -> None:
    from modalkit.exceptions import ModalkitError

    if json_out:
        if error is not None:
            _print_error(error)
        if summary is not None:
            print(json.dumps(summary), flush=True)
    else:
        if summary is not None and not printed:
            _print_summary(summary)
        if error is not None:
            _print_error(error)
    if error is None:
        return
    from modalkit.batch.lease import LeaseLost

    if summary is None and isinstance(error, ModalkitError) and not isinstance(error, LeaseLost):
        raise typer.Exit(EXIT_CANNOT_START)
    raise typer.Exit(EXIT_FAILED)


def _print_error(error: Exception) -> None:
    from modalkit.batch.job import InvalidJobParameters
    from modalkit.batch.sampling import MissingIdField

    if isinstance(error, InvalidJobParameters):  # name the option as the user typed it
        for line in error.lines:
            err.print(f"[red]error:[/red] Invalid value for {escape(line)}", highlight=False)
        return
    if isinstance(error, MissingIdField):
        err.print(f"[red]error:[/red] {escape(error.describe(OPTION_NAMES['id_field']))}", highlight=False)
        return
    # the message is text, not markup: pydantic's "[type=...]" and lists like "['predict']" must print as they are
    err.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"batch job {summary['job_id']}: {summary.get('status', '')}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in ("records", "succeeded", "failed", "chunks", "chunks_skipped", "seconds", "records_per_s",
                "output_uri"):  # fmt: skip
        value = summary.get(key)
        table.add_row(key, f"{value:,}" if isinstance(value, int) else escape(str(value)))
    if summary.get("files_skipped"):
        table.add_row("files_skipped", f"{summary['files_skipped']:,} (names starting with _ or .: not data)")
    if summary.get("duplicate_ids"):
        table.add_row("duplicate_ids", escape(_repeats_line(summary)))
    if summary.get("queues"):
        from modalkit.cli_tools import describe_queues

        table.add_row("queues", escape(describe_queues(summary["queues"])))
    from modalkit.batch.timings import timing_rows

    for name, value in timing_rows(summary):  # none when the workers did not time their stages
        table.add_row(name, escape(value))
    from modalkit.batch.efficiency import cost_rows

    for name, value in cost_rows(summary):  # none before any chunk ran
        table.add_row(name, escape(value))
    Console().print(table)


def _repeats_line(summary: dict[str, Any]) -> str:
    """``3 ids occur more than once: 0 (x.jsonl at 0, y.jsonl at 0), ...``, the first examples named."""
    shown = []
    for example in summary.get("duplicate_examples") or []:
        places = ", ".join(f"{o['key']} at {o['position']}" for o in example["occurrences"])
        shown.append(f"{example['record_id']!r} ({places})")
    count = summary["duplicate_ids"]
    return f"{count:,} {'id occurs' if count == 1 else 'ids occur'} more than once: " + "; ".join(shown)


@app.command()
def replay(
    job_output_uri: Annotated[
        str, typer.Argument(metavar="JOB_OUTPUT_URI", help="The output of the finished job whose failures to rerun.")
    ],
    output_uri: Annotated[
        str, typer.Argument(metavar="NEW_OUTPUT_URI", help="Where the replay's results go (a new, empty output).")
    ],
    stage: Annotated[
        list[str] | None,
        typer.Option(
            metavar="STAGE",
            help="Replay only the failures of this stage (parse, validate, preprocess, predict, postprocess); "
            "repeatable. Default: every stage.",
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(metavar="NAME", help="Model in model_settings.model_entries. Default: the job's.")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(metavar="PATH", help="YAML settings file(s), comma-separated. Default: ./modalkit.yaml."),
    ] = None,
    backend: Annotated[str | None, _job_option("backend")] = None,
    concurrency: Annotated[str | None, _job_option("concurrency")] = None,
    output_format: Annotated[str | None, _job_option("output_format")] = None,
    success_queue: Annotated[str | None, _job_option("success_queue")] = None,
    failure_queue: Annotated[str | None, _job_option("failure_queue")] = None,
    max_failure_rate: Annotated[str | None, _job_option("max_failure_rate")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print only the summary, as one JSON line.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs.")] = False,
) -> None:
    """Run the failed records of a finished job again (after a fix), under their original ids, as a new job:
    the replay-failures flow.

    Exit status as for batch: 0 the replay completed; 1 it failed; 2 it could not start; 130/143 interrupted.
    """
    _resumes()
    _prepare_prefect(verbose)
    params = {
        "job_output_uri": job_output_uri, "output_uri": output_uri, "stages": stage or None, "model_name": model,
        "backend": backend, "concurrency": concurrency, "success_queue": success_queue,
        "failure_queue": failure_queue, "max_failure_rate": max_failure_rate, "output_format": output_format,
        "config": config,
    }  # fmt: skip
    summary, error = run_replay(params, show_progress=not json_out and err.is_terminal)
    _finish(summary, error, json_out)


def run_replay(params: dict[str, Any], show_progress: bool = False) -> tuple[dict[str, Any] | None, Exception | None]:
    """Run flow ``replay-failures`` in this process, against the Prefect API ``modalkit batch`` would use; returns
    ``(summary, error)``. The replay's own job takes the claim and the lease of its output like any job."""
    from modalkit.batch.job import resolve_job_config
    from modalkit.exceptions import ModalkitError
    from modalkit.settings import Settings

    connection = _EarlyStart(params)
    try:
        overrides = {name: params.get(name) for name in OPTION_NAMES}
        resolve_job_config(Settings.load(params["config"] or None), names=OPTION_NAMES, **overrides)
        connection._check_api_from_environment()
        connection._connect_prefect()
        connection.wait_for_prefect()
    except ModalkitError as exc:
        return None, exc
    from flows.replay_failures import build_replay_flow

    with contextlib.ExitStack() as stack:
        if connection.managed_server:
            from flows.prefect_api import no_heartbeats
            from modalkit.cli_prefect import Lease

            stack.enter_context(Lease())
            stack.enter_context(no_heartbeats())
        bar = stack.enter_context(_progress_bar(show_progress))
        flow = build_replay_flow(connection.build_flow(on_progress=bar))
        state: Any = flow(**params, return_state=True)
    return _flow_outcome(state)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    model: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Default model (?model_name= selects another). Default: default_model."),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(metavar="PATH", help="YAML settings file(s), comma-separated. Default: ./modalkit.yaml."),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Server processes (each loads the model).")] = 1,
) -> None:
    """Serve the pipeline over HTTP here: /predict_sync, /predict_batch, /predict_async, /jobs/{id}, /health,
    /metrics, with dynamic batching (batch_config). SIGTERM or Ctrl-C: requests in flight finish, then it exits 0.
    """
    from modalkit.exceptions import ModalkitError

    try:
        settings = _load_settings(config)
        settings.model_settings.entry(model)  # an unknown model fails now, in one line
    except ModalkitError as exc:
        _print_error(exc)
        raise typer.Exit(EXIT_CANNOT_START) from None
    import uvicorn

    for signum in (signal.SIGINT, signal.SIGTERM):  # uvicorn handles them (a graceful stop), then hands them back
        signal.signal(signum, lambda *_: None)
    if workers > 1:
        os.environ["MODALKIT_SERVE_MODEL"] = model or ""
        if config:
            os.environ["MODALKIT_CONFIG"] = config
        from modalkit.serve_app import serve_workers

        serve_workers(host, port, workers)
    else:
        from modalkit.serve_app import serve_app

        try:
            app_ = serve_app(settings, model)
        except ModalkitError as exc:
            _print_error(exc)
            raise typer.Exit(EXIT_CANNOT_START) from None
        err.print(f"serving {app_.state.service.default_model} on http://{host}:{port}", highlight=False)
        uvicorn.run(app_, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    err.print("modalkit serve stopped", highlight=False)


def _load_settings(config: str | None) -> Any:
    from modalkit.settings import Settings

    return Settings.load(config or None)


@app.command()
def demo(
    records: Annotated[int, typer.Option(help="How many sample reviews to score.")] = 20_000,
    workdir: Annotated[Path, typer.Option(help="Where the sample data, results and queues go.")] = Path("demo-output"),
    json_out: Annotated[bool, typer.Option("--json", help="Print only the summary, as one JSON line.")] = False,
) -> None:
    """Score sample reviews end to end on the embedded default: local files, workers, queue and Prefect."""
    from modalkit.demo import prepare_demo, show_demo_results

    _resumes()
    _prepare_prefect(verbose=False)
    setup = prepare_demo(workdir.resolve(), records)
    if not json_out:
        err.print(
            f"scoring {setup.records:,} sample reviews ({setup.poison} of them malformed) from {setup.input_dir}",
            highlight=False,
        )
    params = {**dict.fromkeys(["model_name", *OPTION_NAMES]), **setup.params}
    summary, error = run_batch(params, show_progress=not json_out and err.is_terminal)
    if summary is not None and not json_out:
        _print_summary(summary)
        show_demo_results(setup, summary)
    _finish(summary, error, json_out, printed=True)


@app.command()
def validate(
    input_uri: Annotated[str, typer.Argument(metavar="INPUT_URI", help="Dataset, as `modalkit batch` takes it.")],
    output_uri: Annotated[
        str | None, typer.Argument(metavar="[OUTPUT_URI]", help="Output to check the claim of (optional).")
    ] = None,
    model: Annotated[str | None, typer.Option(metavar="NAME", help="Model in model_settings.model_entries.")] = None,
    config: Annotated[str | None, typer.Option(metavar="PATH", help="YAML settings file(s), comma-separated.")] = None,
    backend: Annotated[str | None, _job_option("backend")] = None,
    chunk_size: Annotated[str | None, _job_option("chunk_size")] = None,
    concurrency: Annotated[str | None, _job_option("concurrency")] = None,
    id_field: Annotated[str | None, _job_option("id_field")] = None,
    output_format: Annotated[str | None, _job_option("output_format")] = None,
    success_queue: Annotated[str | None, _job_option("success_queue")] = None,
    failure_queue: Annotated[str | None, _job_option("failure_queue")] = None,
    max_failure_rate: Annotated[str | None, _job_option("max_failure_rate")] = None,
    date: Annotated[str | None, typer.Option(metavar="YYYY-MM-DD", help="The night {date} stands for.")] = None,
    queue_backend: Annotated[str | None, QUEUE_BACKEND_OPTION] = None,
    sample: Annotated[int, typer.Option(min=0, max=100_000, help="Records to parse and validate.")] = 200,
) -> None:
    """The dry run of `modalkit batch` with the same options: check the configuration and model entry, import and
    load the pipeline, list and plan the input, parse and validate a sample of records, look for the id field, check
    the queues and that the output is claimable. Prints one line per check; writes nothing.

    Exit status: 0 a job would start; 1 it would start but its sample fails more than max_failure_rate; 2 it would
    not start.
    """
    from modalkit.cli_tools import run_validate

    options = {"backend": backend, "chunk_size": chunk_size, "concurrency": concurrency, "id_field": id_field,
               "output_format": output_format, "success_queue": success_queue, "failure_queue": failure_queue,
               "max_failure_rate": max_failure_rate}  # fmt: skip
    params = {"input_uri": input_uri, "output_uri": output_uri, "model_name": model, "config": config, "date": date,
              "names": OPTION_NAMES, "overrides": options}  # fmt: skip
    raise typer.Exit(run_validate(params, queue_backend, sample))


@app.command()
def estimate(
    input_uri: Annotated[str, typer.Argument(metavar="INPUT_URI", help="Dataset, as `modalkit batch` takes it.")],
    model: Annotated[str | None, typer.Option(metavar="NAME", help="Model in model_settings.model_entries.")] = None,
    config: Annotated[str | None, typer.Option(metavar="PATH", help="YAML settings file(s), comma-separated.")] = None,
    sample: Annotated[
        str | None, typer.Option(metavar="N", help="Records in the calibration sample run here. Default: 5000.")
    ] = None,
    gpu: Annotated[
        str | None, typer.Option(metavar="TYPE", help="GPU type priced (modal). Default: deployment_config.gpu.")
    ] = None,
    max_containers: Annotated[
        str | None,
        typer.Option(
            metavar="N",
            help="Modal containers side by side (modal). Default: job_config.concurrency, else "
            "deployment_config.max_containers, else 10.",
        ),
    ] = None,
    backend: Annotated[str | None, _job_option("backend")] = None,
    chunk_size: Annotated[str | None, _job_option("chunk_size")] = None,
    id_field: Annotated[str | None, _job_option("id_field")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print only the estimate, as one JSON line.")] = False,
) -> None:
    """Expected wall time and cost of `modalkit batch INPUT_URI ...` with the same settings: a calibration sample
    of the input runs through the pipeline here, and the whole job is modelled from it (the assumptions are
    printed). Writes nothing.

    Exit status: 0, or 2 when the job could not be estimated (a bad option, configuration or input; an empty input).
    """
    from modalkit.cli_estimate import run_estimate

    params = {"input_uri": input_uri, "model_name": model, "config": config, "sample": sample, "gpu": gpu,
              "max_containers": max_containers, "json": json_out, "names": OPTION_NAMES,
              "overrides": {"backend": backend, "chunk_size": chunk_size, "id_field": id_field}}  # fmt: skip
    raise typer.Exit(run_estimate(params, err))


@app.command()
def queue(
    name: Annotated[str | None, typer.Argument(metavar="[NAME]", help="The queue; default: every queue.")] = None,
    drain: Annotated[bool, typer.Option("--drain", help="Take the records off the queue as they are printed.")] = False,
    config: Annotated[str | None, typer.Option(metavar="PATH", help="YAML settings file(s), comma-separated.")] = None,
) -> None:
    """Print the records waiting on the local queue (queue_config.local_path) as JSON lines, oldest first: what a
    consumer would get. With --drain they are taken off the queue."""
    from modalkit.cli_tools import run_queue

    raise typer.Exit(run_queue(name, drain, config))


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(metavar="[DIR]", help="Where to write the project.")] = Path("."),
) -> None:
    """Start a project: a commented modalkit.yaml, a pipeline module to edit (pipeline.py) and a Modal app (app.py).
    Existing files are never overwritten."""
    from modalkit.cli_init import run_init

    raise typer.Exit(run_init(directory))


@prefect_app.command("status")
def prefect_status() -> None:
    """Say whether modalkit's local Prefect server runs, where, and how long it has been idle."""
    from modalkit.cli_prefect import idle_seconds, server_status, state_dir

    server, idle = server_status()
    if server is None:
        print(f"no local Prefect server is running (its files: {state_dir()})")
        return
    since = f"{idle:.0f} s since a run used it" if idle is not None else "not used yet"
    print(f"running: {server.ui_url} (API {server.api_url}, pid {server.pid}); {since}; it stops "
          f"after {idle_seconds():.0f} s idle")  # fmt: skip


@prefect_app.command("stop")
def prefect_stop() -> None:
    """Stop modalkit's local Prefect server now (the next `modalkit batch` starts it again)."""
    from modalkit.cli_prefect import stop_server

    stopped = stop_server()
    print(
        f"stopped the local Prefect server at {stopped.api_url}" if stopped else "no local Prefect server was running"
    )


# --- signals ---------------------------------------------------------------------------------------------------


def _on_signal(signum: int, frame: object) -> None:
    if _stopping.is_set():  # a second Ctrl-C: stop now
        os._exit(128 + signum)
    _stopping.set()
    threading.Thread(target=_stop_deadline, args=(128 + signum,), daemon=True).start()
    raise Interrupted(signum)


_stopping = threading.Event()
#: What an interrupted command adds to "interrupted": a job's commands (batch, replay, demo) say how to go on.
_after_interrupted = {"hint": ""}


def _resumes() -> None:
    """This command runs a job, which the same command, run again, resumes: its interruption says so."""
    _after_interrupted["hint"] = "; run the same command to resume"


def _stop_deadline(code: int) -> None:
    time.sleep(STOP_SECONDS)
    err.print(f"interrupted; stopping took too long, so it was cut short{_after_interrupted['hint']}", highlight=False)
    os._exit(code)  # the local workers die with this process (they are bound to it)


def _install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a job started with Ctrl-C ignored keeps it ignored
        signal.signal(signal.SIGINT, _on_signal)


def main() -> None:
    """Console-script entry point."""
    from modalkit.ast_guard import install

    install()  # this process runs threads that parse (Prefect's import beside the job's start): CPython 3.11.7's bug
    _install_signal_handlers()
    try:
        _run_command()
    except SystemExit as exc:
        _exit_now(exc.code)


def _run_command() -> None:
    try:
        app()
    except Interrupted as exc:
        err.print(f"interrupted{_after_interrupted['hint']}", highlight=False)
        sys.exit(128 + exc.signum)
    except BaseException as exc:
        if type(exc).__name__ == "TerminationSignal":  # Prefect's own SIGTERM bridge, while a flow ran
            err.print(f"interrupted{_after_interrupted['hint']}", highlight=False)
            sys.exit(128 + int(getattr(exc, "signal", signal.SIGTERM)))
        raise


def _exit_now(code: object) -> None:
    """Exit with ``code`` as ``sys.exit`` would, less the interpreter's teardown of every module (about half a
    second once Prefect is loaded, after the job is done). What an exit must do still happens first: the other
    threads are joined and the exit hooks run (Prefect sends its last logs and events there)."""
    import atexit

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    threading._shutdown()  # type: ignore[attr-defined]  # what a normal exit runs first: joins, threading's hooks
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
