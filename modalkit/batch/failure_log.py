"""A chunk's failure log: its failure rows (also the failure queue's records) and its failures by error type.

Each failed record becomes one :class:`~modalkit.iomodel.FailureRecord` body, built as bytes from the model's field
names; the same bytes are the failure file's row and the failure queue's message. The log also counts failures per
``error_type`` with the first one's stage and message, for the job's report (at most ``MAX_ERROR_TYPES`` types).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from modalkit.batch.queueing import RecordSender, dedup_id
from modalkit.inference_pipeline import RecordError
from modalkit.iomodel import FailureRecord, json_template

__all__ = ["FAILURE_BODY", "MAX_ERROR_TYPES", "MAX_EXAMPLE_CHARS", "MAX_INPUT_CHARS", "FailureLog"]

#: A raw line (a record that did not parse) keeps at most this many characters in its failure row.
MAX_INPUT_CHARS = 100_000
#: A chunk reports its failures by error_type (for the job's report) for at most this many types, each with the
#: first failure's stage and message cut to MAX_EXAMPLE_CHARS; the failure files hold every failure.
MAX_ERROR_TYPES = 20
MAX_EXAMPLE_CHARS = 300

FAILURE_BODY = json_template(FailureRecord, ("job_id", "record_id", "stage", "error_type", "error", "input", "meta"))


class FailureLog:
    """The failures of one chunk.

    Args:
        job_id: The job.
        key: The file's key (each record's ``meta.key``); a chunk of several files names each with :meth:`use`.
        where: Describes a position in the file (``a.jsonl at byte 120``); it starts each record's ``error``.
        sender: Where failure records are spooled for the failure queue, or None.
    """

    def __init__(self, job_id: str, key: str, where: Callable[[int], str], sender: RecordSender | None) -> None:
        self.job_id = job_id
        self.key = key
        self.where = where
        self.sender = sender
        self.failed = 0
        self.errors_by_type: dict[str, int] = {}
        self.error_examples: dict[str, str] = {}
        self._job_json = orjson.dumps(job_id)
        self._lines: list[bytes] = []

    def use(self, key: str, where: Callable[[int], str]) -> None:
        """Log the next failures as records of file ``key`` (a packed chunk reads several files)."""
        self.key = key
        self.where = where

    def add(self, ordinal: int, record_id: Any, pos: int, error: RecordError, data: Any) -> None:
        """Log one failed record: its row, its queue record, its count."""
        if isinstance(data, bytes):
            data = data.decode("utf-8", errors="replace").rstrip("\r\n")
        if isinstance(data, str) and len(data) > MAX_INPUT_CHARS:
            data = data[:MAX_INPUT_CHARS] + "..."
        error_text = f"{self.where(pos)}: {error.error}"
        dumps = orjson.dumps
        body = FAILURE_BODY % (
            self._job_json,
            dumps(record_id),
            dumps(error.stage),
            dumps(error.error_type),
            dumps(error_text),
            dumps(data, default=str),
            dumps({"key": self.key, "position": pos}),
        )
        self._lines.append(body + b"\n")
        self.failed += 1
        count = self.errors_by_type.get(error.error_type)
        if count is not None:
            self.errors_by_type[error.error_type] = count + 1
        elif len(self.errors_by_type) < MAX_ERROR_TYPES:
            self.errors_by_type[error.error_type] = 1
            self.error_examples[error.error_type] = f"{error.stage}: {error_text}"[:MAX_EXAMPLE_CHARS]
        if self.sender is not None:  # whole: a body too large for its queue is the queue backend's to place
            self.sender.add("failure", ordinal, dedup_id(self.job_id, self.key, pos), body)

    def take_lines(self) -> list[bytes]:
        """The failure rows logged since the last call (each ends with a newline)."""
        lines, self._lines = self._lines, []
        return lines
