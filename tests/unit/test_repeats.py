"""The id hashes behind the job-wide check of repeated ids: one id, one hash, in every process and machine."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from modalkit.batch.repeats import IdHashes, hash_ids


def test_an_id_hashes_alike_as_an_integer_and_as_its_text_and_the_same_in_every_process() -> None:
    assert [int(h) for h in hash_ids([7, "order-1", 2**70])] == [
        7191089600892374487, 4396106474611317029, 16213371291910180463]  # fmt: skip
    assert hash_ids(["7", "x", -5, str(2**70)]).tolist() == [*hash_ids([7]), *hash_ids(["x", "-5", 2**70])]
    assert hash_ids(["07"])[0] != hash_ids([7])[0]  # "07" is not the id 7 (nor is it on a queue)


def test_a_chunks_id_hashes_are_sixteen_bytes_a_record_with_their_positions() -> None:
    hashes = IdHashes("a.jsonl")
    hashes.add([3, "b"], [0, 17])
    hashes.add([3], [40])
    data = hashes.to_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        assert npz["pos"].tolist() == [0, 17, 40]
        assert npz["hash"].tolist() == hash_ids([3, "b", 3]).tolist()
        assert npz["keys"].tolist() == ["a.jsonl"]


def test_a_merge_over_the_memory_budget_spills_by_hash_prefix_and_finds_the_same_repeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modalkit.batch import repeats

    uris = {}
    for chunk in range(6):
        hashes = IdHashes(f"f{chunk}.jsonl")
        ids = [*range(chunk * 1000, chunk * 1000 + 1000), *(f"s{i}" for i in range(chunk * 3))]
        hashes.add([*ids, chunk * 7], list(range(len(ids) + 1)))
        uris[chunk] = str(tmp_path / f"{chunk:05d}.npz")
        hashes.write(uris[chunk])
    in_memory = repeats.find_repeats(uris, records=6020)
    monkeypatch.setattr(repeats, "MEMORY_BUDGET", 6020 * 24 // 8)  # 8 buckets on disk
    spilled = repeats.find_repeats(uris, records=6020)
    # s0..s11 are in two chunks or more (s12..s14 only in chunk 5); 0, 7, ..., 35 are in chunk 0's ids too
    assert in_memory.count == spilled.count == 12 + 6
    assert [(r.hash, r.count, r.places) for r in spilled.examples] == [
        (r.hash, r.count, r.places) for r in in_memory.examples
    ]
    assert in_memory.examples[0].places == [(0, "f0.jsonl", 0), (0, "f0.jsonl", 1000)]
