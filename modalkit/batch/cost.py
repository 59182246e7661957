"""What a second of a container or a local worker costs: the settings' price table applied to a deployment.

``rate_for`` prices one Modal container (its GPU, CPU cores and memory, from ``deployment_config``, at
``app_settings.pricing``'s rates, or the deployment's own ``usd_per_hour``) or one local worker (its share of
``pricing.local_usd_per_hour``, 0 by default so that nothing invents a cost).

Example:
    >>> from modalkit.settings import Settings
    >>> s = Settings.load(data={"app_settings": {"deployment_config": {"gpu": "H100", "cpu": 4, "memory": 16384}}})
    >>> rate = rate_for(s, "modal")
    >>> round(rate.usd_per_second * 3600, 4)  # 3.9492 + 4 x 0.04716 + 16 x 0.007992
    4.2657
    >>> rate_for(s, "local").usd_per_second
    0.0
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from modalkit.exceptions import ConfigError
from modalkit.settings import Settings

__all__ = ["MODAL_DEFAULT_CPU", "MODAL_DEFAULT_MEMORY_MIB", "Rate", "gpu_usd_per_hour", "rate_for"]

#: What Modal reserves for a container that asks for nothing (and bills at least that).
MODAL_DEFAULT_CPU = 0.125
MODAL_DEFAULT_MEMORY_MIB = 128

#: Modal's other spellings of a GPU type in the table: a bare ``A100`` is the 40 GB one, ``A10`` is the A10G.
_ALIASES = {"A100": "A100-40GB", "A10": "A10G"}


@dataclass(frozen=True)
class Rate:
    """The price of one container (Modal) or one local worker, all its resources together.

    Attributes:
        usd_per_second: Dollars per second of it.
        gpu: The GPU type as configured (``"H100"``, ``"L4:2"``), or None for CPU only.
        cpu: CPU cores priced.
        memory_gib: GiB of memory priced.
        source: Where the figures came from, in one line.
    """

    usd_per_second: float
    gpu: str | None
    cpu: float
    memory_gib: float
    source: str

    @property
    def usd_per_hour(self) -> float:
        """Dollars per hour of it."""
        return self.usd_per_second * 3600.0


def rate_for(settings: Settings, backend: str, gpu: str | None = None) -> Rate:
    """The price of one container of ``settings``' deployment (``backend="modal"``) or one local worker.

    Args:
        settings: The loaded settings: ``app_settings.pricing`` and ``deployment_config`` (or ``job_config``'s
            ``local_workers``).
        backend: ``"modal"`` or ``"local"``.
        gpu: A GPU type that replaces the configured one (``modalkit estimate --gpu``); Modal only.

    Raises:
        ConfigError: the GPU type is not in ``app_settings.pricing.gpu_usd_per_hour`` (the message names the key and
            the known types), or the backend is unknown.
    """
    app = settings.app_settings
    pricing = app.pricing
    if backend == "local":
        workers = app.job_config.local_workers or max(1, os.cpu_count() or 1)
        return Rate(
            usd_per_second=pricing.local_usd_per_hour / 3600.0 / workers,
            gpu=None,
            cpu=(os.cpu_count() or 1) / workers,
            memory_gib=_machine_memory_gib() / workers,
            source=f"app_settings.pricing.local_usd_per_hour ({pricing.local_usd_per_hour:g} $/h) over {workers} "
            "local workers",
        )
    if backend != "modal":
        raise ConfigError(f"backend {backend!r} has no price: expected 'local' or 'modal'")
    deploy = app.deployment_config
    configured = deploy.gpu[0] if isinstance(deploy.gpu, list) else deploy.gpu  # a fallback list: its first choice
    chosen = gpu if gpu is not None else configured
    key = "gpu" if gpu is not None else "app_settings.deployment_config.gpu"
    cpu = deploy.cpu if deploy.cpu is not None else MODAL_DEFAULT_CPU
    memory_gib = (deploy.memory if deploy.memory is not None else MODAL_DEFAULT_MEMORY_MIB) / 1024
    if deploy.usd_per_hour is not None and (gpu is None or _same_gpu(gpu, configured)):
        return Rate(
            deploy.usd_per_hour / 3600.0,
            chosen,
            cpu,
            memory_gib,
            f"app_settings.deployment_config.usd_per_hour ({deploy.usd_per_hour:g} $/h)",
        )
    gpu_per_hour = gpu_usd_per_hour(settings, chosen, key=key) if chosen else 0.0
    per_hour = gpu_per_hour + cpu * pricing.cpu_core_usd_per_hour + memory_gib * pricing.memory_gib_usd_per_hour
    return Rate(per_hour / 3600.0, chosen, cpu, memory_gib, pricing.source)


def gpu_usd_per_hour(settings: Settings, gpu: str, *, key: str = "gpu") -> float:
    """Dollars per hour of the GPUs ``gpu`` names (``"L4:2"`` is two L4s), from the settings' price table.

    Raises:
        ConfigError: the type is not in the table; the message names ``key`` and the known types.
    """
    table = settings.app_settings.pricing.gpu_usd_per_hour
    name, count = _parse_gpu(gpu, key)
    name = name if name in table else _ALIASES.get(name, name)
    if name not in table:
        known = ", ".join(sorted(table))
        raise ConfigError(
            f"{key}: unknown GPU type {gpu!r}; app_settings.pricing.gpu_usd_per_hour prices {known} "
            "(add the type there with its $/hour)"
        )
    return table[name] * count


def _parse_gpu(gpu: str, key: str) -> tuple[str, int]:
    name, _, count = gpu.strip().partition(":")
    name = name.rstrip("!").upper()  # "H100!": an H100 that Modal may not upgrade; the same price
    if not count:
        return name, 1
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"{key}: {gpu!r} is not a GPU type with a count, e.g. 'L4:2'")
    return name, int(count)


def _same_gpu(a: str, b: str | None) -> bool:
    return b is not None and _parse_gpu(a, "gpu") == _parse_gpu(b, "gpu")


def _machine_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):  # not every platform says
        return 0.0
