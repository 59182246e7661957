"""JSONL (``.jsonl``, ``.ndjson``): one JSON object per line; cut at line ends, parsed by the chunk processor."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from modalkit.batch.formats.base import Batch, InputFile, InputFormat, Part, PlanOptions, batched, extent_of
from modalkit.batch.formats.lines import byte_ranges, read_lines
from modalkit.batch.storage import Store
from modalkit.iomodel import ByteRange, ChunkSpec

__all__ = ["BOM", "JsonlFormat"]

BOM = b"\xef\xbb\xbf"


class JsonlFormat(InputFormat):
    """JSON Lines. Payloads are the raw lines (``bytes``); blank lines are skipped."""

    name = "jsonl"
    suffixes = (".jsonl", ".ndjson")

    def plan(self, file: InputFile, options: PlanOptions, store: Store) -> list[Part]:
        if file.compression or file.size <= options.chunk_size:
            return [Part(ByteRange(), file.size)]
        return [Part(ByteRange(start=s, end=e), n) for s, e, n in byte_ranges(file.size, 0, options.chunk_size)]

    def read(self, chunk: ChunkSpec, batch_size: int, store: Store) -> Iterator[Batch]:
        extent = extent_of(chunk, ByteRange)
        # "{" starts nearly every record, so the strip() that finds blank lines is seldom needed
        lines = (
            (pos, line)
            for pos, line in _without_bom(read_lines(store, chunk, extent.start, extent.end))
            if line[0] == 0x7B or line.strip()
        )
        yield from batched(lines, batch_size)


def _without_bom(lines: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
    """The lines, with a UTF-8 byte order mark at the start of the file dropped (as CSV readers accept one); only
    the first line is looked at, the rest pass through itertools.chain (no Python frame per line)."""
    first = next(lines, None)
    if first is None:
        return iter(())
    pos, line = first
    if pos == 0 and line.startswith(BOM):
        line = line[len(BOM) :] or b"\n"
    return itertools.chain(((pos, line),), lines)
