"""Where chunks run: the local worker pool, or the deployed Modal batch worker (through the Modal client seam).

The batch engine (:mod:`modalkit.batch`) knows neither; the flow gets a :class:`ChunkRunner` from a
:data:`RunnerFactory`, by default :func:`open_runner`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modalkit.runners.base import ChunkRunner, RunnerFactory
from modalkit.settings import JobConfig, Settings

__all__ = ["ChunkRunner", "RunnerFactory", "open_runner"]


def open_runner(
    settings: Settings,
    model_name: str,
    job_config: JobConfig,
    *,
    modal_lookup: Callable[[str, str], Any] | None = None,
) -> ChunkRunner:
    """The runner ``job_config.backend`` names: ``local`` (started now) or ``modal`` (connects on first chunk).

    Args:
        settings: Loaded settings (the workers load the model from them).
        model_name: The model the workers load.
        job_config: The job's parameters: ``backend``, ``local_workers`` and ``chunk_timeout_s``.
        modal_lookup: How the deployed worker class is found; default ``modal.Cls.from_name``. Tests pass an
            in-process stand-in with the same call surface.
    """
    if job_config.backend == "modal":
        from modalkit.runners.modal_client import ModalRunner

        return ModalRunner(settings, model_name, cls_lookup=modal_lookup, chunk_timeout_s=job_config.chunk_timeout_s)
    from modalkit.runners.local import LocalRunner

    return LocalRunner(settings, model_name, job_config.local_workers, chunk_timeout_s=job_config.chunk_timeout_s)
