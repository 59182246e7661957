"""A function run in a forked child process while this one goes on, its result (or its error) handed back.

``modalkit batch`` lists and plans its input this way: the listing is CPU work in Python (a ``stat`` per local
file, a piece per small file), done in a child while the command starts its first local worker; a plan that comes
at once lets the command fork its other workers before it starts importing Prefect in a thread (see
:mod:`modalkit.runners.local`), and a longer listing runs beside that import, on another core. What the child
returns comes back pickled through a pipe.

The child is killed when this process ends. Only on Linux, and only while this process runs no other thread
(forking a process with threads can copy a lock another thread holds); elsewhere, or when threads run, the
function runs here, in :meth:`Forked.result`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["Forked", "start_forked"]

T = TypeVar("T")


class Forked(Generic[T]):
    """A call started by :func:`start_forked`: :meth:`result` waits for it, :meth:`cancel` stops it."""

    def __init__(self, what: str, fn: Callable[..., T], args: tuple[Any, ...], threads_ok: bool = False) -> None:
        self.what = what
        self._fn, self._args = fn, args
        self.pid: int | None = None
        self._read = -1
        if sys.platform == "linux" and (threading.active_count() == 1 or threads_ok):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: run, send, leave without running this process's exit hooks
                os.close(read)
                _die_with_parent()
                _run_and_send(fn, args, write)
            os.close(write)
            self.pid, self._read = pid, read

    @property
    def forked(self) -> bool:
        """Whether the call runs in a child process (else :meth:`result` runs it here)."""
        return self.pid is not None

    def ready(self, timeout: float) -> bool:
        """Whether the child's answer is there (or it ended) within ``timeout`` seconds; :meth:`result` then returns
        at once. False for a call that runs here (it runs in :meth:`result`)."""
        if self._read < 0:
            return False
        readable, _, _ = select.select([self._read], [], [], timeout)
        return bool(readable)

    def result(self) -> T:
        """What the function returned; what it raised is raised here (a child that died says so)."""
        if self.pid is None:
            return self._fn(*self._args)
        chunks = []
        with os.fdopen(self._read, "rb") as pipe:
            self._read = -1
            while block := pipe.read(1 << 20):
                chunks.append(block)
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        if not chunks:
            raise RuntimeError(f"the process {self.what} ended without an answer ({_status(status)})")
        outcome, value = pickle.loads(b"".join(chunks))
        if outcome == "raised":
            raise value
        if outcome == "raised-unpicklable":
            raise _rebuilt(*value)
        return value

    def cancel(self) -> None:
        """Stop the child (if it still runs) and reap it."""
        if self._read >= 0:
            os.close(self._read)
            self._read = -1
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = None


def start_forked(what: str, fn: Callable[..., T], *args: Any, threads_ok: bool = False) -> Forked[T]:
    """Start ``fn(*args)`` in a forked child (see the module's docstring for when it runs here instead); ``what``
    says what it does, for the message when the child dies (``"planning the job"``). ``threads_ok``: fork even
    while other threads run, for a function that takes no lock another thread may hold."""
    return Forked(what, fn, args, threads_ok)


def _die_with_parent() -> None:
    """The child is killed when the thread that forked it ends: it was forked by the main thread, so when the
    process ends (a SIGKILLed command leaves no planning behind)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc's prctl: the child outlives a killed parent
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _run_and_send(fn: Callable[..., Any], args: tuple[Any, ...], write: int) -> None:
    code = 0
    try:
        try:
            payload = pickle.dumps(("returned", fn(*args)), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:  # every error goes back to the parent, which raises it
            payload = _error_payload(exc)
        with os.fdopen(write, "wb") as pipe:
            pipe.write(payload)
    except BaseException:  # a parent that stopped reading (cancelled): nothing to tell
        code = 1
    finally:
        os._exit(code)


def _error_payload(exc: BaseException) -> bytes:
    """``exc`` pickled, when it unpickles as itself; else its class and message (an error whose constructor takes
    other arguments than its message)."""
    exc.__traceback__ = None
    exc.__context__ = exc.__cause__ = None
    try:
        payload = pickle.dumps(("raised", exc), protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(payload)
        return payload
    except Exception:  # any failure to round-trip: send what rebuilds it
        value = (type(exc).__module__, type(exc).__qualname__, str(exc))
        return pickle.dumps(("raised-unpicklable", value), protocol=pickle.HIGHEST_PROTOCOL)


def _rebuilt(module: str, qualname: str, message: str) -> BaseException:
    """An error of the class the child raised, with its message (its constructor is not called)."""
    cls: Any = sys.modules.get(module)
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        return RuntimeError(message)
    exc = cls.__new__(cls)
    BaseException.__init__(exc, message)
    return exc


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
