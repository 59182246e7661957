"""One retry layer per concern: a storage call or a queue send is tried by modalkit alone, one HTTP attempt at a
time, so how long an outage is ridden out is what the README says, not a product of three layers.

The endpoint is a real socket on loopback that accepts each connection and closes it at once (as a server
dropping connections does); counting its accepts counts the HTTP attempts the clients made.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from modalkit.aws import reset_clients
from modalkit.batch import storage
from modalkit.exceptions import QueueError, StorageError
from modalkit.queues import SQSBackend


class DroppingServer:
    """Accepts connections on a free loopback port and closes each at once, counting them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def dropping(monkeypatch: pytest.MonkeyPatch) -> Iterator[DroppingServer]:
    server = DroppingServer()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    reset_clients()
    try:
        yield server
    finally:
        server.close()
        reset_clients()


def test_an_s3_storage_call_makes_one_http_attempt_per_modalkit_try(
    dropping: DroppingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "RETRY_SECONDS", 0.0)  # modalkit's own layer: a single try

    with pytest.raises(StorageError, match="reading s3://bucket/key") as raised:
        storage.default_store().read_bytes("s3://bucket/key")

    assert raised.value.retryable  # a dropped connection is worth trying again, later
    # neither s3fs nor botocore tried again underneath (stock s3fs made 50 attempts over 35 s here); aiohttp
    # resends an idempotent request once, at once, when the server drops it (RFC 9112), which is the second one
    assert dropping.accepted <= 2


def test_an_sqs_send_makes_exactly_max_send_attempts_http_attempts(dropping: DroppingServer) -> None:
    backend = SQSBackend(queue_url=f"{dropping.url}/123456789012/results", max_send_attempts=3)

    with pytest.raises(QueueError, match=r"still failed after 3 attempts") as raised:
        backend.send_batch("results", ['{"a": 1}'])

    assert raised.value.retryable
    assert dropping.accepted == 3  # the shared boto3 client retried nothing itself


def test_planning_a_job_on_an_unreachable_s3_gives_up_with_the_storage_layer_alone(
    dropping: DroppingServer, monkeypatch: pytest.MonkeyPatch, prefect_api: str, tmp_path: Path
) -> None:
    from batch_support import write_config

    from flows.batch_inference import batch_inference

    monkeypatch.setattr(storage, "RETRY_SECONDS", 0.0)  # one try per storage call
    config = write_config(tmp_path)
    with pytest.raises(StorageError, match="s3://bucket/in") as raised:
        batch_inference(input_uri="s3://bucket/in", output_uri=str(tmp_path / "out"), config=str(config))
    assert raised.value.retryable
    # the Prefect task around planning tries once: it used to run twice more, tripling how long an outage took
    assert dropping.accepted <= 2
