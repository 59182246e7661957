"""Reading a packed chunk's small remote files ahead: the next ones are fetched side by side while one is read.

A chunk packed from thousands of small S3 objects would otherwise pay one GET after another (20-50 ms each on S3:
minutes for 10,000 files). :class:`ReadAhead` is the chunk's store for its reads: it fetches the next small remote
pieces whole, in listing order, through the store's own ``read_bytes`` (so each GET has the one retry layer), at
most ``DEPTH`` at once and ``BUDGET`` bytes held, and serves a piece's ``open_input`` from its fetched bytes. Local
files, large pieces (ranges of large files, streamed as before) and chunks of one piece are read as they always
were.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
from collections import deque
from collections.abc import Iterator, Sequence
from typing import IO

from modalkit.batch.storage import Store, is_remote
from modalkit.iomodel import ChunkSpec

__all__ = ["BUDGET", "DEPTH", "SMALL", "ReadAhead", "read_ahead"]

#: Fetches in flight (or fetched and not yet read) at once: S3 serves GETs side by side, and 16 hide a 30 ms GET
#: behind reading and scoring the pieces before it.
DEPTH = 16
#: Bytes fetched ahead and not yet read, at most (one piece larger than this is still fetched, alone).
BUDGET = 64 * 1024 * 1024
#: Pieces up to this size are fetched whole ahead; larger ones are streamed when their turn comes.
SMALL = 8 * 1024 * 1024


class ReadAhead(Store):
    """``store`` for a chunk's reads, with ``pieces``' small remote files fetched ahead (see the module).

    Every call but :meth:`open_input` of a piece fetched ahead is the store's own. Call :meth:`close` when the
    chunk is read (or given up): fetches not yet read are cancelled.
    """

    def __init__(self, store: Store, pieces: Sequence[ChunkSpec], depth: int = DEPTH, budget: int = BUDGET) -> None:
        vars(self).update(vars(store))  # the same filesystems and options: any other call is the store's own
        self._store = store
        self._depth = depth
        self._budget = budget
        self._todo = deque((p.uri, p.size) for p in pieces if is_remote(p.uri) and p.size <= SMALL)
        self._fetched: dict[str, tuple[concurrent.futures.Future[bytes], int]] = {}
        self._held = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(depth, thread_name_prefix="modalkit-read-ahead")
        self._fill()

    def _fill(self) -> None:
        while self._todo and len(self._fetched) < self._depth:
            uri, size = self._todo[0]
            if self._fetched and self._held + size > self._budget:
                return
            self._todo.popleft()
            if uri not in self._fetched:  # a chunk holds each file once; a second mention is read as usual
                self._fetched[uri] = (self._pool.submit(self._store.read_bytes, uri), size)
                self._held += size

    @contextlib.contextmanager
    def open_input(self, uri: str) -> Iterator[IO[bytes]]:
        """``uri``'s content from its fetch ahead when it has one (waiting for it), else the store's own stream."""
        found = self._fetched.pop(uri, None)
        if found is None:
            with self._store.open_input(uri) as stream:
                yield stream
            return
        future, size = found
        try:
            data = future.result()  # a StorageError of the fetch (after the store's retries) is raised here
        finally:
            self._held -= size
            self._fill()
        yield io.BytesIO(data)

    def close(self) -> None:
        """Cancel the fetches not yet read, and stop the fetching threads."""
        self._todo.clear()
        self._fetched.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


def read_ahead(store: Store, chunk: ChunkSpec) -> ReadAhead | None:
    """A :class:`ReadAhead` for ``chunk`` when it holds several pieces of which at least two are small remote
    files; None when reading them one after the other costs nothing worth hiding (local files, one piece)."""
    pieces = chunk.pieces()
    if sum(1 for p in pieces if is_remote(p.uri) and p.size <= SMALL) < 2:
        return None
    return ReadAhead(store, pieces)
