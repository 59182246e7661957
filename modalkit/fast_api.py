"""The HTTP face of a pipeline: routes, auth, error mapping, body limits and metrics (FastAPI).

``create_app`` has the original modalkit's signature; ``create_web_endpoints`` builds it for a deployed Modal class
(its calls go through :mod:`modalkit.runners.modal_client`). ``modalkit serve`` builds it over the local dynamic
batcher (:mod:`modalkit.serve_app`).

Routes: ``POST /predict_sync`` (one record), ``POST /predict_batch`` (a list: each item its own result or error, in
order, HTTP 200), ``POST /predict_async`` (returns ``job_id``), ``GET /jobs/{job_id}``, ``GET /health`` (200 only
when the model is loaded and its device works), ``GET /metrics`` (Prometheus text), ``/docs``, ``/redoc``,
``/openapi.json``. ``?model_name=`` selects a model entry; the body is validated against that entry's own input
model. With an API key, only ``open_routes`` (default ``/health``) answer without it.

Every error has one body, :class:`~modalkit.iomodel.ErrorBody`: ``{"status": "error", "stage", "error_type",
"error"}``. A body that is not JSON (or not UTF-8), 422 with stage ``parse``; one that fails the input model, 422
with stage ``validate`` and the field errors; a body over ``batch_config.max_body_bytes``, 413 before it is read; a
record the pipeline fails on, 422 with its ``stage`` (in ``/predict_batch``, only its own item); an error no record
causes (a broken device, a lost connection), 503 with ``Retry-After`` (or 500); a queue off ``allowed_queues``, 403;
a full batcher, 503 with ``Retry-After``; a request that waited past its timeout, 504; a missing or wrong key, 401;
a job id never issued, 404. No stack trace ever reaches a client.
"""

# no ``from __future__ import annotations``: FastAPI reads the routes' annotations, which are models made at run time
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

import orjson
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from modalkit.exceptions import ConfigError
from modalkit.iomodel import (
    AsyncInputModel,
    AsyncOutputModel,
    ErrorBody,
    InferenceOutputModel,
    JobStatus,
    describe_validation_error,
)
from modalkit.runners.batcher import Overloaded, TimedOut
from modalkit.runners.online import (
    RETRY_AFTER_S,
    DeviceBroken,
    UnavailableOutput,
    UnknownJob,
    error_body,
    http_status,
)

__all__ = [
    "ApiKeyAuth",
    "BodyLimit",
    "HttpMetrics",
    "api_key_dependency",
    "create_app",
    "create_web_endpoints",
    "outcome_body",
]

log = logging.getLogger(__name__)

#: ``sync_fn``: an InferenceOutputModel, or (as the original modalkit took) a plain dict or another model.
SyncFn = Callable[[str, BaseModel], Awaitable[InferenceOutputModel | BaseModel | Mapping[str, Any]]]
AsyncFn = Callable[[str, Any], Awaitable[AsyncOutputModel]]


class HttpMetrics:
    """Prometheus metrics of one app, in a registry of its own: requests by route and status, latency, batch
    sizes, queue depth, and what it costs (device busy seconds, container seconds, model load, price, dollars)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "modalkit_http_requests", "HTTP requests by route and status.", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "modalkit_http_request_seconds", "Time to answer a request.", ["route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        self.batch_size = Histogram(
            "modalkit_batch_size", "Records per pipeline call.", registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
        )  # fmt: skip
        #: ``queue_depth.set_function(f)``: what the gauge reads at each scrape (0 until set)
        self.queue_depth = Gauge("modalkit_queue_depth", "Requests waiting for the pipeline.", registry=self.registry)
        # what the server costs, as a batch job's summary counts it: modalkit_device_busy_seconds_total over
        # modalkit_container_seconds is the device's busy share; modalkit_batch_size_sum over its _count the mean batch
        self.device_seconds = Counter(
            "modalkit_device_busy_seconds", "Seconds the device was busy (the pipeline's predict).",
            registry=self.registry,
        )  # fmt: skip
        #: the gauges below read a function at each scrape, once the server sets them (0 until then)
        self.container_seconds = Gauge(
            "modalkit_container_seconds",
            "Seconds this server process has been up (and billed).",
            registry=self.registry,
        )
        self.model_load_seconds = Gauge(
            "modalkit_model_load_seconds", "Seconds spent loading the models loaded so far.", registry=self.registry
        )
        self.price = Gauge(
            "modalkit_price_usd_per_hour", "Dollars per hour of this process (app_settings.pricing).",
            registry=self.registry,
        )  # fmt: skip
        self.cost = Gauge(
            "modalkit_cost_usd", "Dollars this process has cost: container seconds x the price.", registry=self.registry
        )

    def render(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before it is read into memory, whether it
    declares its length or comes chunked."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        seen = 0
        too_large = False
        replaced = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen, too_large
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            # once the body ran over, whatever the app answers (FastAPI turns the read error into a 400) becomes 413
            nonlocal replaced
            if not too_large:
                await send(message)
            elif not replaced:
                replaced = True
                await _too_large(self.max_bytes)(scope, receive, send)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not replaced:
                await _too_large(self.max_bytes)(scope, receive, send)
        except Exception:
            if too_large and not replaced:  # the app wrapped our signal in an error of its own
                await _too_large(self.max_bytes)(scope, receive, send)
            else:
                raise


class _RouteLabels:
    """The route label of a request path for metrics, derived from the app's own routes: a fixed path is its own
    label, a path with parameters its template (``/jobs/{job_id}``), anything else ``other`` (a label per unknown
    path would grow without bound)."""

    def __init__(self, routes: Sequence[Any]) -> None:
        self.fixed: dict[str, str] = {}
        self.templated: list[tuple[Any, str]] = []
        for route in routes:
            path = getattr(route, "path", None)
            if path is None:
                continue
            if "{" in path:
                self.templated.append((route.path_regex, path))
            else:
                self.fixed[path] = path

    def __call__(self, path: str) -> str:
        label = self.fixed.get(path)
        if label is not None:
            return label
        for regex, template in self.templated:
            if regex.match(path):
                return template
        return "other"


class _Counting:
    """ASGI middleware counting requests by route and status, and their latency (plain ASGI: cheap per request)."""

    def __init__(self, app: Any, metrics: HttpMetrics, routes: Sequence[Any]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the app's routes (complete by the first request, when this is built)
        self.label: _RouteLabels | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.label is None:
            self.label = _RouteLabels(self.routes)
        started = time.perf_counter()
        route = self.label(scope.get("path", ""))
        status = 500

        async def recording_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


class _BodyTooLarge(Exception):
    pass


def _error(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None, stage: str | None = None
) -> JSONResponse:
    """An :class:`~modalkit.iomodel.ErrorBody` response."""
    body = ErrorBody(stage=stage, error_type=error_type, error=message)
    return JSONResponse(body.model_dump(mode="json"), status, headers=headers)


def _too_large(max_bytes: int) -> JSONResponse:
    return _error(413, "PayloadTooLarge", f"the request body is over {max_bytes} bytes")


class ApiKeyAuth:
    """A FastAPI dependency: the request must carry a valid key in ``header``; 401 otherwise, before any work.

    ``keys`` returns the keys valid now (a static key, or the SSM key and, for a grace period after a rotation, the
    one before it); they are compared with :func:`hmac.compare_digest`.
    """

    def __init__(self, header: str, keys: Callable[[], Sequence[str]]) -> None:
        self.header = header
        self.keys = keys

    async def __call__(self, request: Request) -> None:
        given = request.headers.get(self.header)
        valid = self.keys()
        if given is None or not any(hmac.compare_digest(given.encode(), key.encode()) for key in valid):
            raise _Unauthorized(
                f"missing or wrong {self.header} header" if valid else "the server could not read its API key yet"
            )


class _Unauthorized(Exception):
    pass


class _QueueNotAllowed(Exception):
    pass


class _BadBody(Exception):
    """The body is not JSON, or does not fit the input model: 422 with stage ``parse`` or ``validate``."""

    def __init__(self, stage: str, error_type: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.error_type = error_type


def _bad_body(exc: ValidationError) -> _BadBody:
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return _BadBody("parse", "JSONDecodeError", f"the body is not JSON: {first['msg']}")
    return _BadBody("validate", "ValidationError", describe_validation_error(exc))


def _parse(model: type[BaseModel], body: bytes) -> Any:
    """The body as ``model``, parsed and validated in one pass (pydantic's JSON parser); :class:`_BadBody` if not."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _bad_body(exc) from None


def outcome_body(output: InferenceOutputModel) -> dict[str, Any]:
    """The JSON of an output: its fields on success; the error body (``status``, ``stage``, ``error_type``,
    ``error``) on failure."""
    if output.status == "error":
        return error_body(output)
    return output.model_dump(mode="json", exclude_none=False)


def _plain_body(output: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    """What a ``sync_fn`` of the original modalkit's kind returns: a plain dict is the body as it is, another
    pydantic model its JSON (either an error when its ``status`` is ``"error"``)."""
    if isinstance(output, BaseModel):
        return output.model_dump(mode="json")
    if isinstance(output, Mapping):
        return dict(output)
    raise TypeError(f"sync_fn returned {type(output).__name__}; expected an InferenceOutputModel, a model or a dict")


class _Schemas:
    """The input model of each model entry (``?model_name=``); the default one for names it does not list."""

    def __init__(self, default: type[BaseModel], per_model: Mapping[str, type[BaseModel]]) -> None:
        self.default = default
        self.per_model = dict(per_model)
        self._async: dict[type[BaseModel], type[BaseModel]] = {}

    def record(self, model_name: str) -> type[BaseModel]:
        return self.per_model.get(model_name, self.default)

    def async_request(self, model_name: str) -> type[BaseModel]:
        record = self.record(model_name)
        found = self._async.get(record)
        if found is None:
            found = self._async[record] = AsyncInputModel[record]  # type: ignore[valid-type]
        return found

    def distinct(self) -> list[type[BaseModel]]:
        return list(dict.fromkeys([self.default, *self.per_model.values()]))


def _component_name(model: type[BaseModel]) -> str:
    return model.__name__.replace("[", "_").replace("]", "_").replace(",", "_").replace(" ", "")


def _request_body(models: Sequence[type[BaseModel]], array: bool = False) -> dict[str, Any]:
    refs = [{"$ref": f"#/components/schemas/{_component_name(m)}"} for m in models]
    schema: dict[str, Any] = refs[0] if len(refs) == 1 else {"oneOf": refs}
    if array:
        schema = {"type": "array", "items": schema}
    return {"requestBody": {
        "required": True,
        "description": "The record schema of the model ``?model_name=`` names (each entry validates its own).",
        "content": {"application/json": {"schema": schema}},
    }}  # fmt: skip


def _with_input_schemas(app: FastAPI, models: Sequence[type[BaseModel]]) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` that also lists each model entry's input schema (the routes read the raw body)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                found = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(found.pop("$defs", {}))
                components[_component_name(model)] = found
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def create_app(
    input_model: type[BaseModel],
    output_model: type[BaseModel],
    dependencies: Sequence[Callable[..., Any]] | None = None,
    router_dependency: Callable[..., Any] | None = None,
    sync_fn: SyncFn | None = None,
    async_fn: AsyncFn | None = None,
    *,
    batch_fn: Callable[[str, list[BaseModel]], Awaitable[list[InferenceOutputModel]]] | None = None,
    job_fn: Callable[[str], Awaitable[JobStatus]] | None = None,
    health_fn: Callable[[], bool | Exception] | None = None,
    default_model: str = "",
    input_models: Mapping[str, type[BaseModel]] | None = None,
    allowed_queues: Sequence[str] | None = None,
    max_body_bytes: int = 16 * 1024 * 1024,
    open_routes: Sequence[str] = ("/health",),
    metrics: HttpMetrics | None = None,
    title: str = "modalkit",
) -> FastAPI:
    """The FastAPI app serving a pipeline (the original modalkit's signature, plus keyword-only extensions).

    Args:
        input_model: The record schema of the request bodies (of the default model, and of any model
            ``input_models`` does not name).
        output_model: The output schema.
        dependencies: App-wide FastAPI dependencies.
        router_dependency: A dependency on every route but ``open_routes`` (the API-key check).
        sync_fn: ``await sync_fn(model_name, record)`` -> the output (a plain dict is answered as it is).
        async_fn: ``await async_fn(model_name, AsyncInputModel)`` -> ``AsyncOutputModel``.
        batch_fn: ``await batch_fn(model_name, records)`` -> one output per record; default: ``sync_fn`` per record.
        job_fn: ``await job_fn(job_id)`` -> ``JobStatus``; raises :class:`~modalkit.runners.online.UnknownJob`
            for an id never issued (404).
        health_fn: True when the model is loaded; ``/health`` answers 503 until then, and 503 with the error's body
            when it returns an exception (a broken device).
        default_model: The model when ``?model_name=`` is absent.
        input_models: The record schema of each model entry, by name (``?model_name=``).
        allowed_queues: Queues an async request may name (others: 403; an empty list: none). None (the default, as
            the original modalkit had it): any queue. ``create_web_endpoints`` and ``modalkit serve`` pass
            ``app_settings.queue_config.allowed_queues``.
        max_body_bytes: Larger bodies get 413.
        open_routes: Paths ``router_dependency`` does not guard.
        metrics: Where to count; a new registry by default.
    """
    metrics = metrics or HttpMetrics()
    app = FastAPI(
        title=title,
        dependencies=[Depends(d) for d in dependencies or ()],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind the key unless opened
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(_Counting, metrics=metrics, routes=app.routes)  # outermost: it counts the 413s too
    allowed = None if allowed_queues is None else set(allowed_queues)
    opened = set(open_routes)
    schemas = _Schemas(input_model, input_models or {})
    records = schemas.distinct()

    def guard(path: str) -> list[Any]:
        return [Depends(router_dependency)] if router_dependency is not None and path not in opened else []

    @app.post("/predict_sync", dependencies=guard("/predict_sync"), response_model=output_model,
              openapi_extra=_request_body(records), responses={422: {"description": "Invalid record"}})  # fmt: skip
    async def predict_sync(request: Request, model_name: str = Query(default_model)) -> Any:
        if sync_fn is None:
            return _error(404, "NotFound", "this app serves no synchronous calls")
        name = model_name or default_model
        message = _parse(schemas.record(name), await request.body())
        output = await sync_fn(name, message)
        if not isinstance(output, InferenceOutputModel):  # a dict or another model, as the original modalkit took
            body = _plain_body(output)
            return JSONResponse(body, status_code=422 if body.get("status") == "error" else 200)
        status, headers = http_status(output)
        return JSONResponse(outcome_body(output), status_code=status, headers=headers)

    @app.post("/predict_batch", dependencies=guard("/predict_batch"),
              openapi_extra=_request_body(records, array=True))  # fmt: skip
    async def predict_batch(request: Request, model_name: str = Query(default_model)) -> Any:
        # each item is validated on its own: a bad one gets its own error, in its place, and the others run
        name = model_name or default_model
        try:
            items = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise _BadBody("parse", "JSONDecodeError", f"the body is not JSON: {exc}") from None
        if not isinstance(items, list):
            raise _BadBody("validate", "ValidationError", "the body must be a JSON array of records")
        model = schemas.record(name)
        answers: list[dict[str, Any] | None] = [None] * len(items)
        valid: list[tuple[int, BaseModel]] = []
        for i, item in enumerate(items):
            try:
                valid.append((i, model.model_validate(item)))
            except ValidationError as exc:
                body = ErrorBody(stage="validate", error_type="ValidationError", error=describe_validation_error(exc))
                answers[i] = body.model_dump(mode="json")
        messages = [record for _, record in valid]
        outputs: Sequence[InferenceOutputModel | BaseModel | Mapping[str, Any]]
        if batch_fn is not None:
            outputs = await batch_fn(name, messages)
        elif sync_fn is not None:
            outputs = [await sync_fn(name, m) for m in messages]
        else:
            return _error(404, "NotFound", "this app serves no synchronous calls")
        for (i, _), output in zip(valid, outputs, strict=True):
            if isinstance(output, UnavailableOutput):  # no item's fault: the whole call is answered 503 or 500
                status, headers = http_status(output)
                return JSONResponse(error_body(output), status_code=status, headers=headers)
            answers[i] = outcome_body(output) if isinstance(output, InferenceOutputModel) else _plain_body(output)
        return JSONResponse(answers)

    @app.post("/predict_async", dependencies=guard("/predict_async"), response_model=AsyncOutputModel,
              openapi_extra=_request_body([AsyncInputModel[m] for m in records]))  # type: ignore[valid-type]  # fmt: skip
    async def predict_async(request: Request, model_name: str = Query(default_model)) -> Any:
        if async_fn is None:
            return _error(404, "NotFound", "this app serves no asynchronous calls")
        name = model_name or default_model
        job = _parse(schemas.async_request(name), await request.body())
        for queue in (job.success_queue, job.failure_queue):
            if queue and allowed is not None and queue not in allowed:
                raise _QueueNotAllowed(queue)
        return await async_fn(name, job)

    @app.get("/jobs/{job_id}", dependencies=guard("/jobs/{job_id}"), response_model=JobStatus,
             responses={404: {"description": "No job with this id was issued"}})  # fmt: skip
    async def job_status(job_id: str) -> Any:
        if job_fn is None:
            return _error(404, "NotFound", "this app keeps no jobs")
        return await job_fn(job_id)

    @app.get("/health", dependencies=guard("/health"))
    async def health() -> Any:
        state = health_fn() if health_fn is not None else True
        if isinstance(state, Exception):  # e.g. a broken device
            return _error(503, type(state).__name__, str(state), {"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ok" if state else "loading"}, status_code=200 if state else 503)

    @app.get("/metrics", dependencies=guard("/metrics"))
    async def prometheus() -> Response:
        return metrics.render()

    app.openapi = _with_input_schemas(app, [*records, *(AsyncInputModel[m] for m in records)])  # type: ignore[method-assign,valid-type]

    @app.get("/openapi.json", dependencies=guard("/openapi.json"), include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=guard("/docs"), include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{title} - docs")

    @app.get("/redoc", dependencies=guard("/redoc"), include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{title} - ReDoc")

    _error_handlers(app)
    app.state.metrics = metrics
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error a client sees as one :class:`~modalkit.iomodel.ErrorBody`, FastAPI's own ones included."""

    @app.exception_handler(_BadBody)
    async def bad_body(request: Request, exc: _BadBody) -> JSONResponse:
        return _error(422, exc.error_type, str(exc), stage=exc.stage)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
        return _error(422, "ValidationError", "; ".join(parts), stage="validate")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = HTTPStatus(exc.status_code).phrase if exc.status_code in HTTPStatus._value2member_map_ else "Error"
        return _error(exc.status_code, phrase.title().replace(" ", "").replace("-", ""), str(exc.detail),
                      dict(exc.headers or {}))  # fmt: skip

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        return _error(401, "Unauthorized", str(exc))

    @app.exception_handler(_QueueNotAllowed)
    async def forbidden(request: Request, exc: _QueueNotAllowed) -> JSONResponse:
        return _error(403, "QueueNotAllowed", f"queue {exc} is not in app_settings.queue_config.allowed_queues")

    @app.exception_handler(UnknownJob)
    async def unknown_job(request: Request, exc: UnknownJob) -> JSONResponse:
        return _error(404, "UnknownJob", str(exc))

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return _error(503, "Overloaded", str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(DeviceBroken)
    async def device_broken(request: Request, exc: DeviceBroken) -> JSONResponse:
        return _error(503, "DeviceBroken", str(exc), {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(TimedOut)
    async def timed_out(request: Request, exc: TimedOut) -> JSONResponse:
        return _error(504, "TimedOut", str(exc))

    @app.exception_handler(ConfigError)
    async def bad_request(request: Request, exc: ConfigError) -> JSONResponse:
        return _error(400, "ConfigError", str(exc))  # e.g. ?model_name= naming no model entry

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("request %s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return _error(500, type(exc).__name__, str(exc) or type(exc).__name__)


def create_web_endpoints(app_cls: Any, input_model: type[BaseModel], output_model: type[BaseModel]) -> FastAPI:
    """The app for a deployed Modal class (the original modalkit's helper): requests go to ``app_cls`` one record
    per call (Modal batches them), async ones are spawned (:mod:`modalkit.runners.modal_client`); auth, the default
    model, each entry's schema, the queue allowlist and the body limit from the class's ``modal_utils`` settings.

    A model entry that names its ``pipeline`` validates against that pipeline's ``input_model``; the default entry
    and the others against ``input_model``.
    """
    from modalkit.runners import modal_client

    utils = getattr(app_cls, "modal_utils", None)
    configured: dict[str, Any] = {}
    if utils is not None:  # the class's settings: auth, the default model, the queue allowlist, the body limit
        settings = utils.settings
        app_settings = settings.app_settings
        default_model = settings.model_settings.entry(None)[0]
        configured = {
            "router_dependency": api_key_dependency(app_settings.auth_config),
            "open_routes": app_settings.auth_config.open_routes,
            "default_model": default_model,
            "input_models": _declared_input_models(settings, skip=default_model),
            "allowed_queues": app_settings.queue_config.allowed_queues,
            "max_body_bytes": int(app_settings.batch_config.max_body_bytes),
        }
    return create_app(
        input_model=input_model,
        output_model=output_model,
        dependencies=[],
        sync_fn=modal_client.sync_call(app_cls),
        async_fn=modal_client.async_call(app_cls),
        job_fn=modal_client.job_status,
        **configured,
    )


def _declared_input_models(settings: Any, skip: str = "") -> dict[str, type[BaseModel]]:
    """The input model each model entry's pipeline declares (entries that name a pipeline that declares one)."""
    from modalkit.inference_pipeline import import_pipeline

    found: dict[str, type[BaseModel]] = {}
    for name, entry in settings.model_settings.model_entries.items():
        if name == skip or entry.pipeline is None:
            continue
        pipeline = import_pipeline(entry.pipeline, where=f"model_settings.model_entries.{name}.pipeline")
        if pipeline.input_model is not None:
            found[name] = pipeline.input_model
    return found


def api_key_dependency(auth: Any) -> ApiKeyAuth | None:
    """The API-key check for ``auth_config``: a static key, or one read from AWS SSM; None when neither is set."""
    if auth.api_key is not None:
        key = auth.api_key.get_secret_value()
        return ApiKeyAuth(auth.auth_header, lambda: (key,))
    if auth.ssm_key is not None:
        from modalkit.aws import SsmKey

        source = SsmKey(auth.ssm_key, auth.ssm_refresh_seconds)
        return ApiKeyAuth(auth.auth_header, source.valid_keys)
    return None
