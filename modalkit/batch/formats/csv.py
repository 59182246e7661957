"""CSV (``.csv``): a header line naming the columns, then one record per row; rows become dicts of strings,
fitted to the pipeline's input model before validation (empty cells, JSON cells: :mod:`.cells`).

A quoted field may hold a line break, and whether a byte offset falls inside quotes cannot be known without
reading everything before it. So a CSV file is one chunk, unless ``job_config.split_csv`` says its quoted fields
hold no line breaks: then it is cut at line ends like JSONL, and each chunk proves what that promise rests on.
With no quoted line breaks every line holds an even number of quote characters, so every line end is a record
boundary; a chunk fails loudly on a line with an odd number, and before it commits it proves that every line
before its start is even too: the lines of the chunks before it that have committed were checked by them, and
it reads the rest itself (usually one chunk's worth: the one still running beside it). A chunk that starts
inside a quoted field therefore never commits records cut out of it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import BaseModel

from modalkit.batch.formats.base import Batch, InputFile, InputFormat, Part, PlanOptions, Unreadable, batched, extent_of
from modalkit.batch.formats.cells import RowFitter
from modalkit.batch.formats.lines import byte_ranges, open_chunk, read_lines
from modalkit.batch.storage import Store
from modalkit.exceptions import StorageError, storage_errors
from modalkit.iomodel import ChunkSpec, CsvCut, CsvRows

__all__ = ["CsvFormat"]

HEADER_PROBE_BYTES = 1024 * 1024


class CsvFormat(InputFormat):
    """CSV with a header line. Payloads are dicts (column -> string), or :class:`Unreadable` for a bad row."""

    name = "csv"
    suffixes = (".csv",)

    def plan(self, file: InputFile, options: PlanOptions, store: Store) -> list[Part]:
        found = _read_header(store, file)
        if found is None:
            return []  # an empty file (or one of blank lines) holds no records, in every format
        header, header_bytes = found
        if file.compression or file.size <= options.chunk_size or not options.split_csv:
            return [Part(CsvRows(header=header, start=header_bytes), file.size)]
        ranges = byte_ranges(file.size, header_bytes, options.chunk_size)
        if len(ranges) == 1:
            start, end, size = ranges[0]
            return [Part(CsvRows(header=header, start=start, end=end), size)]
        step = ranges[1][0] - ranges[0][0]
        return [
            Part(CsvRows(header=header, start=start, end=end, cut=CsvCut(first_start=header_bytes, step=step, part=i)),
                 size)
            for i, (start, end, size) in enumerate(ranges)
        ]  # fmt: skip

    def read(self, chunk: ChunkSpec, batch_size: int, store: Store) -> Iterator[Batch]:
        yield from batched(_rows(store, chunk, extent_of(chunk, CsvRows)), batch_size)

    def fitter(self, chunk: ChunkSpec, model: type[BaseModel], id_field: str | None) -> RowFitter | None:
        """Cells are text: empty cells, JSON cells and the id are fitted to the model's fields (see
        :mod:`modalkit.batch.formats.cells`); None when no column needs it."""
        fitter = RowFitter(model, extent_of(chunk, CsvRows).header, id_field)
        return fitter if fitter.needed else None

    def prove_start(self, chunk: ChunkSpec, committed: Callable[[], set[int]], store: Store) -> None:
        extent = extent_of(chunk, CsvRows)
        cut = extent.cut
        if cut is None or cut.part == 0:
            return  # a whole file, or its first chunk: it starts right after the header
        done = committed()
        first_index = chunk.index - cut.part  # the file's chunks are numbered one after the other
        proven = 0  # the file's first chunks that committed: each checked its own lines
        while proven < cut.part and first_index + proven in done:
            proven += 1
        if proven == cut.part:
            return
        for pos, line in read_lines(store, chunk, cut.first_start + proven * cut.step, extent.start):
            if line.count(b'"') & 1:
                raise _unbalanced(chunk.key, pos, f"so chunk {chunk.index} cannot be proven to start at a record")


def _read_header(store: Store, f: InputFile) -> tuple[tuple[str, ...], int] | None:
    """The column names and the byte length of the header line (0 for compressed files, read from byte 0); None for
    a file with nothing but blank lines."""
    with storage_errors(f"reading the header of {f.uri}"), open_chunk(store, f.uri, f.compression) as fh:
        probe = fh.readline(HEADER_PROBE_BYTES)
        skipped = 0
        while probe and not probe.strip():  # blank lines before the header
            skipped += len(probe)
            probe = fh.readline(HEADER_PROBE_BYTES)
    if not probe:
        return None
    if probe.startswith(b"\xef\xbb\xbf") and not probe[3:].strip():
        return None
    try:
        names = next(csv.reader(io.StringIO(probe.decode("utf-8-sig"))))
    except (UnicodeDecodeError, csv.Error, StopIteration) as exc:
        raise StorageError(f"{f.key}: cannot read the CSV header: {exc}", retryable=False) from exc
    if len(set(names)) != len(names) or any(not n for n in names):
        raise StorageError(f"{f.key}: CSV header has empty or repeated column names: {names}", retryable=False)
    return tuple(names), 0 if f.compression else skipped + len(probe)


def _unbalanced(key: str, pos: int, consequence: str) -> StorageError:
    return StorageError(
        f"{key}: the CSV line at byte {pos} has an odd number of quote characters (a quoted field holding a line "
        f"break, or a stray quote), {consequence}; this file cannot be cut at line ends: set "
        "app_settings.job_config.split_csv to false (CSV files are then read whole)",
        retryable=False,
    )


def _checked(lines: Iterator[tuple[int, bytes]], key: str, end: int) -> Iterator[tuple[int, bytes]]:
    """The lines, failing on an owned line (one starting before ``end``) with an odd number of quotes."""
    for pos, line in lines:
        if pos < end and line.count(b'"') & 1:
            raise _unbalanced(key, pos, "against the promise of split_csv")
        yield pos, line


def _rows(store: Store, chunk: ChunkSpec, extent: CsvRows) -> Iterator[tuple[int, Any]]:
    header = extent.header
    lines = read_lines(store, chunk, extent.start, None)
    if extent.cut is not None:
        lines = _checked(lines, chunk.key, extent.end if extent.end is not None else 1 << 62)
    if extent.start == 0:  # the header line itself, and blank lines before it (compressed files are read whole)
        for _, line in lines:
            if line.strip():
                break
    source = _LineSource(lines)
    reader = csv.reader(source)
    end = extent.end
    while True:
        source.row_start = None
        source.bad_utf8 = None
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield source.row_start or 0, Unreadable("CSVError", str(exc), source.last_text)
            continue
        pos = source.row_start if source.row_start is not None else 0
        if source.bad_utf8 is not None:
            yield pos, Unreadable("UnicodeDecodeError", source.bad_utf8, source.last_text)
            continue
        if end is not None and pos >= end:
            return  # the next chunk's first record
        if end is not None and source.last_start >= end:
            raise StorageError(
                f"{chunk.key}: the CSV record at byte {pos} holds a quoted line break that runs across the chunk "
                f"boundary at byte {end}, so the file cannot be cut at line ends: set "
                "app_settings.job_config.split_csv to false (CSV files are then read whole)",
                retryable=False,
            )
        if not row or (len(row) == 1 and source.row_start == source.last_start and not row[0].strip()):
            continue  # a blank line, or one of only spaces: not a record, as in JSONL
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
        #: what was not UTF-8 in the current row (the row fails; its text is read with replacement characters)
        self.bad_utf8: str | None = None

    def __iter__(self) -> _LineSource:
        return self

    def __next__(self) -> str:
        pos, line = next(self._lines)
        if self.row_start is None:
            self.row_start = pos
        self.last_start = pos
        try:
            self.last_text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            if self.bad_utf8 is None:
                self.bad_utf8 = f"invalid UTF-8 at byte {pos + exc.start} ({exc.reason})"
            self.last_text = line.decode("utf-8", errors="replace")
        return self.last_text
