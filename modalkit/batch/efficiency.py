"""What a finished job cost and how well it used its devices: container-seconds and device-seconds (busy, and idle
by cause), the mean batch size, records per device-second, dollars in total and per 1,000 records, and where the
money went in a sentence.

The figures come from the chunks' results (their commit markers keep them, so a resumed job's earlier chunks
count) and the job's :class:`~modalkit.batch.cost.Rate`. One container (a Modal container or a local worker) holds
one device, and is billed for its whole life:

- ``container_seconds`` = the chunks' walls + each worker's start (``cold_start``: process start to loading the
  pipeline; ``model_load``) + ``between_chunks`` (a worker up between its chunks, its first included: the flow
  planning or sending) + ``after_last`` (after a worker's last chunk: until the job ended, for a local worker; the
  ``scaledown_window`` Modal bills an idle container, for Modal).
- ``device_seconds`` = the chunks' ``predict`` seconds: the device busy. ``host_wait`` = the timed chunks' walls
  less their ``predict``: the device waiting on the host inside chunks. A chunk from a worker that does not time
  (an older Modal worker) counts in ``container_seconds`` only.
- ``cost_usd`` = ``container_seconds`` x the rate; ``cost_per_1000`` = ``cost_usd`` / records x 1000.

Not counted: attempts of a chunk that failed and were retried, and workers started that ran no chunk.

Example:
    >>> from modalkit.batch.cost import Rate
    >>> from modalkit.iomodel import ChunkResult, StageSeconds
    >>> chunk = ChunkResult(index=0, records=1000, succeeded=1000, started_at=100.0, seconds=10.0, worker="w",
    ...                     stages=StageSeconds(predict=6.0), batches=4, batched_records=1000,
    ...                     cold_start_seconds=1.0, model_load_seconds=3.0, ready_at=100.0)
    >>> bill = job_cost([chunk], Rate(0.001, "L4", 1, 1, "test"), ended_at=112.0, max_batch_size=256)
    >>> bill.container_seconds, round(bill.cost_usd, 4), bill.mean_batch_size, bill.idle["after_last"]
    (16.0, 0.016, 250.0, 2.0)
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from modalkit.batch.cost import Rate
from modalkit.iomodel import ChunkResult

__all__ = ["COST_FIELDS", "IDLE_CAUSES", "JobCost", "cost_rows", "job_cost", "usd"]

#: Why a device was idle, in the order of a container's life.
IDLE_CAUSES: tuple[str, ...] = ("cold_start", "model_load", "host_wait", "between_chunks", "after_last")
#: The summary's fields this module fills.
COST_FIELDS: tuple[str, ...] = (
    "device_seconds", "container_seconds", "device_idle_seconds", "mean_batch_size", "records_per_device_second",
    "cost_usd", "cost_per_1000", "cost_per_1000_succeeded", "cost_failed_usd", "price_usd_per_hour",
    "price_source", "cost_note",
)  # fmt: skip

# Each cause of idle time, and what to do about it when it is the largest.
_IDLE_WHAT = {
    "cold_start": ("containers starting", "keep some warm (deployment_config.min_containers) or run fewer, longer "
                   "ones"),
    "model_load": ("loading the model", "fewer, longer-lived containers (larger chunks), or a faster load"),
    "host_wait": ("the device waiting on the host inside chunks", "raise host workers (job_config.prefetch_batches, "
                  "more cores per container) or make the host stages cheaper"),
    "between_chunks": ("workers waiting between chunks for the flow to plan or send the next", "larger chunks "
                       "(job_config.chunk_size) or more chunks in flight (job_config.concurrency)"),
    "after_last": ("workers idle after their last chunk", "smaller chunks even out the tail; on Modal, a shorter "
                   "deployment_config.scaledown_window"),
}  # fmt: skip
#: What differs for local workers: they start while the job plans, and live until it ends.
_LOCAL_IDLE_WHAT = {
    "cold_start": ("local workers starting (a process each, its imports)", "fewer local workers "
                   "(job_config.local_workers), or more work per run to spread it"),
    "after_last": ("workers idle after their last chunk, until the job ended", "smaller chunks even out the tail"),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class JobCost:
    """A job's cost and efficiency (see the module's docstring for what each figure counts)."""

    device_seconds: float
    container_seconds: float
    idle: dict[str, float]
    batches: int
    batched_records: int
    max_batch_size: int
    records: int
    succeeded: int
    failed: int
    rate: Rate | None
    #: chunks whose workers timed their stages (none: the device's busy seconds are unknown)
    timed: int = 0
    #: where the chunks ran: ``local`` or ``modal`` (what the note advises)
    backend: str = "local"

    @property
    def cost_usd(self) -> float:
        """``container_seconds`` x the rate's dollars per second (0 without a rate)."""
        return self.container_seconds * self.rate.usd_per_second if self.rate is not None else 0.0

    @property
    def mean_batch_size(self) -> float:
        """Records per call of ``predict``."""
        return self.batched_records / self.batches if self.batches else 0.0

    def per_1000(self, records: int) -> float:
        """Dollars per 1,000 of ``records`` (0 without any)."""
        return self.cost_usd / records * 1000 if records else 0.0

    def note(self) -> str | None:
        """Where the money (the container-seconds) went, and what to do about the largest idle share."""
        if self.container_seconds <= 0 or not self.timed:
            return None
        total = self.container_seconds
        busy = self.device_seconds / total
        cause = max(IDLE_CAUSES, key=lambda c: self.idle[c])
        share = self.idle[cause] / total
        text = f"the device was busy {busy:.0%} of the {total:,.1f} container-seconds"
        if share > 0:
            what, advice = (_LOCAL_IDLE_WHAT if self.backend == "local" else {}).get(cause, _IDLE_WHAT[cause])
            text += f"; {share:.0%} went to {what}: {advice}"
        if self.batches and self.mean_batch_size < 0.5 * self.max_batch_size:
            text += (f"; batches averaged {self.mean_batch_size:,.0f} records of max_batch_size "
                     f"{self.max_batch_size:,} (small chunks or files leave short batches)")  # fmt: skip
        return text

    def summary_fields(self) -> dict[str, Any]:
        """The summary's cost fields (:data:`COST_FIELDS`), rounded for people to read."""
        return {
            "device_seconds": round(self.device_seconds, 3),
            "container_seconds": round(self.container_seconds, 3),
            "device_idle_seconds": {cause: round(self.idle[cause], 3) for cause in IDLE_CAUSES},
            "mean_batch_size": round(self.mean_batch_size, 2),
            "records_per_device_second": round(self.records / self.device_seconds, 1) if self.device_seconds else 0.0,
            "cost_usd": round(self.cost_usd, 6),
            "cost_per_1000": round(self.per_1000(self.records), 6),
            "cost_per_1000_succeeded": round(self.per_1000(self.succeeded), 6),
            "cost_failed_usd": round(self.cost_usd * self.failed / self.records, 6) if self.records else 0.0,
            "price_usd_per_hour": round(self.rate.usd_per_hour, 6) if self.rate is not None else 0.0,
            "price_source": self.rate.source if self.rate is not None else "",
            "cost_note": self.note(),
        }


def job_cost(
    results: Iterable[ChunkResult], rate: Rate | None, *, ended_at: float, max_batch_size: int, backend: str = "local"
) -> JobCost:
    """The cost of the chunks in ``results`` at ``rate`` (None: no price, 0 dollars), the job having ended at
    ``ended_at`` (seconds since the epoch: a local worker's idle tail runs until then)."""
    results = list(results)
    idle = dict.fromkeys(IDLE_CAUSES, 0.0)
    walls = device = 0.0
    for result in results:
        walls += result.seconds
        idle["cold_start"] += result.cold_start_seconds
        idle["model_load"] += result.model_load_seconds
        if result.stages is not None:
            busy = min(result.stages.predict, result.seconds)
            device += busy
            idle["host_wait"] += result.seconds - busy
    by_worker: dict[str, list[ChunkResult]] = defaultdict(list)
    for result in results:
        if result.worker and not result.skipped and result.started_at:  # this run's: their workers' gaps and tails
            by_worker[result.worker].append(result)
    tail = rate.billed_idle_seconds if rate is not None else 0.0
    for chunks in by_worker.values():
        chunks.sort(key=lambda r: r.started_at)
        free_since = chunks[0].ready_at or chunks[0].started_at
        for result in chunks:
            idle["between_chunks"] += max(0.0, result.started_at - free_since)
            free_since = max(free_since, result.started_at + result.seconds)
        idle["after_last"] += tail if tail else max(0.0, ended_at - free_since)
    untimed = sum(r.seconds for r in results if r.stages is None)
    container = device + untimed + sum(idle.values())
    return JobCost(
        device_seconds=device,
        container_seconds=container,
        idle=idle,
        batches=sum(r.batches for r in results),
        batched_records=sum(r.batched_records for r in results),
        max_batch_size=max_batch_size,
        records=sum(r.records for r in results),
        succeeded=sum(r.succeeded for r in results),
        failed=sum(r.failed for r in results),
        rate=rate,
        timed=sum(1 for r in results if r.stages is not None),
        backend=backend,
    )


def usd(amount: float) -> str:
    """Dollars as people read them: cents from a dollar up, three significant digits below (``$0.00123``)."""
    return f"${amount:,.2f}" if amount >= 1 or amount == 0 else f"${amount:.3g}"


def cost_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The CLI table's and the report's cost lines of a summary (a ``JobSummary`` dump); none before any chunk
    ran."""
    container = summary.get("container_seconds") or 0.0
    if not container:
        return []
    idle = summary.get("device_idle_seconds") or {}
    device = summary.get("device_seconds") or 0.0
    parts = ", ".join(f"{cause.replace('_', ' ')} {idle[cause]:,.1f} s" for cause in IDLE_CAUSES if idle.get(cause))
    price = summary.get("price_usd_per_hour") or 0.0
    timed = summary.get("stage_seconds") is not None
    busy = f": device busy {device:,.1f} s ({device / container:.0%})" if timed else " (no chunk was timed)"
    rows = [
        ("cost", f"{usd(summary.get('cost_usd', 0.0))} ({usd(summary.get('cost_per_1000', 0.0))} per 1,000 records, "
                 f"{usd(summary.get('cost_per_1000_succeeded', 0.0))} per 1,000 succeeded; failed records "
                 f"{usd(summary.get('cost_failed_usd', 0.0))})"),
        ("price", f"{usd(price)} per container-hour ({summary.get('price_source') or 'no price'})"),
        ("container-seconds", f"{container:,.1f} s{busy}" + (f", idle: {parts}" if parts else "")),
    ]  # fmt: skip
    if timed:
        mean, most = summary.get("mean_batch_size", 0.0), summary.get("max_batch_size", 0)
        rate = summary.get("records_per_device_second", 0.0)
        rows.append(("batches", f"mean {mean:,.1f} records of max_batch_size {most:,}; {rate:,.0f} records per "
                                "device-second"))  # fmt: skip
    if summary.get("cost_note"):
        rows.append(("where the money went", str(summary["cost_note"])))
    return rows
