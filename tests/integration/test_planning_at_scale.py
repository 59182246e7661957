"""Planning at scale: listing thousands of objects on a real moto_server costs one request per page of keys, not
one per object, and planning JSONL reads nothing; Parquet footers are read side by side and planned in listing
order; a rerun over an unchanged local dataset bigger than the content-hash cache once held opens no input file.

S3 requests are counted by a :class:`CountingProxy` in front of moto_server; files opened are seen through a
Python audit hook (the ``open`` event every ``open()`` raises).
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import CountingProxy, MotoServer

from modalkit.aws import s3_storage_options
from modalkit.batch.planning import job_id_for, list_dataset, plan_chunks
from modalkit.batch.storage import Store
from modalkit.iomodel import RowGroups

#: Two pages of S3's ListObjectsV2 (1,000 keys a page).
OBJECTS = 1_050
#: More files than the local content-hash cache used to keep (20,000): a rerun re-read the files it had dropped.
LOCAL_FILES = 20_001

_watched: list[str] = []  # a path prefix while a test watches opens under it
_opened: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _watched and isinstance(args[0], str) and args[0].startswith(_watched[0]):
        _opened.append(args[0])


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one records only while a test watches


@pytest.fixture
def opened() -> Iterator[list[str]]:
    """The files opened under the path the test appends to ``_watched`` (the list is what it yields)."""
    _opened.clear()
    yield _opened
    _watched.clear()
    _opened.clear()


@pytest.fixture
def proxy(aws: MotoServer) -> Iterator[CountingProxy]:
    counting = CountingProxy(aws.port, delay=0.02)  # S3 a little further away: requests side by side overlap
    yield counting
    counting.close()


def store_through(proxy: CountingProxy) -> Store:
    return Store(s3_options={**s3_storage_options(), "endpoint_url": proxy.url})


def put_objects(s3: Any, bucket: str, bodies: dict[str, bytes]) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: s3.put_object(Bucket=bucket, Key=item[0], Body=item[1]), bodies.items()))


def test_listing_thousands_of_objects_costs_a_request_per_page_and_planning_jsonl_reads_nothing(
    s3: Any, unique: str, proxy: CountingProxy
) -> None:
    bucket = f"scale-{unique}"
    s3.create_bucket(Bucket=bucket)
    put_objects(s3, bucket, {f"in/part-{i:05d}.jsonl": b'{"text": "ok"}\n' * 5 for i in range(OBJECTS)})
    store = store_through(proxy)

    files = list_dataset(f"s3://{bucket}/in", store=store)
    listing = list(proxy.requests)
    proxy.reset()
    chunks = plan_chunks(files, chunk_size=1 << 20, job_id="j", store=store)

    assert len(files) == OBJECTS
    pages = [r for r in listing if "list-type=2" in r and "max-keys=1&" not in r]
    assert len(pages) == 2, listing
    assert len(listing) <= len(pages) + 2, listing  # at most a look at the input itself besides the pages
    assert proxy.requests == []  # JSONL is cut by the sizes the listing gave: no object read
    assert sum(c.size for c in chunks) == sum(f.size for f in files)
    assert job_id_for(files, "m", {}) == job_id_for(list_dataset(f"s3://{bucket}/in", store=store), "m", {})


def parquet_bytes(rows: int, groups: int) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": [f"r{i}" for i in range(rows)]}), sink, row_group_size=rows // groups)
    return sink.getvalue()


def test_parquet_footers_are_read_side_by_side_and_planned_in_listing_order(
    s3: Any, unique: str, proxy: CountingProxy
) -> None:
    bucket = f"footers-{unique}"
    s3.create_bucket(Bucket=bucket)
    put_objects(s3, bucket, {f"in/part-{i:03d}.parquet": parquet_bytes(20, 2) for i in range(40)})
    store = store_through(proxy)
    files = list_dataset(f"s3://{bucket}/in", store=store)
    proxy.reset()

    chunks = plan_chunks(files, chunk_size=1, job_id="j", store=store)  # every row group its own chunk

    assert [(c.index, c.key, c.extent) for c in chunks] == [
        (2 * i + g, f.key, RowGroups(groups=(g,), first_row=10 * g)) for i, f in enumerate(files) for g in (0, 1)
    ]
    assert proxy.max_held > 1  # footers fetched side by side, not one after the other
    assert len(proxy.requests) <= 2 * len(files), proxy.requests  # a look and a read of its footer per file


def test_a_rerun_over_more_local_files_than_the_hash_cache_used_to_hold_opens_no_input_file(
    tmp_path: Path, opened: list[str]
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    for i in range(LOCAL_FILES):
        (root / f"part-{i:05d}.jsonl").write_bytes(b'{"text": "ok"}\n' * 5)
    first = job_id_for(list_dataset(str(root)), "m", {})
    _watched.append(str(root))

    again = job_id_for(list_dataset(str(root)), "m", {})

    assert again == first
    assert opened == []


def test_switching_between_two_local_datasets_opens_neither_again(tmp_path: Path, opened: list[str]) -> None:
    for name, count in (("a", 30), ("b", 50)):
        (tmp_path / name).mkdir()
        for i in range(count):
            (tmp_path / name / f"{i}.jsonl").write_bytes(b'{"text": "%d"}\n' % i)
    ids = {name: job_id_for(list_dataset(str(tmp_path / name)), "m", {}) for name in ("a", "b")}
    _watched.append(str(tmp_path))

    assert {name: job_id_for(list_dataset(str(tmp_path / name)), "m", {}) for name in ("b", "a")} == ids
    assert opened == []
    os.utime(tmp_path / "a" / "0.jsonl", ns=(1, 1))  # touched: read again, same content, same id
    assert job_id_for(list_dataset(str(tmp_path / "a")), "m", {}) == ids["a"]
    assert opened == [str(tmp_path / "a" / "0.jsonl")]
