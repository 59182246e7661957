"""ModalService: the online model class, written the way the original modalkit's docs show.

Subclass it under ``@app.cls(**modal_config.get_app_cls_settings())``; modalkit adds the ``@modal.batched``
``process_request`` method when the subclass is defined, with ``max_batch_size``/``wait_ms`` from the subclass's
``modal_utils`` (so nothing is read when modalkit is imported). The pipeline is built once per container in
``load_artefacts`` (``@modal.enter``); each request gets its own outcome through the isolated runner, and async
requests get a success or failure record on their queues.

Example:
    >>> import modal
    >>> from modalkit.modal_config import ModalConfig
    >>> from modalkit.modal_service import ModalService
    >>> from modalkit.settings import Settings
    >>> modal_config = ModalConfig(Settings.load(data={"model_settings": {"model_entries": {
    ...     "sentiment": {"pipeline": "modalkit.examples.sentiment:SentimentPipeline"}}}}))
    >>> app = modal.App(name=modal_config.app_name)
    >>> @app.cls(**modal_config.get_app_cls_settings())
    ... class Sentiment(ModalService):
    ...     model_name: str = modal.parameter(default="sentiment")
    ...     modal_utils: ModalConfig = modal_config
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from types import MethodType
from typing import TYPE_CHECKING, Any, ClassVar

import modal
import orjson
from pydantic import BaseModel

from modalkit.exceptions import DeviceError, QueueError
from modalkit.fast_api import create_web_endpoints  # the original modalkit's docs import it from here
from modalkit.inference_pipeline import FailedOutput, InferencePipeline, load_pipeline
from modalkit.iomodel import (
    AsyncInputModel,
    AsyncOutputModel,
    InferenceOutputModel,
    SyncInputModel,
)
from modalkit.modal_config import ModalConfig, VolumeReloader
from modalkit.queues import QueueBackend, create_backend, deliver_sync
from modalkit.runners import modal_client
from modalkit.runners.online import async_record, run_requests
from modalkit.settings import BatchConfig
from modalkit.task_queue import send_response_queue  # the original modalkit's module offered it here

__all__ = [
    "BatchWorker",
    "FailedOutput",
    "ModalService",
    "create_web_endpoints",
    "replace_container",
    "send_response_queue",
]

log = logging.getLogger(__name__)


def _init_service(self: ModalService, queue_backend: QueueBackend | None = None) -> None:
    """Set the injected queue backend (None keeps the class's, or the configured one)."""
    if queue_backend is not None:
        self.queue_backend = queue_backend


class _InitHiddenFromModal:
    """``ModalService.__init__``: ``object.__init__`` when read on the class, :func:`_init_service` on an instance.

    Modal 1.x refuses an ``@app.cls`` class unless ``cls.__init__ == object.__init__`` (an inherited ``__init__``
    counts), because it builds instances with ``cls.__new__`` and never calls one. Python calls ``__init__``
    through the instance (``MyService(...)``, ``super().__init__(...)``), so there it is the original modalkit's
    ``__init__(queue_backend=None)``; read on the class, it is ``object.__init__``, which is what runs under Modal.
    """

    def __get__(self, instance: object, owner: type | None = None) -> Callable[..., None]:
        if instance is None:
            return object.__init__
        return MethodType(_init_service, instance)


class ModalService:
    """Base class of the online model class: loads the pipeline once per container and serves batches.

    Attributes:
        model_name: The model to serve (a key of ``model_settings.model_entries``); usually a ``modal.parameter``.
        inference_implementation: The pipeline class; may be omitted when the model entry names ``pipeline``.
        modal_utils: The app's :class:`ModalConfig`; its settings give the batching and the model entry.
        queue_backend: Where async results go; None uses ``app_settings.queue_config``.

    ``MyService(queue_backend=backend)``, or ``super().__init__(queue_backend=backend)`` in a subclass's own
    ``__init__``, injects a backend outside Modal, as in the original modalkit; the ``queue_backend`` class attribute
    works everywhere. Modal 1.x refuses an ``@app.cls`` class whose ``__init__`` is not ``object.__init__`` and
    builds its instances without calling one, so ``ModalService.__init__`` is seen as ``object.__init__`` on the
    class (see :class:`_InitHiddenFromModal`); a subclass that writes its own ``__init__`` cannot be an
    ``@app.cls`` class.
    """

    model_name: str
    inference_implementation: ClassVar[type[InferencePipeline] | None] = None
    modal_utils: ModalConfig
    queue_backend: QueueBackend | None = None

    if TYPE_CHECKING:

        def __init__(self, queue_backend: QueueBackend | None = None) -> None: ...

    else:
        __init__ = _InitHiddenFromModal()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "process_request" in cls.__dict__:
            return  # the subclass wrote its own
        utils = getattr(cls, "modal_utils", None)
        defaults = BatchConfig()
        batching = (
            utils.get_batched_method_settings()
            if isinstance(utils, ModalConfig)
            else {"max_batch_size": defaults.max_batch_size, "wait_ms": defaults.wait_ms}
        )

        process_request = _own_copy(ModalService.process_request, cls)
        cls.process_request = modal.batched(**batching)(process_request)  # type: ignore[method-assign,assignment]

    @modal.enter()
    def load_artefacts(self) -> None:
        """Build the pipeline for ``model_name`` (once per container) and set up volume reloading."""
        utils = self._utils()
        self._model_inference_instance: InferencePipeline = load_pipeline(
            utils.settings, self.model_name, type(self).inference_implementation
        )
        self._reloader: VolumeReloader = utils.volume_reloader()

    def _utils(self) -> ModalConfig:
        # the instance's own modal_utils first (an app may set it per instance), then the class's
        utils = getattr(self, "modal_utils", None)
        if utils is None:
            utils = ModalConfig()
            self.modal_utils = utils
        return utils

    @property
    def pipeline(self) -> InferencePipeline:
        """The loaded pipeline (after ``load_artefacts``)."""
        return self._model_inference_instance

    # the original modalkit's names for the volume reload state; apps written for it may read them, or move the last
    # reload back to have the next batch reload
    @property
    def _reload_interval(self) -> float | None:
        """Seconds between volume reloads (``volume_reload_interval_seconds``); None: never."""
        return self._reloader.interval

    @property
    def _last_reload_time(self) -> float:
        """When the volumes were last reloaded (``time.time()`` seconds; at first, when the container started)."""
        return self._reloader.last

    @_last_reload_time.setter
    def _last_reload_time(self, value: float) -> None:
        self._reloader.last = value

    def _reload_volumes_if_needed(self) -> None:
        if self._reloader.maybe_reload():
            try:
                self._model_inference_instance.on_volume_reload()
            except Exception:
                log.exception("on_volume_reload failed; serving with the models already loaded")

    def _process_request(
        self, input_list: list[SyncInputModel[Any] | AsyncInputModel[Any]]
    ) -> list[InferenceOutputModel]:
        """Run a batch of requests through the online core (:mod:`modalkit.runners.online`, as ``modalkit serve``
        does); each gets its own output, ``status="error"`` for those that failed.

        Async requests also get a record on their success or failure queue; a record that cannot be delivered
        turns that request's output into an error saying so (it is never dropped silently). A broken device fails
        the whole batch (503) and has Modal replace the container.
        """
        self._reload_volumes_if_needed()
        outputs = run_requests(
            self._model_inference_instance, [item.message for item in input_list], lambda _: replace_container()
        )
        for idx, (item, output) in enumerate(zip(input_list, outputs, strict=True)):
            if isinstance(item, AsyncInputModel):
                output.meta = dict(item.meta)
                try:
                    self.send_async_response(idx, output, item)
                except QueueError as exc:
                    log.error("async result %d was not delivered: %s", idx, exc)
                    outputs[idx] = InferenceOutputModel(status="error", error=f"result not delivered: {exc}")
        return outputs

    def process_request(
        self, input_list: list[SyncInputModel[Any] | AsyncInputModel[Any]]
    ) -> list[InferenceOutputModel]:
        """Process a batch of requests: one output per request, in order (``_process_request`` does the work).

        Each subclass gets a copy of this as its ``@modal.batched`` method, named as its own.
        """
        return self._process_request(input_list)

    def _queue_backend(self) -> QueueBackend | None:
        if self.queue_backend is not None:
            return self.queue_backend
        if not hasattr(self, "_configured_backend"):
            self._configured_backend = create_backend(self._utils().app_settings.queue_config)
        return self._configured_backend

    def send_async_response(
        self, message_idx: int, raw_output_data: InferenceOutputModel, input_data: AsyncInputModel[Any]
    ) -> None:
        """Send one async result to its success or failure queue (skipped when that queue is not named).

        The job id is the Modal function call's id (``"local"`` outside a container); the record id is
        ``meta["record_id"]``, else the job id (:func:`~modalkit.runners.online.async_record`). Modal 1.x tells a
        batched method only the first call id of its batch: async requests that Modal batched together share it,
        so give each a ``meta.record_id`` when records must be told apart.

        Raises:
            QueueError: the record could not be delivered.
        """
        job_id = modal.current_function_call_id() or "local"
        queue, body = async_record(job_id, raw_output_data, input_data)
        if not queue:
            return
        backend = self._queue_backend()
        if backend is None:
            raise QueueError(f"request {message_idx} names queue {queue!r} but queue_config.backend is none")
        deliver_sync(backend, queue, [orjson.dumps(body).decode()])

    @staticmethod
    def sync_call(cls: Any) -> Callable[[str, BaseModel], Awaitable[InferenceOutputModel]]:
        """A function that runs one request on the deployed class and waits for its output
        (:func:`modalkit.runners.modal_client.sync_call`).

        Example:
            >>> sync_fn = ModalService.sync_call(MyApp)  # doctest: +SKIP
            >>> await sync_fn("sentiment", TextIn(text="great"))  # doctest: +SKIP
        """
        return modal_client.sync_call(cls)

    @staticmethod
    def async_call(cls: Any) -> Callable[[str, BaseModel], Awaitable[AsyncOutputModel]]:
        """A function that spawns one async request on the deployed class and returns its job id at once
        (:func:`modalkit.runners.modal_client.async_call`)."""
        return modal_client.async_call(cls)


def _own_copy(method: Callable[..., Any], cls: type) -> Callable[..., Any]:
    """``method`` as a function of ``cls``'s own (its ``__qualname__``), for Modal to register on that class."""
    import types

    copy = types.FunctionType(method.__code__, method.__globals__, method.__name__, method.__defaults__,
                              method.__closure__)  # fmt: skip
    copy.__qualname__ = f"{cls.__qualname__}.{method.__name__}"
    copy.__doc__ = method.__doc__
    copy.__annotations__ = dict(method.__annotations__)
    copy.__module__ = method.__module__
    return copy


def replace_container() -> None:
    """Have Modal stop sending inputs to this container, so that it is replaced (after a device failure).

    Outside a Modal container (a local run, ``.local()``) there is nothing to replace; that is logged.
    """
    import modal.experimental

    try:
        modal.experimental.stop_fetching_inputs()
    except RuntimeError as exc:  # "Must be called from within a Modal container."
        log.warning("not in a Modal container, so it cannot be replaced: %s", exc)


class BatchWorker:
    """Base of the Modal class that runs batch-job chunks: one chunk reference per call, counts back.

    Subclass it under ``@app.cls(**modal_config.get_batch_worker_cls_settings())`` with ``model_name`` (a
    ``modal.parameter``) and ``modal_utils``; ``modalkit/modal_app.py`` does exactly that. The container loads the
    pipeline once (``@modal.enter``) and reads and writes S3 itself: the data never travels through the caller.

    A container runs the same executor as a local worker (stages overlapped, ``preprocess`` in host processes
    sized by ``deployment_config.cpu``) and takes one chunk at a time: it is not ``@modal.concurrent``. Modal runs
    the concurrent inputs of a class on threads of their own, so two chunks would call ``predict`` from two
    threads at once (the executor keeps it on the one thread that loaded the model, as CUDA contexts and streams
    expect, and one batch at a time on the device), and would share the container's host processes, which answer
    one chunk's sub-batches in order. What concurrency could buy is the device's idle time at a chunk boundary
    (the part file's upload, the queue records and the marker, then the next chunk's first sub-batches): a
    fraction of a second against a chunk of ``chunk_size`` (32 MiB by default: seconds to minutes of device
    time). Larger chunks shrink it further without a second thread on the device.
    """

    model_name: str
    inference_implementation: ClassVar[type[InferencePipeline] | None] = None
    modal_utils: ModalConfig

    @modal.enter()
    def load_worker(self) -> None:
        """Build the pipeline and the queue backend, once per container, and start its host processes
        (``job_config.host_workers``; empty = the container's ``deployment_config.cpu`` less one)."""
        from modalkit.batch.chunk import ChunkProcessor
        from modalkit.batch.host_pool import default_host_workers
        from modalkit.batch.worker_start import WorkerStart

        settings = self.modal_utils.settings
        app = settings.app_settings
        host_workers = app.job_config.host_workers or default_host_workers(app.deployment_config.cpu or 1)
        start = WorkerStart.measure(
            lambda: load_pipeline(settings, self.model_name, type(self).inference_implementation)
        )
        self._processor = ChunkProcessor(start.value, create_backend(app.queue_config), host_workers=host_workers,
                                         cpus=app.deployment_config.cpu)  # fmt: skip
        self._processor.started(start)

    @modal.method()
    def process_chunk(self, job: dict[str, Any], chunk: dict[str, Any]) -> dict[str, Any]:
        """Process one chunk (given as the JSON forms of JobSpec and ChunkSpec); returns the ChunkResult's."""
        from modalkit.iomodel import ChunkSpec, JobSpec

        try:
            spec = ChunkSpec.model_validate(chunk)
            result = self._processor.process(JobSpec.model_validate(job), spec)
        except DeviceError:
            replace_container()  # the flow retries the chunk (nothing was committed) on another container
            raise
        # "pieces": the files this worker read, so that the flow can tell a worker of a version before packed chunks
        # (which would read only a packed chunk's first file) from this one
        return {**result.model_dump(mode="json"), "pieces": len(spec.pieces())}
