"""What the line-based formats (JSONL, CSV) share: cutting a file at byte offsets, and reading a byte range.

A chunk owns the lines that *start* inside its range ``[start, end)``: the reader skips the partial line it
starts in (the previous chunk's) and reads the line running over its end. Every line belongs to exactly one
chunk whatever the cut points, and planning reads no record bodies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import IO

from modalkit.batch.formats.codecs import codec_named
from modalkit.batch.storage import Store
from modalkit.exceptions import StorageError, storage_errors
from modalkit.iomodel import ChunkSpec

__all__ = ["byte_ranges", "open_chunk", "read_lines"]


def byte_ranges(file_size: int, start: int, chunk_size: int) -> list[tuple[int, int | None, int]]:
    """``[start, file_size)`` in equal parts of at most ``chunk_size`` bytes, so chunks take about the same time
    (no small remainder): ``(start, end, size)`` each, the last part's ``end`` None (to the end of the file)."""
    parts = max(1, -(-(file_size - start) // chunk_size))
    step = max(1, -(-(file_size - start) // parts))
    ranges: list[tuple[int, int | None, int]] = []
    while True:
        end = start + step
        ranges.append((start, None if end >= file_size else end, min(end, file_size) - start))
        if end >= file_size:
            return ranges
        start = end


@contextlib.contextmanager
def open_chunk(store: Store, uri: str, compression: str | None) -> Iterator[IO[bytes]]:
    """The file at ``uri`` for buffered reading, decompressed by its codec."""
    with store.open_input(uri) as raw:
        if compression is None:
            yield raw
            return
        with storage_errors(f"opening {uri}"), codec_named(compression).open(raw) as stream:
            yield stream


@contextlib.contextmanager
def _corrupt_is_final(chunk: ChunkSpec, corrupt: tuple[type[BaseException], ...]) -> Iterator[None]:
    try:
        yield
    except corrupt as exc:
        raise StorageError(
            f"{chunk.key}: the {chunk.compression} data is corrupt or truncated ({type(exc).__name__}: {exc}); "
            "replace the file: running the job again cannot fix it",
            retryable=False,
        ) from exc


def read_lines(store: Store, chunk: ChunkSpec, start: int, end: int | None) -> Iterator[tuple[int, bytes]]:
    """The lines of ``chunk``'s file that start in ``[start, end)``, with their offsets; ``end`` None reads on to
    the end of the file (a CSV reader stops itself: a record may continue past its range)."""
    what = f"reading {chunk.uri}"
    corrupt = codec_named(chunk.compression).corrupt_errors if chunk.compression else ()
    with storage_errors(what), _corrupt_is_final(chunk, corrupt), open_chunk(store, chunk.uri, chunk.compression) as fh:
        pos = start
        if pos > 0 and not chunk.compression:
            fh.seek(pos - 1)
            if fh.read(1) != b"\n":
                pos += len(fh.readline())
        readline = fh.readline
        while end is None or pos < end:
            try:
                line = readline()
            except Exception:
                with storage_errors(what):  # translated only here: a context manager per line is a cost per record
                    raise
                raise  # not a storage error: as it is
            if not line:
                return
            yield pos, line
            pos += len(line)
