"""The server wiring of ``modalkit serve``: the local service (:mod:`modalkit.runners.serving`) behind the HTTP
routes (:mod:`modalkit.fast_api`), and its lifespan (load in the background, resume async jobs, drain on stop).

Beside the CLI, outside the routes module: the routes know no server; this module knows both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from modalkit.fast_api import HttpMetrics, api_key_dependency, create_app
from modalkit.runners.serving import LocalService
from modalkit.settings import Settings

__all__ = ["serve_app", "serve_app_from_env", "serve_workers"]

log = logging.getLogger(__name__)


def serve_app(settings: Settings, model_name: str | None = None) -> FastAPI:
    """The app ``modalkit serve`` runs: the local service (dynamic batcher per model, durable async jobs) behind
    the routes, with the settings' auth, open routes, body limit and queue allowlist.

    The default model loads in the background when the server starts (``/health`` answers 503 until it has);
    async jobs accepted before a crash run again; on shutdown (SIGTERM) requests and jobs in flight finish first.
    """
    metrics = HttpMetrics()
    service = LocalService(
        settings, model_name, on_batch=metrics.batch_size.observe, on_predict=metrics.device_seconds.inc
    )
    metrics.queue_depth.set_function(lambda: float(service.pending()))
    _count_cost(metrics, service, settings)
    app_settings = settings.app_settings
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
        input_models=service.input_models(),
        allowed_queues=app_settings.queue_config.allowed_queues,
        max_body_bytes=int(app_settings.batch_config.max_body_bytes),
        open_routes=app_settings.auth_config.open_routes,
        metrics=metrics,
        title=f"modalkit: {service.default_model}",
    )
    app.router.lifespan_context = _lifespan(service, app_settings.batch_config.request_timeout_s)
    app.state.service = service
    return app


def _count_cost(metrics: HttpMetrics, service: LocalService, settings: Settings) -> None:
    """The cost gauges: this process's seconds up (from its start), its models' load, its price (a local worker's,
    as batch jobs price one: ``app_settings.pricing.local_usd_per_hour`` shared among the local workers) and the
    dollars so far."""
    from modalkit.batch.cost import rate_for
    from modalkit.batch.worker_start import process_started_at

    started = process_started_at() or time.time()
    rate = rate_for(settings, "local")
    metrics.container_seconds.set_function(lambda: time.time() - started)
    metrics.model_load_seconds.set_function(lambda: service.model_load_seconds)
    metrics.price.set(rate.usd_per_hour)
    metrics.cost.set_function(lambda: (time.time() - started) * rate.usd_per_second)


def _lifespan(service: LocalService, drain_timeout: float) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
            await service.drain(timeout=drain_timeout)
            starting.cancel()
            service.close()

    return lifespan


def serve_app_from_env() -> FastAPI:
    """``serve_app`` for each process of ``modalkit serve --workers N`` (uvicorn's factory): the settings the usual
    way (``MODALKIT_CONFIG``), the default model from ``MODALKIT_SERVE_MODEL``."""
    return serve_app(Settings.load(), os.environ.get("MODALKIT_SERVE_MODEL") or None)


def serve_workers(host: str, port: int, workers: int) -> None:
    """Run ``workers`` server processes (``serve_app_from_env`` in each) until SIGTERM or Ctrl-C, and return only
    once every process this started is gone.

    uvicorn joins its workers, but multiprocessing's resource tracker (a child of this process too, started with
    them) exits only when it sees this process's end of its pipe close, which is at exit: it would outlive the
    server by a moment. It is stopped (and waited for) here instead.
    """
    import uvicorn

    try:
        uvicorn.run("modalkit.serve_app:serve_app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning", timeout_graceful_shutdown=30)  # fmt: skip
    finally:
        _stop_resource_tracker()


def _stop_resource_tracker() -> None:
    from multiprocessing import resource_tracker

    stop = getattr(resource_tracker._resource_tracker, "_stop", None)  # CPython's own way to close and reap it
    if callable(stop):
        stop()
