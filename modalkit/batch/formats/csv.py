"""CSV (``.csv``): a header line naming the columns, then one record per row; rows become dicts of strings.

A quoted field may hold a line break, and whether a byte offset falls inside quotes cannot be known without
reading everything before it. So a CSV file is one chunk, unless ``job_config.split_csv`` says its quoted fields
hold no line breaks: then it is cut at line ends like JSONL, and a record found running across a cut fails the
job loudly instead of being scored broken.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

from modalkit.batch.formats.base import Batch, InputFile, InputFormat, PlanOptions, Unreadable, batched
from modalkit.batch.formats.lines import byte_ranges, open_chunk, read_lines
from modalkit.exceptions import StorageError, storage_errors

__all__ = ["CsvFormat"]

HEADER_PROBE_BYTES = 1024 * 1024


class CsvFormat(InputFormat):
    """CSV with a header line. Payloads are dicts (column -> string), or :class:`Unreadable` for a bad row."""

    name = "csv"
    suffixes = (".csv",)

    def plan(self, file: InputFile, options: PlanOptions) -> list[dict[str, Any]]:
        header, header_bytes = _read_header(file)
        if file.compression or file.size <= options.chunk_size or not options.split_csv:
            return [{"start": header_bytes, "end": None, "size": file.size, "header": header}]
        return [{**part, "header": header} for part in byte_ranges(file.size, header_bytes, options.chunk_size)]

    def read(self, chunk: Any, batch_size: int) -> Iterator[Batch]:
        yield from batched(_rows(chunk), batch_size)


def _read_header(f: InputFile) -> tuple[tuple[str, ...], int]:
    """The column names and the byte length of the header line (0 for compressed files, read from byte 0)."""
    with storage_errors(f"reading the header of {f.uri}"), open_chunk(f.uri, f.compression) as fh:
        probe = fh.readline(HEADER_PROBE_BYTES)
    if not probe.strip():
        raise StorageError(f"{f.key}: CSV file has no header line", retryable=False)
    try:
        names = next(csv.reader(io.StringIO(probe.decode("utf-8-sig"))))
    except (UnicodeDecodeError, csv.Error, StopIteration) as exc:
        raise StorageError(f"{f.key}: cannot read the CSV header: {exc}", retryable=False) from exc
    if len(set(names)) != len(names) or any(not n for n in names):
        raise StorageError(f"{f.key}: CSV header has empty or repeated column names: {names}", retryable=False)
    return tuple(names), 0 if f.compression else len(probe)


def _rows(chunk: Any) -> Iterator[tuple[int, Any]]:
    header = chunk.header
    if not header:
        raise StorageError(f"{chunk.key}: CSV chunk planned without a header", retryable=False)
    lines = read_lines(chunk, stop_at_end=False)
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
