"""The ``modalkit`` command.

    modalkit batch INPUT_URI OUTPUT_URI [--model NAME] [--config PATH] [--backend local|modal] [--chunk-size 64MiB]
                   [--concurrency N] [--id-field FIELD] [--output-format jsonl|parquet]
                   [--success-queue Q] [--failure-queue Q] [--max-failure-rate R] [--json]
    modalkit demo

``batch`` runs the Prefect flow ``batch-inference`` in this process (against ``PREFECT_API_URL`` when set, else a
temporary local Prefect server). Exit status: 0 when the job completed, 1 when it failed, 2 when it could not
start (bad configuration or input). With ``--json`` the last line of stdout is the summary.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["app", "main"]

app = typer.Typer(
    name="modalkit",
    help="Batch and online inference for one InferencePipeline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True, soft_wrap=True)  # an error line is never broken: paths and keys stay whole

EXIT_FAILED = 1
EXIT_CANNOT_START = 2


def _prepare_prefect(verbose: bool) -> None:
    # before prefect is imported: quiet logs unless asked, no analytics from a temporary server
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        # Prefect logs a failed flow or task run at ERROR with the whole traceback; the CLI says what went wrong
        # in one line of its own, so keep those off the console (they still reach the Prefect API, and -v shows them)
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")


@app.command()
def batch(
    input_uri: Annotated[str, typer.Argument(help="Dataset: s3://bucket/prefix/, file:///dir, or a local path.")],
    output_uri: Annotated[str, typer.Argument(help="Where part files, failures and the manifest go.")],
    model: Annotated[str | None, typer.Option(help="Model name in model_settings.model_entries.")] = None,
    config: Annotated[str | None, typer.Option(help="YAML settings file(s), comma-separated.")] = None,
    backend: Annotated[str | None, typer.Option(help="local (worker processes) or modal.")] = None,
    chunk_size: Annotated[str | None, typer.Option(help="Input bytes per chunk, e.g. 64MiB.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Chunks in flight at once.")] = None,
    id_field: Annotated[str | None, typer.Option(help="Record field holding the record id.")] = None,
    output_format: Annotated[str | None, typer.Option(help="jsonl or parquet.")] = None,
    success_queue: Annotated[str | None, typer.Option(help="Queue for success records.")] = None,
    failure_queue: Annotated[str | None, typer.Option(help="Queue for failure records.")] = None,
    max_failure_rate: Annotated[float | None, typer.Option(help="Fail the job above this failed fraction.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print only the summary, as one JSON line.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs.")] = False,
) -> None:
    """Run the batch-inference flow over INPUT_URI and write results to OUTPUT_URI."""
    if backend not in (None, "local", "modal"):
        raise typer.BadParameter("must be 'local' or 'modal'", param_hint="--backend")
    if output_format not in (None, "jsonl", "parquet"):
        raise typer.BadParameter("must be 'jsonl' or 'parquet'", param_hint="--output-format")
    _prepare_prefect(verbose)
    params = {
        "input_uri": input_uri, "output_uri": output_uri, "model_name": model, "backend": backend,
        "chunk_size": chunk_size, "concurrency": concurrency, "id_field": id_field, "output_format": output_format,
        "success_queue": success_queue, "failure_queue": failure_queue, "max_failure_rate": max_failure_rate,
        "config": config,
    }  # fmt: skip
    summary, error = run_batch(params, show_progress=not json_out and err.is_terminal)
    _finish(summary, error, json_out)


def run_batch(params: dict[str, Any], show_progress: bool = False) -> tuple[dict[str, Any] | None, Exception | None]:
    """Run flow ``batch-inference`` in this process; returns ``(summary, error)``."""
    from flows.batch_inference import batch_inference
    from modalkit.batch.progress import listening

    with _progress_bar(show_progress) as on_progress, listening(on_progress):
        state: Any = batch_inference(**params, return_state=True)
    if state.is_completed():
        return state.result(), None
    outcome = state.result(raise_on_failure=False)
    error = outcome if isinstance(outcome, Exception) else RuntimeError(str(state.message))
    return getattr(error, "summary", None), error


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
    if summary is None and isinstance(error, ModalkitError):
        raise typer.Exit(EXIT_CANNOT_START)
    raise typer.Exit(EXIT_FAILED)


def _print_error(error: Exception) -> None:
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
    Console().print(table)


@app.command()
def demo(
    records: Annotated[int, typer.Option(help="How many sample reviews to score.")] = 20_000,
    workdir: Annotated[Path, typer.Option(help="Where the sample data, results and queues go.")] = Path("demo-output"),
    json_out: Annotated[bool, typer.Option("--json", help="Print only the summary, as one JSON line.")] = False,
) -> None:
    """Score sample reviews end to end on the embedded default: local files, workers, queue and Prefect."""
    from modalkit.demo import prepare_demo, show_demo_results

    _prepare_prefect(verbose=False)
    setup = prepare_demo(workdir.resolve(), records)
    if not json_out:
        err.print(
            f"scoring {setup.records:,} sample reviews ({setup.poison} of them malformed) from {setup.input_dir}",
            highlight=False,
        )
    summary, error = run_batch(setup.params, show_progress=not json_out and err.is_terminal)
    if summary is not None and not json_out:
        _print_summary(summary)
        show_demo_results(setup, summary)
    _finish(summary, error, json_out, printed=True)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
