"""Listing an input dataset and cutting it into chunks, without reading record bodies.

* JSONL files are cut into equal byte ranges of at most ``chunk_size``; a chunk owns the lines that *start*
  inside its range, so every line belongs to exactly one chunk whatever the cut points (the reader aligns to line
  ends). CSV files are cut the same way only with ``split_csv`` (a quoted field may hold a line break); otherwise
  each is one chunk. A CSV file's header line is read once here, to name the columns.
* Parquet files are cut along row groups (a row group is never split), from the footer metadata alone.
* Compressed files (``.gz``) cannot be cut and make one chunk each.

The job id hashes the listing (keys, sizes, ETags/mtimes), the model and the parameters that shape the results,
so the same job run twice gets the same id, and its committed chunks are skipped.

Example:
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, "a.jsonl"), "w") as f:
    ...     _ = f.write('{"text": "x"}\\n' * 1000)
    >>> [(c.start, c.end) for c in plan_chunks(list_dataset(d), chunk_size=6000)]
    [(0, 4667), (4667, 9334), (9334, None)]
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from modalkit.batch import storage
from modalkit.batch.storage import StoredFile
from modalkit.exceptions import ConfigError, StorageError, storage_errors
from modalkit.iomodel import ChunkSpec

__all__ = ["InputFile", "job_id_for", "list_dataset", "plan_chunks"]

Format = Literal["jsonl", "csv", "parquet"]
_SUFFIXES: dict[str, tuple[Format, str | None]] = {
    ".jsonl": ("jsonl", None),
    ".ndjson": ("jsonl", None),
    ".jsonl.gz": ("jsonl", "gzip"),
    ".ndjson.gz": ("jsonl", "gzip"),
    ".csv": ("csv", None),
    ".csv.gz": ("csv", "gzip"),
    ".parquet": ("parquet", None),
    ".pq": ("parquet", None),
}
HEADER_PROBE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class InputFile(StoredFile):
    """An input file with its detected format and compression."""

    format: Format = "jsonl"
    compression: str | None = None


def _detect(key: str) -> tuple[Format, str | None] | None:
    lower = key.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return _SUFFIXES[suffix]
    return None


def list_dataset(input_uri: str) -> list[InputFile]:
    """The input files under ``input_uri``, sorted, with their formats.

    Raises:
        StorageError: the URI does not exist or holds no files.
        ConfigError: a file has an extension modalkit cannot read (named in the message).
    """
    files = storage.list_files(input_uri)
    if not files:
        raise StorageError(f"input {input_uri} holds no files", retryable=False)
    out, unknown = [], []
    for stored in files:
        detected = _detect(stored.key)
        if detected is None:
            unknown.append(stored.key)
        else:
            out.append(InputFile(stored.uri, stored.key, stored.size, stored.etag, *detected))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ConfigError(
            f"input {input_uri} has files modalkit cannot read: {shown}; supported: {', '.join(sorted(_SUFFIXES))}"
        )
    return out


def plan_chunks(
    files: Sequence[InputFile], chunk_size: int, job_id: str = "", split_csv: bool = False
) -> list[ChunkSpec]:
    """Cut ``files`` into chunks of about ``chunk_size`` bytes, numbered in listing order.

    CSV files are cut only with ``split_csv``: a quoted field may hold a line break, and whether a cut point falls
    inside quotes cannot be known without reading everything before it (a chunk that finds a record running across
    its end fails, rather than corrupt the next chunk).
    """
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be positive, got {chunk_size}")
    chunks: list[ChunkSpec] = []
    for f in files:
        base = {"job_id": job_id, "uri": f.uri, "key": f.key, "format": f.format, "file_size": f.size}
        if f.format == "parquet":
            for groups, first_row, size in _parquet_groups(f, chunk_size):
                chunks.append(ChunkSpec(index=len(chunks), row_groups=groups, first_row=first_row, size=size, **base))
            continue
        header = _csv_header(f) if f.format == "csv" else None
        start = header[1] if header else 0
        if f.compression or f.size <= chunk_size or (f.format == "csv" and not split_csv):
            chunks.append(
                ChunkSpec(
                    index=len(chunks), compression=f.compression, start=start, end=None,
                    size=f.size, header=header[0] if header else None, **base,
                )
            )  # fmt: skip
            continue
        # equal parts of at most chunk_size bytes, so chunks take about the same time (no small remainder)
        parts = max(1, -(-(f.size - start) // chunk_size))  # 1 for a CSV file that is only its header
        step = -(-(f.size - start) // parts)
        while start < f.size:
            end = start + step
            chunks.append(
                ChunkSpec(
                    index=len(chunks), start=start, end=None if end >= f.size else end,
                    size=min(end, f.size) - start, header=header[0] if header else None, **base,
                )
            )  # fmt: skip
            start = end
    return chunks


def _csv_header(f: InputFile) -> tuple[tuple[str, ...], int]:
    """The CSV column names and the byte length of the header line (0 for compressed files)."""
    with storage_errors(f"reading the header of {f.uri}"), storage.open_input(f.uri, f.compression) as fh:
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


def _parquet_groups(f: InputFile, chunk_size: int) -> list[tuple[tuple[int, ...], int, int]]:
    import pyarrow.parquet as pq

    with storage_errors(f"reading the Parquet footer of {f.uri}"), storage.open_input(f.uri) as fh:
        try:
            meta = pq.ParquetFile(fh).metadata
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends on a corrupt file
            raise StorageError(f"{f.key}: not a readable Parquet file: {exc}", retryable=False) from exc
    chunks: list[tuple[tuple[int, ...], int, int]] = []
    groups: list[int] = []
    first_row = row = size = 0
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        if groups and size + rg.total_byte_size > chunk_size:
            chunks.append((tuple(groups), first_row, size))
            groups, first_row, size = [], row, 0
        groups.append(i)
        size += rg.total_byte_size
        row += rg.num_rows
    if groups:
        chunks.append((tuple(groups), first_row, size))
    return chunks


def job_id_for(files: Sequence[StoredFile], model_name: str, params: dict[str, Any]) -> str:
    """A stable id for a job: the same listing, model and parameters give the same id."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"model": model_name, "params": params}, sort_keys=True, default=str).encode())
    for f in files:
        digest.update(f"\n{f.key}\t{f.size}\t{f.etag}".encode())
    return digest.hexdigest()[:16]
