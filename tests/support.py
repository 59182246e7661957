"""Test helpers: real servers on free loopback ports, started and stopped by PID.

* :class:`MotoServer`: a real ``moto_server`` process (S3, SQS...) reached by the real boto3/s3fs clients.
* :class:`TcpProxy`: a small TCP proxy in front of a server, to cut the connection mid-job and restore it
  without losing the server's state (a restarted moto_server starts empty).
* :class:`CountingProxy`: a TcpProxy that reads the HTTP requests going through it, to count what a client asks
  of S3 (requests by method and query, connections open at once), optionally adding latency to each request.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie counts: see test_batch_resilience's own for one that
    does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def running(pid: int) -> bool:
    """Whether a process with this pid exists and has not ended (a zombie, dead but not yet reaped, does not run)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            text = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return text.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def interrupt(proc: subprocess.Popen[bytes]) -> tuple[bytes, float]:
    """Ctrl-C to ``proc``: its stderr and the seconds it took to exit (killed if it does not within 10 s)."""
    try:
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
        return stderr, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def free_port() -> int:
    """A TCP port nobody listens on right now (on 127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a process we started, by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def stop_daemon(pid: int, timeout: float = 30.0) -> None:
    """Stop a process that is not our child (a daemon some command started) by its pid: SIGTERM, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


_REQUEST_LINE = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/[\d.]+"')


class MotoServer:
    """A moto_server process on a free loopback port."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"moto-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise

    def log_size(self) -> int:
        """Where its request log ends now: pass it to :meth:`requests` to count what came after."""
        return self.log_path.stat().st_size

    def requests(self, since: int = 0, settle: float = 0.3) -> collections.Counter[str]:
        """The requests it served since log offset ``since``, by kind: ``LIST`` (a listing page), ``GET``,
        ``HEAD``, ``PUT``, ``POST``, ``DELETE``. moto logs a request just after answering it: ``settle`` waits."""
        time.sleep(settle)
        text = self.log_path.read_bytes()[since:].decode(errors="replace")
        kinds: collections.Counter[str] = collections.Counter()
        for method, path in _REQUEST_LINE.findall(text):
            listing = method == "GET" and re.search(r"[?&](list-type|prefix|delimiter)=", path)
            kinds["LIST" if listing else method] += 1
        return kinds

    def reset(self) -> None:
        """Empty every bucket and queue (moto's reset API)."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target port; :meth:`cut` drops every connection and refuses new ones."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._up = threading.Event()
        self._up.set()
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open_listener()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _open_listener(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        sock.settimeout(0.1)
        self._listener = sock

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            listener = self._listener
            if listener is None:
                time.sleep(0.02)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            self._forward(src, dst)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)

    def _forward(self, src: socket.socket, dst: socket.socket) -> None:
        """Copy ``src`` to ``dst`` until ``src`` closes (raises OSError when either breaks)."""
        while True:
            data = src.recv(65536)
            if not data:
                return
            dst.sendall(data)

    def cut(self) -> None:
        """Close the listening socket and every open connection: clients see connection refused/reset."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        """Listen again on the same port."""
        if self._listener is None:
            self._open_listener()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._thread.join(timeout=5)


class CountingProxy(TcpProxy):
    """A :class:`TcpProxy` that parses the HTTP/1.1 requests going through it (request line, headers, a
    ``Content-Length`` or chunked body) and records each as ``"METHOD /path?query"`` in :attr:`requests`.

    ``delay`` seconds are added before each request is forwarded (a far-away S3); :attr:`max_held` is the most
    requests held for it at once: 1 for a client that sends its requests one after the other, more for one that
    sends them side by side.
    """

    def __init__(self, target_port: int, delay: float = 0.0) -> None:
        self.delay = delay
        self.requests: list[str] = []
        self.max_held = 0
        self._held = 0
        super().__init__(target_port)

    def reset(self) -> None:
        """Forget the requests counted so far, and the peak of requests held."""
        with self._lock:
            self.requests = []
            self.max_held = 0

    def _forward(self, src: socket.socket, dst: socket.socket) -> None:
        if src.getpeername()[1] == self.target_port:  # the server's replies pass through untouched
            super()._forward(src, dst)
        else:
            self._forward_requests(src, dst)

    def _forward_requests(self, src: socket.socket, dst: socket.socket) -> None:
        reader = src.makefile("rb")
        while True:
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = reader.readline(65536)
                if not line:
                    return
                head += line
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
            method, target = request_line.split(" ")[:2]
            with self._lock:
                self.requests.append(f"{method} {target}")
                self._held += 1
                self.max_held = max(self.max_held, self._held)
            time.sleep(self.delay)
            with self._lock:
                self._held -= 1
            dst.sendall(head)
            if headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size_line = reader.readline(65536)
                    dst.sendall(size_line)
                    size = int(size_line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        break
                    dst.sendall(reader.read(size + 2))  # the chunk and its CRLF
                trailer = None
                while trailer not in (b"\r\n", b""):  # trailers (checksums), then the empty line
                    trailer = reader.readline(65536)
                    dst.sendall(trailer)
            elif int(headers.get("content-length", "0")):
                dst.sendall(reader.read(int(headers["content-length"])))
