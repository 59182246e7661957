"""Part-file writers: JSONL rows or Parquet row groups, written to a local staging file, then moved whole.

A success row is ``record_id`` plus the output model's fields (the envelope fields ``status`` and ``error`` are
left out: every row of a part file is a success). Parquet columns come from the output model's field types;
fields of other types (nested models, dicts) are stored as JSON text. ``record_id`` is a string column in Parquet.
"""

from __future__ import annotations

import datetime as dt
import types
import typing
from typing import IO, Any, Literal

import orjson
from pydantic import BaseModel

__all__ = ["JsonlWriter", "ParquetWriter", "arrow_schema"]

ROW_GROUP_ROWS = 65_536


class JsonlWriter:
    """Appends ready-made JSON lines to a local file (buffered)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.rows = 0
        self._fh: IO[bytes] = open(path, "wb", buffering=1024 * 1024)  # noqa: SIM115 - closed in close()

    def write_lines(self, lines: list[bytes]) -> None:
        """Write lines that already end with a newline."""
        if lines:
            self._fh.write(b"".join(lines))
            self.rows += len(lines)

    def close(self) -> None:
        self._fh.close()


class ParquetWriter:
    """Writes rows as Parquet, buffering up to ROW_GROUP_ROWS rows per row group."""

    def __init__(self, path: str, output_model: type[BaseModel], exclude: set[str]) -> None:
        import pyarrow.parquet as pq

        self.path = path
        self.rows = 0
        self.schema = arrow_schema(output_model, exclude)
        self._json_columns = [
            f.name for f in self.schema if f.name != "record_id" and (f.metadata or {}).get(b"encoding") == b"json"
        ]
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self._buffer: list[dict[str, Any]] = []

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        """Buffer rows (dicts with ``record_id`` and the output fields); flushed by row group."""
        for row in rows:
            row["record_id"] = str(row["record_id"])
            for name in self._json_columns:
                if row.get(name) is not None:
                    row[name] = orjson.dumps(row[name], default=str).decode()
        self._buffer.extend(rows)
        self.rows += len(rows)
        if len(self._buffer) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema))
            self._buffer = []

    def close(self) -> None:
        try:
            self._flush()
        finally:
            self._writer.close()


def arrow_schema(model: type[BaseModel], exclude: set[str]) -> Any:
    """The Arrow schema of a part file for ``model``: ``record_id`` then the model's fields, in order."""
    import pyarrow as pa

    fields = [pa.field("record_id", pa.string(), nullable=False)]
    for name, info in model.model_fields.items():
        if name in exclude:
            continue
        arrow_type, is_json = _arrow_type(info.annotation)
        fields.append(pa.field(name, arrow_type, nullable=True, metadata={"encoding": "json"} if is_json else None))
    return pa.schema(fields)


def _arrow_type(annotation: Any) -> tuple[Any, bool]:
    import pyarrow as pa

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _arrow_type(args[0])
        return pa.string(), True
    if origin is Literal:
        values = typing.get_args(annotation)
        if all(isinstance(v, bool) for v in values):
            return pa.bool_(), False
        if all(isinstance(v, int) for v in values):
            return pa.int64(), False
        if all(isinstance(v, str) for v in values):
            return pa.string(), False
        return pa.string(), True
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        item_type, is_json = _arrow_type(item)
        return (pa.string(), True) if is_json else (pa.list_(item_type), False)
    simple = {
        bool: pa.bool_(),
        int: pa.int64(),
        float: pa.float64(),
        str: pa.string(),
        bytes: pa.binary(),
        dt.datetime: pa.timestamp("us", tz="UTC"),
        dt.date: pa.date32(),
    }
    if annotation in simple:
        return simple[annotation], False
    return pa.string(), True
