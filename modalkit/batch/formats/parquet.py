"""Parquet (``.parquet``, ``.pq``): cut along row groups from the footer alone; a row group is never split."""

from __future__ import annotations

from collections.abc import Iterator

from modalkit.batch.formats.base import Batch, InputFile, InputFormat, Part, PlanOptions, extent_of
from modalkit.batch.storage import Store
from modalkit.exceptions import StorageError, storage_errors
from modalkit.iomodel import ChunkSpec, RowGroups

__all__ = ["ParquetFormat"]


class ParquetFormat(InputFormat):
    """Parquet. Payloads are dicts (column -> value); a record's position is its row index in the file."""

    name = "parquet"
    suffixes = (".parquet", ".pq")
    position = "row"
    compressible = False  # Parquet compresses its own pages and needs to seek

    def plan(self, file: InputFile, options: PlanOptions, store: Store) -> list[Part]:
        import pyarrow.parquet as pq

        if file.size == 0:
            return []  # an empty file holds no records, in every format
        with storage_errors(f"reading the Parquet footer of {file.uri}"), store.open_input(file.uri) as fh:
            try:
                meta = pq.ParquetFile(fh).metadata
            except Exception as exc:  # pyarrow raises ArrowInvalid and friends on a corrupt file
                raise StorageError(f"{file.key}: not a readable Parquet file: {exc}", retryable=False) from exc
        chunks: list[Part] = []
        groups: list[int] = []
        first_row = row = size = 0
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            if groups and size + group.total_byte_size > options.chunk_size:
                chunks.append(Part(RowGroups(groups=tuple(groups), first_row=first_row), size))
                groups, first_row, size = [], row, 0
            groups.append(i)
            size += group.total_byte_size
            row += group.num_rows
        if groups:
            chunks.append(Part(RowGroups(groups=tuple(groups), first_row=first_row), size))
        return chunks

    def read(self, chunk: ChunkSpec, batch_size: int, store: Store) -> Iterator[Batch]:
        import pyarrow.parquet as pq

        extent = extent_of(chunk, RowGroups)
        what = f"reading {chunk.uri}"
        with storage_errors(what), store.open_input(chunk.uri) as fh:
            try:
                batches = pq.ParquetFile(fh).iter_batches(
                    batch_size=batch_size, row_groups=list(extent.groups), use_threads=False
                )
                row = extent.first_row
                for batch in batches:
                    rows = batch.to_pylist()
                    yield list(range(row, row + len(rows))), rows
                    row += len(rows)
            except (OSError, StorageError):
                raise
            except Exception as exc:  # pyarrow's ArrowInvalid & co. on a damaged file
                raise StorageError(f"{chunk.key}: cannot read Parquet row groups: {exc}", retryable=False) from exc
