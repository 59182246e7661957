"""The id hashes behind the job-wide check of repeated ids: one id, one hash, in every process and machine."""

from __future__ import annotations

import io

import numpy as np

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
