"""``modalkit estimate``: the whole job's expected wall time and cost, from a calibration sample run here; CLI side.

The model is :mod:`modalkit.batch.estimate`; this module checks the options (a bad one fails at once, in one line),
measures what the job's own process spends beside local workers (importing Prefect and the flow, in a fresh
interpreter: the library never imports Prefect), and prints the table, or with ``--json`` the one JSON line.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from modalkit.exceptions import ModalkitError
from modalkit.settings import Settings

__all__ = ["run_estimate"]

EXIT_CANNOT_ESTIMATE = 2
#: ``--sample``'s bounds.
SAMPLE_RANGE = (1, 1_000_000)
#: ``--max-containers``' bounds (``deployment_config.max_containers``').
CONTAINERS_RANGE = (1, 10_000)


class BadOption(ModalkitError):
    """An option's value is out of its bounds (named as typed)."""


def run_estimate(params: dict[str, Any], err: Console) -> int:
    """``modalkit estimate``: print the estimate (a table, or with ``params["json"]`` one JSON line, last).

    Returns:
        0, or 2 when the job could not be estimated (a bad option, configuration or input; an empty input).
    """
    from modalkit.batch.job import InvalidJobParameters, resolve_job_config

    try:
        sample = _whole("--sample", params["sample"], SAMPLE_RANGE)
        containers = _whole("--max-containers", params["max_containers"], CONTAINERS_RANGE)
        settings = Settings.load(params["config"] or None)
        config = resolve_job_config(settings, names=params["names"], **params["overrides"])
    except InvalidJobParameters as exc:
        for line in exc.lines:
            err.print(f"[red]error:[/red] Invalid value for {escape(line)}", highlight=False)
        return EXIT_CANNOT_ESTIMATE
    except ModalkitError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return EXIT_CANNOT_ESTIMATE
    from modalkit.batch.estimate import DEFAULT_SAMPLE, estimate_job
    from modalkit.batch.sampling import MissingIdField

    slots = None
    if config.backend == "modal":  # the Modal runner's default containers (the engine imports no runner)
        from modalkit.runners.modal_client import DEFAULT_MODAL_SLOTS

        slots = DEFAULT_MODAL_SLOTS
    try:
        found = estimate_job(
            settings, params["input_uri"], params["model_name"], config, sample=sample or DEFAULT_SAMPLE,
            gpu=params["gpu"], max_containers=containers,
            orchestrator_cpu=_orchestrator_cpu_seconds, modal_slots=slots,
        )  # fmt: skip
    except MissingIdField as exc:  # named as the option is typed, as `modalkit batch` names it
        err.print(f"[red]error:[/red] {escape(exc.describe(params['names']['id_field']))}", highlight=False)
        return EXIT_CANNOT_ESTIMATE
    except ModalkitError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return EXIT_CANNOT_ESTIMATE
    if params["json"]:
        print(json.dumps(found.summary()), flush=True)
    else:
        _print_table(found, params["input_uri"])
    return 0


def _whole(option: str, value: str | None, bounds: tuple[int, int]) -> int | None:
    if value is None:
        return None
    low, high = bounds
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise BadOption(f"Invalid value for {option} {value!r}: allowed: a whole number from {low:,} to {high:,}")
    return number


def _orchestrator_cpu_seconds() -> float:
    """CPU seconds a fresh interpreter spends importing the flow (Prefect with it): what the job's own process
    spends beside its local workers while they run its first chunks."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "import flows.batch_inference"], capture_output=True, check=False,
                   timeout=120)  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _print_table(found: Any, input_uri: str) -> None:
    from modalkit.batch.timings import STAGES

    cal, model = found.calibration, found.model
    table = Table(title=f"estimate: {escape(input_uri)}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    records = f"{found.records:,}" + (" (counted)" if cal.whole_input else " (estimated from bytes per record)")
    per = cal.chosen
    stages = per.stages()
    where = ", ".join(f"{stage} {getattr(stages, stage) / per.records * 1000:.3f} s"
                      for stage in STAGES if getattr(stages, stage) > 0)  # fmt: skip
    if model.backend == "local":
        on = f"local, {model.workers} worker(s) on {model.cores} core(s)"
    else:
        on = f"modal, {model.workers} container(s) of {model.gpu or 'CPU only'}"
    hourly = found.usd_per_second * 3600
    rows = [
        ("input", f"{found.total_bytes:,} bytes in {found.chunks:,} chunk(s)"),
        ("sample", f"{cal.records:,} records from {len(cal.windows)} window(s), run here"),
        ("records", records),
        ("per 1,000 records", where or "-"),
        ("backend", on),
        ("seconds", f"{found.seconds:,.1f} (start {found.start_seconds:.1f} s, planning {found.plan_seconds:.1f} s)"),
        ("cost_usd", f"${found.cost_usd:,.4f} ({found.billed_seconds:,.0f} billed s at ${hourly:,.4f}/h)"),
        ("cost_per_1000", f"${found.cost_per_1000:,.6f}"),
        ("bottleneck", found.bottleneck.note if found.bottleneck else "-"),
    ]
    for name, value in rows:
        table.add_row(name, escape(value))
    for n, line in enumerate(found.assumptions):
        table.add_row("assumptions" if n == 0 else "", escape(line))
    Console().print(table)
