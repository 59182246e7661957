"""Where chunks run: the local worker pool, or the deployed Modal batch worker.

Both take a chunk *reference* (``JobSpec`` + ``ChunkSpec``) and return its counts. :class:`ModalChunkClient` is
the one seam where modalkit calls deployed Modal functions: it looks the worker class up by name
(``modal.Cls.from_name``) and calls ``process_chunk.remote``. Tests replace ``cls_lookup`` with an in-process
stand-in that has the same call surface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from modalkit.exceptions import modal_errors
from modalkit.iomodel import ChunkResult, ChunkSpec, JobSpec
from modalkit.settings import Settings

__all__ = ["ChunkBackend", "LocalBackend", "ModalChunkClient", "open_backend"]

BATCH_WORKER_CLASS = "BatchWorker"
#: How the Modal worker class is looked up: ``modal.Cls.from_name`` when None. Tests put an in-process stand-in
#: with the same call surface here; nothing else should.
modal_cls_lookup: Callable[[str, str], Any] | None = None


class ChunkBackend(Protocol):
    """Runs chunks somewhere and reports their counts."""

    def run_chunk(self, job: JobSpec, chunk: ChunkSpec) -> ChunkResult:
        """Process one chunk; blocks until it is done."""
        ...

    def close(self) -> None:
        """Release workers and connections."""
        ...


class LocalBackend:
    """Chunks run in a pool of local worker processes (the embedded default)."""

    def __init__(self, settings: Settings, model_name: str, workers: int | None = None) -> None:
        from modalkit.local import LocalWorkerPool

        self.pool = LocalWorkerPool(settings, model_name, workers)
        self.pool.start()

    def run_chunk(self, job: JobSpec, chunk: ChunkSpec) -> ChunkResult:
        return self.pool.run_chunk(job, chunk)

    def close(self) -> None:
        self.pool.close()


class ModalChunkClient:
    """Chunks run on the deployed Modal batch worker class, looked up by name.

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
            lookup = self._lookup or modal_cls_lookup
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
        self._worker = None


def open_backend(
    kind: str,
    settings: Settings,
    model_name: str,
    *,
    workers: int | None = None,
    cls_lookup: Callable[[str, str], Any] | None = None,
) -> ChunkBackend:
    """The backend named ``kind`` ("local" or "modal")."""
    if kind == "modal":
        from modalkit.modal_config import ModalConfig

        return ModalChunkClient(ModalConfig(settings).app_name, model_name, cls_lookup=cls_lookup)
    return LocalBackend(settings, model_name, workers)
