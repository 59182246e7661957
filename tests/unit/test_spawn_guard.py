"""A worker's spawn is not cut in half by Ctrl-C or SIGTERM: a signal that comes while the local runner may be
spawning (``spawning``) reaches the handler that was installed only once the block is done, so the spawned process
is whole and known to its pool (which stops it), and never prints multiprocessing's ``EOFError: Ran out of input``
traceback on the user's terminal (the half-written spawn that test_cli_lifecycle's SIGTERM test caught)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import pytest

from modalkit.spawn_guard import spawning


class Stopped(BaseException):
    pass


@pytest.fixture
def raising_sigterm() -> Iterator[list[int]]:
    seen: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        seen.append(signum)
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_during_a_spawn_reaches_the_installed_handler_only_once_the_spawn_is_done(
    raising_sigterm: list[int],
) -> None:
    steps = []

    def spawn() -> None:
        with spawning():
            signal.raise_signal(signal.SIGTERM)
            steps.append("after the signal")  # the spawn's write, in the real case

    with pytest.raises(Stopped):
        spawn()
    assert steps == ["after the signal"]
    assert raising_sigterm == [signal.SIGTERM]


def test_the_handlers_are_as_they_were_after_a_spawn(raising_sigterm: list[int]) -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with spawning():
        pass
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert raising_sigterm == []


def test_an_ignored_signal_stays_ignored_through_a_spawn() -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with spawning():
            signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_spawn_off_the_main_thread_leaves_the_handlers_alone(raising_sigterm: list[int]) -> None:
    installed = signal.getsignal(signal.SIGTERM)
    during = []

    def spawn() -> None:
        with spawning():
            during.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=spawn)
    thread.start()
    thread.join()
    assert during == [installed]
