"""``modalkit batch`` from start to stop, as a terminal runs it: with no Prefect API configured, Ctrl-C, SIGTERM.

With no ``PREFECT_API_URL`` the command starts one local Prefect server in its own session and every later run
reuses it; ``modalkit prefect status|stop`` show and stop it, and it stops itself once idle. Ctrl-C (SIGINT to the
whole process group, as a terminal sends it) and SIGTERM stop a job within seconds with one line and exit 130 or
143, leaving no process of the job behind; running the same command again resumes. The managed server of the
module lives in a temporary MODALKIT_HOME and is stopped by its pid at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from batch_support import duplicates, read_failures, read_parts, write_config
from support import alive, free_port, running, stop_daemon, stop_process

TESTS_DIR = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A MODALKIT_HOME for the module's managed Prefect server; whatever server it holds is stopped by pid after."""
    root = tmp_path_factory.mktemp("modalkit-home")
    yield root
    info = root / "prefect" / "server.json"
    if info.exists():
        stop_daemon(int(json.loads(info.read_text())["pid"]))


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # no Prefect API configured
    path = os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(MODALKIT_HOME=str(home), PYTHONPATH=path, COLUMNS="200", **extra)
    return env


def run(cwd: Path, env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modalkit.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip


def write_reviews(folder: Path, n: int, filler: int = 0) -> None:
    folder.mkdir(parents=True)
    texts = ["Absolutely love it, great value", "Terrible, it broke after a day", "It is fine, nothing special"]
    with (folder / "reviews.jsonl").open("w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"r{i:06d}", "text": f"{texts[i % 3]} (review {i}) " + "so " * filler}) + "\n")


def server_info(home: Path) -> dict[str, Any]:
    return dict(json.loads((home / "prefect" / "server.json").read_text()))


def test_without_a_prefect_api_the_first_run_starts_a_local_server_the_next_reuses_it_and_its_ui_uses_its_api(
    home: Path, tmp_path: Path
) -> None:
    write_reviews(tmp_path / "in", 10)
    config = write_config(tmp_path)
    env = cli_env(home)

    first = run(tmp_path, env, "batch", "in", "out-1", "--config", str(config), "--json")
    server = server_info(home)
    second = run(tmp_path, env, "batch", "in", "out-2", "--config", str(config), "--json")

    assert first.returncode == 0, first.stderr
    assert "starting a local Prefect server for modalkit" in first.stderr
    assert second.returncode == 0, second.stderr
    assert "starting a local Prefect server" not in second.stderr  # found running, reused
    assert server_info(home) == server
    assert alive(server["pid"])
    for proc in (first, second):
        assert json.loads(proc.stdout.splitlines()[-1])["records"] == 10
        assert "Traceback" not in proc.stderr
    status = run(tmp_path, env, "prefect", "status")
    assert status.returncode == 0
    assert f"running: http://127.0.0.1:{server['port']}" in status.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/ui-settings", timeout=10) as reply:
        assert json.loads(reply.read())["api_url"] == server["api_url"]  # the UI shows this server's runs


def test_modalkit_prefect_stop_stops_the_local_server(home: Path, tmp_path: Path) -> None:
    env = cli_env(home)
    write_reviews(tmp_path / "in", 5)
    assert run(tmp_path, env, "batch", "in", "out", "--config", str(write_config(tmp_path))).returncode == 0
    server = server_info(home)

    stopped = run(tmp_path, env, "prefect", "stop")

    assert stopped.returncode == 0
    assert f"stopped the local Prefect server at {server['api_url']}" in stopped.stdout
    assert not alive(server["pid"])
    assert not (home / "prefect" / "server.json").exists()
    assert "no local Prefect server is running" in run(tmp_path, env, "prefect", "status").stdout


def test_the_local_server_stops_itself_once_no_run_has_used_it_for_the_idle_time(home: Path, tmp_path: Path) -> None:
    env = cli_env(home, MODALKIT_PREFECT_IDLE_SECONDS="4")
    run(tmp_path, env, "prefect", "stop")  # the next run starts a server with this idle time
    write_reviews(tmp_path / "in", 5)
    assert run(tmp_path, env, "batch", "in", "out", "--config", str(write_config(tmp_path))).returncode == 0
    server = server_info(home)

    deadline = time.monotonic() + 90  # the watcher stops the server, then removes its server.json
    while (alive(server["pid"]) or (home / "prefect" / "server.json").exists()) and time.monotonic() < deadline:
        time.sleep(0.5)

    assert not alive(server["pid"])
    assert not (home / "prefect" / "server.json").exists()
    assert "stopping the Prefect server" in (home / "prefect" / "server.log").read_text()


@pytest.fixture(scope="module")
def users_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A user's own ``prefect server start`` on a free loopback port; yields its API URL."""
    root = tmp_path_factory.mktemp("users-prefect")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(root / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    with open(root / "server.log", "wb") as log:
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (root / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the user's Prefect server did not start"
            time.sleep(0.5)
        yield api
    finally:
        stop_process(server, timeout=30)


def flow_runs_with_output(api: str, output_uri: str) -> list[Any]:
    """The flow runs the Prefect server at ``api`` recorded whose ``output_uri`` parameter is ``output_uri``."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    return [run for run in runs if run.parameters.get("output_uri") == output_uri]


@pytest.mark.parametrize(
    ("file", "table"),
    [("prefect.toml", "[api]"), ("pyproject.toml", "[tool.prefect.api]")],
    ids=["prefect.toml", "pyproject"],
)
def test_a_prefect_api_url_set_in_prefect_toml_or_pyproject_is_used_and_no_local_server_is_started(
    users_server: str, tmp_path: Path, file: str, table: str
) -> None:
    own_home = tmp_path / "home"  # a MODALKIT_HOME of its own: a managed server would leave its files here
    (tmp_path / file).write_text(f'{table}\nurl = "{users_server}"\n', encoding="utf-8")
    write_reviews(tmp_path / "in", 5)
    out = str(tmp_path / "out")

    proc = run(tmp_path, cli_env(own_home), "batch", "in", out, "--config", str(write_config(tmp_path)), "--json")

    assert proc.returncode == 0, proc.stderr
    assert "starting a local Prefect server" not in proc.stderr
    assert not (own_home / "prefect").exists()  # modalkit's managed server was never started
    runs = flow_runs_with_output(users_server, out)
    assert [run.state_type.value for run in runs] == ["COMPLETED"]  # the run is recorded on the user's server
    assert runs[0].name.startswith("batch-inference/sentiment/")


def test_a_configured_prefect_api_that_does_not_answer_fails_in_one_line_before_any_work(
    home: Path, tmp_path: Path
) -> None:
    write_reviews(tmp_path / "in", 5)
    env = {**cli_env(home), "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # nothing listens on port 9

    proc = run(tmp_path, env, "batch", "in", "out", "--config", str(write_config(tmp_path)), "--json")

    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: the Prefect API at http://127.0.0.1:9/api does not answer; start that server, or unset "
        "PREFECT_API_URL to let modalkit run a local one"
    ]
    assert not (tmp_path / "out").exists()


def test_a_local_server_that_cannot_start_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    broken_home = tmp_path / "home"
    (broken_home / "prefect").mkdir(parents=True)
    (broken_home / "prefect" / "home").write_text("a file where the server's home folder must go")
    write_reviews(tmp_path / "in", 5)

    proc = run(tmp_path, cli_env(broken_home), "batch", "in", "out", "--config", str(write_config(tmp_path)))

    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith("error: could not start a local Prefect server (it exited; its log: ")
    assert errors[0].endswith("set PREFECT_API_URL to a running Prefect server (e.g. `prefect server start`) and run "
                              "the command again")  # fmt: skip
    assert "Traceback" not in proc.stderr


def group_of(pgid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True, check=False).stdout
    pids = [int(p) for p in out.split()]
    return [p for p in pids if _state(p) not in ("Z", "")]  # a zombie is gone, only not yet reaped by init


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_the_job_s_process_group_stops_it_in_seconds_with_one_line_and_a_rerun_resumes(
    home: Path, tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    write_reviews(tmp_path / "in", 100_000, filler=20)  # about 15 MB: 58 chunks of 256KiB
    config = write_config(tmp_path, job_config={"chunk_size": "256KiB", "local_workers": 2})
    args = ["batch", "in", "out", "--config", str(config), "--id-field", "id", "--json"]
    env = cli_env(home)
    # a terminal's foreground job: its own process group, SIGINT not ignored
    proc = subprocess.Popen([sys.executable, "-m", "modalkit.cli", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    markers = tmp_path / "out" / "_chunks"
    deadline = time.monotonic() + 120
    while not (markers.exists() and any(p.name.endswith(".json") and "progress" not in p.name
                                        for p in markers.iterdir())):  # fmt: skip
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no chunk committed in 120 s"
        time.sleep(0.05)
    assert len(group_of(proc.pid)) >= 3  # the command and its workers

    os.killpg(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=60)

    assert proc.returncode == code, stderr
    assert stdout == ""
    assert stderr.strip().splitlines()[-1] == "interrupted; run the same command to resume"
    assert "Traceback" not in stderr
    assert group_of(proc.pid) == []  # no worker (nor anything else of the job) outlived it
    committed = len([p for p in markers.iterdir() if "progress" not in p.name])
    assert committed < 58  # it stopped before the end

    again = run(tmp_path, env, *args)

    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.splitlines()[-1])
    assert summary["chunks_skipped"] >= 1
    ids = [r["record_id"] for r in read_parts(str(tmp_path / "out"))]
    ids += [r["record_id"] for r in read_failures(str(tmp_path / "out"))]
    assert duplicates(ids) == {}
    assert len(ids) == summary["records"] == 100_000


def env_with_sitecustomize(home: Path, tmp_path: Path, code: str, **extra: str) -> dict[str, str]:
    """The command's environment with ``code`` run as ``sitecustomize`` at the start of every Python process."""
    spy = tmp_path / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(code, encoding="utf-8")
    env = cli_env(home, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(spy), env["PYTHONPATH"]])
    return env


LISTING_SPY = """
import os

if os.environ.get("LISTING_SPY_DIR"):
    from fsspec.implementations.local import LocalFileSystem

    _ls = LocalFileSystem.ls

    def ls(self, path, detail=True, **kwargs):
        if os.path.abspath(self._strip_protocol(path)) == os.environ["LISTING_SPY_DIR"]:
            with open(os.environ["LISTING_SPY_LOG"], "a") as log:
                log.write(f"{os.getpid()}\\n")
        return _ls(self, path, detail=detail, **kwargs)

    LocalFileSystem.ls = ls

    _scandir = os.scandir

    def scandir(path="."):
        if isinstance(path, str) and os.path.abspath(path) == os.environ["LISTING_SPY_DIR"]:
            with open(os.environ["LISTING_SPY_LOG"], "a") as log:
                log.write(f"{os.getpid()}\\n")
        return _scandir(path)

    os.scandir = scandir
"""


def test_a_job_lists_its_input_once(home: Path, tmp_path: Path) -> None:
    # every listing of the input folder (fsspec's find, walk and glob, and os.scandir) is written down, in any
    # process
    write_reviews(tmp_path / "in", 20)
    log = tmp_path / "listings.log"
    env = env_with_sitecustomize(home, tmp_path, LISTING_SPY, LISTING_SPY_DIR=str(tmp_path / "in"),
                                 LISTING_SPY_LOG=str(log))  # fmt: skip

    proc = run(tmp_path, env, "batch", "in", "out", "--config", str(write_config(tmp_path)), "--json")

    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["records"] == 20
    assert len(log.read_text().splitlines()) == 1


SLOW_LISTING = """
import os, time

if os.environ.get("SLOW_LISTING_DIR"):
    _scandir = os.scandir

    def scandir(path="."):
        if isinstance(path, str) and os.path.abspath(path) == os.environ["SLOW_LISTING_DIR"]:
            with open(os.environ["SLOW_LISTING_LOG"], "a") as log:
                log.write(f"{os.getpid()}\\n")
            time.sleep(120)  # a listing that takes minutes (100,000 objects on a slow store)
        return _scandir(path)

    os.scandir = scandir
"""


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_job_stopped_while_it_lists_its_input_leaves_no_planning_process_behind(
    home: Path, tmp_path: Path, how: str
) -> None:
    write_reviews(tmp_path / "in", 20)
    log = tmp_path / "listing.log"
    env = env_with_sitecustomize(home, tmp_path, SLOW_LISTING, SLOW_LISTING_DIR=str(tmp_path / "in"),
                                 SLOW_LISTING_LOG=str(log))  # fmt: skip
    args = ["batch", "in", "out", "--config", str(write_config(tmp_path)), "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "modalkit.cli", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text().strip()):  # the listing started (and hangs)
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the listing did not start in 60 s"
        time.sleep(0.05)
    [lister] = [int(pid) for pid in log.read_text().split()]

    os.kill(proc.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)  # the command alone, not its group
    _, stderr = proc.communicate(timeout=30)

    if how == "sigterm":
        assert proc.returncode == 143, stderr
        assert stderr.strip().splitlines()[-1] == "interrupted; run the same command to resume"
    deadline = time.monotonic() + 10
    while running(lister) and time.monotonic() < deadline:  # ended (a zombie until its new parent reaps it)
        time.sleep(0.05)
    assert not running(lister)
    assert not (tmp_path / "out" / "_job.json").exists()  # planning writes nothing
