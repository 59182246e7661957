"""The local worker pool's processes: they live as long as the job's process, whichever of its threads started
them, and no longer.

Workers are spawned by whichever thread first submits work that finds no idle worker: the main thread, a lane,
the thread that starts a job's first chunks. Linux's ``PR_SET_PDEATHSIG`` fires when the spawning *thread* ends,
not its process: a worker spawned by a lane was killed when that lane ended, and one killed while it waited for
work held the pool's call-queue lock, so that the pool's other workers, and the job's close, waited forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from batch_support import write_config
from support import alive

from modalkit.runners.local import LocalRunner
from modalkit.settings import Settings


def worker_pids(runner: LocalRunner) -> list[int]:
    return list(getattr(runner._pool(), "_processes", None) or {})  # the stdlib keeps them there


def test_a_worker_started_by_a_thread_that_has_ended_lives_on_and_the_pool_closes(tmp_path: Path) -> None:
    settings = Settings.load(str(write_config(tmp_path)))
    runner = LocalRunner(settings, "sentiment", workers=2, start=False)
    try:
        started: list[int] = []  # a thread spawns a worker, waits until it has started and runs work, and ends
        spawner = threading.Thread(target=lambda: started.append(runner._pool().submit(os.getpid).result()))
        spawner.start()
        spawner.join()
        (pid,) = worker_pids(runner)
        assert started == [pid]
        time.sleep(1.0)

        assert alive(pid)
        assert runner._pool().submit(os.getpid).result(timeout=60) == pid  # and it still takes work
    finally:
        closing = threading.Thread(target=runner.close, daemon=True)
        closing.start()
        closing.join(timeout=60)
    assert not closing.is_alive(), "closing the pool hung"
    assert not alive(pid)


PARENT = """
import sys, time
from modalkit.runners.local import LocalRunner
from modalkit.settings import Settings

runner = LocalRunner(Settings.load(sys.argv[1]), "sentiment", workers=1)
time.sleep(1.0)
print(*(getattr(runner._pool(), "_processes", None) or {}), flush=True)
time.sleep(600)
"""


def test_a_worker_dies_within_seconds_of_its_job_process_killed_with_sigkill(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(config)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert parent.stdout is not None
        (pid,) = map(int, parent.stdout.readline().split())
        assert alive(pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), "a worker outlived its job's process"
