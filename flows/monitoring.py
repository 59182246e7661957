"""What a person watching a batch job in the Prefect UI, or an automation, sees of it: the flow run's name and tags,
the markdown report, and the ``modalkit.job.completed`` / ``modalkit.job.failed`` event.

The event's resource is the job (``modalkit.job.<job_id>``, labelled with its model, input, output and outcome:
``clean``, ``with-failures`` or ``failed``); its payload is the job's summary (or, for a job that never started,
the error). An automation matching ``modalkit.job.failed``, or ``modalkit.job.completed`` with the label
``modalkit.outcome: with-failures``, notifies on a night that went wrong (README, "Alerts").
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from modalkit.batch.efficiency import cost_rows
from modalkit.batch.job import errors_by_type
from modalkit.batch.layout import OutputLayout
from modalkit.batch.timings import TIMING_FIELDS, busy_text, stage_shares
from modalkit.iomodel import ChunkResult, JobSummary

__all__ = ["emit_job_event", "job_report", "label_run", "summary_rows"]

log = logging.getLogger(__name__)

#: How many error types the report lists (the failure files hold every failure).
REPORT_ERROR_TYPES = 5
#: How many chunks that failed for good the summary table names with their errors.
TABLE_CHUNK_ERRORS = 20


def label_run(model: str, backend: str, day: str) -> None:
    """Name this flow run ``batch-inference/<model>/<day>`` (the model it scores, the night it reads) and add the
    tags ``model:<name>``, ``backend:<name>`` and ``deployment:<name>`` (the UI filters on them), in one API call.
    A run outside Prefect's API, or an API that does not answer, keeps its name and tags; the job goes on."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.runtime import deployment, flow_run

    run_id = flow_run.id
    if run_id is None:
        return
    current = list(flow_run.tags)
    # the run in hand says whether a deployment started it: asking prefect.runtime first would read the run back
    context = FlowRunContext.get()
    deployed = context is not None and context.flow_run is not None and context.flow_run.deployment_id is not None
    name = deployment.name if deployed else None
    tags = [f"model:{model}", f"backend:{backend}"] + ([f"deployment:{name}"] if name else [])
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run_id, name=f"batch-inference/{model}/{day}",
                                   tags=[*current, *(t for t in tags if t not in current)])  # fmt: skip
    except Exception as exc:  # a name and tags help the UI; they are never worth failing a job
        log.warning("could not name and tag flow run %s: %s", run_id, exc)


def job_report(
    summary: JobSummary,
    results: list[ChunkResult],
    errors: list[tuple[int, BaseException]],
    max_failure_rate: float,
) -> str:
    """The markdown report of a finished job: counts, failure rate, throughput, wall time, where the output and
    the failures are, the ids that occur more than once (the first few, with their places), where the time went
    (when the chunks were timed), where the money went, and the first failure reasons grouped by ``error_type``."""
    layout = OutputLayout(summary.output_uri)
    state = "failed" if errors or summary.status == "failed" else "completed"
    lines = [
        f"# Batch job `{summary.job_id}`: {state}",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{summary.model_name}` |",
        f"| records | {summary.records:,} |",
        f"| succeeded | {summary.succeeded:,} |",
        f"| failed | {summary.failed:,} ({summary.failure_rate:.2%}; the job fails over {max_failure_rate:.2%}) |",
        f"| chunks | {summary.chunks:,} ({summary.chunks_skipped:,} committed by an earlier run) |",
        f"| throughput | {summary.records_per_s:,.0f} records/s |",
        f"| wall time | {summary.seconds:,.1f} s |",
        f"| input | `{summary.input_uri}` |",
        f"| output | `{summary.output_uri}` (manifest: `{layout.manifest}`) |",
        f"| failures | `{layout.failures_dir}/` |"
        if summary.failed
        else f"| failures | none (no `{layout.failures_dir.rsplit('/', 1)[-1]}/` written) |",
    ]
    if summary.duplicate_ids:
        lines += ["", f"## {summary.duplicate_ids:,} id(s) occur more than once", ""]
        lines += ["Each record is in the output and on the queues under its id; consumers keyed on the id see "
                  "these more than once.", "", "| id | records | where |", "|---|---|---|"]  # fmt: skip
        for repeat in summary.duplicate_examples:
            where = ", ".join(f"{o.key} at {o.position}" for o in repeat.occurrences)
            unshown = repeat.count - len(repeat.occurrences)
            more = f" and {unshown} more" if unshown > 0 else ""
            lines.append(f"| `{_cell(str(repeat.record_id))}` | {repeat.count:,} | {_cell(where + more)} |")
    if errors:
        lines += ["", f"## {len(errors)} chunk(s) failed after their retries", ""]
        lines += [f"- chunk {index:05d}: `{_one_line(exc)}`" for index, exc in errors[:REPORT_ERROR_TYPES]]
    lines += _timing_section(summary)
    lines += _cost_section(summary)
    by_type, examples = errors_by_type(results)
    if by_type:
        lines += ["", "## Failures by error type", "", "| error_type | records | first failure |", "|---|---|---|"]
        for error_type, count in by_type.most_common(REPORT_ERROR_TYPES):
            lines.append(f"| `{error_type}` | {count:,} | {_cell(examples.get(error_type, ''))} |")
        if len(by_type) > REPORT_ERROR_TYPES:
            lines.append(f"| ({len(by_type) - REPORT_ERROR_TYPES} more types) | | see the failures folder |")
    return "\n".join(lines) + "\n"


def summary_rows(summary: JobSummary, errors: list[tuple[int, BaseException]]) -> list[dict[str, str]]:
    """The summary table artifact's rows (``field``, ``value``): every field of the summary, the stage timings only
    when chunks were timed (the stage seconds on one line), then the first chunks that failed for good."""
    data = summary.model_dump(exclude=set(TIMING_FIELDS) if summary.stage_seconds is None else None)
    if summary.stage_seconds is not None:
        data["stage_seconds"] = ", ".join(f"{stage} {sec:,.2f} s" for stage, sec in summary.stage_seconds.items())
    rows = [{"field": k, "value": str(v)} for k, v in data.items()]
    rows += [{"field": f"chunk {i:05d} error", "value": str(exc)[:500]} for i, exc in errors[:TABLE_CHUNK_ERRORS]]
    return rows


def _timing_section(summary: JobSummary) -> list[str]:
    """Where the time went: the device's busy share, each stage's seconds and share of the chunks' time, and the
    bottleneck; nothing when no chunk was timed."""
    data = summary.model_dump()
    shares = stage_shares(data)
    if not shares:
        return []
    lines = ["", "## Where the time went", "", f"The device was busy {busy_text(data)}.", ""]
    lines += ["| stage | seconds | share of the chunks' time |", "|---|---|---|"]
    for stage, seconds, share in shares:
        name = "predict (device)" if stage == "predict" else stage
        lines.append(f"| {name} | {seconds:,.2f} | {share:.0%} |")
    if summary.bottleneck_note:
        lines += ["", f"**Bottleneck:** {summary.bottleneck_note}"]
    return lines


def _cost_section(summary: JobSummary) -> list[str]:
    """Where the money went: dollars in total and per 1,000 records, the price, the container-seconds busy and idle
    by cause, the batch size achieved, and what to do about the largest idle share; nothing before any chunk ran."""
    rows = cost_rows(summary.model_dump())
    if not rows:
        return []
    lines = ["", "## Where the money went", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in rows if name != "where the money went"]
    if summary.cost_note:
        lines += ["", f"**Where the money went:** {summary.cost_note}"]
    return lines


def emit_job_event(
    outcome: Literal["completed", "failed"],
    summary: dict[str, Any] | None,
    error: str | None,
    uris: dict[str, str],
) -> None:
    """Emit ``modalkit.job.<outcome>`` with the summary as its payload and the job as its resource. Sent through
    Prefect's events client (to the server the run reports to); never fails the job."""
    from prefect.events import emit_event

    payload: dict[str, Any] = dict(summary or {})
    if error is not None:
        payload["error"] = error
    job_id = str(payload.get("job_id") or "unplanned")
    failed = int(payload.get("failed") or 0)
    label = "failed" if outcome == "failed" else "with-failures" if failed else "clean"
    resource = {
        "prefect.resource.id": f"modalkit.job.{job_id}",
        "prefect.resource.name": f"batch job {job_id}",
        "modalkit.outcome": label,
        "modalkit.model": str(payload.get("model_name") or ""),
        "modalkit.input_uri": uris.get("input_uri", ""),
        "modalkit.output_uri": uris.get("output_uri", ""),
    }
    try:
        emit_event(event=f"modalkit.job.{outcome}", resource=resource, payload=payload)
    except Exception as exc:
        log.warning("could not emit modalkit.job.%s: %s", outcome, exc)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300].replace("`", "'")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")[:300]
