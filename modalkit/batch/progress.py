"""Progress of a running batch job: what the flow hands its ``on_progress`` callable after each chunk (the CLI's
progress bar), beside its Prefect progress artifact."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["JobProgress"]


@dataclass(frozen=True)
class JobProgress:
    """Where a job stands: chunks and bytes done of the total, and records so far."""

    job_id: str
    chunks_done: int
    chunks_total: int
    bytes_done: int
    bytes_total: int
    records: int
    failed: int

    @property
    def percent(self) -> float:
        """Progress in percent, by input bytes."""
        return 100.0 * self.bytes_done / self.bytes_total if self.bytes_total else 100.0
