"""``create_app`` in-process, called as the original modalkit's users call it (its signature, a plain function as
the router dependency, functions that return plain dicts), over httpx's ASGI transport."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from pydantic import BaseModel

from modalkit.fast_api import create_app
from modalkit.iomodel import AsyncOutputModel


class Question(BaseModel):
    message: str


class Answer(BaseModel):
    result: str


def call(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(main())


def test_the_originals_create_app_passes_a_plain_dict_through_and_runs_its_router_dependency() -> None:
    checked: list[bool] = []
    seen: list[tuple[str, Any]] = []

    async def sync_fn(model_name: str, message: Any) -> dict[str, str]:
        seen.append((model_name, message))
        return {"result": "test"}

    async def async_fn(model_name: str, request: Any) -> dict[str, str]:
        return {"job_id": "test_job_id"}

    app = create_app(input_model=Question, output_model=Answer, dependencies=[],
                     router_dependency=lambda: checked.append(True), sync_fn=sync_fn, async_fn=async_fn)  # fmt: skip

    sync = call(app, "POST", "/predict_sync", json={"message": "hi"}, params={"model_name": "m"})
    job = call(app, "POST", "/predict_async", json={"message": {"message": "hi"}}, params={"model_name": "m"})
    health = call(app, "GET", "/health")

    assert (sync.status_code, sync.json()) == (200, {"result": "test"})
    assert seen == [("m", Question(message="hi"))]
    assert (job.status_code, job.json()) == (200, AsyncOutputModel(job_id="test_job_id").model_dump())
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert checked == [True, True]  # the prediction routes, not /health
