"""Input formats as plug-ins: JSONL, CSV and Parquet, and the gzip codec.

Each format declares its suffixes, how a file is planned into chunks, each a typed extent
(:class:`~modalkit.iomodel.ByteRange`, :class:`~modalkit.iomodel.CsvRows`, :class:`~modalkit.iomodel.RowGroups`),
and how a chunk is read (:class:`~modalkit.batch.formats.base.InputFormat`); a codec
(:class:`~modalkit.batch.formats.base.Codec`) declares a compression suffix. A file's name picks both:
``reviews.jsonl.gz`` is JSONL compressed with gzip.

Example:
    >>> from modalkit.batch.formats import detect
    >>> detect("2026/12/01/reviews.JSONL.gz")
    ('jsonl', 'gzip')
    >>> detect("notes.txt") is None
    True
"""

from __future__ import annotations

from modalkit.batch.formats.base import Batch, Codec, InputFile, InputFormat, Part, PlanOptions, Unreadable
from modalkit.batch.formats.codecs import CODECS, codec_named
from modalkit.batch.formats.csv import CsvFormat
from modalkit.batch.formats.jsonl import JsonlFormat
from modalkit.batch.formats.parquet import ParquetFormat

__all__ = [
    "Batch",
    "Codec",
    "InputFile",
    "InputFormat",
    "Part",
    "PlanOptions",
    "Unreadable",
    "codec_named",
    "detect",
    "format_named",
    "supported_suffixes",
]

FORMATS: dict[str, InputFormat] = {fmt.name: fmt for fmt in (JsonlFormat(), CsvFormat(), ParquetFormat())}


def _suffix_table() -> dict[str, tuple[str, str | None]]:
    table: dict[str, tuple[str, str | None]] = {}
    for fmt in FORMATS.values():
        for suffix in fmt.suffixes:
            table[suffix] = (fmt.name, None)
            if fmt.compressible:
                for codec in CODECS.values():
                    table.update({suffix + extra: (fmt.name, codec.name) for extra in codec.suffixes})
    return table


_SUFFIXES = _suffix_table()
assert all(suffix.startswith(".") for suffix in _SUFFIXES)
#: the most dots a suffix holds (``.jsonl.gz``: 2)
_MAX_DOTS = max(suffix.count(".") for suffix in _SUFFIXES)


def detect(key: str) -> tuple[str, str | None] | None:
    """``(format, codec)`` that a file name declares (case-insensitive), or None when no format reads it: the
    longest suffix it ends with, found by looking up what follows each of its last dots (not by trying every
    suffix: planning detects every listed file)."""
    lower = key.lower()
    starts: list[int] = []
    pos = len(lower)
    for _ in range(_MAX_DOTS):
        pos = lower.rfind(".", 0, pos)
        if pos < 0:
            break
        starts.append(pos)
    for start in reversed(starts):  # the longest first
        found = _SUFFIXES.get(lower[start:])
        if found is not None:
            return found
    return None


def supported_suffixes() -> list[str]:
    """Every file suffix some format reads, sorted."""
    return sorted(_SUFFIXES)


def format_named(name: str) -> InputFormat:
    """The format called ``name`` (a ChunkSpec's ``format``)."""
    return FORMATS[name]
