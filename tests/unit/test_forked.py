"""A function run in a forked child (``modalkit batch`` plans its input this way while its first worker starts).

pytest's process may run threads that earlier tests left (Prefect's, a server's): these tests fork with
``threads_ok`` (their functions take no lock), and the function that kills its process checks it is the child."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from modalkit.exceptions import ConfigError
from modalkit.forked import start_forked


def _pid_and(value: int) -> tuple[int, int]:
    return os.getpid(), value * 2


def test_the_function_runs_in_another_process_and_its_result_comes_back() -> None:
    call = start_forked("doubling", _pid_and, 21, threads_ok=True)
    assert call.forked
    pid, value = call.result()
    assert (value, pid != os.getpid()) == (42, True)


def _raise_config() -> None:
    raise ConfigError("model_settings.model_entries.x.pipeline is not set")


def test_an_error_of_the_child_is_raised_here_with_its_class_and_message() -> None:
    call = start_forked("planning", _raise_config, threads_ok=True)
    with pytest.raises(ConfigError, match=r"model_entries\.x\.pipeline is not set"):
        call.result()


class _Picky(ConfigError):
    def __init__(self, message: str, where: int) -> None:  # unpickles badly: pickle calls it with the message only
        super().__init__(f"{message} at {where}")


def _raise_picky() -> None:
    raise _Picky("bad line", 7)


def test_an_error_that_does_not_unpickle_keeps_its_class_and_message() -> None:
    with pytest.raises(_Picky, match="bad line at 7"):
        start_forked("planning", _raise_picky, threads_ok=True).result()


def _die(parent: int) -> None:
    if os.getpid() != parent:  # never this test's own process
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_child_that_dies_is_an_error_naming_what_it_did_and_the_signal() -> None:
    with pytest.raises(
        RuntimeError, match=r"the process planning the job ended without an answer \(killed by signal 9\)"
    ):
        start_forked("planning the job", _die, os.getpid(), threads_ok=True).result()


def test_cancel_kills_a_child_that_still_runs_and_reaps_it() -> None:
    call = start_forked("sleeping", time.sleep, 60, threads_ok=True)
    pid = call.pid
    assert pid is not None
    call.cancel()
    with pytest.raises(ChildProcessError):  # reaped: no zombie left behind
        os.waitpid(pid, os.WNOHANG)


@contextlib.contextmanager
def another_thread() -> Iterator[None]:
    """Another thread runs in this process inside the block."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        yield
    finally:
        stop.set()
        other.join()


def test_with_another_thread_running_the_function_runs_here_when_its_result_is_asked_for() -> None:
    with another_thread():
        call = start_forked("doubling", _pid_and, 2)
        assert not call.forked
        assert call.result() == (os.getpid(), 4)


def _after(seconds: float) -> str:
    time.sleep(seconds)
    return "planned"


def test_ready_says_whether_the_answer_is_there_within_the_wait_and_result_then_returns_it() -> None:
    call = start_forked("planning slowly", _after, 1.0, threads_ok=True)
    try:
        assert call.ready(0.05) is False  # still running
        assert call.ready(20.0) is True
        assert call.result() == "planned"
    finally:
        call.cancel()


def test_ready_is_false_for_a_call_that_runs_here() -> None:
    with another_thread():
        call = start_forked("doubling", _pid_and, 2)
        assert call.ready(0.0) is False
        assert call.result() == (os.getpid(), 4)
