"""The Modal client: the one seam where modalkit calls deployed Modal functions.

Batch: :class:`ModalChunkClient` looks the deployed batch worker class up by name (``modal.Cls.from_name``, lazily:
no network until the first chunk) and calls ``process_chunk.spawn`` with a chunk *reference*, then waits on the
call (``FunctionCall.get``) under the chunk's time limit (:mod:`modalkit.runners.deadline`): past it the call is
cancelled with its container (``cancel(terminate_containers=True)``) and the chunk is retried on another. The
container reads and writes the data itself. Modal's errors become modalkit's
(:func:`~modalkit.exceptions.modal_errors`). Tests give ``cls_lookup`` an in-process stand-in with the same call
surface.

Online: :func:`sync_call` and :func:`async_call` send one request to the deployed model class's ``process_request``
(``.remote.aio``, ``.spawn.aio``); :func:`job_status` looks a spawned call up by its id (``GET /jobs/{id}``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel

from modalkit.batch.layout import OutputLayout
from modalkit.exceptions import RemoteError, modal_errors
from modalkit.iomodel import (
    AsyncInputModel,
    AsyncOutputModel,
    ChunkResult,
    ChunkSpec,
    InferenceOutputModel,
    JobSpec,
    JobStatus,
    SyncInputModel,
)
from modalkit.runners.deadline import ChunkDeadline, ChunkTimedOut
from modalkit.runners.online import UnknownJob
from modalkit.settings import Settings

__all__ = [
    "BATCH_WORKER_CLASS",
    "DEFAULT_MODAL_SLOTS",
    "ModalChunkClient",
    "ModalRunner",
    "async_call",
    "job_status",
    "sync_call",
]

BATCH_WORKER_CLASS = "BatchWorker"
#: Chunks in flight on Modal when neither job_config.concurrency nor deployment_config.max_containers says.
DEFAULT_MODAL_SLOTS = 10


class ModalChunkClient:
    """Calls the deployed Modal batch worker class, looked up by name.

    Args:
        app_name: The deployed Modal app (``ModalConfig.app_name``).
        model_name: The model the workers load (the class's ``model_name`` parameter).
        class_name: The worker class's name in the app.
        cls_lookup: ``modal.Cls.from_name`` (the default), or a stand-in with the same signature.
        chunk_timeout_s: How long a chunk's call may run, from the call (its container's start included);
            ``job_config.chunk_timeout_s``, None: the adaptive limit of :class:`ChunkDeadline`.
    """

    def __init__(
        self,
        app_name: str,
        model_name: str,
        class_name: str = BATCH_WORKER_CLASS,
        cls_lookup: Callable[[str, str], Any] | None = None,
        chunk_timeout_s: float | None = None,
    ) -> None:
        self.app_name = app_name
        self.model_name = model_name
        self.class_name = class_name
        self.deadline = ChunkDeadline(chunk_timeout_s)
        self._lookup = cls_lookup
        self._worker: Any = None

    def _remote_worker(self) -> Any:
        if self._worker is None:
            lookup = self._lookup
            if lookup is None:
                import modal

                lookup = modal.Cls.from_name
            with modal_errors(f"looking up {self.class_name} in Modal app {self.app_name!r}"):
                self._worker = lookup(self.app_name, self.class_name)(model_name=self.model_name)
        return self._worker

    def run_chunk(self, job: JobSpec, chunk: ChunkSpec) -> ChunkResult:
        """Spawn ``process_chunk`` with the chunk reference and wait for it under the chunk's time limit.

        Raises:
            ChunkTimedOut: the call ran past the limit; it was cancelled and its container stopped (retryable).
            RemoteError, ConfigError: what Modal raised, translated.
        """
        import modal.exception

        worker = self._remote_worker()
        what = f"running chunk {chunk.index} ({chunk.key}) on Modal app {self.app_name!r}"
        with modal_errors(what):
            call = worker.process_chunk.spawn(job.model_dump(mode="json"), chunk.model_dump(mode="json"))
        called = time.time()

        def poll(seconds: float) -> Any:
            try:
                with modal_errors(what):
                    return call.get(timeout=seconds)
            except RemoteError as exc:
                cause = exc.__cause__
                expired = isinstance(cause, modal.exception.OutputExpiredError)
                if isinstance(cause, modal.exception.TimeoutError) and not expired:
                    raise TimeoutError(what) from None  # not done yet
                raise

        try:
            result = self.deadline.wait(poll, lambda: called, chunk)
        except ChunkTimedOut:
            with contextlib.suppress(Exception), modal_errors(f"cancelling chunk {chunk.index}"):
                call.cancel(terminate_containers=True)  # a hung container takes no more chunks
            raise
        _check_pieces(job, chunk, result, self.app_name)
        return ChunkResult.model_validate(result)

    def close(self) -> None:
        """Forget the looked-up class (a later chunk looks it up again)."""
        self._worker = None


class ModalRunner:
    """Chunks run on the deployed ``BatchWorker`` of the app the settings name; one Modal call per chunk.

    ``slots`` is ``deployment_config.max_containers`` (else :data:`DEFAULT_MODAL_SLOTS`): one chunk per container.
    """

    def __init__(
        self,
        settings: Settings,
        model_name: str,
        cls_lookup: Callable[[str, str], Any] | None = None,
        chunk_timeout_s: float | None = None,
    ):
        from modalkit.modal_config import ModalConfig

        self.client = ModalChunkClient(
            ModalConfig(settings).app_name, model_name, cls_lookup=cls_lookup, chunk_timeout_s=chunk_timeout_s
        )
        self.slots = settings.app_settings.deployment_config.max_containers or DEFAULT_MODAL_SLOTS

    def run_chunk(self, job: JobSpec, chunk: ChunkSpec) -> ChunkResult:
        return self.client.run_chunk(job, chunk)

    def close(self) -> None:
        self.client.close()

    def cancel(self) -> None:
        # a call in flight finishes (or is retried) on Modal's side; its chunk commits or is redone by the rerun
        self.client.close()


# --- online: the deployed model class (ModalService) -----------------------------------------------------------------


def sync_call(cls: Any) -> Callable[[str, BaseModel], Awaitable[InferenceOutputModel]]:
    """A function that runs one request on the deployed class ``cls`` and waits for its output."""

    async def fn(model_name: str, input_data: BaseModel) -> InferenceOutputModel:
        request = SyncInputModel[Any](message=input_data)
        result: InferenceOutputModel = await cls(model_name=model_name).process_request.remote.aio(request)
        return result

    return fn


def async_call(cls: Any) -> Callable[[str, BaseModel], Awaitable[AsyncOutputModel]]:
    """A function that spawns one async request on the deployed class ``cls`` and returns its job id at once."""

    async def fn(model_name: str, input_data: BaseModel) -> AsyncOutputModel:
        request = input_data if isinstance(input_data, AsyncInputModel) else AsyncInputModel(message=input_data)
        call = await cls(model_name=model_name).process_request.spawn.aio(request)
        return AsyncOutputModel(job_id=call.object_id)

    return fn


async def job_status(job_id: str, from_id: Callable[[str], Any] | None = None) -> JobStatus:
    """The state of the spawned call ``job_id`` (``modal.FunctionCall.from_id``, or a stand-in).

    Raises:
        UnknownJob: Modal knows no call with this id, or the id is not one.
    """
    import modal.exception

    if from_id is None:
        from_id = modal.FunctionCall.from_id
    try:
        call = from_id(job_id)
        result = await call.get.aio(timeout=0)
    except modal.exception.OutputExpiredError:  # a TimeoutError too: caught first
        return JobStatus(job_id=job_id, status="error", error="the job's result has expired")
    except TimeoutError:
        return JobStatus(job_id=job_id, status="running")
    except (modal.exception.NotFoundError, modal.exception.InvalidError) as exc:
        raise UnknownJob(job_id) from exc
    output = result[0] if isinstance(result, list) and result else result
    meta = dict(getattr(output, "meta", None) or {})
    if isinstance(output, InferenceOutputModel) and output.status == "error":
        return JobStatus(job_id=job_id, status="error", error=output.error, meta=meta)
    body = output.model_dump(mode="json") if isinstance(output, BaseModel) else output
    return JobStatus(job_id=job_id, status="success", result=body, meta=meta)


def _check_pieces(job: JobSpec, chunk: ChunkSpec, result: Any, app_name: str) -> None:
    """Refuse the result of a packed chunk that the deployed worker did not read whole: a worker of a modalkit
    version before packed chunks reads only its first file (and says nothing of ``pieces``)."""
    pieces = len(chunk.pieces())
    if pieces == 1 or (isinstance(result, dict) and result.get("pieces") == pieces):
        return
    raise RemoteError(
        f"the Modal app {app_name!r} read chunk {chunk.index} as one file, not the {pieces} files packed into it: it "
        f"was deployed with an earlier modalkit; redeploy it (modal deploy -m modalkit.modal_app), delete "
        f"{OutputLayout(job.output_uri).marker(chunk.index)}, and run the job again",
        retryable=False,
    )
