"""Streaming the records of one chunk, in sub-batches, with each record's position in its file.

A record's position is its byte offset for JSONL and CSV (the offset of the line where it starts) and its row
index for Parquet; ``<file key>:<position>`` is the record's default id. Memory is bounded by the sub-batch, not
the chunk: lines are read through a buffered stream and handed on ``batch_size`` at a time.

Payloads are what the chunk processor validates: ``bytes`` (a JSON line still to parse), ``dict`` (a CSV or
Parquet row), or :class:`Unreadable` (a CSV line that could not be split into the header's columns).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from modalkit.batch import storage
from modalkit.exceptions import StorageError, storage_errors
from modalkit.iomodel import ChunkSpec

__all__ = ["Unreadable", "iter_batches"]


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A record that could not be read into fields: why, and the raw text."""

    error_type: str
    error: str
    raw: str


Batch = tuple[list[int], list[Any]]


def iter_batches(chunk: ChunkSpec, batch_size: int) -> Iterator[Batch]:
    """Yield ``(positions, payloads)`` lists of at most ``batch_size`` records, in file order."""
    if chunk.format == "parquet":
        yield from _parquet_batches(chunk, batch_size)
    elif chunk.format == "csv":
        yield from _batched(_csv_rows(chunk), batch_size)
    else:
        # "{" starts nearly every record, so the strip() that finds blank lines is seldom needed
        lines = ((pos, line) for pos, line in _lines(chunk) if line[0] == 0x7B or line.strip())
        yield from _batched(lines, batch_size)


def _batched(items: Iterable[tuple[int, Any]], size: int) -> Iterator[Batch]:
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


def _lines(chunk: ChunkSpec, stop_at_end: bool = True) -> Iterator[tuple[int, bytes]]:
    """The lines that start in the chunk's byte range, with their offsets (the range's first partial line is
    the previous chunk's; the line running over the end is this one's). With ``stop_at_end=False`` the lines go
    on to the end of the file and the caller stops (a CSV record may continue past the range)."""
    what = f"reading {chunk.uri}"
    with storage_errors(what), storage.open_input(chunk.uri, chunk.compression) as fh:
        pos = chunk.start
        if pos > 0 and not chunk.compression:
            fh.seek(pos - 1)
            if fh.read(1) != b"\n":
                pos += len(fh.readline())
        end = chunk.end if stop_at_end else None
        readline = fh.readline
        while end is None or pos < end:
            try:
                line = readline()
            except Exception:
                with storage_errors(what):  # translated there (a context manager per line costs ~3% of a job)
                    raise
                raise  # not a storage error: as it is
            if not line:
                return
            yield pos, line
            pos += len(line)


def _csv_rows(chunk: ChunkSpec) -> Iterator[tuple[int, Any]]:
    header = chunk.header
    if not header:
        raise StorageError(f"{chunk.key}: CSV chunk planned without a header", retryable=False)
    lines = _lines(chunk, stop_at_end=False)
    if chunk.start == 0:
        next(lines, None)  # the header line itself (compressed files are read from their first byte)
    source = _LineSource(lines)
    reader = csv.reader(source)
    end = chunk.end
    while True:
        source.row_start = None
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield source.row_start or 0, Unreadable("CSVError", str(exc), source.last_text)
            continue
        pos = source.row_start if source.row_start is not None else 0
        if end is not None and pos >= end:
            return  # the next chunk's first record
        if end is not None and source.last_start >= end:
            raise StorageError(
                f"{chunk.key}: the CSV record at byte {pos} holds a quoted line break that runs across the chunk "
                f"boundary at byte {end}, so the file cannot be cut at line ends: set "
                "app_settings.job_config.split_csv to false (CSV files are then read whole)",
                retryable=False,
            )
        if not row or row == [""]:
            continue  # blank line
        if len(row) != len(header):
            yield (
                pos,
                Unreadable("CSVError", f"line has {len(row)} fields, the header has {len(header)}", source.last_text),
            )
            continue
        yield pos, dict(zip(header, row, strict=True))


class _LineSource:
    """Feeds decoded lines to csv.reader and remembers where the current row started."""

    def __init__(self, lines: Iterator[tuple[int, bytes]]) -> None:
        self._lines = lines
        self.row_start: int | None = None
        self.last_start = 0
        self.last_text = ""

    def __iter__(self) -> _LineSource:
        return self

    def __next__(self) -> str:
        pos, line = next(self._lines)
        if self.row_start is None:
            self.row_start = pos
        self.last_start = pos
        self.last_text = line.decode("utf-8", errors="replace")
        return self.last_text


def _parquet_batches(chunk: ChunkSpec, batch_size: int) -> Iterator[Batch]:
    import pyarrow.parquet as pq

    what = f"reading {chunk.uri}"
    with storage_errors(what), storage.open_input(chunk.uri) as fh:
        try:
            batches = pq.ParquetFile(fh).iter_batches(
                batch_size=batch_size, row_groups=list(chunk.row_groups), use_threads=False
            )
            row = chunk.first_row
            for batch in batches:
                rows = batch.to_pylist()
                yield list(range(row, row + len(rows))), rows
                row += len(rows)
        except (OSError, StorageError):
            raise
        except Exception as exc:  # pyarrow's ArrowInvalid & co. on a damaged file
            raise StorageError(f"{chunk.key}: cannot read Parquet row groups: {exc}", retryable=False) from exc
