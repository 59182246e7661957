"""The HTTP face of a pipeline: routes, auth, error mapping, body limits and metrics (FastAPI).

``create_app`` has the original modalkit's signature; ``create_web_endpoints`` builds it for a deployed Modal class.
``modalkit serve`` builds it over the local dynamic batcher (:mod:`modalkit.runners.serving`).

Routes: ``POST /predict_sync`` (one record), ``POST /predict_batch`` (a list: each item its own result or error, in
order, HTTP 200), ``POST /predict_async`` (returns ``job_id``), ``GET /jobs/{job_id}``, ``GET /health`` (open: 200
only when the model is loaded), ``GET /metrics`` (Prometheus text, open). ``?model_name=`` selects a model entry.
Errors: a body that fails the input model or is not JSON, 422 with the field errors; a body over
``batch_config.max_body_bytes``, 413 before it is read; a record the pipeline fails on, 422 with ``stage``,
``error_type`` and ``error`` (in ``/predict_batch``, only its own item); a queue off ``allowed_queues``, 403; a full
batcher, 503 with ``Retry-After``; a request that waited past its timeout, 504; a missing or wrong key, 401. No stack
trace ever reaches a client.
"""

# no ``from __future__ import annotations``: FastAPI reads the routes' annotations, which are models made at run time
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from modalkit.exceptions import ConfigError
from modalkit.iomodel import (
    AsyncInputModel,
    AsyncOutputModel,
    InferenceOutputModel,
    JobStatus,
    describe_validation_error,
)
from modalkit.runners.batcher import Overloaded, TimedOut
from modalkit.runners.online import RETRY_AFTER_S, DeviceBroken, UnavailableOutput, error_body, http_status

__all__ = ["ApiKeyAuth", "BodyLimit", "HttpMetrics", "create_app", "create_web_endpoints", "outcome_body"]

log = logging.getLogger(__name__)

SyncFn = Callable[[str, BaseModel], Awaitable[InferenceOutputModel]]
AsyncFn = Callable[[str, Any], Awaitable[AsyncOutputModel]]


class HttpMetrics:
    """Prometheus metrics of one app, in a registry of its own: requests by route and status, latency, batch
    sizes, queue depth."""

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


#: The paths metrics name; any other path counts as "other" (a label per unknown path would grow without bound).
_ROUTES = frozenset(
    {"/predict_sync", "/predict_batch", "/predict_async", "/health", "/metrics", "/docs", "/openapi.json"}
)


class _Counting:
    """ASGI middleware counting requests by route and status, and their latency (plain ASGI: cheap per request)."""

    def __init__(self, app: Any, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope.get("path", "")
        route = "/jobs/{job_id}" if path.startswith("/jobs/") else path if path in _ROUTES else "other"
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


def _too_large(max_bytes: int) -> JSONResponse:
    return JSONResponse(
        {"status": "error", "error_type": "PayloadTooLarge", "error": f"the request body is over {max_bytes} bytes"},
        status_code=413,
    )


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


def outcome_body(output: InferenceOutputModel) -> dict[str, Any]:
    """The JSON of an output: its fields on success; the error body (``status``, ``stage``, ``error_type``,
    ``error``) on failure."""
    if output.status == "error":
        return error_body(output)
    return output.model_dump(mode="json", exclude_none=False)


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
    allowed_queues: Sequence[str] | None = None,
    max_body_bytes: int = 16 * 1024 * 1024,
    metrics: HttpMetrics | None = None,
    title: str = "modalkit",
) -> FastAPI:
    """The FastAPI app serving a pipeline (the original modalkit's signature, plus keyword-only extensions).

    Args:
        input_model: The record schema of the request bodies (OpenAPI shows it).
        output_model: The output schema.
        dependencies: App-wide FastAPI dependencies.
        router_dependency: A dependency on the prediction and job routes (the API-key check); not on ``/health``
            and ``/metrics``.
        sync_fn: ``await sync_fn(model_name, record)`` -> the output.
        async_fn: ``await async_fn(model_name, AsyncInputModel)`` -> ``AsyncOutputModel``.
        batch_fn: ``await batch_fn(model_name, records)`` -> one output per record; default: ``sync_fn`` per record.
        job_fn: ``await job_fn(job_id)`` -> ``JobStatus``.
        health_fn: True when the model is loaded; ``/health`` answers 503 until then, and 503 with the error's body
            when it returns an exception (a broken device).
        default_model: The model when ``?model_name=`` is absent.
        allowed_queues: Queues an async request may name (others: 403).
        max_body_bytes: Larger bodies get 413.
        metrics: Where to count; a new registry by default.
    """
    metrics = metrics or HttpMetrics()
    app = FastAPI(title=title, dependencies=[Depends(d) for d in dependencies or ()])
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(_Counting, metrics=metrics)  # outermost: it counts the 413s too
    allowed = set(allowed_queues or ())
    router = APIRouter(dependencies=[Depends(router_dependency)] if router_dependency else [])
    async_model = AsyncInputModel[input_model]  # type: ignore[valid-type]

    @router.post("/predict_sync", response_model=output_model, responses={422: {"description": "Invalid record"}})
    async def predict_sync(message: input_model, model_name: str = Query(default_model)) -> Any:  # type: ignore[valid-type]
        if sync_fn is None:
            return JSONResponse({"error": "this app serves no synchronous calls"}, status_code=404)
        output = await sync_fn(model_name or default_model, message)
        status, headers = http_status(output)
        return JSONResponse(outcome_body(output), status_code=status, headers=headers)

    items_schema = {"type": "array", "items": {"$ref": f"#/components/schemas/{input_model.__name__}"}}

    @router.post(
        "/predict_batch",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": items_schema}}}},
    )
    async def predict_batch(messages: Annotated[list[Any], Body()], model_name: str = Query(default_model)) -> Any:
        # each item is validated on its own: a bad one gets its own error, in its place, and the others run
        name = model_name or default_model
        answers: list[dict[str, Any] | None] = [None] * len(messages)
        valid: list[tuple[int, BaseModel]] = []
        for i, item in enumerate(messages):
            try:
                valid.append((i, input_model.model_validate(item)))
            except ValidationError as exc:
                answers[i] = {"status": "error", "stage": "validate", "error_type": "ValidationError",
                              "error": describe_validation_error(exc)}  # fmt: skip
        records = [record for _, record in valid]
        if batch_fn is not None:
            outputs = await batch_fn(name, records)
        elif sync_fn is not None:
            outputs = [await sync_fn(name, m) for m in records]
        else:
            return JSONResponse({"error": "this app serves no synchronous calls"}, status_code=404)
        for (i, _), output in zip(valid, outputs, strict=True):
            if isinstance(output, UnavailableOutput):  # no item's fault: the whole call is answered 503 or 500
                status, headers = http_status(output)
                return JSONResponse(error_body(output), status_code=status, headers=headers)
            answers[i] = outcome_body(output)
        return JSONResponse(answers)

    @router.post("/predict_async", response_model=AsyncOutputModel)
    async def predict_async(request: async_model, model_name: str = Query(default_model)) -> Any:
        if async_fn is None:
            return JSONResponse({"error": "this app serves no asynchronous calls"}, status_code=404)
        for queue in (request.success_queue, request.failure_queue):
            if queue and queue not in allowed:
                raise _QueueNotAllowed(queue)
        return await async_fn(model_name or default_model, request)

    @router.get("/jobs/{job_id}", response_model=JobStatus)
    async def job_status(job_id: str) -> Any:
        if job_fn is None:
            return JSONResponse({"error": "this app keeps no jobs"}, status_code=404)
        return await job_fn(job_id)

    @app.get("/health")
    async def health() -> Any:
        state = health_fn() if health_fn is not None else True
        if isinstance(state, Exception):  # e.g. a broken device
            return JSONResponse(
                {"status": "error", "stage": None, "error_type": type(state).__name__, "error": str(state)},
                status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
            )  # fmt: skip
        return JSONResponse({"status": "ok" if state else "loading"}, status_code=200 if state else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return metrics.render()

    app.include_router(router)
    _error_handlers(app)
    app.state.metrics = metrics
    return app


def _error_handlers(app: FastAPI) -> None:
    def error(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"status": "error", "error_type": error_type, "error": message}, status, headers=headers)

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        return error(401, "Unauthorized", str(exc))

    @app.exception_handler(_QueueNotAllowed)
    async def forbidden(request: Request, exc: _QueueNotAllowed) -> JSONResponse:
        return error(403, "QueueNotAllowed", f"queue {exc} is not in app_settings.queue_config.allowed_queues")

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return error(503, "Overloaded", str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(DeviceBroken)
    async def device_broken(request: Request, exc: DeviceBroken) -> JSONResponse:
        return error(503, "DeviceBroken", str(exc), {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(TimedOut)
    async def timed_out(request: Request, exc: TimedOut) -> JSONResponse:
        return error(504, "TimedOut", str(exc))

    @app.exception_handler(ConfigError)
    async def bad_request(request: Request, exc: ConfigError) -> JSONResponse:
        return error(400, "ConfigError", str(exc))  # e.g. ?model_name= naming no model entry

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("request %s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return error(500, type(exc).__name__, str(exc) or type(exc).__name__)


def create_web_endpoints(app_cls: Any, input_model: type[BaseModel], output_model: type[BaseModel]) -> FastAPI:
    """The app for a deployed Modal class (the original modalkit's helper): requests go to ``app_cls`` one record
    per call (Modal batches them), async ones are spawned; auth from the class's ``modal_utils`` settings."""
    from modalkit.modal_service import ModalService

    utils = getattr(app_cls, "modal_utils", None)
    configured: dict[str, Any] = {}
    if utils is not None:  # the class's settings: auth, the default model, the queue allowlist, the body limit
        app_settings = utils.settings.app_settings
        configured = {
            "router_dependency": api_key_dependency(app_settings.auth_config),
            "default_model": utils.settings.model_settings.entry(None)[0],
            "allowed_queues": app_settings.queue_config.allowed_queues,
            "max_body_bytes": int(app_settings.batch_config.max_body_bytes),
        }
    return create_app(
        input_model,
        output_model,
        sync_fn=ModalService.sync_call(app_cls),
        async_fn=ModalService.async_call(app_cls),
        job_fn=_modal_job_status,
        **configured,
    )


async def _modal_job_status(job_id: str) -> JobStatus:
    import modal

    try:
        call = modal.FunctionCall.from_id(job_id)
        result = await call.get.aio(timeout=0)
    except TimeoutError:
        return JobStatus(job_id=job_id, status="running")
    except modal.exception.OutputExpiredError:
        return JobStatus(job_id=job_id, status="error", error="the job's result has expired")
    except modal.exception.NotFoundError:
        return JobStatus(job_id=job_id, status="error", error="unknown job")
    output = result[0] if isinstance(result, list) and result else result
    if isinstance(output, InferenceOutputModel) and output.status == "error":
        return JobStatus(job_id=job_id, status="error", error=output.error)
    body = output.model_dump(mode="json") if isinstance(output, BaseModel) else output
    return JobStatus(job_id=job_id, status="success", result=body)


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


def serve_app(settings: Any, model_name: str | None = None) -> FastAPI:
    """The app ``modalkit serve`` runs: the local service (dynamic batcher per model, durable async jobs) behind
    the routes above, with the settings' auth, body limit and queue allowlist.

    The default model loads in the background when the server starts (``/health`` answers 503 until it has);
    async jobs accepted before a crash run again; on shutdown (SIGTERM) requests and jobs in flight finish first.
    """
    import asyncio
    import contextlib

    from modalkit.runners.serving import LocalService

    metrics = HttpMetrics()
    service = LocalService(settings, model_name, on_batch=metrics.batch_size.observe)
    metrics.queue_depth.set_function(lambda: float(service.pending()))
    app_settings = settings.app_settings

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        loading = asyncio.get_running_loop().run_in_executor(None, service.load)

        async def ready() -> None:
            await loading
            service.ready = True
            resumed = service.resume_jobs()
            if resumed:
                log.warning("running %d async jobs accepted before the last stop", resumed)

        starting = asyncio.create_task(ready())
        try:
            yield
        finally:
            await service.drain(timeout=app_settings.batch_config.request_timeout_s)
            starting.cancel()
            service.close()

    app = create_app(
        service.input_model(),
        service.output_model(),
        router_dependency=api_key_dependency(app_settings.auth_config),
        sync_fn=service.sync,
        async_fn=service.submit_async,
        batch_fn=service.batch,
        job_fn=service.job,
        health_fn=service.health,
        default_model=service.default_model,
        allowed_queues=app_settings.queue_config.allowed_queues,
        max_body_bytes=int(app_settings.batch_config.max_body_bytes),
        metrics=metrics,
        title=f"modalkit: {service.default_model}",
    )
    app.router.lifespan_context = lifespan
    app.state.service = service
    return app


def serve_app_from_env() -> FastAPI:
    """``serve_app`` for each process of ``modalkit serve --workers N`` (uvicorn's factory): the settings the usual
    way (``MODALKIT_CONFIG``), the default model from ``MODALKIT_SERVE_MODEL``."""
    import os

    from modalkit.settings import Settings

    return serve_app(Settings.load(), os.environ.get("MODALKIT_SERVE_MODEL") or None)
