"""One thread at a time in ``ast.parse`` on CPython 3.11.0-3.11.7 and 3.12.0, whose AST constructor counts its
recursion depth in state the threads share: two threads parsing at once can fail with ``SystemError: AST
constructor recursion depth mismatch`` (python/cpython#106905, fixed in 3.11.8 and 3.12.1).

Libraries call ``ast.parse`` where nobody expects it: ``inspect.signature`` of a builtin (Prefect and pydantic,
importing in one thread while the CLI works in another), NumPy reading a ``.npy`` header (``ast.literal_eval``,
in the threads that merge a job's id hashes). :func:`install` wraps ``ast.parse`` in a lock on those versions and
does nothing on the others; ``modalkit``'s command line and its worker processes call it as they start.
"""

from __future__ import annotations

import ast
import functools
import sys
import threading
from typing import Any

__all__ = ["affected", "install"]

_LOCK = threading.RLock()  # re-entrant: a parse that imports (and so parses) again must not wait on itself


def affected(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> bool:
    """Whether CPython ``version`` has the race (3.11.0-3.11.7, 3.12.0)."""
    return sys.implementation.name == "cpython" and ((3, 11, 0) <= version < (3, 11, 8) or version == (3, 12, 0))


def install() -> None:
    """Have ``ast.parse`` take a process-wide lock, on an affected interpreter (once; later calls do nothing)."""
    if not affected() or getattr(ast.parse, "__modalkit_guarded__", False):
        return
    parse = ast.parse

    @functools.wraps(parse)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return parse(*args, **kwargs)

    guarded.__modalkit_guarded__ = True  # type: ignore[attr-defined]
    ast.parse = guarded
