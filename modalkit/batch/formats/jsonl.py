"""JSONL (``.jsonl``, ``.ndjson``, and ``.json`` as Spark and Ray read it): one JSON object per line; cut at line
ends, parsed by the chunk processor.

A ``.json`` file is often one JSON document instead (an array, or a pretty-printed object), which read line by
line would fail every line: planning reads its first line (one small read per ``.json`` file) and refuses such a
file, naming it and how to convert it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import orjson

from modalkit.batch.formats.base import Batch, InputFile, InputFormat, Part, PlanOptions, batched, extent_of
from modalkit.batch.formats.lines import byte_ranges, open_chunk, read_lines
from modalkit.batch.storage import Store
from modalkit.exceptions import ConfigError, storage_errors
from modalkit.iomodel import ByteRange, ChunkSpec

__all__ = ["BOM", "JsonlFormat"]

BOM = b"\xef\xbb\xbf"
#: How much of a ``.json`` file's first line planning reads to tell JSON Lines from one JSON document.
PROBE_BYTES = 1024 * 1024


#: A whole file up to this size is read in one call and split into lines (see ``_small_file_lines``).
SMALL_FILE_BYTES = 1024 * 1024
#: The extent of a file read whole (one frozen instance for every small file: 100,000 made anew cost 0.2 s).
WHOLE_FILE = ByteRange()


class JsonlFormat(InputFormat):
    """JSON Lines. Payloads are the raw lines (``bytes``); blank lines are skipped."""

    name = "jsonl"
    suffixes = (".jsonl", ".ndjson", ".json")

    def plan(self, file: InputFile, options: PlanOptions, store: Store) -> list[Part]:
        if file.key.lower().removesuffix(f".{file.compression}" if file.compression else "").endswith(".json"):
            _require_json_lines(store, file)
        if file.compression or file.size <= options.chunk_size:
            return [Part(WHOLE_FILE, file.size)]
        return [Part(ByteRange(start=s, end=e), n) for s, e, n in byte_ranges(file.size, 0, options.chunk_size)]

    def read(self, chunk: ChunkSpec, batch_size: int, store: Store) -> Iterator[Batch]:
        extent = extent_of(chunk, ByteRange)
        if extent.start == 0 and extent.end is None and not chunk.compression and chunk.size <= SMALL_FILE_BYTES:
            yield from batched(_small_file_lines(store, chunk), batch_size)
            return
        # "{" starts nearly every record, so the strip() that finds blank lines is seldom needed
        lines = (
            (pos, line)
            for pos, line in _without_bom(read_lines(store, chunk, extent.start, extent.end))
            if line[0] == 0x7B or line.strip()
        )
        yield from batched(lines, batch_size)


def _require_json_lines(store: Store, file: InputFile) -> None:
    """Refuse a ``.json`` file whose first line is not one whole JSON object: a JSON array or a pretty-printed
    document, not JSON Lines."""
    with storage_errors(f"reading the first line of {file.uri}"), open_chunk(store, file.uri, file.compression) as fh:
        first = fh.readline(PROBE_BYTES)
        while first and not first.strip():
            first = fh.readline(PROBE_BYTES)
    if len(first) == PROBE_BYTES and not first.endswith(b"\n"):
        return  # a first line too long to look at: its records fail one by one if they are not JSON
    first = first.removeprefix(BOM).strip()
    if first.startswith(b"["):
        shape = "a JSON array"
    elif first.startswith(b"{") and not _parses(first):
        shape = "one JSON document over several lines"
    else:
        return  # JSON Lines (or records that fail one by one, each saying why)
    raise ConfigError(
        f"{file.key} holds {shape}, not JSON Lines (one object per line, which modalkit reads from .json files as "
        "Spark and Ray do); convert it to a .jsonl file, e.g. with jq -c '.[]' for an array or jq -c . for an object"
    )


def _parses(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


def _small_file_lines(store: Store, chunk: ChunkSpec) -> list[tuple[int, bytes]]:
    """The lines of a small file read whole, as :func:`read_lines` and :func:`_without_bom` give them (each with
    its ``\\n``, a last line without one as it is, blank lines left out): one read and one split, where reading it
    line by line cost more per file than its few records (a packed chunk holds thousands of small files)."""
    with storage_errors(f"reading {chunk.uri}"), store.open_input(chunk.uri) as fh:
        data = fh.read()
    lines: list[tuple[int, bytes]] = []
    pos = 0
    parts = data.split(b"\n")
    last = len(parts) - 1
    for n, part in enumerate(parts):
        line = part if n == last else part + b"\n"
        if not line:
            break
        if line[0] == 0x7B or line.strip():
            lines.append((pos, line))
        pos += len(line)
    if lines and lines[0][0] == 0 and lines[0][1].startswith(BOM):
        first = lines[0][1][len(BOM) :]
        if first.strip():
            lines[0] = (0, first)
        else:
            del lines[0]
    return lines


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
