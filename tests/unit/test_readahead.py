"""Reading a packed chunk's small remote files ahead: side by side, bounded in number and bytes, in order, and
each one read through the store's own ``read_bytes`` (its retry layer)."""

from __future__ import annotations

import threading
import time

from fsspec.implementations.memory import MemoryFileSystem

from modalkit.batch.readahead import ReadAhead, read_ahead
from modalkit.batch.storage import Store
from modalkit.iomodel import ByteRange, ChunkPiece, ChunkSpec


class SlowStore(Store):
    """An in-memory object store whose every GET takes 20 ms, as an S3 GET does; it counts the GETs in flight."""

    def __init__(self) -> None:
        super().__init__({"memory": MemoryFileSystem()})
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0

    def read_bytes(self, uri: str) -> bytes:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        time.sleep(0.02)
        try:
            return super().read_bytes(uri)
        finally:
            with self.lock:
                self.in_flight -= 1


def packed(store: Store, files: int, size: int = 10) -> ChunkSpec:
    pieces = []
    for n in range(files):
        uri = f"memory://bucket/in/f{n:03d}.jsonl"
        store.write_bytes(uri, f'{{"n": {n}}}\n'.encode().ljust(size))
        pieces.append(ChunkPiece(uri=uri, key=f"f{n:03d}.jsonl", format="jsonl", extent=ByteRange(), size=size))
    first, *more = pieces
    whole = {**dict(first), "size": size * files}  # a chunk's size is all its pieces'
    return ChunkSpec(job_id="j", index=0, **whole, more=tuple(more))


def test_small_remote_files_are_read_side_by_side_at_most_depth_at_once_and_in_order() -> None:
    store = SlowStore()
    chunk = packed(store, 64)
    ahead = ReadAhead(store, chunk.pieces(), depth=8)
    started = time.perf_counter()
    try:
        for n, piece in enumerate(chunk.pieces()):
            with ahead.open_input(piece.uri) as fh:
                assert fh.read().startswith(f'{{"n": {n}}}'.encode())
    finally:
        ahead.close()
    assert 1 < store.most <= 8
    assert time.perf_counter() - started < 64 * 0.02 / 2  # one after the other would take 1.28 s


def test_files_over_the_byte_budget_are_fetched_one_at_a_time() -> None:
    store = SlowStore()
    chunk = packed(store, 6, size=1000)
    ahead = ReadAhead(store, chunk.pieces(), depth=8, budget=1500)
    try:
        for piece in chunk.pieces():
            with ahead.open_input(piece.uri) as fh:
                assert fh.read()
    finally:
        ahead.close()
    assert store.most == 1


def test_local_files_and_one_piece_chunks_are_not_read_ahead() -> None:
    store = SlowStore()
    assert read_ahead(store, packed(store, 1)) is None
    other = ChunkPiece(uri="/tmp/b.jsonl", key="b.jsonl", format="jsonl", extent=ByteRange())
    local = ChunkSpec(job_id="j", index=0, uri="/tmp/a.jsonl", key="a.jsonl", format="jsonl", extent=ByteRange(),
                      more=(other,))  # fmt: skip
    assert read_ahead(store, local) is None
    ahead = read_ahead(store, packed(store, 3))
    assert ahead is not None
    ahead.close()
