"""Ids that occur more than once in a job: each chunk's id hashes, merged when the job ends.

Only ids from the data can repeat (``id_field``; ``<key>:<position>`` ids cannot), and only a check over the whole
job finds a repeat across chunks or files. Each chunk hashes the id of every record that has a valid one (7 and
"7" are one id, as on a queue) to 64 bits (:func:`hash_ids`: stable across processes and machines, unlike
``hash()``) and writes the hashes with each record's position (and in a chunk packed from several files, the
record's file in the chunk's key table) as one bookkeeping object, ``_ids/NNNNN.npz`` (16 bytes a record, 20 in
a packed chunk; one PUT per chunk, written before the commit marker so every committed chunk has its hashes).
When the job ends, :func:`find_repeats` reads the objects of every chunk (committed before
or now: a resumed job still sees them all), in memory when they fit ``MEMORY_BUDGET`` and otherwise spilled to
local files by the hash's top bits and merged bucket by bucket, counts the hashes that occur more than once and
keeps the first ``MAX_EXAMPLES`` in job order with their occurrences; :func:`resolve_examples` then finds their id
values in the part and failure files of those few chunks.

Why a separate object and not the commit marker: markers are JSON and every one is read when a job resumes, so a
marker carrying megabytes of hashes would make each resume read them all twice; the bookkeeping object is read
once, at the end, and only when ``id_field`` is set. Two different ids share a 64-bit hash with probability about
``n**2 / 2**65`` (3e-4 at 100 million ids): such a pair would be counted, and is never shown as an example.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import heapq
import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from modalkit.batch.storage import Store, default_store
from modalkit.exceptions import StorageError

__all__ = ["MAX_EXAMPLES", "IdHashes", "Repeats", "find_repeats", "hash_ids", "resolve_examples"]

#: Repeated ids shown in the summary, each with at most MAX_OCCURRENCES of its places.
MAX_EXAMPLES = 5
MAX_OCCURRENCES = 5
#: Bytes of rows (hash, position, chunk, file: 24 bytes a record) merged in memory at once; more is spilled.
#: 32 MiB (about 1.4M records a bucket): at 256 MiB a 10M-record job held about 240 MB of rows in the flow's
#: process, and the spilled merge is as fast as the in-memory one (bench/RESULTS.md, "The repeated-id check").
MEMORY_BUDGET = 32 * 1024 * 1024
#: Bookkeeping objects read at once (S3 GETs are slow one by one, fast side by side).
READERS = 16

_ROW = np.dtype([("hash", "<u8"), ("pos", "<u8"), ("chunk", "<u4"), ("file", "<u4")])


def hash_ids(ids: Iterable[Any]) -> np.ndarray:
    """The 64-bit hash of each id, as little-endian uint64; 7 and "7" hash alike (on a queue they are one id).

    An integer id (or a string that spells one as ``str(int)`` would, within 64 bits) goes through splitmix64's
    finalizer, vectorized (a bijection: two such ids never collide); any other id is BLAKE2b-64 of its UTF-8 text.
    Both are the same in every process and on every machine.
    """
    ids = ids if isinstance(ids, list) else list(ids)
    if all(type(i) is int for i in ids):
        try:
            return _mix(np.array(ids, dtype=np.int64))
        except OverflowError:
            pass
    out = np.empty(len(ids), dtype="<u8")
    numbers: list[int] = []
    number_at: list[int] = []
    digests: list[bytes] = []
    digest_at: list[int] = []
    blake = hashlib.blake2b
    for n, value in enumerate(ids):
        number = _as_int64(value)
        if number is None:
            digests.append(blake(str(value).encode("utf-8", "surrogatepass"), digest_size=8).digest())
            digest_at.append(n)
        else:
            numbers.append(number)
            number_at.append(n)
    if numbers:
        out[number_at] = _mix(np.array(numbers, dtype=np.int64))
    if digests:
        out[digest_at] = np.frombuffer(b"".join(digests), dtype="<u8")
    return out


_INT64 = (-(2**63), 2**63)


def _as_int64(value: Any) -> int | None:
    """``value`` as an int when it is one, or a string spelling one as ``str(int)`` does, within 64 bits."""
    if type(value) is int:
        number = value
    elif type(value) is str and value.lstrip("-").isdigit() and value.isascii():
        number = int(value)
        if str(number) != value:
            return None
    else:
        return None
    return number if _INT64[0] <= number < _INT64[1] else None


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer over int64 values (uint64 arithmetic wraps, as the algorithm wants)."""
    z = values.view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))).astype("<u8", copy=False)


class IdHashes:
    """The id hashes of one chunk's records, with their positions and files; :meth:`write` stores them as one object.

    Args:
        key: The chunk's first file (a packed chunk adds the others with :meth:`file`).
    """

    #: ids kept before they are hashed together: a packed chunk adds a few ids per file, and hashing them file by
    #: file cost about 40 µs a file in NumPy calls
    PENDING = 8192

    def __init__(self, key: str) -> None:
        self.keys = [key]
        self._hashes: list[np.ndarray] = []
        self._positions: list[int] = []
        self._files: list[np.ndarray] = []
        self._pending: list[Any] = []  # ids not hashed yet
        self._pending_files: list[int] = []  # the file number of each

    def __len__(self) -> int:
        return len(self._positions)

    def file(self, key: str) -> int:
        """The number of file ``key`` in this chunk's key table (added when new)."""
        if key not in self.keys[-1:]:  # a chunk reads each file once, in order: the last key or a new one
            self.keys.append(key)
        return len(self.keys) - 1

    def add(self, ids: Sequence[Any], positions: Sequence[int], file: int = 0) -> None:
        """Hash ``ids`` (valid ids from the data, repeats included) found at ``positions`` of file number ``file``."""
        if ids:
            self._pending.extend(ids)
            self._pending_files.extend([file] * len(ids))
            self._positions.extend(positions)
            if len(self._pending) >= self.PENDING:
                self._hash_pending()

    def _hash_pending(self) -> None:
        if self._pending:
            self._hashes.append(hash_ids(self._pending))
            self._files.append(np.asarray(self._pending_files, dtype="<u4"))
            self._pending, self._pending_files = [], []

    def to_bytes(self) -> bytes:
        """The ``.npz`` object: ``hash`` and ``pos`` (uint64, in record order: the merge sorts them anyway), ``keys``
        (the chunk's files) and, when there are several, ``key_index`` (uint32: each record's file in ``keys``)."""
        self._hash_pending()
        hashes = np.concatenate(self._hashes) if self._hashes else np.empty(0, "<u8")
        positions = np.asarray(self._positions, dtype="<u8")
        arrays: dict[str, np.ndarray] = {"hash": hashes, "pos": positions, "keys": np.asarray(self.keys, dtype=str)}
        if len(self.keys) > 1:  # a chunk of one file writes what it wrote before chunks were packed
            arrays["key_index"] = np.concatenate(self._files) if self._files else np.empty(0, "<u4")
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    def write(self, uri: str, store: Store | None = None) -> None:
        """Store the hashes at ``uri`` (one object)."""
        (store or default_store()).write_bytes(uri, self.to_bytes())


@dataclass
class Repeat:
    """One id that occurs more than once: its hash, how often, and where (``(chunk, key, position)``, first ones)."""

    hash: int
    count: int
    places: list[tuple[int, str, int]]


@dataclass
class Repeats:
    """What :func:`find_repeats` found: how many ids occur more than once, and the first few in job order."""

    count: int = 0
    examples: list[Repeat] = field(default_factory=list)
    records: int = 0


def find_repeats(uris: Mapping[int, str], store: Store | None = None, records: int | None = None) -> Repeats:
    """The ids that occur more than once across the bookkeeping objects ``uris`` (chunk index -> URI).

    ``records`` (the job's record count, when known) sizes the merge: rows over ``MEMORY_BUDGET`` are spilled to
    local files in buckets by the hash's top bits, so memory stays bounded whatever the job's size. A chunk whose
    object is missing (committed before modalkit kept id hashes) is left out.
    """
    store = store or default_store()
    buckets = 1
    while records is not None and records * _ROW.itemsize > MEMORY_BUDGET * buckets:
        buckets *= 2
    with tempfile.TemporaryDirectory(prefix="modalkit-ids-") as spill, contextlib.ExitStack() as closing:
        files: list[str] = []
        parts: list[list[np.ndarray]] = [[] for _ in range(buckets)]
        paths = [os.path.join(spill, f"{b}.bin") for b in range(buckets)]
        spilled = [closing.enter_context(open(path, "wb")) for path in paths] if buckets > 1 else []
        total = 0
        for chunk, hashes, positions, keys, file in _read_all(uris, store):
            rows = np.empty(len(hashes), _ROW)
            rows["hash"], rows["pos"], rows["chunk"] = hashes, positions, chunk
            rows["file"] = len(files) if file is None else len(files) + file
            files.extend(keys)
            total += len(rows)
            if buckets == 1:
                parts[0].append(rows)
                continue
            shift = np.uint64(64 - (buckets.bit_length() - 1))
            which = (rows["hash"] >> shift).astype(np.int64)
            for b in np.unique(which):
                rows[which == b].tofile(spilled[b])
        for fh in spilled:
            fh.close()
        found = Repeats(records=total)
        best: list[tuple[tuple[int, int], Repeat]] = []
        for b in range(buckets):
            if buckets == 1:
                rows = np.concatenate(parts[0]) if parts[0] else np.empty(0, _ROW)
            else:
                rows = np.fromfile(paths[b], _ROW)
            found.count += _merge_bucket(rows, files, best)
        found.examples = [repeat for _, repeat in sorted(best, key=lambda item: item[0])]
    return found


_Read = tuple[int, np.ndarray, np.ndarray, list[str], np.ndarray | None]


def _read_all(uris: Mapping[int, str], store: Store) -> Iterator[_Read]:
    """Each chunk's hashes, positions, key table and each record's file in it (None: all of the first, as in
    objects of one file and those written before chunks were packed)."""

    def read(item: tuple[int, str]) -> _Read | None:
        chunk, uri = item
        try:
            data = store.read_bytes(uri)
        except StorageError:
            if store.exists(uri):
                raise
            return None
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            file = npz["key_index"] if "key_index" in npz.files else None
            return chunk, npz["hash"], npz["pos"], [str(k) for k in npz["keys"]], file

    items = sorted(uris.items())
    if not items:
        return
    with concurrent.futures.ThreadPoolExecutor(min(READERS, len(items))) as pool:
        for start in range(0, len(items), READERS * 4):  # a window at a time: at most this many objects held
            for result in pool.map(read, items[start : start + READERS * 4]):
                if result is not None:
                    yield result


def _merge_bucket(rows: np.ndarray, files: list[str], best: list[tuple[tuple[int, int], Repeat]]) -> int:
    """Count the hashes of ``rows`` that occur more than once; keep the first MAX_EXAMPLES of them (job order)
    in ``best``: at most MAX_EXAMPLES ``((file, position) of the first occurrence, repeat)``."""
    if len(rows) < 2:
        return 0
    ordered = np.sort(rows["hash"])  # the hashes alone: sorting them is most of the cost, so sort nothing else
    same = ordered[1:] == ordered[:-1]
    if not same.any():
        return 0
    repeated_hashes = ordered[1:][same]
    repeated_hashes = repeated_hashes[np.r_[True, repeated_hashes[1:] != repeated_hashes[:-1]]]
    at = np.minimum(np.searchsorted(repeated_hashes, rows["hash"]), len(repeated_hashes) - 1)
    rows = rows[repeated_hashes[at] == rows["hash"]]  # only the records whose id repeats
    rows = rows[np.lexsort((rows["pos"], rows["file"], rows["hash"]))]
    hashes = rows["hash"]
    starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
    counts = np.diff(np.r_[starts, len(rows)])
    repeated = starts[counts > 1]
    repeated_counts = counts[counts > 1]
    if not len(repeated):
        return 0
    first = rows[repeated]
    chosen = np.lexsort((first["pos"], first["file"]))[:MAX_EXAMPLES]
    for i in chosen:
        start, count = int(repeated[i]), int(repeated_counts[i])
        shown = rows[start : start + min(count, MAX_OCCURRENCES)]
        places = [(int(r["chunk"]), files[int(r["file"])], int(r["pos"])) for r in shown]
        order = (int(first["file"][i]), int(first["pos"][i]))
        best.append((order, Repeat(int(hashes[start]), count, places)))
    best[:] = heapq.nsmallest(MAX_EXAMPLES, best, key=lambda item: item[0])
    return len(repeated)


def resolve_examples(
    repeats: Sequence[Repeat], parts: Mapping[int, Sequence[str]], store: Store | None = None
) -> list[tuple[Any, Repeat]]:
    """Each repeat's id value, found in the output files of the chunk of its first occurrence (``parts``: chunk
    index -> its part file and failure file URIs): only those few chunks are read. A repeat whose id is not found
    (a hash shared by two different ids) is left out."""
    store = store or default_store()
    wanted: dict[int, dict[int, Repeat]] = {}
    for repeat in repeats:
        wanted.setdefault(repeat.places[0][0], {})[repeat.hash] = repeat
    found: dict[int, Any] = {}
    for chunk, by_hash in wanted.items():
        for uri in parts.get(chunk, ()):
            ids = _record_ids(uri, store)
            for record_id, hashed in zip(ids, hash_ids(ids), strict=True):
                if int(hashed) in by_hash:
                    found.setdefault(int(hashed), record_id)
    return [(found[r.hash], r) for r in repeats if r.hash in found]


def _record_ids(uri: str, store: Store) -> list[Any]:
    """The ``record_id`` of every row of a part file (JSONL or Parquet) or failure file; none when it is absent."""
    try:
        data = store.read_bytes(uri)
    except StorageError:
        if store.exists(uri):
            raise
        return []
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        return list(pq.read_table(io.BytesIO(data), columns=["record_id"]).column("record_id").to_pylist())
    return [orjson.loads(line)["record_id"] for line in data.splitlines() if line.strip()]
