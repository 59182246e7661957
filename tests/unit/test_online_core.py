"""The online core both ``modalkit serve`` and the Modal class run (``modalkit.runners.online``): whose fault a
failure is, the HTTP status it gets, the broken-device callback, and the async record id rule."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from pydantic import BaseModel

from modalkit.exceptions import DeviceError
from modalkit.inference_pipeline import InferencePipeline
from modalkit.iomodel import AsyncInputModel, InferenceOutputModel
from modalkit.runners.online import async_record, error_body, http_status, run_requests


class In(BaseModel):
    x: float


class Out(InferenceOutputModel):
    y: float


class Inverse(InferencePipeline):
    """1/x; ``x == 0`` is the record's fault; ``raises`` makes every batch raise it (no record's fault)."""

    input_model, output_model = In, Out
    raises: BaseException | None = None

    def preprocess(self, input_list: list[In]) -> dict[str, Any]:
        return {}

    def predict(self, input_list: list[In], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        if self.raises is not None:
            raise self.raises
        return {"y": [1 / i.x for i in input_list]}

    def postprocess(self, input_list: list[In], raw_output: dict[str, Any]) -> list[Any]:
        return [Out(y=y) for y in raw_output["y"]]


def pipeline(raises: BaseException | None = None) -> Inverse:
    p = Inverse("inverse", "/tmp", {})
    p.raises = raises
    return p


def test_a_record_the_pipeline_fails_on_is_422_alone_and_the_others_200() -> None:
    outputs = run_requests(pipeline(), [In(x=2), In(x=0)])
    assert [http_status(o)[0] for o in outputs] == [200, 422]
    assert error_body(outputs[1]) == {"status": "error", "stage": "predict", "error_type": "ZeroDivisionError",
                                      "error": "float division by zero"}  # fmt: skip


@pytest.mark.parametrize(
    ("raised", "status"),
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), 503),
        (ConnectionError("refused"), 503),
        (TimeoutError("slow"), 503),
        (MemoryError("no room"), 500),
    ],
    ids=["cuda", "connection", "timeout", "memory"],
)
def test_an_error_no_record_causes_is_never_422(raised: BaseException, status: int) -> None:
    broken: list[DeviceError] = []
    outputs = run_requests(pipeline(raised), [In(x=1), In(x=2)], broken.append)
    assert [http_status(o) for o in outputs] == [
        (status, {"Retry-After": "1"} if status == 503 else None)
    ] * 2  # fmt: skip
    assert outputs[0] is not outputs[1]  # each request its own output (meta is set per request)
    assert len(broken) == (1 if "CUDA" in str(raised) else 0)  # the device policy, once per batch


def test_a_failed_output_keeps_its_status_and_fields_through_pickling_as_modal_returns_it() -> None:
    (output,) = run_requests(pipeline(ConnectionError("refused")), [In(x=1)])
    again = pickle.loads(pickle.dumps(output))
    assert (http_status(again), error_body(again)) == (http_status(output), error_body(output))


def test_an_async_record_id_is_meta_record_id_as_given_else_the_job_id() -> None:
    output = Out(y=1.0)
    with_id = AsyncInputModel[In](message=In(x=1), success_queue="ok", meta={"record_id": 7})
    without = AsyncInputModel[In](message=In(x=1), success_queue="ok")
    assert async_record("job-1", output, with_id)[1]["record_id"] == 7  # an integer id stays one, as in batch
    assert async_record("job-1", output, without)[1]["record_id"] == "job-1"


def test_open_routes_default_to_health_and_a_path_without_its_slash_is_refused_naming_the_key() -> None:
    from modalkit.exceptions import ConfigError
    from modalkit.settings import Settings

    assert Settings.load(data={}).app_settings.auth_config.open_routes == ["/health"]
    with pytest.raises(ConfigError, match=r"app_settings\.auth_config\.open_routes"):
        Settings.load(data={"app_settings": {"auth_config": {"open_routes": ["metrics"]}}})
