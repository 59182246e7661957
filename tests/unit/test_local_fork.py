"""How the local runner starts a worker process: forked while the starting process runs no other thread (the
worker starts with what it imported), spawned while one runs (forking then could copy a lock that thread holds).
A forked worker starts with its parent's signal handlers, which while processes start only note a signal
(:mod:`modalkit.spawn_guard`): a SIGTERM sent the moment it starts must still stop it, as the pool stops workers so.
Each case runs in a fresh interpreter, so that no thread of the test session is running beside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

STARTS = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time
    from pathlib import Path

    from modalkit.runners.local import _ForkWhileAlone
    from modalkit.spawn_guard import spawning

    def note(path):
        Path(path).write_text(json.dumps("xml.dom.minidom" in sys.modules))

    def stay():
        time.sleep(60)

    def main(out):
        import xml.dom.minidom  # imported here only: a forked child has it, a spawned one does not
        context = _ForkWhileAlone()
        child = context.Process(target=note, args=(os.path.join(out, "alone"),))
        child.start(); child.join()
        stop = threading.Event()
        beside = threading.Thread(target=stop.wait)
        beside.start()
        child = context.Process(target=note, args=(os.path.join(out, "beside"),))
        child.start(); child.join()
        stop.set(); beside.join()
        with spawning():  # as the runner starts its workers: this process only notes a signal meanwhile
            child = context.Process(target=stay)
            child.start()
            os.kill(child.pid, signal.SIGTERM)
        child.join(20)
        alive = child.is_alive()
        if alive:
            child.kill()
        Path(out, "stopped").write_text(json.dumps([alive, child.exitcode]))
    """
)


@pytest.fixture
def started(tmp_path: Path) -> dict[str, object]:
    (tmp_path / "starts.py").write_text(STARTS, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", f"import starts; starts.main({str(tmp_path)!r})"], cwd=tmp_path, env=env,
                   check=True, timeout=60)  # fmt: skip
    return {name: json.loads((tmp_path / name).read_text()) for name in ("alone", "beside", "stopped")}


def test_a_worker_started_while_no_other_thread_runs_is_forked_with_what_its_parent_imported(
    started: dict[str, object],
) -> None:
    assert started["alone"] is True


def test_a_worker_started_while_another_thread_runs_is_spawned(started: dict[str, object]) -> None:
    assert started["beside"] is False


def test_a_sigterm_the_moment_a_forked_worker_starts_stops_it(started: dict[str, object]) -> None:
    assert started["stopped"] == [False, -15]
