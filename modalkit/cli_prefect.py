"""The local Prefect server ``modalkit batch`` uses when no Prefect API is configured: Prefect's own background
server, started once, reused, stopped when idle. Part of the CLI: the library never imports it, Modal images leave
it out.

``modalkit batch`` runs flow ``batch-inference``, and a Prefect flow needs an API. With none configured (in any of
Prefect's settings sources), Prefect would start a temporary server inside every run: seconds of start-up each
time. Instead the first run starts ``prefect server start --background`` on a free loopback port, in a session
of its own (a Ctrl-C to the job's terminal does not reach it), and every later run connects to it at once.

Prefect's background mode keeps the server's pid in ``PREFECT_HOME/server.pid`` and ``prefect server stop`` stops
it; two things it cannot do are kept here, as small as they go: which port the server listens on (Prefect has a
fixed default port, 4200, which another server may hold) is written to ``server.json``, and a watcher process
stops the server after ``MODALKIT_PREFECT_IDLE_SECONDS`` (default 1800) without a modalkit run (runs touch a
``lease`` file while they use it).

    modalkit prefect status     # where it is, its UI, how long it has been idle
    modalkit prefect stop       # stop it now

Its files live under ``$MODALKIT_HOME/prefect`` (default ``~/.modalkit/prefect``): ``server.json`` (pid, port),
``server.log``, the ``lease``, and the server's own ``home/`` (its SQLite database and pid file).
This module never imports Prefect: the server is the ``prefect`` command, run as a child process.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from modalkit.exceptions import ConfigError

__all__ = [
    "Lease",
    "ManagedServer",
    "PrefectUnavailable",
    "api_answers",
    "ensure_server",
    "server_status",
    "stop_server",
]

DEFAULT_IDLE_SECONDS = 1800.0
#: How long a first start may take: a new database is migrated first (about 20 s on a busy 2-core machine).
START_TIMEOUT = 180.0
LEASE_EVERY_SECONDS = 30.0
#: Prefect's pid file of a background server, in its PREFECT_HOME (``prefect.cli._server_utils``).
PREFECT_PID_FILE = "server.pid"


class PrefectUnavailable(ConfigError):
    """No Prefect API could be reached or started; the message says what to do."""


@dataclass(frozen=True)
class ManagedServer:
    """A running managed server: its API URL, port, the server's process id, and when it started."""

    api_url: str
    port: int
    pid: int
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
    """Stop the managed server with ``prefect server stop`` and wait for it to go; returns what was stopped, None
    if nothing ran."""
    root = state_dir()
    if not root.exists():
        return None
    with _locked(root / "lock"):
        info = _read_info(root)
        if info is None:
            return None
        _stop(root, info, timeout)
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
    if info is None or not _alive(info.pid):
        return None
    return info if api_answers(info.api_url) else None


def _read_info(root: Path) -> ManagedServer | None:
    try:
        data = json.loads((root / "server.json").read_text(encoding="utf-8"))
        return ManagedServer(data["api_url"], int(data["port"]), int(data["pid"]), float(data["started_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _prefect(root: Path, *args: str, port: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``prefect`` command on the managed server's home, in a session of its own (a server it starts in
    the background stays out of the job's process group), with its output appended to ``server.log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(root / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if port is not None:  # the UI's API is this server's, not Prefect's default (127.0.0.1:4200, another or none)
        env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{port}/api"
    with open(root / "server.log", "a", encoding="utf-8") as log:
        try:
            return subprocess.run(
                [sys.executable, "-m", "prefect", *args],
                cwd=root,  # never a prefect.toml of the user's working directory
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                timeout=120,
                check=False,
                text=True,
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(args, returncode=124)


def _start(root: Path, timeout: float) -> ManagedServer:
    stale = _read_info(root)
    if stale is not None:  # a server that stopped answering: replace it
        _stop(root, stale, 10.0)
    with contextlib.suppress(OSError):  # a pid file left by a server that died: Prefect would refuse to start
        (root / "home" / PREFECT_PID_FILE).unlink()
    port = _free_port()
    log_path = root / "server.log"
    launched = _prefect(root, "server", "start", "--background", "--host", "127.0.0.1", "--port", str(port), port=port)
    pid = _read_pid(root)
    if launched.returncode != 0 or pid is None:
        raise PrefectUnavailable(
            f"could not start a local Prefect server (it exited; its log: {log_path}); set PREFECT_API_URL to a "
            "running Prefect server (e.g. `prefect server start`) and run the command again"
        )
    server = ManagedServer(f"http://127.0.0.1:{port}/api", port, pid, time.time())
    (root / "server.json").write_text(json.dumps(asdict(server)), encoding="utf-8")
    _spawn_watcher(root, server)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api_answers(server.api_url, timeout=1.0):
            return server
        if not _alive(server.pid):
            break
        time.sleep(0.2)
    exited = not _alive(server.pid)
    _stop(root, server, 10.0)
    waited = "it exited" if exited else f"it did not answer within {timeout:.0f} s"
    raise PrefectUnavailable(
        f"could not start a local Prefect server ({waited}; its log: {log_path}); set PREFECT_API_URL to a running "
        "Prefect server (e.g. `prefect server start`) and run the command again"
    )


def _read_pid(root: Path) -> int | None:
    try:
        return int((root / "home" / PREFECT_PID_FILE).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None


def _stop(root: Path, server: ManagedServer, timeout: float) -> None:
    """``prefect server stop`` (SIGTERM to the pid in its pid file), then wait for the server to go; SIGKILL after
    ``timeout``. ``server.json`` goes with it."""
    if _read_pid(root) == server.pid:
        _prefect(root, "server", "stop")
    _terminate(server.pid, timeout)
    with contextlib.suppress(FileNotFoundError):
        (root / "server.json").unlink()


def _spawn_watcher(root: Path, server: ManagedServer) -> None:
    """The idle watcher, in a session of its own; not waited for (it outlives this process)."""
    with open(root / "server.log", "ab") as log:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "modalkit.cli_prefect", str(root), str(server.pid), str(idle_seconds())],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    watcher.returncode = 0  # not waited for: it is meant to outlive this process (no "still running" warning)


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


# --- the idle watcher: python -m modalkit.cli_prefect ROOT PID IDLE_SECONDS ------------------------------------


def watch(root: Path, pid: int, idle: float) -> int:
    """Stop the server ``pid`` once no run has touched the lease for ``idle`` seconds; return when it is gone.

    Idle time counts from when the server first answers (a new database migrates first), or the last run.
    """
    info = _read_info(root)
    api_url = info.api_url if info is not None else ""
    check = min(1.0, idle / 4)
    ready_at = 0.0
    lease = root / "lease"
    while _alive(pid):
        time.sleep(check)
        if not ready_at:
            ready_at = time.time() if api_answers(api_url, timeout=1.0) else 0.0
            continue
        if _idle_for(lease, ready_at) <= idle:
            continue
        with _locked(root / "lock"):  # a run that finds the server holds the lock while it touches the lease
            current = _read_info(root)
            if _idle_for(lease, ready_at) <= idle or current is None or current.pid != pid:
                continue
            print(f"modalkit: no run for {idle:.0f} s; stopping the Prefect server", flush=True)
            _stop(root, current, 30.0)
        break
    return 0


def _idle_for(lease: Path, ready_at: float) -> float:
    try:
        used = max(ready_at, lease.stat().st_mtime)
    except OSError:
        used = ready_at
    return time.time() - used


if __name__ == "__main__":
    sys.exit(watch(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
