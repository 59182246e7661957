"""Batch planning and reading: every record of a dataset is read exactly once, in order, at its true position,
whatever the chunk size; listing rules; the job id.

The JSONL/CSV properties are checked against a direct scan of the file over many random files and chunk sizes
(a deterministic ``random.Random(seed)`` per case, so a failure names the seed that reproduces it).
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modalkit.batch.formats import Batch, InputFile, Part, Unreadable, format_named
from modalkit.batch.planning import job_id_for, list_dataset, pack_parts, plan_chunks
from modalkit.batch.storage import default_store
from modalkit.exceptions import ConfigError, StorageError
from modalkit.iomodel import ByteRange, ChunkSpec

SEEDS = range(150)
WORDS = ["ok", "a", "naïve", "日本語", "emoji 🎉", "x" * 40, "comma, inside", 'say "hi"', "tab\there", "ünïcödé"]


def iter_batches(chunk: ChunkSpec, batch_size: int) -> Iterator[Batch]:
    """The chunk's sub-batches, read by its format's plug-in."""
    return format_named(chunk.format).read(chunk, batch_size, default_store())


def read_all(chunks: list[ChunkSpec], batch_size: int) -> list[tuple[int, Any]]:
    """(position, payload) of every record of every chunk, in chunk order."""
    out: list[tuple[int, Any]] = []
    for piece in (piece for chunk in chunks for piece in chunk.pieces()):
        for positions, payloads in iter_batches(piece, batch_size):
            assert len(positions) == len(payloads)
            assert 0 < len(positions) <= batch_size
            out.extend(zip(positions, payloads, strict=True))
    return out


def scan_lines(data: bytes, skip_first: bool = False) -> list[tuple[int, bytes]]:
    """Reference: every line with the byte offset where it starts (the last may lack its newline)."""
    out, pos = [], 0
    for line in data.splitlines(keepends=True):
        # splitlines also splits on \r, \x0b...; the files here only break lines with \n or \r\n
        out.append((pos, line))
        pos += len(line)
    assert pos == len(data)
    return out[1:] if skip_first else out


def assert_byte_ranges_tile_the_file(chunks: list[ChunkSpec], first_start: int, size: int) -> None:
    assert chunks[0].extent.start == first_start
    assert chunks[-1].extent.end is None
    for before, after in itertools.pairwise(chunks):
        assert before.extent.end == after.extent.start
        assert before.extent.start < before.extent.end  # type: ignore[operator]
    assert all(c.extent.end is None or c.extent.end < size for c in chunks)


# --- JSONL ----------------------------------------------------------------------------------------------------


def random_jsonl(rng: random.Random) -> bytes:
    lines = []
    for i in range(rng.randint(0, 40)):
        kind = rng.random()
        if kind < 0.1:
            body = b""  # an empty line
        elif kind < 0.15:
            body = b"   \t"  # a blank one
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 5, 30])))
            body = json.dumps({"i": i, "text": text}, ensure_ascii=rng.random() < 0.3).encode()
        lines.append(body + rng.choice([b"\n", b"\n", b"\r\n"]))
    data = b"".join(lines)
    if data and rng.random() < 0.3:
        data = data.rstrip(b"\r\n")  # a file not ending in a newline
    return data


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_every_jsonl_line_is_read_once_in_order_at_its_byte_offset(tmp_path: Path, compress: bool) -> None:
    for seed in SEEDS:
        rng = random.Random(seed)
        data = random_jsonl(rng)
        path = tmp_path / f"{seed}.jsonl{'.gz' if compress else ''}"
        path.write_bytes(gzip.compress(data) if compress else data)
        files = list_dataset(str(path))
        chunk_size = rng.choice([1, 2, 3, 7, 16, 50, 120, 400, 5000])
        chunks = plan_chunks(files, chunk_size=chunk_size, job_id="j")

        expected = [(pos, line) for pos, line in scan_lines(data) if line.strip()]
        got = read_all(chunks, batch_size=rng.randint(1, 6))
        assert got == expected, f"seed {seed}, chunk_size {chunk_size}"
        for pos, line in got:
            assert data[pos : pos + len(line)] == line  # the offset is the line's true place in the file
        if compress:
            assert len(chunks) == 1, "a gzip file cannot be cut"
            assert chunks[0].compression == "gzip"
        elif data:
            assert_byte_ranges_tile_the_file(chunks, 0, len(data))
            if len(data) > chunk_size:
                assert len(chunks) == -(-len(data) // chunk_size)
                assert all((c.extent.end or len(data)) - c.extent.start <= chunk_size for c in chunks)


def test_a_line_longer_than_a_chunk_is_read_once_by_the_chunk_where_it_starts(tmp_path: Path) -> None:
    long_line = json.dumps({"text": "y" * 500}).encode() + b"\n"
    data = b'{"text": "a"}\n' + long_line + b'{"text": "b"}\n'
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(data)
    chunks = plan_chunks(list_dataset(str(tmp_path / "in")), chunk_size=20)
    per_chunk = [[pos for positions, _ in iter_batches(c, 100) for pos in positions] for c in chunks]
    last = 14 + len(long_line)
    owner = next(i for i, c in enumerate(chunks) if c.extent.start <= last < (c.extent.end or len(data)))
    assert owner > 1
    assert per_chunk[0] == [0, 14]  # the long line starts in chunk 0 and is read there, past the chunk's end
    assert per_chunk[owner] == [last]
    assert all(p == [] for i, p in enumerate(per_chunk) if i not in (0, owner))  # inside the long line: nothing


# --- CSV ------------------------------------------------------------------------------------------------------


def random_csv(rng: random.Random) -> tuple[bytes, list[tuple[int, dict[str, str]]]]:
    """A CSV file (header id,text,n; quoted fields with commas and quotes; blank lines) and its expected rows."""
    newline = rng.choice(["\n", "\r\n"])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=newline, quoting=rng.choice([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
    writer.writerow(["id", "text", "n"])
    header_len = len(buf.getvalue().encode())
    rows: list[tuple[int, dict[str, str]]] = []
    for i in range(rng.randint(0, 30)):
        if rng.random() < 0.1:
            buf.write(newline)  # a blank line
            continue
        pos = len(buf.getvalue().encode())
        row = {"id": f"r{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 8))), "n": str(i)}
        writer.writerow(row.values())
        rows.append((pos, row))
    data = buf.getvalue().encode()
    assert data[:header_len].endswith(b"\n")
    if rows and rng.random() < 0.3:
        data = data.rstrip(b"\r\n")
    return data, rows


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_every_csv_row_is_read_once_in_order_without_the_header(tmp_path: Path, compress: bool) -> None:
    for seed in SEEDS:
        rng = random.Random(seed)
        data, expected = random_csv(rng)
        path = tmp_path / f"{seed}.csv{'.gz' if compress else ''}"
        path.write_bytes(gzip.compress(data) if compress else data)
        chunk_size = rng.choice([1, 5, 17, 60, 200, 5000])
        chunks = plan_chunks(list_dataset(str(path)), chunk_size=chunk_size)

        if not chunks:  # a file holding only its header
            assert data.rstrip(b"\r\n").count(b"\n") == 0
            assert not expected
            continue
        assert {c.extent.header for c in chunks} == {("id", "text", "n")}
        got = read_all(chunks, batch_size=rng.randint(1, 6))
        assert got == expected, f"seed {seed}, chunk_size {chunk_size}"
        if compress:
            assert len(chunks) == 1
        else:
            header_len = data.index(b"\n") + 1
            assert_byte_ranges_tile_the_file(chunks, header_len, len(data))


def test_csv_multiline_quoted_field_in_a_single_chunk_file(tmp_path: Path) -> None:
    # A quoted field holding a newline cannot be cut safely (documented); a file that is one chunk reads it whole.
    data = b'id,text\r\n1,"first line\r\nsecond, line"\r\n2,plain\r\n3,"a ""quote"""\r\n'
    (tmp_path / "a.csv").write_bytes(data)
    chunks = plan_chunks(list_dataset(str(tmp_path / "a.csv")), chunk_size=len(data))
    assert len(chunks) == 1
    got = read_all(chunks, 10)
    assert got == [
        (9, {"id": "1", "text": "first line\r\nsecond, line"}),
        (data.index(b"2,plain"), {"id": "2", "text": "plain"}),
        (data.index(b"3,"), {"id": "3", "text": 'a "quote"'}),
    ]


def test_csv_row_with_the_wrong_number_of_fields_is_unreadable_not_fatal(tmp_path: Path) -> None:
    data = b"a,b\n1,2\n1,2,3\n4,5\n"
    (tmp_path / "x.csv").write_bytes(data)
    got = read_all(plan_chunks(list_dataset(str(tmp_path / "x.csv")), 1000), 10)
    assert got[0] == (4, {"a": "1", "b": "2"})
    assert got[2] == (14, {"a": "4", "b": "5"})
    pos, bad = got[1]
    assert pos == 8
    assert isinstance(bad, Unreadable)
    assert bad.error_type == "CSVError"
    assert "3 fields" in bad.error
    assert "header has 2" in bad.error
    assert bad.raw == "1,2,3\n"


def test_csv_header_problems_are_storage_errors_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "dup.csv").write_bytes(b"a,a\n1,2\n")
    with pytest.raises(StorageError, match=r"dup\.csv.*repeated"):
        plan_chunks(list_dataset(str(tmp_path / "dup.csv")), 100)
    (tmp_path / "empty.csv").write_bytes(b"\n")  # nothing but a blank line: no records, as in every format
    assert plan_chunks(list_dataset(str(tmp_path / "empty.csv")), 100) == []
    (tmp_path / "bad.csv").write_bytes(b"a,\n1,2\n")
    with pytest.raises(StorageError, match=r"bad\.csv.*empty or repeated column names"):
        plan_chunks(list_dataset(str(tmp_path / "bad.csv")), 100)


def test_csv_header_with_a_byte_order_mark(tmp_path: Path) -> None:
    (tmp_path / "bom.csv").write_bytes("\ufeffid,text\n1,x\n".encode())
    chunks = plan_chunks(list_dataset(str(tmp_path / "bom.csv")), 100)
    assert chunks[0].extent.header == ("id", "text")
    assert read_all(chunks, 10) == [(11, {"id": "1", "text": "x"})]


# --- Parquet --------------------------------------------------------------------------------------------------


def test_parquet_chunks_follow_row_groups_and_read_every_row(tmp_path: Path) -> None:
    for seed in range(40):
        rng = random.Random(seed)
        n = rng.randint(1, 300)
        table = pa.table({"id": list(range(n)), "text": [rng.choice(WORDS) * rng.randint(1, 5) for _ in range(n)]})
        path = tmp_path / f"{seed}.parquet"
        pq.write_table(table, path, row_group_size=rng.randint(1, 80))
        meta = pq.ParquetFile(path).metadata
        chunk_size = rng.choice([1, 200, 1000, 5000, 10**9])
        chunks = plan_chunks(list_dataset(str(path)), chunk_size=chunk_size)

        groups = [g for c in chunks for g in c.extent.groups]
        assert groups == list(range(meta.num_row_groups)), f"seed {seed}: every row group once, in order, unsplit"
        row = 0
        for c in chunks:
            assert c.extent.first_row == row
            row += sum(meta.row_group(g).num_rows for g in c.extent.groups)
            if len(c.extent.groups) > 1:
                assert c.size <= chunk_size  # only a single row group may exceed the chunk size
        got = read_all(chunks, batch_size=rng.randint(1, 50))
        assert [pos for pos, _ in got] == list(range(n))
        assert [rowdict for _, rowdict in got] == pq.read_table(path).to_pylist()


def test_unreadable_parquet_is_a_storage_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(StorageError, match=r"bad\.parquet"):
        plan_chunks(list_dataset(str(tmp_path / "bad.parquet")), 100)


# --- listing --------------------------------------------------------------------------------------------------


def test_listing_is_sorted_detects_formats_and_skips_hidden_and_underscore_files(tmp_path: Path) -> None:
    root = tmp_path / "in"
    for name in ["b.jsonl", "a.csv", "sub/c.parquet", "sub/d.ndjson.gz", "e.JSONL", "f.pq", "g.csv.gz"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    for name in [".hidden.jsonl", "_manifest.json", "_chunks/00000.json", "sub/_private/z.jsonl", ".git/config"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    files = list_dataset(str(root))
    assert [(f.key, f.format, f.compression) for f in files] == [
        ("a.csv", "csv", None),
        ("b.jsonl", "jsonl", None),
        ("e.JSONL", "jsonl", None),
        ("f.pq", "parquet", None),
        ("g.csv.gz", "csv", "gzip"),
        ("sub/c.parquet", "parquet", None),
        ("sub/d.ndjson.gz", "jsonl", "gzip"),
    ]
    assert all(f.size == 1 and os.path.exists(f.uri) for f in files)
    assert list_dataset(f"file://{root}") == files


def test_a_file_named_on_its_own_is_taken_whatever_its_name(tmp_path: Path) -> None:
    (tmp_path / "_export.jsonl").write_bytes(b'{"text": "x"}\n')

    files = list_dataset(str(tmp_path / "_export.jsonl"))

    assert [(f.key, f.size) for f in files] == [("_export.jsonl", 14)]
    with pytest.raises(StorageError, match="holds no files"):  # under a folder it is hidden, like _manifest.json
        list_dataset(str(tmp_path))


def test_symlinked_files_are_listed_with_their_targets_size_and_read_through(tmp_path: Path) -> None:
    data = b"".join(b'{"i": %d}\n' % i for i in range(100))
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "real.jsonl").write_bytes(data)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").symlink_to(tmp_path / "store" / "real.jsonl")

    files = list_dataset(str(tmp_path / "in"))

    assert [(f.key, f.size, f.format) for f in files] == [("a.jsonl", len(data), "jsonl")]
    chunks = plan_chunks(files, chunk_size=300, job_id="j")
    assert len(chunks) > 1
    assert [line for _, line in read_all(chunks, batch_size=7)] == data.splitlines(keepends=True)


def test_chunks_are_numbered_across_files_in_listing_order(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "b.jsonl").write_bytes(b'{"x": 1}\n' * 10)
    (tmp_path / "in" / "a.jsonl").write_bytes(b'{"x": 1}\n' * 10)
    chunks = plan_chunks(list_dataset(str(tmp_path / "in")), chunk_size=40, job_id="job")
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.key for c in chunks] == ["a.jsonl"] * 3 + ["b.jsonl"] * 3
    assert {c.job_id for c in chunks} == {"job"}


def test_small_files_share_a_chunk_up_to_chunk_size_in_listing_order(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for n in range(10):
        (tmp_path / "in" / f"f{n}.jsonl").write_bytes(b'{"x": 1}\n' * 3)  # 27 bytes each
    chunks = plan_chunks(list_dataset(str(tmp_path / "in")), chunk_size=100, job_id="job")
    assert [[p.key for p in c.pieces()] for c in chunks] == [
        ["f0.jsonl", "f1.jsonl", "f2.jsonl"], ["f3.jsonl", "f4.jsonl", "f5.jsonl"],
        ["f6.jsonl", "f7.jsonl", "f8.jsonl"], ["f9.jsonl"],
    ]  # fmt: skip
    assert [(c.index, c.size) for c in chunks] == [(0, 81), (1, 81), (2, 81), (3, 27)]  # every piece counts
    assert all(p.job_id == "job" and p.index == c.index for c in chunks for p in c.pieces())
    assert [pos for pos, _ in read_all(chunks, batch_size=2)] == [0, 9, 18] * 10


def test_a_part_of_about_chunk_size_stays_alone_and_a_files_ranges_never_share_a_chunk(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b'{"x": 1}\n' * 2)  # 18 bytes
    (tmp_path / "in" / "b.jsonl").write_bytes(b'{"x": 1}\n' * 11)  # 99 bytes: two ranges of 50 and 49
    (tmp_path / "in" / "c.jsonl").write_bytes(b'{"x": 1}\n' * 2)
    chunks = plan_chunks(list_dataset(str(tmp_path / "in")), chunk_size=60, job_id="job")
    assert [[(p.key, p.size) for p in c.pieces()] for c in chunks] == [
        [("a.jsonl", 18)], [("b.jsonl", 50)], [("b.jsonl", 49)], [("c.jsonl", 18)]
    ]  # fmt: skip
    big = plan_chunks(list_dataset(str(tmp_path / "in")), chunk_size=200, job_id="job")
    assert [[p.key for p in c.pieces()] for c in big] == [["a.jsonl", "b.jsonl", "c.jsonl"]]


def test_a_chunk_holds_at_most_max_pieces_files(tmp_path: Path) -> None:
    from modalkit.batch.formats import InputFile, Part
    from modalkit.batch.planning import MAX_PIECES, pack_parts
    from modalkit.iomodel import ByteRange

    planned = [(InputFile(f"{n}.jsonl", f"{n}.jsonl", 1, ""), [Part(ByteRange(), 1)]) for n in range(MAX_PIECES + 5)]
    chunks = pack_parts(planned, chunk_size=10**9)
    assert [len(c.pieces()) for c in chunks] == [MAX_PIECES, 5]


def test_unsupported_extension_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "ok.jsonl").write_bytes(b"{}\n")
    (tmp_path / "in" / "notes.txt").write_bytes(b"hello")
    with pytest.raises(ConfigError, match=r"notes\.txt") as info:
        list_dataset(str(tmp_path / "in"))
    assert "ok.jsonl" not in str(info.value)


def test_empty_or_missing_input_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="holds no files"):
        list_dataset(str(tmp_path / "empty"))
    (tmp_path / "only_hidden").mkdir()
    (tmp_path / "only_hidden" / ".x.jsonl").write_bytes(b"{}\n")
    with pytest.raises(StorageError, match="holds no files"):
        list_dataset(str(tmp_path / "only_hidden"))
    with pytest.raises(StorageError, match="does not exist"):
        list_dataset(str(tmp_path / "nowhere"))


def test_chunk_size_must_be_positive(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b"{}\n")
    with pytest.raises(ConfigError, match="chunk_size"):
        plan_chunks(list_dataset(str(tmp_path / "a.jsonl")), chunk_size=0)


# --- job id ---------------------------------------------------------------------------------------------------


def test_job_id_is_stable_and_changes_with_listing_model_or_params(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.jsonl").write_bytes(b'{"x": 1}\n')
    (root / "b.jsonl").write_bytes(b'{"x": 2}\n')
    params: dict[str, Any] = {"chunk_size": 100, "id_field": None}
    base = job_id_for(list_dataset(str(root)), "m", params)
    assert base == job_id_for(list_dataset(str(root)), "m", dict(reversed(params.items())))
    assert len(base) == 16

    assert job_id_for(list_dataset(str(root)), "other", params) != base
    assert job_id_for(list_dataset(str(root)), "m", {**params, "chunk_size": 101}) != base
    assert job_id_for(list_dataset(str(root)), "m", {**params, "id_field": "id"}) != base

    stat = (root / "a.jsonl").stat()
    os.utime(root / "a.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touched: same content
    assert job_id_for(list_dataset(str(root)), "m", params) == base
    (root / "a.jsonl").write_bytes(b'{"x": 3}\n')  # same size, new content
    touched = job_id_for(list_dataset(str(root)), "m", params)
    assert touched != base
    assert job_id_for(list_dataset(str(root)), "m", params) == touched

    (root / "b.jsonl").write_bytes(b'{"x": 22}\n')  # new size
    assert job_id_for(list_dataset(str(root)), "m", params) not in (base, touched)

    (root / "c.jsonl").write_bytes(b"")  # a new file
    with_c = job_id_for(list_dataset(str(root)), "m", params)
    (root / "c.jsonl").unlink()
    assert with_c != job_id_for(list_dataset(str(root)), "m", params)


def test_a_packed_chunk_s_size_is_all_its_pieces_and_each_piece_keeps_its_own() -> None:
    small = [(InputFile(f"{n}.jsonl", f"{n}.jsonl", 30 + i, ""), [Part(ByteRange(), 30 + i)]) for i, n in
             enumerate("abc")]  # fmt: skip
    (chunk,) = pack_parts(small, chunk_size=1000)
    assert chunk.size == 30 + 31 + 32  # progress and dispatch order count every byte the chunk reads
    assert [p.size for p in chunk.pieces()] == [30, 31, 32]
