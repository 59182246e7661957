"""CSV cells filled into the pipeline's input model: an empty cell is None for a field that accepts None (or the
field's default), a cell holding JSON fills a nested model or list field, and a string field keeps its text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import orjson
from pydantic import BaseModel, Field

from modalkit.batch.chunk import process_chunk
from modalkit.batch.planning import list_dataset, plan_chunks
from modalkit.inference_pipeline import InferencePipeline
from modalkit.iomodel import InferenceOutputModel, JobSpec


class Address(BaseModel):
    city: str
    zip: str | None = None


class Order(BaseModel):
    order_id: int
    note: str
    comment: Optional[str]  # noqa: UP045 - spelled as the new user's pipeline spells it
    qty: int | None = None
    price: Optional[float]  # noqa: UP045
    gift: bool | None = None
    lang: str = "en"
    address: Address | None = None
    items: list[str] = Field(default_factory=list)
    raw: str = ""


class Seen(InferenceOutputModel):
    order: dict[str, Any]


class EchoOrders(InferencePipeline):
    """Returns each validated input as it reached the pipeline."""

    input_model = Order
    output_model = Seen

    def __init__(self) -> None:
        super().__init__("orders", "models", {})

    def preprocess(self, input_list: list[Order]) -> dict[str, Any]:
        return {}

    def predict(self, input_list: list[Order], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        return {}

    def postprocess(self, input_list: list[Order], raw_output: dict[str, Any]) -> list[Seen]:
        return [Seen(order=o.model_dump()) for o in input_list]


HEADER = "order_id,note,comment,qty,price,gift,lang,address,items,raw\n"


def run_csv(tmp_path: Path, body: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "orders.csv").write_text(HEADER + body, encoding="utf-8")
    (chunk,) = plan_chunks(list_dataset(str(tmp_path / "in")), 10**9, "job0123456789abc")
    job = JobSpec(job_id="job0123456789abc", input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"),
                  model_name="orders", id_field="order_id")  # fmt: skip
    process_chunk(job, chunk, EchoOrders())
    parts = tmp_path / "out" / "part-00000.jsonl"
    failures = tmp_path / "out" / "_failures" / "part-00000.jsonl"
    read = lambda p: [orjson.loads(line) for line in p.read_bytes().splitlines()] if p.exists() else []  # noqa: E731
    return read(parts), read(failures)


def test_empty_cells_of_optional_fields_are_none_and_fields_with_defaults_get_their_default(tmp_path: Path) -> None:
    parts, failures = run_csv(tmp_path, "1,hello,,,,,,,,\n")
    assert failures == []
    (row,) = parts
    assert row["order"] == {"order_id": 1, "note": "hello", "comment": None, "qty": None, "price": None,
                            "gift": None, "lang": "en", "address": None, "items": [], "raw": ""}  # fmt: skip


def test_filled_cells_still_parse_as_their_fields_types(tmp_path: Path) -> None:
    parts, failures = run_csv(tmp_path, "2,hi,a comment,3,9.5,true,fr,,,\n")
    assert failures == []
    assert parts[0]["order"] | {"address": None, "items": []} == {"order_id": 2, "note": "hi", "comment": "a comment",
        "qty": 3, "price": 9.5, "gift": True, "lang": "fr", "address": None, "items": [], "raw": ""}  # fmt: skip


def test_a_cell_holding_json_fills_a_nested_model_and_a_list_field(tmp_path: Path) -> None:
    address = json.dumps({"city": "Lyon", "zip": None}).replace('"', '""')
    items = json.dumps(["tea", "cup"]).replace('"', '""')
    parts, failures = run_csv(tmp_path, f'3,x,,,,,,"{address}","{items}",\n')
    assert failures == []
    order = parts[0]["order"]
    assert order["address"] == {"city": "Lyon", "zip": None}
    assert order["items"] == ["tea", "cup"]


def test_a_string_field_whose_cell_looks_like_json_keeps_the_text(tmp_path: Path) -> None:
    parts, failures = run_csv(tmp_path, '4,"{""a"": 1}",[1],,,,,,,"[""x""]"\n')
    assert failures == []
    order = parts[0]["order"]
    assert (order["note"], order["comment"], order["raw"]) == ('{"a": 1}', "[1]", '["x"]')


def test_a_required_string_field_with_an_empty_cell_gets_the_empty_string(tmp_path: Path) -> None:
    parts, failures = run_csv(tmp_path, "5,,,,,,,,,\n")
    assert failures == []
    assert parts[0]["order"]["note"] == ""


def test_a_required_number_with_an_empty_cell_fails_naming_the_field_and_the_others_pass(tmp_path: Path) -> None:
    parts, failures = run_csv(tmp_path, "6,a,,,,,,,,\n,b,,,,,,,,\n7,c,,,,,,,,\n")
    assert [p["record_id"] for p in parts] == [6, 7]
    (failure,) = failures
    assert failure["error_type"] == "InvalidRecordId"
    assert "'order_id'" in failure["error"]


def test_a_nested_cell_that_is_not_json_fails_naming_the_field(tmp_path: Path) -> None:
    parts, failures = run_csv(tmp_path, "8,a,,,,,,Lyon,,\n9,b,,,,,,,,\n")
    assert [p["record_id"] for p in parts] == [9]
    (failure,) = failures
    assert failure["record_id"] == 8
    assert "field 'address'" in failure["error"]
    assert "JSON" in failure["error"]
    assert failure["input"]["address"] == "Lyon"
