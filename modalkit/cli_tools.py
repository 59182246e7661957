"""What ``modalkit`` does beside running a job: the ``--queue-backend`` choice, ``modalkit validate`` (the dry run)
and ``modalkit queue`` (the local queue's records as JSON lines). CLI side: the commands' options are declared in
:mod:`modalkit.cli`, which calls these; this module prints, and returns exit statuses.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from modalkit.exceptions import ConfigError, ModalkitError
from modalkit.settings import JobConfig, Settings

__all__ = ["QUEUE_BACKENDS", "describe_queues", "refuse_vanishing_queues", "run_queue", "run_validate",
           "with_queue_backend"]  # fmt: skip

#: The queue backends ``--queue-backend`` may name.
QUEUE_BACKENDS = ("local", "sqs", "memory")
EXIT_FAILED = 1
#: Records ``modalkit queue --drain`` takes off the queue at a time.
DRAIN_BATCH = 100
EXIT_CANNOT_START = 2

err = Console(stderr=True, soft_wrap=True)


def with_queue_backend(settings: Settings, backend: str | None) -> Settings:
    """``settings`` with ``app_settings.queue_config.backend`` set to ``backend`` (``--queue-backend``), if given.

    Raises:
        ConfigError: ``backend`` is not one of :data:`QUEUE_BACKENDS`.
    """
    if backend is None:
        return settings
    if backend not in QUEUE_BACKENDS:
        raise ConfigError(f"--queue-backend {backend!r}: not a queue backend; use one of {', '.join(QUEUE_BACKENDS)}")
    app = settings.app_settings
    queue_config = app.queue_config.model_copy(update={"backend": backend})
    return settings.model_copy(update={"app_settings": app.model_copy(update={"queue_config": queue_config})})


def refuse_vanishing_queues(settings: Settings, job_config: JobConfig, chosen: str | None) -> None:
    """A command-line job that names queues on the ``memory`` backend is refused: its records would be kept in
    the memory of the worker processes and be gone when the command exits, with nobody to read them.

    Raises:
        ConfigError: naming ``--queue-backend`` or the setting, why, and what to use instead.
    """
    if settings.app_settings.queue_config.backend != "memory":
        return
    if not (job_config.success_queue or job_config.failure_queue):
        return
    source = "--queue-backend memory" if chosen else "app_settings.queue_config.backend: memory"
    raise ConfigError(
        f"{source}: the queue records would be kept in the worker processes' memory and vanish when the job "
        "ends; use --queue-backend local (a SQLite file: read it with `modalkit queue NAME`) or sqs"
    )


def describe_queues(queues: dict[str, Any]) -> str:
    """The summary's ``queues`` in one line for the table: ``local: /x/queues.sqlite3 (success scored)``."""
    named = ", ".join(
        f"{role} {queues[f'{role}_queue']}" for role in ("success", "failure") if queues.get(f"{role}_queue")
    )
    hint = "; read with `modalkit queue NAME`" if queues.get("backend") == "local" else ""
    return f"{queues.get('backend')}: {queues.get('location')} ({named}){hint}"


def run_validate(params: dict[str, Any], queue_backend: str | None, sample: int) -> int:
    """``modalkit validate``: print one line per check, then the first problems of each, then the verdict.

    Returns:
        0 a job would start; 1 it would start, but the sample's failure rate passes ``max_failure_rate``; 2 it
        would not start.
    """
    from modalkit.batch.job import resolve_job_config
    from modalkit.batch.partition import fill_partition, is_template, partition_date
    from modalkit.batch.validate import validate_job

    input_uri, output_uri = params["input_uri"], params["output_uri"]
    try:
        if is_template(input_uri) or (output_uri and is_template(output_uri)) or params.get("date"):
            day = partition_date(params.get("date"), None, "--date")
            input_uri = fill_partition(input_uri, day, "INPUT_URI")
            output_uri = fill_partition(output_uri, day, "OUTPUT_URI") if output_uri else None
        settings = with_queue_backend(Settings.load(params.get("config") or None), queue_backend)
        job_config = resolve_job_config(settings, names=params["names"], **params["overrides"])
        refuse_vanishing_queues(settings, job_config, queue_backend)
    except ModalkitError as exc:
        _line("problem", "config", str(exc).replace("\n", "; "))
        print("validate: a job would not start (1 problem)")
        return EXIT_CANNOT_START
    result = validate_job(settings, input_uri, output_uri, params.get("model_name"), job_config, sample=sample)
    for check in result.checks:
        _line(check.status, check.name, check.detail)
        for example in check.examples:
            print(f"           {example}")
    problems = sum(1 for c in result.checks if c.status == "problem")
    if not result.would_start:
        print(f"validate: a job would not start ({problems} problem{'s' if problems > 1 else ''})")
        return EXIT_CANNOT_START
    if result.would_fail:
        print("validate: a job would start, but its sample fails more than max_failure_rate: it would likely fail")
        return EXIT_FAILED
    print("validate: a job would start")
    return 0


def _line(status: str, name: str, detail: str) -> None:
    print(f"{status:<8} {name}: {detail}", flush=True)


def run_queue(name: str | None, drain: bool, config: str | None) -> int:
    """``modalkit queue``: the records waiting on the local queue ``name`` (every queue when None) as JSON lines on
    stdout, oldest first; with ``drain`` they are taken off (a consumer would not get them again).

    Returns:
        0, or 2 when the settings cannot be loaded or no local queue file exists (nothing is created).
    """
    from modalkit.queues import LocalQueueBackend

    try:
        settings = Settings.load(config or None)
    except ModalkitError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return EXIT_CANNOT_START
    queue_config = settings.app_settings.queue_config
    backend = LocalQueueBackend(queue_config.local_path)
    if not Path(backend.location()).exists():
        err.print(
            f"[red]error:[/red] no local queue file at {escape(backend.location())} "
            "(app_settings.queue_config.local_path): no job has sent records to the local backend from here; "
            "run this where the job ran, or pass its --config",
            highlight=False,
        )
        return EXIT_CANNOT_START
    try:
        names = [name] if name is not None else backend.queues()
        total = 0
        for queue in names:
            total += _print_queue(backend, queue, drain)
    finally:
        backend.close()
    verb = "took" if drain else "read"
    where = f"queue {name!r}" if name is not None else f"{len(names)} queue(s)"
    err.print(f"{verb} {total:,} record(s) from {where} in {escape(backend.location())}", highlight=False)
    return 0


def _print_queue(backend: Any, queue: str, drain: bool) -> int:
    write = sys.stdout.write
    count = 0
    if not drain:
        for body in backend.messages(queue):
            write(body.replace("\n", " ") + "\n")
            count += 1
        return count
    while True:
        bodies = backend.receive(queue, max_messages=DRAIN_BATCH)
        if not bodies:
            return count
        for body in bodies:
            write(body.replace("\n", " ") + "\n")
        sys.stdout.flush()  # before the next batch is taken: a closed pipe loses at most the batch in hand
        count += len(bodies)
