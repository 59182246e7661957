"""What ``modalkit serve`` runs: each model's pipeline behind a dynamic batcher, and async jobs through a durable
job store, on the same code path as a batch job's records (the isolated runner, the queue backends).

Async jobs: ``POST /predict_async`` writes the job to a SQLite file (``<queue_config.local_path>/jobs.sqlite``)
and answers its id; a background task runs queued jobs through the model's batcher and sends each result to the
request's success or failure queue with the job id as the message's dedup id, then marks the job done. A job
accepted before a crash (queued, or running when the process died) runs again when the server starts; a result
already sent before the crash is not delivered twice (the queue backend drops a repeated dedup id). A job the
device broke under (or that was still waiting when it broke) stays queued, with no record sent: the next start runs
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from modalkit.exceptions import DeviceError, QueueError
from modalkit.inference_pipeline import InferencePipeline, StageClock, load_pipeline
from modalkit.iomodel import AsyncInputModel, AsyncOutputModel, InferenceOutputModel, JobStatus
from modalkit.queues import QueueBackend, QueueMessage, create_backend, deliver
from modalkit.runners.batcher import DynamicBatcher
from modalkit.runners.online import DeviceBroken, UnknownJob, async_record, run_requests
from modalkit.settings import Settings

__all__ = ["JobStore", "LocalService"]

log = logging.getLogger(__name__)


class JobStore:
    """Async jobs in a SQLite file: accepted (queued), running, done (with the result) or failed (with the error)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an accepted job survives a power cut, not only a crash
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, model TEXT NOT NULL, request BLOB NOT NULL, "
            "status TEXT NOT NULL, result BLOB, error TEXT, created REAL NOT NULL, updated REAL NOT NULL)"
        )

    def add(self, model: str, request: bytes) -> str:
        job_id = uuid.uuid4().hex
        now = time.time()
        with self._lock:
            self._db.execute("INSERT INTO jobs VALUES (?, ?, ?, 'queued', NULL, NULL, ?, ?)",
                             (job_id, model, request, now, now))  # fmt: skip
        return job_id

    def unfinished(self) -> list[tuple[str, str, bytes]]:
        """Jobs accepted and not finished (queued, or running when the process stopped), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, model, request FROM jobs WHERE status IN ('queued', 'running') ORDER BY created"
            ).fetchall()
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def set(self, job_id: str, status: str, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        body = orjson.dumps(result) if result is not None else None
        with self._lock:
            self._db.execute("UPDATE jobs SET status = ?, result = ?, error = ?, updated = ? WHERE job_id = ?",
                             (status, body, error, time.time(), job_id))  # fmt: skip

    def get(self, job_id: str) -> JobStatus:
        """The job's state and its request's meta.

        Raises:
            UnknownJob: no job with this id was accepted here.
        """
        with self._lock:
            row = self._db.execute(
                "SELECT status, result, error, request FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        if row is None:
            raise UnknownJob(job_id)
        status, result, error, request = row
        meta = orjson.loads(request).get("meta") or {}
        return JobStatus(job_id=job_id, status=status, result=orjson.loads(result) if result else None, error=error,
                         meta=meta)  # fmt: skip

    def take_resume_lock(self) -> bool:
        """True for the one process (of those sharing this file) that resumes unfinished jobs; held until exit."""
        import fcntl

        self._resume_lock = open(f"{self.path}.resume.lock", "a")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self._resume_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._resume_lock.close()
            return False
        return True

    def close(self) -> None:
        with self._lock:
            self._db.close()


class LocalService:
    """The models ``modalkit serve`` answers for, each loaded once behind its own dynamic batcher.

    Args:
        settings: Loaded settings (batching, queues, the model entries).
        model_name: The default model (``?model_name=`` selects another entry); None = the settings' default.
        on_batch: Called with each batch's size (metrics).
        job_store: Where async jobs are kept; default ``<queue_config.local_path>/jobs.sqlite``.
        on_predict: Called after each batch with the seconds its ``predict`` took: the device busy (metrics).
    """

    def __init__(
        self,
        settings: Settings,
        model_name: str | None = None,
        on_batch: Callable[[int], None] | None = None,
        job_store: Path | None = None,
        on_predict: Callable[[float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.default_model = settings.model_settings.entry(model_name)[0]
        self.on_batch = on_batch
        self.on_predict = on_predict
        #: seconds spent loading the models loaded so far
        self.model_load_seconds = 0.0
        self._models: dict[str, tuple[InferencePipeline, DynamicBatcher]] = {}
        self._lock = threading.Lock()
        queue_config = settings.app_settings.queue_config
        self.jobs = JobStore(job_store or Path(queue_config.local_path) / "jobs.sqlite")
        self._backend: QueueBackend | None = create_backend(queue_config)
        self._job_tasks: set[asyncio.Task[None]] = set()
        self.ready = False
        #: why the device is broken (the server then answers 503 to everything); None while it works
        self.broken: str | None = None

    # --- models -----------------------------------------------------------------------------------------------

    def load(self, name: str | None = None) -> DynamicBatcher:
        """The batcher of model ``name`` (loading its pipeline the first time)."""
        name = name or self.default_model
        found = self._models.get(name)
        if found is not None:
            return found[1]
        with self._lock:
            found = self._models.get(name)
            if found is None:
                began = time.perf_counter()
                pipeline = load_pipeline(self.settings, name)
                self.model_load_seconds += time.perf_counter() - began
                batch = self.settings.app_settings.batch_config
                batcher = DynamicBatcher(
                    self._runner(pipeline), batch.max_batch_size, batch.wait_ms, batch.max_pending,
                    batch.request_timeout_s, self.on_batch,
                )  # fmt: skip
                found = (pipeline, batcher)
                self._models[name] = found
        return found[1]

    def input_model(self) -> type[BaseModel]:
        """The default model's input schema (the pipeline class must declare it)."""
        return self._pipeline_class().require_schemas()[0]

    def output_model(self) -> type[BaseModel]:
        return self._pipeline_class().require_schemas()[1]

    def input_models(self) -> dict[str, type[BaseModel]]:
        """Each model entry's input schema, by name (entries that name a pipeline declaring one): the body of a
        request for ``?model_name=NAME`` is validated against NAME's own."""
        found: dict[str, type[BaseModel]] = {}
        for name, entry in self.settings.model_settings.model_entries.items():
            if entry.pipeline is not None:
                declared = self._pipeline_class(name).input_model
                if declared is not None:
                    found[name] = declared
        return found

    def _pipeline_class(self, model_name: str | None = None) -> type[InferencePipeline]:
        from modalkit.inference_pipeline import import_pipeline

        name, entry = self.settings.model_settings.entry(model_name or self.default_model)
        if entry.pipeline is None:
            from modalkit.exceptions import ConfigError

            raise ConfigError(f"model_settings.model_entries.{name}.pipeline is not set: modalkit serve needs it")
        return import_pipeline(entry.pipeline, where=f"model_settings.model_entries.{name}.pipeline")

    def pending(self) -> int:
        """Requests waiting for a pipeline, over every model."""
        return sum(batcher.pending for _, batcher in self._models.values())

    def _runner(self, pipeline: InferencePipeline) -> Callable[[list[Any]], list[InferenceOutputModel]]:
        """A batch of records -> one output each, through the online core (errors as values)."""

        clock = StageClock()  # one batch at a time per model: no lock needed

        def run(records: list[Any]) -> list[InferenceOutputModel]:
            before = clock.seconds["predict"]
            outputs = run_requests(pipeline, records, self._device_broke, clock)
            if self.on_predict is not None:
                self.on_predict(clock.seconds["predict"] - before)
            return outputs

        return run

    def _device_broke(self, exc: DeviceError) -> None:
        log.error("the device is broken: /health answers 503 and so does every request until a restart")
        self.broken = str(exc)

    def health(self) -> bool | Exception:
        """True when the default model is loaded and the device works; the reason otherwise."""
        if self.broken is not None:
            return DeviceBroken(self.broken)
        return self.ready

    # --- requests ---------------------------------------------------------------------------------------------

    async def sync(self, model_name: str, record: BaseModel) -> InferenceOutputModel:
        if self.broken is not None:
            raise DeviceBroken(self.broken)
        outcome: InferenceOutputModel = await self.load(model_name).submit(record)
        return outcome

    async def batch(self, model_name: str, records: list[BaseModel]) -> list[InferenceOutputModel]:
        if self.broken is not None:
            raise DeviceBroken(self.broken)
        batcher = self.load(model_name)
        return list(await asyncio.gather(*(batcher.submit(r) for r in records)))

    async def submit_async(self, model_name: str, request: AsyncInputModel[Any]) -> AsyncOutputModel:
        """Accept an async job: durable once this returns; it runs in the background."""
        if self.broken is not None:
            raise DeviceBroken(self.broken)
        self.load(model_name)  # an unknown model fails the request now, not the job later
        job_id = self.jobs.add(model_name or self.default_model, request.model_dump_json().encode())
        self._spawn(job_id, model_name or self.default_model, request)
        return AsyncOutputModel(job_id=job_id)

    async def job(self, job_id: str) -> JobStatus:
        """The job's state (raises UnknownJob for an id never issued here)."""
        return self.jobs.get(job_id)

    def resume_jobs(self) -> int:
        """Run the jobs accepted before the last stop that did not finish; returns how many.

        With ``--workers N`` every server process starts at once and shares the job file: only the one that takes
        the resume lock runs the unfinished jobs, so none runs twice.
        """
        if not self.jobs.take_resume_lock():
            return 0
        unfinished = self.jobs.unfinished()
        for job_id, model, body in unfinished:
            request_model: Any = AsyncInputModel[self._input_for(model)]  # type: ignore[misc]
            self._spawn(job_id, model, request_model.model_validate_json(body))
        return len(unfinished)

    def _input_for(self, model: str) -> type[BaseModel]:
        self.load(model)
        return type(self._models[model][0]).require_schemas()[0]

    def _spawn(self, job_id: str, model: str, request: AsyncInputModel[Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._run_job(job_id, model, request))
        self._job_tasks.add(task)
        task.add_done_callback(self._job_tasks.discard)

    async def _run_job(self, job_id: str, model: str, request: AsyncInputModel[Any]) -> None:
        if self.broken is not None:
            return  # it stays queued: the next start, on a working device, runs it
        self.jobs.set(job_id, "running")
        try:
            output = await self.load(model).submit(request.message)
            if self.broken is not None:  # the device broke under this job: not the record's fault, nothing is sent
                log.error("async job %s stays queued: the device is broken; a restart runs it", job_id)
                self.jobs.set(job_id, "queued")
                return
            queue, body = async_record(job_id, output, request)
            if queue:
                if self._backend is None:
                    raise QueueError(f"the job names queue {queue!r} but queue_config.backend is none")
                await deliver(self._backend, queue, [QueueMessage(orjson.dumps(body).decode(), dedup_id=job_id)])
        except Exception as exc:  # the job failed to run or to deliver: it says so, it is not lost silently
            log.error("async job %s failed: %s: %s", job_id, type(exc).__name__, exc)
            self.jobs.set(job_id, "error", error=f"{type(exc).__name__}: {exc}")
            return
        if output.status == "success":
            self.jobs.set(job_id, "success", result=output.model_dump(mode="json"))
        else:
            self.jobs.set(job_id, "error", error=output.error)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait for the requests and jobs in flight (SIGTERM), at most ``timeout`` seconds."""
        end = time.monotonic() + timeout
        for _, batcher in list(self._models.values()):
            await batcher.drain(max(0.0, end - time.monotonic()))
        if self._job_tasks:
            await asyncio.wait(list(self._job_tasks), timeout=max(0.0, end - time.monotonic()))

    def close(self) -> None:
        for _, batcher in self._models.values():
            batcher.close()
        self.jobs.close()
        if self._backend is not None:
            with contextlib.suppress(Exception):
                close = getattr(self._backend, "close", None)
                if callable(close):
                    close()
