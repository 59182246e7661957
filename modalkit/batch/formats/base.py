"""What an input format plug-in declares: its suffixes, how its files are cut into chunks, how a chunk is read.

A format never reads record bodies to plan (only headers or footers), and reads a chunk as a stream of
``(positions, payloads)`` sub-batches: a payload is ``bytes`` (a JSON line still to parse), a ``dict`` (a CSV or
Parquet row), or :class:`Unreadable` (a record that could not be split into fields, with why).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, ClassVar, Literal, NamedTuple, TypeVar

from pydantic import BaseModel

from modalkit.batch.formats.cells import RowFitter
from modalkit.batch.storage import Store, StoredFile
from modalkit.iomodel import ChunkSpec, Extent

__all__ = ["Batch", "Codec", "InputFile", "InputFormat", "Part", "PlanOptions", "Unreadable", "batched", "extent_of"]

E = TypeVar("E")

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


class Part(NamedTuple):
    """One chunk of a file as its format plans it: which part (the extent) and about how many bytes it reads."""

    extent: Extent
    size: int


class InputFormat(ABC):
    """An input format: ``name`` is what a ChunkSpec's ``format`` says; ``suffixes`` name its files."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]
    #: What a record's position counts: the byte offset of its line, or its row index in the file.
    position: ClassVar[Literal["byte", "row"]] = "byte"
    #: Whether its files may be compressed (a codec suffix such as ``.gz`` after the format's own).
    compressible: ClassVar[bool] = True

    @abstractmethod
    def plan(self, file: InputFile, options: PlanOptions, store: Store) -> list[Part]:
        """The chunks of ``file``, in file order: each one's extent (the byte range, CSV rows or row groups it
        reads) and size; the planner adds the index, job id, uri, key and format. Reads no record body (a header
        or a footer at most, through ``store``)."""

    @abstractmethod
    def read(self, chunk: ChunkSpec, batch_size: int, store: Store) -> Iterator[Batch]:
        """The records of ``chunk`` (of the extent this format planned), read through ``store``, in file order, at
        most ``batch_size`` per sub-batch."""

    def fitter(self, chunk: ChunkSpec, model: type[BaseModel], id_field: str | None) -> RowFitter | None:
        """How ``chunk``'s records are fitted to the pipeline's input ``model`` before validation, decided once per
        chunk; None (the default) when they need nothing: JSON and Parquet values have their types already."""
        return None

    def prove_start(self, chunk: ChunkSpec, committed: Callable[[], set[int]], store: Store) -> None:  # noqa: B027 - optional
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


def extent_of(chunk: ChunkSpec, kind: type[E]) -> E:
    """``chunk``'s extent, which must be of the type ``kind`` its format plans (a mismatch is a bug, never data)."""
    extent = chunk.extent
    if not isinstance(extent, kind):
        raise TypeError(f"chunk {chunk.index} ({chunk.key}) has a {extent.kind} extent, not {kind.__name__}")
    return extent
