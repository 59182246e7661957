"""Every path of a batch job's output, in one place: the output layout contract.

Under OUTPUT_URI::

    part-NNNNN.<fmt>              successes of chunk N (jsonl or parquet), only when it has some
    _failures/part-NNNNN.jsonl    failures of chunk N, only when it has some
    _chunks/NNNNN.json            commit marker of chunk N (its counts, which of the two files it wrote)
    _chunks/NNNNN.progress.json   how far chunk N's queue records were sent (while it runs)
    _ids/NNNNN.npz                the id hashes of chunk N's records (only with an id_field): repeated ids
    _job.json                     which job owns this output
    _manifest.json                the summary, totals and failures by error type, when the job ends (a size that
                                  does not grow with the chunks: each chunk's result is in its marker)
    _lease/NNNNNNNN.json          which run of the job runs now (one generation per run; see batch/lease.py)
    _replay/                      a replay job's input: the failures of the job it replays

Nothing else in modalkit spells one of these paths.

Example:
    >>> layout = OutputLayout("s3://bucket/scored", "parquet")
    >>> layout.part(7)
    's3://bucket/scored/part-00007.parquet'
    >>> layout.marker(7), OutputLayout.marker_index("00007.json")
    ('s3://bucket/scored/_chunks/00007.json', 7)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modalkit.batch.storage import Store, join

__all__ = ["OutputLayout"]

_MARKER_NAME = re.compile(r"^(\d{5,})\.json$")
_LEASE_NAME = re.compile(r"^(\d{8,})\.json$")


@dataclass(frozen=True)
class OutputLayout:
    """The paths under one job output.

    Args:
        root: The output URI (a trailing ``/`` is dropped).
        output_format: ``jsonl`` or ``parquet``: the part files' suffix.
    """

    root: str
    output_format: str = "jsonl"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", self.root.rstrip("/"))

    # --- per chunk ---------------------------------------------------------------------------------------------

    def part(self, index: int) -> str:
        """The part file of chunk ``index``: its successes."""
        return join(self.root, f"part-{index:05d}.{self.output_format}")

    def failures(self, index: int) -> str:
        """The failure file of chunk ``index``."""
        return join(self.failures_dir, f"part-{index:05d}.jsonl")

    def marker(self, index: int) -> str:
        """The commit marker of chunk ``index``: written last, once its files and records are out."""
        return join(self.chunks_dir, f"{index:05d}.json")

    def ids(self, index: int) -> str:
        """The id hashes of chunk ``index``'s records (with an ``id_field``), for finding ids that repeat."""
        return join(self.root, "_ids", f"{index:05d}.npz")

    def journal(self, index: int) -> str:
        """How far chunk ``index``'s queue records were sent (exists only while the chunk is unfinished)."""
        return join(self.chunks_dir, f"{index:05d}.progress.json")

    @staticmethod
    def marker_index(name: str) -> int | None:
        """The chunk index of a file name under ``_chunks/`` when it is a commit marker, else None."""
        match = _MARKER_NAME.match(name)
        return int(match.group(1)) if match else None

    def committed_indices(self, store: Store) -> list[int]:
        """The indices of the chunks that have a commit marker (one listing of ``_chunks/`` through ``store``)."""
        return [i for i in map(OutputLayout.marker_index, store.list_names(self.chunks_dir)) if i is not None]

    # --- per job -------------------------------------------------------------------------------------------------

    @property
    def failures_dir(self) -> str:
        """The folder of the failure files."""
        return join(self.root, "_failures")

    @property
    def chunks_dir(self) -> str:
        """The folder of the commit markers and journals."""
        return join(self.root, "_chunks")

    @property
    def job_claim(self) -> str:
        """``_job.json``: which job owns this output (written before any chunk)."""
        return join(self.root, "_job.json")

    @property
    def manifest(self) -> str:
        """``_manifest.json``: the summary and every chunk's result."""
        return join(self.root, "_manifest.json")

    @property
    def lease_dir(self) -> str:
        """``_lease/``: the generations of the lease of the run that runs the job now."""
        return join(self.root, "_lease")

    def lease(self, generation: int) -> str:
        """The lease file of ``generation`` (created exclusively by the run that takes it)."""
        return join(self.lease_dir, f"{generation:08d}.json")

    @staticmethod
    def lease_generation(name: str) -> int | None:
        """The generation of a file name under ``_lease/``, else None."""
        match = _LEASE_NAME.match(name)
        return int(match.group(1)) if match else None

    # --- a replay job's input --------------------------------------------------------------------------------------

    @property
    def replay_dir(self) -> str:
        """Where a replay job keeps its input (the failures it replays)."""
        return join(self.root, "_replay")

    @property
    def replay_input(self) -> str:
        """The replayed records, one JSON object per line."""
        return join(self.replay_dir, "failures.jsonl")

    @property
    def replay_source(self) -> str:
        """Which job and stages this replay replays."""
        return join(self.replay_dir, "_source.json")
