"""The record id policy of a chunk: which id each record gets, and which records fail for their id.

A record's id is the value of the job's ``id_field`` (a string or an integer, as the input has it), else
``<file key>:<position>``; a replayed failure keeps its original id (:data:`REPLAY_ID_KEY`). Ids from the data are
unique within a chunk: a record whose id an earlier record of the chunk has fails (``DuplicateRecordId``), and 7
and "7" count as one id (on a queue they are one). Ids from the data are also hashed for the job-wide check of
repeated ids (:mod:`~modalkit.batch.repeats`), repeats included. Work is done per sub-batch, one call for many
records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from modalkit.batch.repeats import IdHashes
from modalkit.inference_pipeline import RecordError

__all__ = ["REPLAY_ID_KEY", "IdPolicy", "Parsed", "Rejected"]

#: A record holding this key takes its value as its record id (replayed failures keep their original ids).
REPLAY_ID_KEY = "__modalkit_record_id__"


#: A record that parsed: ``(ordinal in the chunk, position in the file, data)``; a plain tuple, made per record.
Parsed = tuple[int, int, Any]


class Rejected(NamedTuple):
    """A record that failed before the pipeline saw it."""

    ordinal: int
    record_id: Any
    pos: int
    error: RecordError
    data: Any


class IdPolicy:
    """Gives the records of one file of a chunk their ids (a packed chunk has one policy per file: an id two of its
    files share is a repeat across files, counted job-wide, as when the files are in two chunks).

    Args:
        job_id: The job.
        key: The file's key: the prefix of ids from positions.
        id_field: The field that holds the id, or None for ids from positions.
        where: Describes a position in the file (``a.jsonl at byte 120``) for error messages.
        hashes: Where the ids from the data are hashed: a packed chunk's files share one :class:`IdHashes`, each
            policy adding its own file to it; by default a new one for this file.
    """

    def __init__(
        self,
        job_id: str,
        key: str,
        id_field: str | None,
        where: Callable[[int], str],
        hashes: IdHashes | None = None,
    ) -> None:
        self.job_id = job_id
        self.key = key
        self.id_field = id_field
        self.where = where
        #: the ids seen in this chunk and where they were, when ids come from the data; ids keep their type here
        #: (no str() per int id), and _first_across_types catches 7 and "7"
        self._seen: dict[Any, int] | None = {} if id_field is not None else None
        self._id_type: type | None = None  # the one type of the chunk's ids so far; None once there are two
        #: the hashes of the ids from the data (with an id_field), for the job-wide check of repeated ids
        self.hashes: IdHashes | None = None
        self._file = 0
        if id_field is not None:
            self.hashes = hashes if hashes is not None else IdHashes(key)
            self._file = self.hashes.file(key)

    def position_id(self, pos: int) -> str:
        """The id of the record at ``pos`` when it has no other (``<key>:<pos>``)."""
        return f"{self.key}:{pos}"

    def assign(self, records: list[Parsed]) -> tuple[list[Any], list[Parsed], list[Rejected]]:
        """The ids of ``records`` that have a valid, unique one, those records, and the records rejected."""
        id_field = self.id_field
        seen = self._seen
        ids: list[Any] = []
        kept: list[Parsed] = []
        rejected: list[Rejected] = []
        hashed: list[Any] = []
        hashed_positions: list[int] = []
        for record in records:
            ordinal, pos, data = record
            if type(data) is dict and id_field is not None and REPLAY_ID_KEY not in data:
                record_id = data.get(id_field)  # the common case inline; _record_id says why any other is bad
                if type(record_id) is not str and type(record_id) is not int:
                    record_id = self._record_id(data, pos)
            else:
                record_id = self._record_id(data, pos)
            if type(record_id) is _BadId:
                error = RecordError("validate", "InvalidRecordId", record_id.reason)
                rejected.append(Rejected(ordinal, self.position_id(pos), pos, error, data))
                continue
            if seen is not None:  # ids from the data must be unique; 7 and "7" are one id on a queue
                hashed.append(record_id)
                hashed_positions.append(pos)
                first = seen.setdefault(record_id, pos)
                if first == pos and type(record_id) is not self._id_type:
                    first = self._first_across_types(record_id, pos)
                if first != pos:
                    rejected.append(self._duplicate(record, record_id, first))
                    continue
            ids.append(record_id)
            kept.append(record)
        if self.hashes is not None:
            self.hashes.add(hashed, hashed_positions, self._file)
        return ids, kept, rejected

    def _record_id(self, data: Any, pos: int) -> Any:
        if type(data) is not dict:
            return _BadId(f"the record is a JSON {type(data).__name__}, not an object")
        if REPLAY_ID_KEY in data:
            return data.pop(REPLAY_ID_KEY)
        id_field = self.id_field
        if id_field is None:
            return self.position_id(pos)
        value = data.get(id_field)
        if type(value) is str or type(value) is int:
            return value
        if value is None:
            return _BadId(f"the record has no '{id_field}' field (the job's id_field)")
        return _BadId(f"'{id_field}' is a {type(value).__name__}; record ids must be str or int")

    def _first_across_types(self, record_id: Any, pos: int) -> int:
        """Where an id was first seen as the other JSON type (7 for "7", "7" for 7), else ``pos``. Runs for the
        chunk's first id, and for every id once the chunk has held both types (while it holds one, never)."""
        assert self._seen is not None
        if len(self._seen) == 1:
            self._id_type = type(record_id)  # the first id
            return pos
        self._id_type = None
        if type(record_id) is int:
            return self._seen.get(str(record_id), pos)
        text = str(record_id)
        if text.lstrip("-").isdigit() and str(int(text)) == text:
            return self._seen.get(int(text), pos)
        return pos

    def _duplicate(self, record: Parsed, record_id: Any, first: int) -> Rejected:
        """A record whose id an earlier record of the chunk has: it fails, so no id is in the output twice."""
        reason = f"record id {record_id!r} is already the id of the record at {self.where(first)}"
        error = RecordError("validate", "DuplicateRecordId", reason)
        ordinal, pos, data = record
        return Rejected(ordinal, record_id, pos, error, data)


class _BadId:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason
