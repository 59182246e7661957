#!/usr/bin/env python3
"""The cost of the job-wide repeated-id check (modalkit/batch/repeats.py), measured directly.

For N records with W1's ids (integers, JSONL byte offsets as positions; with ``--str-ids``, strings) cut into
chunks of W1's size at the default chunk_size (about 145,000 records of ~230 bytes in 32 MiB):

* worker: what each chunk pays, hashing its ids sub-batch by sub-batch (256) and writing its ``_ids`` object
  (local disk), in microseconds per record;
* finalize: reading every chunk's object and merging them (``find_repeats``), in memory as the job does up to
  the memory budget, and spilled in 8 buckets as a job over ~1.4M records does; with 0.1% of the ids repeated.

    python bench/repeated_ids.py 1000000 4000000      # prints a markdown table; --json prints the figures
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modalkit.batch import repeats
from modalkit.batch.repeats import IdHashes, find_repeats

RECORDS_PER_CHUNK = 145_000
RECORD_BYTES = 230
SUB_BATCH = 256
REPEATED = 0.001


def measure(rows: int, str_ids: bool = False) -> dict[str, Any]:
    """Seconds the workers and the finalize merge spend on the check for ``rows`` records."""
    step = max(1, int(1 / REPEATED))
    with tempfile.TemporaryDirectory(prefix="bench-repeats-") as folder:
        uris: dict[int, str] = {}
        worker = 0.0
        size = 0
        for chunk, start in enumerate(range(0, rows, RECORDS_PER_CHUNK)):
            stop = min(rows, start + RECORDS_PER_CHUNK)
            # every `step`-th id repeats one of the first chunk's ids
            ids: list[Any] = [i if i % step else i // step for i in range(start, stop)]
            if str_ids:
                ids = [f"order-{i:09d}" for i in ids]
            positions = [i * RECORD_BYTES for i in range(stop - start)]
            uri = os.path.join(folder, f"{chunk:05d}.npz")
            began = time.perf_counter()
            hashes = IdHashes(f"part-{chunk % 4}.jsonl")
            for at in range(0, len(ids), SUB_BATCH):
                hashes.add(ids[at : at + SUB_BATCH], positions[at : at + SUB_BATCH])
            hashes.write(uri)
            worker += time.perf_counter() - began
            size += os.path.getsize(uri)
            uris[chunk] = uri
        began = time.perf_counter()
        found = find_repeats(uris, records=rows)
        in_memory = time.perf_counter() - began
        budget = repeats.MEMORY_BUDGET
        repeats.MEMORY_BUDGET = max(1, rows * 24 // 8)  # as a job 8 times over the budget: 8 buckets on disk
        try:
            began = time.perf_counter()
            spilled = find_repeats(uris, records=rows)
            spilled_s = time.perf_counter() - began
        finally:
            repeats.MEMORY_BUDGET = budget
        assert spilled.count == found.count
    return {
        "rows": rows,
        "ids": "str" if str_ids else "int",
        "chunks": len(uris),
        "worker_s": round(worker, 3),
        "worker_us_per_record": round(worker / rows * 1e6, 3),
        "bytes_per_record": round(size / rows, 2),
        "finalize_s": round(in_memory, 3),
        "finalize_spilled_s": round(spilled_s, 3),
        "repeated_ids": found.count,
    }


def markdown(results: list[dict[str, Any]], w1_seconds: dict[int, float] | None = None) -> list[str]:
    """The section RESULTS.md gets; ``w1_seconds`` (rows -> the W1 job's seconds) adds the check's share of it."""
    lines = [
        "## The repeated-id check",
        "",
        "With an `id_field` (W1 has `id_field: id`), every chunk hashes its ids and writes `_ids/NNNNN.npz`,",
        "and the job's end merges them (modalkit/batch/repeats.py). Measured directly by `bench/repeated_ids.py`:",
        f"chunks of {RECORDS_PER_CHUNK:,} records (W1's at 32 MiB), sub-batches of {SUB_BATCH}, {REPEATED:.1%} of",
        "ids repeated;",
        "the worker's time is summed over chunks (two workers share it in W1); finalize reads and merges every",
        "chunk's object, in memory (as up to about 1.4M records) and spilled in 8 buckets (as beyond).",
        "",
        "| records | ids | chunks | worker s (us/record) | bytes/record | finalize s in memory | finalize s "
        "spilled | share of the W1 job |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        w1 = (w1_seconds or {}).get(r["rows"]) if r["ids"] == "int" else None
        share = f"{(r['worker_s'] / 2 + r['finalize_s']) / w1:.2%}" if w1 else "-"
        lines.append(
            f"| {r['rows']:,} | {r['ids']} | {r['chunks']} | {r['worker_s']:.2f} ({r['worker_us_per_record']:.2f}) "
            f"| {r['bytes_per_record']:.1f} | {r['finalize_s']:.2f} | {r['finalize_spilled_s']:.2f} | {share} |"
        )
    return [*lines, ""]


def main(argv: list[str]) -> int:
    as_json = "--json" in argv
    sizes = [int(a) for a in argv if a.isdigit()] or [1_000_000, 4_000_000]
    results = [measure(n, str_ids) for n in sizes for str_ids in (False, True)]
    print(json.dumps(results) if as_json else "\n".join(markdown(results)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
