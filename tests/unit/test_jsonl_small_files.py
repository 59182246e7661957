"""A small JSONL file read whole (one read, one split) gives exactly the lines reading it line by line gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from modalkit.batch.formats.jsonl import BOM, SMALL_FILE_BYTES, WHOLE_FILE, JsonlFormat
from modalkit.batch.storage import default_store
from modalkit.iomodel import ChunkSpec

CONTENTS = {
    "plain": b'{"a": 1}\n{"a": 2}\n',
    "no final newline": b'{"a": 1}\n{"a": 2}',
    "blank lines": b'\n{"a": 1}\n   \n\n{"a": 2}\n\n',
    "crlf": b'{"a": 1}\r\n{"a": 2}\r\n',
    "bom": BOM + b'{"a": 1}\n{"a": 2}\n',
    "bom then blank": BOM + b"\n" + b'{"a": 1}\n',
    "bom only": BOM,
    "empty": b"",
    "not json": b"[1, 2]\nnot json\n{\n",
    "unicode": '{"t": "é\u2028"}\n'.encode(),
}


def _read(path: Path, size: int) -> list[tuple[list[int], list[bytes]]]:
    chunk = ChunkSpec(job_id="j", index=0, uri=str(path), key=path.name, format="jsonl", extent=WHOLE_FILE, size=size)
    return [(list(p), list(b)) for p, b in JsonlFormat().read(chunk, 2, default_store())]


@pytest.mark.parametrize("name", sorted(CONTENTS))
def test_a_small_file_read_whole_gives_what_reading_it_line_by_line_gives(tmp_path: Path, name: str) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(CONTENTS[name])
    whole = _read(path, len(CONTENTS[name]))
    by_line = _read(path, SMALL_FILE_BYTES + 1)  # said to be larger: read line by line
    assert whole == by_line
