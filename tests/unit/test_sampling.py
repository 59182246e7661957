"""The id field checked on the input's first records, in every format, before a job writes anything."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modalkit.batch.planning import list_dataset, plan_chunks
from modalkit.batch.sampling import MissingIdField, check_id_field, sample_records


def chunks_of(folder: Path) -> list:
    return plan_chunks(list_dataset(str(folder)), chunk_size=1 << 20)


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_a_misspelt_id_field_is_named_with_the_first_records_fields_in_every_format(
    tmp_path: Path, suffix: str
) -> None:
    rows = [{"order_id": i, "text": f"t{i}"} for i in range(5)]
    path = tmp_path / f"orders.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == "csv":
        path.write_text("order_id,text\n" + "".join(f"{r['order_id']},{r['text']}\n" for r in rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)

    with pytest.raises(MissingIdField) as caught:
        check_id_field(chunks_of(tmp_path), "oder_id")
    check_id_field(chunks_of(tmp_path), "order_id")  # the right name passes

    assert caught.value.describe("--id-field") == (
        f"--id-field 'oder_id' is in none of the first records of orders.{suffix} (the first has: order_id, text); "
        "did you mean 'order_id'?"
    )


def test_an_id_field_only_some_records_lack_is_no_typo_and_a_head_of_broken_lines_gives_no_verdict(
    tmp_path: Path,
) -> None:
    (tmp_path / "some").mkdir()
    lines = [json.dumps({"text": "no id"}), json.dumps({"id": "r1", "text": "has one"})]
    (tmp_path / "some" / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jsonl").write_text("not json\n{also not\n", encoding="utf-8")

    check_id_field(chunks_of(tmp_path / "some"), "id")  # the record without one fails alone, as InvalidRecordId
    check_id_field(chunks_of(tmp_path / "broken"), "id")  # those lines fail as JSONDecodeError, each alone


def test_the_sample_takes_the_first_records_of_each_file_with_their_positions(tmp_path: Path) -> None:
    for name in ("a", "b"):
        lines = [json.dumps({"id": f"{name}{i}"}) for i in range(10)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    sample = sample_records(chunks_of(tmp_path), 6)

    assert [r.data["id"] for r in sample] == ["a0", "a1", "a2", "b0", "b1", "b2"]
    line = len(json.dumps({"id": "a0"})) + 1
    assert [r.where for r in sample[:2]] == ["a.jsonl at byte 0", f"a.jsonl at byte {line}"]
