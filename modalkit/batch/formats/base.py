"""What an input format plug-in declares: its suffixes, how its files are cut into chunks, how a chunk is read.

A format never reads record bodies to plan (only headers or footers), and reads a chunk as a stream of
``(positions, payloads)`` sub-batches: a payload is ``bytes`` (a JSON line still to parse), a ``dict`` (a CSV or
Parquet row), or :class:`Unreadable` (a record that could not be split into fields, with why).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, ClassVar, Literal

from modalkit.batch.storage import StoredFile

__all__ = ["Batch", "Codec", "InputFile", "InputFormat", "PlanOptions", "Unreadable", "batched"]

#: A sub-batch of a chunk: each record's position (byte offset or row index) and its payload.
Batch = tuple[list[int], list[Any]]


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A record that could not be read into fields: the error's type and message, and the raw text."""

    error_type: str
    error: str
    raw: str


@dataclass(frozen=True)
class InputFile(StoredFile):
    """An input file with the format and the compression its name declares."""

    format: str = "jsonl"
    compression: str | None = None


@dataclass(frozen=True)
class PlanOptions:
    """What planning a file may depend on: the chunk size, and whether CSV files may be cut at line ends."""

    chunk_size: int
    split_csv: bool = False


class InputFormat(ABC):
    """An input format: ``name`` is what a ChunkSpec's ``format`` says; ``suffixes`` name its files."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]
    #: What a record's position counts: the byte offset of its line, or its row index in the file.
    position: ClassVar[Literal["byte", "row"]] = "byte"
    #: Whether its files may be compressed (a codec suffix such as ``.gz`` after the format's own).
    compressible: ClassVar[bool] = True

    @abstractmethod
    def plan(self, file: InputFile, options: PlanOptions) -> list[dict[str, Any]]:
        """The chunks of ``file``: each as the ChunkSpec fields that say which part of it (start/end, row groups,
        size, header...); the planner adds the index, job id, uri, key and format."""

    @abstractmethod
    def read(self, chunk: Any, batch_size: int) -> Iterator[Batch]:
        """The records of ``chunk`` (a ChunkSpec), in file order, at most ``batch_size`` per sub-batch."""

    def prove_start(self, chunk: Any, committed: Callable[[], set[int]]) -> None:  # noqa: B027 - optional
        """Raise unless ``chunk`` provably starts at a record boundary; called before its results are committed.

        ``committed`` lists the indices of the job's committed chunks. Nothing to prove by default: JSONL lines
        and Parquet row groups are records' boundaries by construction.
        """


class Codec(ABC):
    """A compression a file name may declare after its format's suffix (``reviews.jsonl.gz``).

    A compressed file cannot be cut (a chunk cannot start in the middle of a stream): it is one chunk.
    """

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]
    #: What reading the decompressed stream raises when the file is corrupt or truncated (no retry can fix it).
    corrupt_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    @abstractmethod
    def open(self, stream: IO[bytes]) -> IO[bytes]:
        """The decompressed stream of ``stream``."""


def batched(items: Iterable[tuple[int, Any]], size: int) -> Iterator[Batch]:
    """``(position, payload)`` pairs regrouped into sub-batches of at most ``size``."""
    positions: list[int] = []
    payloads: list[Any] = []
    for pos, payload in items:
        positions.append(pos)
        payloads.append(payload)
        if len(positions) == size:
            yield positions, payloads
            positions, payloads = [], []
    if positions:
        yield positions, payloads
