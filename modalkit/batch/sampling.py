"""The first records of a job's input, read and parsed before the job starts: the id field is checked on them
before the output is claimed, and ``modalkit validate`` checks its sample with them.

Records are read by the chunk's own format (:mod:`modalkit.batch.formats`), as ``process_chunk`` reads them, and
only the first few of a chunk: one read of a file's head, paid once per job.

Example:
    >>> import os, tempfile
    >>> from modalkit.batch.planning import list_dataset, plan_chunks
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, "a.jsonl"), "w") as f:
    ...     _ = f.write('{"order_id": 1, "text": "x"}\\n')
    >>> chunks = plan_chunks(list_dataset(d), chunk_size=1 << 20)
    >>> [r.data for r in first_records(chunks[0], 5)]
    [{'order_id': 1, 'text': 'x'}]
    >>> try:
    ...     check_id_field(chunks, "oder_id")
    ... except MissingIdField as exc:
    ...     print(exc.suggestion)
    order_id
"""

from __future__ import annotations

import difflib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from modalkit.batch.formats import Unreadable, format_named
from modalkit.batch.record_ids import REPLAY_ID_KEY
from modalkit.batch.storage import Store, default_store
from modalkit.exceptions import ConfigError, ModalkitError
from modalkit.iomodel import ChunkSpec

__all__ = ["ID_CHECK_RECORDS", "MissingIdField", "SampledRecord", "check_id_field", "first_records", "sample_records"]

#: Records of the input's head the id field is looked for in (it is a typo when none of them has it).
ID_CHECK_RECORDS = 20
#: Files (pieces of the first chunks) looked at for a first record that parses (a head of blank or broken lines is
#: not a verdict).
ID_CHECK_CHUNKS = 3


@dataclass(frozen=True, slots=True)
class SampledRecord:
    """One record of the input as the job would read it: where it is, and its data or why it does not parse."""

    key: str
    position: int
    where: str  # "a.jsonl at byte 120", as failure records and errors say it
    data: Any = None
    error: str | None = None


class MissingIdField(ConfigError):
    """The job's id field is in none of the input's first records: a typo, found before anything is written.

    Attributes:
        id_field: The field asked for.
        key: The file of the first record.
        fields: The first record's fields.
        suggestion: The closest of them, or None.
    """

    def __init__(self, id_field: str, key: str, fields: list[str], suggestion: str | None) -> None:
        self.id_field, self.key, self.fields, self.suggestion = id_field, key, fields, suggestion
        super().__init__(self.describe("id_field"))

    def describe(self, name: str) -> str:
        """The message with the parameter named as the caller knows it (``--id-field`` on the command line)."""
        shown = ", ".join(self.fields[:12]) + (", ..." if len(self.fields) > 12 else "")
        hint = f"; did you mean {self.suggestion!r}?" if self.suggestion else "; name one of its fields"
        named = f"{name} {self.id_field!r}" if name else repr(self.id_field)
        return f"{named} is in none of the first records of {self.key} (the first has: {shown}){hint}"


def first_records(chunk: ChunkSpec, limit: int, store: Store | None = None) -> list[SampledRecord]:
    """The first ``limit`` records of ``chunk``'s first piece, parsed (a record that does not parse carries its
    error)."""
    fmt = format_named(chunk.format)
    out: list[SampledRecord] = []
    reader = fmt.read(chunk, max(1, min(limit, 1000)), store or default_store())
    try:
        for positions, payloads in reader:
            for pos, payload in zip(positions, payloads, strict=True):
                out.append(_parsed(chunk.key, f"{chunk.key} at {fmt.position} {pos}", pos, payload))
                if len(out) >= limit:
                    return out
    finally:
        close = getattr(reader, "close", None)  # a generator: its file is closed now, not when it is collected
        if close is not None:
            close()
    return out


def sample_records(
    chunks: Sequence[ChunkSpec], limit: int, store: Store | None = None, max_files: int = 10
) -> list[SampledRecord]:
    """About ``limit`` records: the first records of the first chunk of each of the first ``max_files`` files,
    shared evenly (one read per file sampled)."""
    firsts: dict[str, ChunkSpec] = {}
    for piece in (piece for chunk in chunks for piece in chunk.pieces()):
        firsts.setdefault(piece.key, piece)
        if len(firsts) == max_files:
            break
    if not firsts or limit < 1:
        return []
    each = -(-limit // len(firsts))
    records: list[SampledRecord] = []
    for chunk in firsts.values():
        records.extend(first_records(chunk, min(each, limit - len(records)), store))
        if len(records) >= limit:
            break
    return records


def check_id_field(chunks: Sequence[ChunkSpec], id_field: str | None, store: Store | None = None) -> None:
    """Raise :class:`MissingIdField` when ``id_field`` is in none of the input's first records (they parse, and
    none holds it): a typo would otherwise fail every record of the job. One read of the input's head.

    A field some records lack is no typo: those records fail on their own (``InvalidRecordId``). An input whose
    head cannot be read gets no verdict here: the chunk that reads it reports why, as before.
    """
    if id_field is None:
        return
    parsed: list[SampledRecord] = []
    heads = list(itertools.islice((piece for chunk in chunks for piece in chunk.iter_pieces()), ID_CHECK_CHUNKS))
    for head in heads:
        try:
            parsed = [r for r in first_records(head, ID_CHECK_RECORDS, store) if isinstance(r.data, dict)]
        except ModalkitError:  # no verdict: the chunk that reads it reports the error, as a job always has
            return
        if parsed:
            break
    if not parsed or any(id_field in r.data or REPLAY_ID_KEY in r.data for r in parsed):
        return
    first = parsed[0]
    fields = [str(name) for name in first.data]
    close = difflib.get_close_matches(id_field, fields, n=1, cutoff=0.6) or [
        name for name in fields if name.lower() == id_field.lower()
    ]
    raise MissingIdField(id_field, first.key, fields, close[0] if close else None)


def _parsed(key: str, where: str, pos: int, payload: Any) -> SampledRecord:
    if isinstance(payload, bytes):
        try:
            return SampledRecord(key, pos, where, orjson.loads(payload))
        except orjson.JSONDecodeError:
            return SampledRecord(key, pos, where, error=_json_error(payload))
    if isinstance(payload, Unreadable):
        return SampledRecord(key, pos, where, error=f"{payload.error_type}: {payload.error}")
    return SampledRecord(key, pos, where, payload)


def _json_error(line: bytes) -> str:
    try:
        json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as bad:
        return f"invalid UTF-8 ({bad.reason})"
    except json.JSONDecodeError as plain:
        return f"invalid JSON: {plain.msg} (column {plain.colno})"
    return "invalid JSON"
