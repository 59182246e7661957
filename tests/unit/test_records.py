"""The record shapes have one owner (modalkit.iomodel): ids keep their JSON type, a failure record's error part is
the error body clients see, templates for hot loops take their keys from the models, and a failure body can be cut
to fit a queue's size limit."""

from __future__ import annotations

import doctest
import json

import pytest

from modalkit import iomodel
from modalkit.iomodel import ErrorBody, FailureRecord, SuccessRecord, json_template, truncate_failure_input


def failure(**fields: object) -> FailureRecord:
    return FailureRecord(
        **{"job_id": "j", "record_id": 7, "stage": "validate", "error_type": "ValidationError", "error": "bad"} | fields
    )


@pytest.mark.parametrize("record_id", [7, "7", "data.jsonl:0"])
def test_record_ids_keep_their_json_type_through_both_records(record_id: int | str) -> None:
    success = SuccessRecord(job_id="j", record_id=record_id, output={})
    assert json.loads(success.model_dump_json())["record_id"] == record_id
    assert SuccessRecord.model_validate_json(success.model_dump_json()).record_id == record_id
    assert json.loads(failure(record_id=record_id).model_dump_json())["record_id"] == record_id


def test_a_failure_records_error_part_is_an_error_body_with_the_same_descriptions() -> None:
    record = failure(input={"text": 5})
    body = ErrorBody.model_validate(record.model_dump(include=set(ErrorBody.model_fields)))
    assert body == ErrorBody(stage="validate", error_type="ValidationError", error="bad")
    for name in ("error_type", "error"):
        assert FailureRecord.model_fields[name].description == ErrorBody.model_fields[name].description


def test_the_record_bodies_hold_exactly_the_contract_keys() -> None:
    assert list(json.loads(SuccessRecord(job_id="j", record_id=1, output={}).model_dump_json())) == [
        "job_id", "record_id", "status", "output", "meta"]  # fmt: skip
    assert list(json.loads(failure().model_dump_json())) == [
        "job_id", "record_id", "status", "stage", "error_type", "error", "input", "meta"]  # fmt: skip


def test_a_json_template_names_the_models_fields_and_refuses_others() -> None:
    template = json_template(SuccessRecord, ["job_id", "record_id", "output", "meta"])
    body = template % (b'"j"', b"7", b'{"label":1}', b"{}")
    assert SuccessRecord.model_validate_json(body) == SuccessRecord(job_id="j", record_id=7, output={"label": 1})
    with pytest.raises(ValueError, match="must be fields"):
        json_template(SuccessRecord, ["job_id", "id", "output", "meta"])
    with pytest.raises(ValueError, match="in field order"):
        json_template(SuccessRecord, ["record_id", "job_id", "output", "meta"])
    with pytest.raises(ValueError, match="no plain default"):
        json_template(SuccessRecord, ["job_id", "record_id", "meta"])


def test_the_examples_in_iomodel_run() -> None:
    assert doctest.testmod(iomodel).failed == 0


def test_a_failure_body_is_cut_to_fit_by_its_input_only() -> None:
    record = failure(input={"notes": ["é\n" * 1000] * 50}, meta={"key": "a.jsonl"})
    cut = truncate_failure_input(record.model_dump_json(), 4096)
    assert cut is not None
    assert len(cut.encode()) <= 4096
    back = FailureRecord.model_validate_json(cut)
    assert back.input_truncated
    assert back.model_dump(exclude={"input", "input_truncated"}) == record.model_dump(exclude={"input"})
    assert json.dumps(record.input, ensure_ascii=False, separators=(",", ":")).startswith(back.input[:-3])


def test_only_a_failure_record_that_can_fit_is_cut() -> None:
    assert truncate_failure_input(SuccessRecord(job_id="j", record_id=1, output={}).model_dump_json(), 1024) is None
    assert truncate_failure_input("not json", 1024) is None
    assert truncate_failure_input(failure(error="e" * 2000, input="x").model_dump_json(), 1024) is None


def test_online_async_bodies_are_the_record_models_with_the_contract_keys() -> None:
    from pydantic import BaseModel

    from modalkit.inference_pipeline import FailedOutput, RecordError, async_result
    from modalkit.iomodel import AsyncInputModel, InferenceOutputModel

    class TextIn(BaseModel):
        text: str

    class Label(InferenceOutputModel):
        label: str

    request = AsyncInputModel[TextIn](message={"text": "hi"}, success_queue="ok", failure_queue="bad", meta={"a": 1})
    queue, body = async_result("job1", 7, Label(label="pos"), request)
    assert queue == "ok"
    assert body == SuccessRecord(job_id="job1", record_id=7, output={"label": "pos"}, meta={"a": 1}).model_dump()
    assert list(body) == ["job_id", "record_id", "status", "output", "meta"]

    failed = FailedOutput.of(RecordError("predict", "RuntimeError", "boom"))
    queue, body = async_result("job1", "r1", failed, request)
    assert queue == "bad"
    assert FailureRecord.model_validate(body) == failure(
        job_id="job1", record_id="r1", stage="predict", error_type="RuntimeError", error="boom",
        input={"text": "hi"}, meta={"a": 1},
    )  # fmt: skip
    assert list(body) == ["job_id", "record_id", "status", "stage", "error_type", "error", "input", "meta"]
