"""The Modal client: the one seam where modalkit calls deployed Modal functions.

:class:`ModalChunkClient` looks the deployed batch worker class up by name (``modal.Cls.from_name``, lazily: no
network until the first chunk) and calls ``process_chunk.remote`` with a chunk *reference*; the container reads
and writes the data itself. Modal's errors become modalkit's (:func:`~modalkit.exceptions.modal_errors`). Tests
give ``cls_lookup`` an in-process stand-in with the same call surface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modalkit.exceptions import modal_errors
from modalkit.iomodel import ChunkResult, ChunkSpec, JobSpec
from modalkit.settings import Settings

__all__ = ["BATCH_WORKER_CLASS", "DEFAULT_MODAL_SLOTS", "ModalChunkClient", "ModalRunner"]

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
    """

    def __init__(
        self,
        app_name: str,
        model_name: str,
        class_name: str = BATCH_WORKER_CLASS,
        cls_lookup: Callable[[str, str], Any] | None = None,
    ) -> None:
        self.app_name = app_name
        self.model_name = model_name
        self.class_name = class_name
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
        """Call ``process_chunk.remote`` with the chunk reference; Modal errors become modalkit errors."""
        worker = self._remote_worker()
        with modal_errors(f"running chunk {chunk.index} ({chunk.key}) on Modal app {self.app_name!r}"):
            result = worker.process_chunk.remote(job.model_dump(mode="json"), chunk.model_dump(mode="json"))
        return ChunkResult.model_validate(result)

    def close(self) -> None:
        """Forget the looked-up class (a later chunk looks it up again)."""
        self._worker = None


class ModalRunner:
    """Chunks run on the deployed ``BatchWorker`` of the app the settings name; one Modal call per chunk.

    ``slots`` is ``deployment_config.max_containers`` (else :data:`DEFAULT_MODAL_SLOTS`): one chunk per container.
    """

    def __init__(self, settings: Settings, model_name: str, cls_lookup: Callable[[str, str], Any] | None = None):
        from modalkit.modal_config import ModalConfig

        self.client = ModalChunkClient(ModalConfig(settings).app_name, model_name, cls_lookup=cls_lookup)
        self.slots = settings.app_settings.deployment_config.max_containers or DEFAULT_MODAL_SLOTS

    def run_chunk(self, job: JobSpec, chunk: ChunkSpec) -> ChunkResult:
        return self.client.run_chunk(job, chunk)

    def close(self) -> None:
        self.client.close()

    def cancel(self) -> None:
        # a call in flight finishes (or is retried) on Modal's side; its chunk commits or is redone by the rerun
        self.client.close()
