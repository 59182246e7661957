"""Starting processes that a Ctrl-C or SIGTERM cannot cut in half, and that do not inherit Ctrl-C.

A spawn (multiprocessing's ``spawn`` start method) forks and execs the child, then writes it what to run through a
pipe. A signal that arrives meanwhile is handled (on the main thread) the moment the fork returns, before that
write: the handler's exception unwinds through it, the pipe is closed empty, and the child, already running, prints
``EOFError: Ran out of input`` with a traceback on the user's terminal. And a child started with Ctrl-C unblocked
gets the terminal's Ctrl-C too, and prints a ``KeyboardInterrupt`` traceback from wherever it was (importing,
loading a model). Whoever starts processes does it inside :func:`spawning`: the parent handles Ctrl-C and SIGTERM
and stops its children itself.

Example:
    >>> import multiprocessing
    >>> from modalkit.spawn_guard import spawning
    >>> with spawning():  # doctest: +SKIP
    ...     multiprocessing.get_context("spawn").Process(target=print).start()
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["spawning"]


@contextlib.contextmanager
def spawning() -> Iterator[None]:
    """Around anything that may start a process: on the main thread the SIGINT and SIGTERM handlers only note the
    signal while the block runs, and the handler that was installed gets it as the block ends, once the started
    process is whole and its owner knows it (and stops it); off the main thread no signal handler runs anyway.
    Processes started inside the block begin with SIGINT blocked (a signal mask is inherited across exec), until
    they unblock it themselves."""
    deferred: list[int] = []
    previous_handlers: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not None:  # None: a handler not installed from Python, left alone
                previous_handlers[signum] = signal.signal(signum, lambda received, _frame: deferred.append(received))
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        for installed, handler in previous_handlers.items():
            signal.signal(installed, handler)
        for received in dict.fromkeys(deferred):  # each signal once, in the order they came
            handler = previous_handlers[received]
            if callable(handler):
                handler(received, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(received)  # its default action (SIGTERM ends the process), now that it can
