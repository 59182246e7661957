"""The local Prefect server modalkit manages when no Prefect API is configured: started once, reused, stopped idle.

``modalkit batch`` runs flow ``batch-inference``, and a Prefect flow needs an API. With none configured
(in any of Prefect's settings sources), Prefect would start a temporary server inside every run:
seconds of start-up each time, and a server that outlives a killed run. Instead modalkit starts one local server
the first time, in its own session (so a Ctrl-C to the job's terminal does not reach it), and every later run
connects to it at once. A small supervisor process keeps it: it stops the server after ``MODALKIT_PREFECT_IDLE_SECONDS``
(default 1800) without a modalkit run and without a running flow, and takes it down if it dies itself.

    modalkit prefect status     # where it is, its UI, how long it has been idle
    modalkit prefect stop       # stop it now

Its files live under ``$MODALKIT_HOME/prefect`` (default ``~/.modalkit/prefect``): ``server.json`` (pids, port),
``server.log``, the ``lease`` that runs touch, and the server's own ``home/`` (its SQLite database).
This module never imports Prefect: the server is the ``prefect server start`` command, run as a child process.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modalkit.exceptions import ConfigError

__all__ = [
    "Lease",
    "ManagedServer",
    "PrefectUnavailable",
    "ensure_server",
    "server_status",
    "stop_server",
]

DEFAULT_IDLE_SECONDS = 1800.0
#: How long a first start may take: a new database is migrated first (about 20 s on a busy 2-core machine).
START_TIMEOUT = 180.0
LEASE_EVERY_SECONDS = 30.0
_PR_SET_PDEATHSIG = 1


class PrefectUnavailable(ConfigError):
    """No Prefect API could be reached or started; the message says what to do."""


@dataclass(frozen=True)
class ManagedServer:
    """A running managed server: its API URL, its supervisor's and the server's process ids, its port."""

    api_url: str
    port: int
    supervisor_pid: int
    started_at: float

    @property
    def ui_url(self) -> str:
        """The Prefect UI of the server."""
        return self.api_url.removesuffix("/api")


def state_dir(environ: Any = None) -> Path:
    """Where the managed server keeps its files: ``$MODALKIT_HOME/prefect``."""
    environ = os.environ if environ is None else environ
    home = environ.get("MODALKIT_HOME") or str(Path("~/.modalkit").expanduser())
    return Path(home) / "prefect"


def idle_seconds(environ: Any = None) -> float:
    """How long the server waits without a run before it stops: ``MODALKIT_PREFECT_IDLE_SECONDS``.

    Raises:
        ConfigError: the variable is not a positive number.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("MODALKIT_PREFECT_IDLE_SECONDS", "")
    if not raw:
        return DEFAULT_IDLE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"MODALKIT_PREFECT_IDLE_SECONDS {raw!r}: not allowed; use a number of seconds above 0")
    return value


def api_answers(api_url: str, timeout: float = 2.0) -> bool:
    """Whether the Prefect API at ``api_url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


# --- the client side: find it or start it ----------------------------------------------------------------------


def ensure_server(on_start: Callable[[str], None] | None = None, timeout: float = START_TIMEOUT) -> ManagedServer:
    """The managed server, started (and waited for) if it is not running; its lease is renewed.

    Args:
        on_start: Told one line when a server has to be started (the CLI prints it).
        timeout: How long to wait for a new server to answer.

    Raises:
        PrefectUnavailable: it could not be started; the message names the log and what to do.
    """
    root = state_dir()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / "lock"):
        server = _running(root)
        if server is None:
            if on_start is not None:
                on_start(
                    f"starting a local Prefect server for modalkit (once; it stays up for later runs and stops after "
                    f"{idle_seconds():.0f} s idle; `modalkit prefect stop` stops it now)"
                )
            server = _start(root, timeout)
        _touch(root / "lease")
        return server


def server_status() -> tuple[ManagedServer | None, float | None]:
    """The managed server if it is running, and how many seconds since a run last used it."""
    root = state_dir()
    server = _running(root)
    lease = root / "lease"
    idle = time.time() - lease.stat().st_mtime if lease.exists() else None
    return server, idle


def stop_server(timeout: float = 30.0) -> ManagedServer | None:
    """Stop the managed server (its supervisor stops the server); returns what was stopped, None if nothing ran."""
    root = state_dir()
    if not root.exists():
        return None
    with _locked(root / "lock"):
        info = _read_info(root)
        if info is None:
            return None
        _terminate(info.supervisor_pid, timeout)
        with contextlib.suppress(FileNotFoundError):
            (root / "server.json").unlink()
        return info


class Lease:
    """Tells the managed server it is in use: touches its lease now and every 30 s until the block ends."""

    def __init__(self) -> None:
        self._path = state_dir() / "lease"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="modalkit-prefect-lease", daemon=True)

    def __enter__(self) -> Lease:
        _touch(self._path)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_EVERY_SECONDS):
            _touch(self._path)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        _touch(self._path)


def _running(root: Path) -> ManagedServer | None:
    info = _read_info(root)
    if info is None or not _alive(info.supervisor_pid):
        return None
    return info if api_answers(info.api_url) else None


def _read_info(root: Path) -> ManagedServer | None:
    try:
        data = json.loads((root / "server.json").read_text(encoding="utf-8"))
        return ManagedServer(data["api_url"], int(data["port"]), int(data["supervisor_pid"]), float(data["started_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _start(root: Path, timeout: float) -> ManagedServer:
    stale = _read_info(root)
    if stale is not None:  # a supervisor whose server stopped answering: replace both
        _terminate(stale.supervisor_pid, 10.0)
    port = _free_port()
    log_path = root / "server.log"
    launched = subprocess.run(  # a short-lived launcher starts the supervisor, so that it is nobody's child here
        [sys.executable, "-m", "modalkit.prefect_server", "launch", str(root), str(port), str(idle_seconds())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if launched.returncode != 0 or not launched.stdout.strip().isdigit():
        raise PrefectUnavailable(
            f"could not launch a local Prefect server: {launched.stderr.strip()[-300:] or 'no reason given'}; set "
            "PREFECT_API_URL to a running Prefect server (e.g. `prefect server start`) and run the command again"
        )
    server = ManagedServer(f"http://127.0.0.1:{port}/api", port, int(launched.stdout.strip()), time.time())
    (root / "server.json").write_text(json.dumps(server.__dict__), encoding="utf-8")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api_answers(server.api_url, timeout=1.0):
            return server
        if not _alive(server.supervisor_pid):
            break
        time.sleep(0.2)
    exited = not _alive(server.supervisor_pid)
    _terminate(server.supervisor_pid, 10.0)
    with contextlib.suppress(FileNotFoundError):
        (root / "server.json").unlink()
    waited = "it exited" if exited else f"it did not answer within {timeout:.0f} s"
    raise PrefectUnavailable(
        f"could not start a local Prefect server ({waited}; its log: {log_path}); set PREFECT_API_URL to a running "
        "Prefect server (e.g. `prefect server start`) and run the command again"
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM ``pid`` and wait for it to go; SIGKILL it after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the supervisor: python -m modalkit.prefect_server launch|supervise ROOT PORT IDLE_SECONDS ------------------


def launch(root: Path, port: int, idle: float) -> int:
    """Start the supervisor in a session of its own, print its pid, and return (so init adopts it)."""
    with open(root / "server.log", "ab") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "modalkit.prefect_server", "supervise", str(root), str(port), str(idle)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C or SIGHUP to the job's terminal does not reach it
            close_fds=True,
        )
    print(supervisor.pid, flush=True)
    supervisor.returncode = 0  # not waited for: it is meant to outlive this launcher
    return 0


def _die_with_parent() -> None:  # runs in the server's process, before exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _flows_running(api_url: str) -> bool:
    """Whether the server has a flow run pending or running (then it is not idle, lease or not)."""
    body = json.dumps({"flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING"]}}}}).encode()
    request = urllib.request.Request(
        f"{api_url}/flow_runs/count", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(json.loads(response.read())) > 0
    except (OSError, urllib.error.URLError, ValueError):
        return False


def supervise(root: Path, port: int, idle: float) -> int:
    """Run ``prefect server start`` on ``port`` and keep it until it is idle, told to stop, or dies."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    api_url = f"http://127.0.0.1:{port}/api"
    # the UI's API is this server's, not Prefect's default (127.0.0.1:4200, another server or none)
    env.update(PREFECT_HOME=str(root / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_API_URL=api_url)
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,  # no threads here yet; the server dies with its supervisor
    )
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.set())
    check = min(15.0, max(0.5, idle / 4))
    lease, ready_at = root / "lease", 0.0
    while not stopping.wait(check):
        if server.poll() is not None:
            break
        if not ready_at:  # idle time counts from when it first answers, not while it starts (migrations)
            ready_at = time.time() if api_answers(api_url, timeout=1.0) else 0.0
            continue
        used = max(ready_at, lease.stat().st_mtime if lease.exists() else 0.0)
        if time.time() - used > idle and not _flows_running(api_url):
            print(f"modalkit: no run for {idle:.0f} s; stopping the Prefect server", flush=True)
            break
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    info = _read_info(root)
    if info is not None and info.supervisor_pid == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            (root / "server.json").unlink()
    return 0


if __name__ == "__main__":
    _command = {"launch": launch, "supervise": supervise}[sys.argv[1]]
    sys.exit(_command(Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
