"""Where a job's time went: its chunks' stage seconds summed, the device's busy share, and the bottleneck named.

Each chunk a timing worker ran reports :class:`~modalkit.iomodel.StageSeconds` (``ChunkResult.stages``; its commit
marker keeps them, so a resumed job's committed chunks count too). The job sums them over the chunks that have
them, and measures the device's busy share against the same chunks' seconds: ``sum(predict) / sum(seconds)``, so
a long chunk weighs more than a short one, and a chunk from a worker that does not time (an older Modal worker)
counts in neither. The summary, the manifest, the report and the CLI table show the result; a job none of whose
chunks was timed shows nothing of it.

Example:
    >>> from modalkit.iomodel import ChunkResult, StageSeconds
    >>> timings = sum_stages([ChunkResult(index=0, seconds=10.0, stages=StageSeconds(parse=3.8, predict=4.6))])
    >>> round(timings.stages.device_busy, 2), timings.bottleneck().kind, timings.bottleneck().stage
    (0.46, 'host', 'parse')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from modalkit.iomodel import ChunkResult, StageSeconds

__all__ = [
    "DEVICE_BOUND",
    "HOST_STAGES",
    "STAGES",
    "TIMING_FIELDS",
    "Bottleneck",
    "JobTimings",
    "busy_text",
    "find_bottleneck",
    "stage_shares",
    "sum_stages",
    "timing_rows",
]

#: The stages in the order a record goes through them (the keys of the summary's ``stage_seconds``).
STAGES: tuple[str, ...] = ("read", "parse", "preprocess", "predict", "postprocess", "write", "queue")
#: The stages of the host, which the device waits on when they are slow (all but ``predict``).
HOST_STAGES: tuple[str, ...] = tuple(stage for stage in STAGES if stage != "predict")
#: The summary's fields this module fills (empty, or 0, when no chunk was timed).
TIMING_FIELDS: tuple[str, ...] = (
    "stage_seconds", "device_busy_fraction", "chunk_seconds", "timed_chunks", "bottleneck", "bottleneck_note",
)  # fmt: skip
#: The device is the bottleneck when it was busy at least this share of the chunks' time: what is left is the
#: gaps between sub-batches, which no host setting closes. Below it, the device waited on the host.
DEVICE_BOUND = 0.8

# What to do when a host stage is the slowest. Host stages overlap predict on their own threads (one core's worth
# of Python between them) unless job_config.prefetch_batches is 0.
_MORE_CORES = ("keep job_config.prefetch_batches at 1 or more so that it overlaps predict, make it cheaper, or "
               "give it a faster core")  # fmt: skip
HOST_ADVICE: dict[str, str] = {
    "read": "read further ahead (raise job_config.prefetch_batches), or keep the input nearer the workers",
    "parse": _MORE_CORES,
    "preprocess": _MORE_CORES + ", or move preprocessing that the device could do onto it",
    "postprocess": _MORE_CORES,
    "write": _MORE_CORES + ", or write to faster storage",
    "queue": "the queue backend is slow to take records: check its latency and limits (queue_config)",
}


@dataclasses.dataclass(frozen=True)
class Bottleneck:
    """What limited a job: ``device`` (it was busy; a faster device or more of them would go faster) or ``host``
    (it waited; ``stage`` is the slowest host stage), and ``note``, the sentence that says so and what to do."""

    kind: Literal["device", "host"]
    stage: str
    note: str


@dataclasses.dataclass(frozen=True)
class JobTimings:
    """The timed chunks' stages summed (``stages.device_busy`` is ``predict`` over ``chunk_seconds``), the sum of
    those chunks' seconds, and how many chunks were timed."""

    stages: StageSeconds
    chunk_seconds: float
    timed_chunks: int

    def bottleneck(self) -> Bottleneck | None:
        """The job's bottleneck (:func:`find_bottleneck`)."""
        return find_bottleneck(self.stages, self.chunk_seconds)

    def summary_fields(self) -> dict[str, Any]:
        """The summary's timing fields: ``stage_seconds``, ``device_busy_fraction``, ``chunk_seconds``,
        ``timed_chunks``, ``bottleneck`` and ``bottleneck_note``, rounded for people to read."""
        found = self.bottleneck()
        return {
            "stage_seconds": {stage: round(getattr(self.stages, stage), 3) for stage in STAGES},
            "device_busy_fraction": round(self.stages.device_busy, 4),
            "chunk_seconds": round(self.chunk_seconds, 3),
            "timed_chunks": self.timed_chunks,
            "bottleneck": found.kind if found else None,
            "bottleneck_note": found.note if found else None,
        }


def sum_stages(results: Iterable[ChunkResult]) -> JobTimings | None:
    """The stages of the chunks in ``results`` that carry them, summed (skipped chunks too: their markers keep
    what they recorded); None when no chunk does."""
    totals = dict.fromkeys(STAGES, 0.0)
    seconds, timed = 0.0, 0
    for result in results:
        if result.stages is None:
            continue
        timed += 1
        seconds += result.seconds
        for stage in STAGES:
            totals[stage] += getattr(result.stages, stage)
    if not timed:
        return None
    busy = totals["predict"] / seconds if seconds > 0 else 0.0
    return JobTimings(StageSeconds(**totals, device_busy=busy), seconds, timed)


def find_bottleneck(stages: StageSeconds, chunk_seconds: float) -> Bottleneck | None:
    """``device`` when the device was busy at least :data:`DEVICE_BOUND` of ``chunk_seconds``, else ``host``,
    naming the slowest host stage and what to do about it; None when the chunks took no time."""
    if chunk_seconds <= 0:
        return None
    busy = stages.device_busy
    if busy >= DEVICE_BOUND:
        note = (f"device: busy {busy:.0%} of the chunks' time; a faster device or more of them (a higher "
                "concurrency) would go faster, more host cores would not")  # fmt: skip
        return Bottleneck("device", "predict", note)
    slowest = max(HOST_STAGES, key=lambda stage: getattr(stages, stage))
    took = getattr(stages, slowest)
    note = (f"host: the device waited {1 - busy:.0%} of the chunks' time; the slowest host stage is {slowest} "
            f"({took:.2f} s, {took / chunk_seconds:.0%} of the chunks' time): {HOST_ADVICE[slowest]}")  # fmt: skip
    return Bottleneck("host", slowest, note)


def stage_shares(summary: Mapping[str, Any]) -> list[tuple[str, float, float]]:
    """``(stage, seconds, share of the chunks' seconds)`` of each stage of a summary (a ``JobSummary`` dump), in
    pipeline order; empty when its chunks were not timed."""
    seconds = summary.get("stage_seconds")
    base = summary.get("chunk_seconds") or 0.0
    if not seconds:
        return []
    return [(stage, seconds.get(stage, 0.0), seconds.get(stage, 0.0) / base if base > 0 else 0.0) for stage in STAGES]


def busy_text(summary: Mapping[str, Any]) -> str:
    """``46% of the chunks' 10.0 s``, and how many chunks the timings cover when some were not timed."""
    busy, seconds = summary.get("device_busy_fraction") or 0.0, summary.get("chunk_seconds") or 0.0
    text = f"{busy:.0%} of the chunks' {seconds:,.1f} s"
    timed, chunks = summary.get("timed_chunks") or 0, summary.get("chunks") or 0
    return text + (f" ({timed:,} of {chunks:,} chunks timed)" if timed < chunks else "")


def timing_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The CLI table's rows of a summary (a ``JobSummary`` dump): where the time went (the stages that took any,
    slowest first), how busy the device was, and the bottleneck; none when its chunks were not timed."""
    shares = [share for share in stage_shares(summary) if share[1] > 0]
    if summary.get("stage_seconds") is None:
        return []
    shares.sort(key=lambda share: -share[1])
    rows = [
        ("where the time went", ", ".join(f"{stage} {sec:,.2f} s ({part:.0%})" for stage, sec, part in shares) or "-"),
        ("device busy", busy_text(summary)),
    ]
    if summary.get("bottleneck_note"):
        rows.append(("bottleneck", str(summary["bottleneck_note"])))
    return rows
