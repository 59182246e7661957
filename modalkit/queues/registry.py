"""Building a backend by name: from ``app_settings.queue_config``, or by name with keyword arguments.

Built in: ``local`` (the embedded default), ``sqs``, ``memory``, and ``none`` (no backend). Register your own with
:func:`register_backend`, as a class (the original modalkit's form) or as a factory taking a ``QueueConfig``.

Example:
    >>> from modalkit.queues import create_backend, register_backend
    >>> class Printer:
    ...     async def send_message(self, queue_name: str, message: str) -> bool:
    ...         print(queue_name, message)
    ...         return True
    >>> register_backend("printer", Printer)
    >>> type(create_backend("printer")).__name__
    'Printer'
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from modalkit.exceptions import BackendError
from modalkit.queues.base import QueueBackend
from modalkit.queues.local import LocalQueueBackend
from modalkit.queues.memory import MemoryBackend
from modalkit.queues.sqs import SQSBackend

if TYPE_CHECKING:
    from modalkit.settings import QueueConfig

__all__ = ["BackendFactory", "create_backend", "register_backend"]

#: A registered backend: a class called with keyword arguments, or a factory called with the QueueConfig.
BackendFactory = type | Callable[["QueueConfig"], QueueBackend]

_REGISTRY: dict[str, BackendFactory] = {}


def _local(config: QueueConfig) -> QueueBackend:
    return LocalQueueBackend(config.local_path)


def _memory(config: QueueConfig) -> QueueBackend:
    return MemoryBackend.shared()


#: How each built-in backend is made from a QueueConfig (by name, its class takes the keyword arguments).
_BUILT_IN_FROM_CONFIG: dict[str, Callable[[QueueConfig], QueueBackend]] = {
    "local": _local,
    "memory": _memory,
    "sqs": SQSBackend.from_config,
}
_BUILT_IN_CLASSES: dict[str, type] = {"local": LocalQueueBackend, "memory": MemoryBackend, "sqs": SQSBackend}


def register_backend(name: str, backend_class: BackendFactory) -> None:
    """Make ``name`` a backend: ``queue_config.backend: <name>`` and ``create_backend(name, ...)`` build it.

    Args:
        name: The backend's name in configuration.
        backend_class: A class implementing :class:`~modalkit.queues.QueueBackend`, called with the keyword
            arguments of :func:`create_backend` (from a ``QueueConfig``: with the config's fields its constructor
            accepts); or a factory function called with the ``QueueConfig``.
    """
    _REGISTRY[name] = backend_class


def create_backend(config: QueueConfig | str, **kwargs: Any) -> QueueBackend | None:
    """The backend ``config`` names: a ``QueueConfig`` (``app_settings.queue_config``) or a backend name.

    ``create_backend("sqs", queue_url=...)`` builds the named class with the keyword arguments, as the original
    modalkit did; ``create_backend(queue_config)`` builds the configured backend. ``none`` gives None.

    Raises:
        BackendError: the name is neither built in nor registered, or the keywords do not fit the class (a
            :class:`~modalkit.exceptions.ConfigError` too).
    """
    if isinstance(config, str):
        return _by_name(config, kwargs)
    if kwargs:
        raise BackendError("create_backend(queue_config) takes no keyword arguments; set them in the QueueConfig")
    name = config.backend
    if name == "none":
        return None
    registered = _REGISTRY.get(name)
    if registered is None:
        built_in = _BUILT_IN_FROM_CONFIG.get(name)
        if built_in is None:
            raise _unknown(name)
        return built_in(config)
    if inspect.isclass(registered):
        return _construct(name, registered, _accepted(registered, config.model_dump()))
    return registered(config)


def _by_name(name: str, kwargs: dict[str, Any]) -> QueueBackend | None:
    if name == "none":
        return None
    registered = _REGISTRY.get(name) or _BUILT_IN_CLASSES.get(name)
    if registered is None:
        raise _unknown(name)
    if inspect.isclass(registered):
        return _construct(name, registered, kwargs)
    from modalkit.settings import QueueConfig

    return registered(QueueConfig(backend=name, **kwargs))


def _construct(name: str, cls: type, kwargs: dict[str, Any]) -> QueueBackend:
    try:
        backend: QueueBackend = cls(**kwargs)
    except TypeError as exc:
        raise BackendError(f"queue backend {name!r} ({cls.__qualname__}) cannot be built: {exc}") from exc
    return backend


def _accepted(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The ``values`` that ``cls``'s constructor takes (all of them when it takes ``**kwargs``)."""
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return values
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in values.items() if k in names}


def _unknown(name: str) -> BackendError:
    known = ", ".join(sorted({*_REGISTRY, *_BUILT_IN_CLASSES, "none"}))
    return BackendError(
        f"app_settings.queue_config.backend: unknown backend {name!r} (known: {known}); "
        "register yours with modalkit.task_queue.register_backend, or inject it with queue_backend=..."
    )
