"""``create_app`` as apps written for the original modalkit call it, over HTTP (httpx on the ASGI app, in-process).

The original passed what ``sync_fn`` returned straight through (a plain dict included) and had no queue allowlist;
apps built from modalkit's settings (``create_web_endpoints``, ``modalkit serve``) keep the settings' allowlist.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import BaseModel

from modalkit.fast_api import create_app, create_web_endpoints
from modalkit.iomodel import AsyncInputModel, AsyncOutputModel
from modalkit.modal_config import ModalConfig
from modalkit.settings import Settings


class Question(BaseModel):
    text: str


class Answer(BaseModel):
    result: str


def post(app: FastAPI, *requests: tuple[str, Any]) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.post(path, json=body, params={"model_name": "m"}) for path, body in requests]

    return asyncio.run(main())


async def answer_with_a_dict(model_name: str, record: BaseModel) -> Any:
    return {"result": f"{model_name}: {record.text}"}  # type: ignore[attr-defined]


async def answer_with_a_model(model_name: str, record: BaseModel) -> Any:
    return Answer(result=record.text)  # type: ignore[attr-defined]


def test_a_dict_that_sync_fn_returns_is_the_response_body_as_the_original_passed_it_through() -> None:
    app = create_app(Question, Answer, [], None, answer_with_a_dict, None)

    sync, batch = post(app, ("/predict_sync", {"text": "hi"}), ("/predict_batch", [{"text": "a"}, {"text": "b"}]))

    assert (sync.status_code, sync.json()) == (200, {"result": "m: hi"})
    assert (batch.status_code, batch.json()) == (200, [{"result": "m: a"}, {"result": "m: b"}])


def test_a_model_without_a_status_field_that_sync_fn_returns_is_its_json() -> None:
    app = create_app(Question, Answer, [], None, answer_with_a_model, None)

    [sync] = post(app, ("/predict_sync", {"text": "hi"}))

    assert (sync.status_code, sync.json()) == (200, {"result": "hi"})


def test_a_dict_with_status_error_from_sync_fn_is_a_422_with_that_body() -> None:
    async def refuse(model_name: str, record: BaseModel) -> Any:
        return {"status": "error", "error": "not today"}

    [sync] = post(create_app(Question, Answer, [], None, refuse, None), ("/predict_sync", {"text": "hi"}))

    assert (sync.status_code, sync.json()) == (422, {"status": "error", "error": "not today"})


def spawner(seen: list[AsyncInputModel[Any]]) -> Any:
    async def spawn(model_name: str, request: AsyncInputModel[Any]) -> Any:
        seen.append(request)
        return {"job_id": f"job-{len(seen)}"}  # a dict, as the original's tests return

    return spawn


def async_body(**queues: str) -> dict[str, Any]:
    return {"message": {"text": "hi"}, **queues}


def test_create_app_without_allowed_queues_lets_an_async_request_name_any_queue_as_the_original_did() -> None:
    seen: list[AsyncInputModel[Any]] = []
    app = create_app(Question, Answer, [], None, None, spawner(seen))

    [reply] = post(app, ("/predict_async", async_body(success_queue="anything", failure_queue="else")))

    assert (reply.status_code, reply.json()) == (200, {"job_id": "job-1"})
    assert [(r.success_queue, r.failure_queue) for r in seen] == [("anything", "else")]


def test_create_app_with_allowed_queues_refuses_any_other_queue_with_403_and_an_empty_list_refuses_all() -> None:
    seen: list[AsyncInputModel[Any]] = []
    listed = create_app(Question, Answer, [], None, None, spawner(seen), allowed_queues=["results"])
    empty = create_app(Question, Answer, [], None, None, spawner(seen), allowed_queues=[])

    ok, off_list = post(
        listed,
        ("/predict_async", async_body(success_queue="results")),
        ("/predict_async", async_body(success_queue="results", failure_queue="elsewhere")),
    )
    [none_allowed] = post(empty, ("/predict_async", async_body(success_queue="results")))

    assert ok.status_code == 200
    assert (off_list.status_code, none_allowed.status_code) == (403, 403)
    assert "elsewhere" in off_list.json()["error"]
    assert len(seen) == 1


def test_web_endpoints_built_from_settings_keep_the_settings_allowlist(tmp_path: Any) -> None:
    settings = Settings.load(
        data={
            "app_settings": {"queue_config": {"allowed_queues": ["results"]}},
            "model_settings": {"model_entries": {"m": {"pipeline": "modalkit.examples.sentiment:SentimentPipeline"}}},
        }
    )
    spawned: list[AsyncInputModel[Any]] = []

    class DeployedStandIn:  # the call surface of a modal.Cls that create_web_endpoints uses
        modal_utils = ModalConfig(settings)

        def __init__(self, model_name: str) -> None:
            self.process_request = self
            self.spawn = self

        async def aio(self, request: AsyncInputModel[Any]) -> Any:
            spawned.append(request)
            return type("FunctionCall", (), {"object_id": "fc-1"})()

    app = create_web_endpoints(app_cls=DeployedStandIn, input_model=Question, output_model=Answer)

    ok, refused = post(
        app,
        ("/predict_async", async_body(success_queue="results")),
        ("/predict_async", async_body(success_queue="anything")),
    )

    assert (ok.status_code, AsyncOutputModel.model_validate(ok.json()).job_id) == (200, "fc-1")
    assert refused.status_code == 403
    assert len(spawned) == 1
