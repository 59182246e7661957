"""Output writers: a chunk's part file (JSONL or Parquet) and its failure file, written to a local staging file.

Each writer has one ``write`` method and ``close``; the chunk processor moves the closed file into place whole.
A success row is ``record_id`` plus the output model's fields, without the envelope (``status``, ``error``,
``meta``): every row of a part file is a success. Parquet columns come from the output model's field types
(computed fields included); fields of other types (nested models, dicts) are stored as JSON text, and an output
model that allows extra fields (``InferenceOutputModel`` does) keeps them as a JSON object in the column
``_extra`` (null when a row has none). ``record_id`` is an integer column when the ids are integers (the input
model's ``id_field`` is an ``int``, or every id of the first row group is one), else a string column.

Disk errors (a full disk, a read-only file system) become :class:`~modalkit.exceptions.StorageError` naming the
file, not retryable: another attempt on the same disk meets the same error.
"""

from __future__ import annotations

import datetime as dt
import types
import typing
from collections.abc import Sequence
from typing import IO, Any, Literal, NamedTuple, Protocol

import orjson
from pydantic import BaseModel

from modalkit.exceptions import storage_errors
from modalkit.iomodel import OUTPUT_ENVELOPE

__all__ = [
    "FailureWriter",
    "JsonlPartWriter",
    "ParquetPartWriter",
    "PartWriter",
    "Success",
    "arrow_schema",
    "open_part_writer",
    "record_id_type",
]

ROW_GROUP_ROWS = 65_536
BUFFER_BYTES = 1024 * 1024


class Success(NamedTuple):
    """One scored record: its id, its output model, and the output's JSON without the envelope fields."""

    record_id: Any
    output: BaseModel
    body: bytes


class PartWriter(Protocol):
    """Writes a chunk's successes in one output format."""

    def write(self, rows: Sequence[Success]) -> None:
        """Append ``rows``."""
        ...

    def close(self) -> None:
        """Finish the file (it is complete once this returns)."""
        ...


class _File:
    """A buffered local file whose OS errors name what it is."""

    def __init__(self, path: str, what: str) -> None:
        self.what = f"writing {what} ({path})"
        with storage_errors(self.what):
            self.fh: IO[bytes] = open(path, "wb", buffering=BUFFER_BYTES)  # noqa: SIM115 - closed in close()

    def write(self, data: bytes) -> None:
        with storage_errors(self.what):
            self.fh.write(data)

    def close(self) -> None:
        with storage_errors(self.what):
            self.fh.close()


class JsonlPartWriter:
    """Successes as JSON lines: ``{"record_id": ..., <output fields>}``."""

    def __init__(self, path: str, what: str = "a part file") -> None:
        self._file = _File(path, what)

    def write(self, rows: Sequence[Success]) -> None:
        if not rows:
            return
        dumps = orjson.dumps
        lines = []
        for r in rows:  # the body is the output's JSON object: record_id goes in as its first key
            rid = dumps(r.record_id)
            lines.append(
                b'{"record_id":%s,%s\n' % (rid, r.body[1:]) if len(r.body) > 2 else b'{"record_id":%s}\n' % rid
            )
        self._file.write(b"".join(lines))

    def close(self) -> None:
        self._file.close()


class ParquetPartWriter:
    """Successes as Parquet, buffering up to ROW_GROUP_ROWS rows per row group.

    ``id_type`` is the ``record_id`` column's type: ``int`` or ``str``, or None to take it from the ids themselves
    (an integer column when every id of the first row group is an int; ids of the form ``<key>:<position>`` and
    mixed ids make a string column).
    """

    def __init__(
        self, path: str, output_model: type[BaseModel], what: str = "a part file", id_type: type | None = str
    ) -> None:
        self.path = path
        self.what = f"writing {what} ({path})"
        self.output_model = output_model
        self._id: type | None = id_type
        self._dump = output_model.__pydantic_serializer__.to_python
        self._writer: Any = None
        self._buffer: list[dict[str, Any]] = []
        probe = arrow_schema(output_model, OUTPUT_ENVELOPE)
        self._extra = EXTRA_COLUMN in probe.names
        self._json_columns = [
            f.name for f in probe if f.name != "record_id" and (f.metadata or {}).get(b"encoding") == b"json"
        ]
        with storage_errors(self.what):
            open(path, "wb").close()  # fail now, naming the file, if it cannot be written

    def write(self, rows: Sequence[Success]) -> None:
        for r in rows:
            row = self._dump(r.output, exclude=OUTPUT_ENVELOPE)
            row["record_id"] = r.record_id
            if self._extra and r.output.model_extra:
                row[EXTRA_COLUMN] = {name: row.pop(name, None) for name in r.output.model_extra}
            for name in self._json_columns:
                if row.get(name) is not None:
                    row[name] = orjson.dumps(row[name], default=str).decode()
            self._buffer.append(row)
        if len(self._buffer) >= ROW_GROUP_ROWS:
            self._flush()

    def _open(self) -> Any:
        import pyarrow.parquet as pq

        if self._id is None:
            self._id = int if self._buffer and all(type(r["record_id"]) is int for r in self._buffer) else str
        self.schema = arrow_schema(self.output_model, OUTPUT_ENVELOPE, self._id)
        with storage_errors(self.what):
            self._writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")
        return self._writer

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._buffer:
            return
        writer = self._writer or self._open()
        convert = self._id
        for row in self._buffer:
            if type(row["record_id"]) is not convert:
                row["record_id"] = convert(row["record_id"])  # type: ignore[misc]
        with storage_errors(self.what):
            writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema))
        self._buffer = []

    def close(self) -> None:
        try:
            self._flush()
        finally:
            writer = self._writer or self._open()
            with storage_errors(self.what):
                writer.close()


class FailureWriter:
    """A chunk's failure rows: ready-made JSON lines."""

    def __init__(self, path: str, what: str = "a failure file") -> None:
        self._file = _File(path, what)

    def write(self, lines: Sequence[bytes]) -> None:
        """Append lines that already end with a newline."""
        if lines:
            self._file.write(b"".join(lines))

    def close(self) -> None:
        self._file.close()


def open_part_writer(
    output_format: str, path: str, output_model: type[BaseModel], what: str, id_type: type | None = str
) -> PartWriter:
    """The writer of ``output_format`` (``jsonl`` or ``parquet``) on a new local file; ``id_type`` (``int`` or
    ``str``) is the type of the ``record_id`` column where the format has typed columns."""
    if output_format == "parquet":
        return ParquetPartWriter(path, output_model, what, id_type)
    return JsonlPartWriter(path, what)


def record_id_type(input_model: type[BaseModel], id_field: str | None) -> type | None:
    """The type of a job's record ids where the input says it: ``str`` for ids of the form ``<key>:<position>``,
    ``int`` or ``str`` for an ``id_field`` the input model declares so, else None (the ids themselves tell)."""
    if not id_field:
        return str
    info = input_model.model_fields.get(id_field)
    annotation = _optional_inner(info.annotation) if info is not None else None
    return annotation if annotation in (int, str) else None


def _optional_inner(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


#: The column holding the extra fields of an output model that allows them (``extra="allow"``), as JSON.
EXTRA_COLUMN = "_extra"


def arrow_schema(model: type[BaseModel], exclude: typing.AbstractSet[str], id_type: type = str) -> Any:
    """The Arrow schema of a part file for ``model``: ``record_id``, the model's fields in order, its computed
    fields, and ``_extra`` when the model allows extra fields."""
    import pyarrow as pa

    fields = [pa.field("record_id", pa.int64() if id_type is int else pa.string(), nullable=False)]
    declared = [(name, info.annotation) for name, info in model.model_fields.items()]
    declared += [(name, info.return_type) for name, info in model.model_computed_fields.items()]
    for name, annotation in declared:
        if name in exclude:
            continue
        arrow_type, is_json = _arrow_type(annotation)
        fields.append(pa.field(name, arrow_type, nullable=True, metadata={"encoding": "json"} if is_json else None))
    if model.model_config.get("extra") == "allow":
        fields.append(pa.field(EXTRA_COLUMN, pa.string(), nullable=True, metadata={"encoding": "json"}))
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
