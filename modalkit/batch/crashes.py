"""Finding the record that kills its worker process (``os._exit``, a segfault, an OOM kill), instead of failing its
whole chunk.

A worker that runs a chunk under a :class:`CrashPlan` writes a breadcrumb to a local file before each pipeline call:
which records (by their ordinal in the chunk: a record's position repeats across the files of a packed chunk, its
ordinal does not) are in flight. When the process dies, the runner reads the breadcrumb and runs the chunk
again with a narrower plan: a sub-batch that was in flight at two deaths in a row is run one record at a time
(``careful``), and a record that was alone in flight at a death is not run again but failed with
``error_type: WorkerCrashed`` (``killers``). The other records of the chunk are scored as usual.

A chunk whose sub-batches overlap (the pipelined executor of :mod:`modalkit.batch.chunk`) has several sub-batches
in the pipeline at once; its breadcrumb names the records of all of them, and once a worker has died on a chunk
(``CrashPlan.deaths``) the chunk runs one sub-batch after another, so that the breadcrumbs narrow down as above.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from modalkit.inference_pipeline import RecordError

__all__ = ["CrashLog", "CrashPlan", "CrashTracker", "read_breadcrumb", "run_guarded", "spans"]

#: What a record that killed its worker gets, in place of an output.
WORKER_CRASHED = "WorkerCrashed"


@dataclass(frozen=True)
class CrashPlan:
    """How a worker runs a chunk that has killed workers before (records by their ordinal in the chunk)."""

    breadcrumb: str
    careful: frozenset[int] = frozenset()
    killers: frozenset[int] = frozenset()
    #: how many times a worker has died on this chunk already: the chunk then runs one sub-batch at a time
    deaths: int = 0


class CrashLog:
    """The worker's side: the breadcrumb file, rewritten before each pipeline call."""

    def __init__(self, plan: CrashPlan) -> None:
        self.plan = plan
        self._fh = open(plan.breadcrumb, "wb")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()  # the stages of a pipelined chunk note from several threads

    def note(self, kind: str, positions: Sequence[int]) -> None:
        """Record that the pipeline is about to run these records (``kind``: "batch" or "one")."""
        self.note_spans(kind, spans(positions))

    def note_spans(self, kind: str, text: str) -> None:
        """:meth:`note` with the positions already written as :func:`spans` (joined by spaces)."""
        line = f"{kind} {text}\n".encode()
        with self._lock:
            fh = self._fh
            fh.seek(0)
            fh.write(line)
            fh.truncate()
            fh.flush()  # to the OS: it outlives this process however it dies

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()


def spans(positions: Sequence[int]) -> str:
    """``positions`` (increasing) as the breadcrumb writes them: runs of consecutive ones as ``first-last``, the others
    alone, separated by spaces. A sub-batch is mostly one run: its breadcrumb costs the same for 1 record or 10,000."""
    if not positions:
        return ""
    first, last = positions[0], positions[-1]
    if last - first == len(positions) - 1:  # increasing and as many as the range holds: one run
        return f"{first}-{last}" if last != first else str(first)
    out: list[str] = []
    start = prev = first
    for pos in positions[1:]:
        if pos != prev + 1:
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = pos
        prev = pos
    out.append(f"{start}-{prev}" if prev != start else str(start))
    return " ".join(out)


def read_breadcrumb(path: str) -> tuple[str, tuple[int, ...]] | None:
    """What was in flight when the worker died: ``("batch" | "one", positions)``, or None when nothing was."""
    try:
        with open(path, "rb") as fh:
            kind, _, rest = fh.read().decode().strip().partition(" ")
    except (OSError, UnicodeDecodeError):
        return None
    if kind not in ("batch", "one"):
        return None
    positions: list[int] = []
    try:
        for word in rest.split():
            first, _, last = word.partition("-")
            positions.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        return None
    return kind, tuple(positions)


def run_guarded(
    run: Callable[[list[Any]], list[Any]], models: list[Any], positions: list[int], log: CrashLog
) -> list[Any]:
    """``run(models)`` under the crash plan: killers are not run, careful records are run one by one."""
    plan = log.plan
    if not plan.killers and not plan.careful:  # the common case: no worker died on this chunk
        log.note("batch", positions)
        return run(models)
    outcomes: list[Any] = [None] * len(models)
    normal = []
    for i, pos in enumerate(positions):
        if pos in plan.killers:
            outcomes[i] = RecordError(
                "predict", WORKER_CRASHED, "the worker process died while running this record alone (an os._exit, a "
                "segfault or an out-of-memory kill); it was not run again, so that the rest of its chunk could be"
            )  # fmt: skip
        elif pos not in plan.careful:
            normal.append(i)
    if normal:
        log.note("batch", [positions[i] for i in normal])
        for i, outcome in zip(normal, run([models[i] for i in normal]), strict=True):
            outcomes[i] = outcome
    for i, pos in enumerate(positions):
        if pos in plan.careful and pos not in plan.killers:
            log.note("one", [pos])
            (outcomes[i],) = run([models[i]])
    log.note("batch", [])
    return outcomes


@dataclass
class CrashTracker:
    """The runner's side: what the worker deaths on one chunk say, and the plan for its next attempt."""

    breadcrumb: str
    max_deaths: int = 12
    deaths: int = 0
    careful: set[int] = field(default_factory=set)
    killers: set[int] = field(default_factory=set)
    _last: tuple[int, ...] | None = None

    def plan(self) -> CrashPlan:
        return CrashPlan(self.breadcrumb, frozenset(self.careful), frozenset(self.killers), self.deaths)

    def died(self) -> bool:
        """Account for a death; True when the chunk should run again with the narrower plan."""
        self.deaths += 1
        crumb = read_breadcrumb(self.breadcrumb)
        with contextlib.suppress(OSError):
            os.remove(self.breadcrumb)
        if self.deaths > self.max_deaths:
            return False
        if crumb is None or not crumb[1]:
            # nothing of this chunk was in the pipeline: another chunk's worker died and took the pool down, or this
            # one died outside the pipeline; try again as it is, twice
            return self.deaths <= 2
        kind, positions = crumb
        if kind == "one":
            self.killers.update(positions)
        elif positions == self._last:
            self.careful.update(positions)  # the same records in flight at two deaths in a row: one at a time
        self._last = positions
        return True
