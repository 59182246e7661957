"""Shared fixtures: a clean environment per test, and a real moto_server for S3/SQS tests."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from support import MotoServer, stop_daemon

# Prefect: a private home for the whole run, no analytics, never a developer's own server.
_PREFECT_HOME = tempfile.mkdtemp(prefix="modalkit-tests-prefect-")
for _name in [n for n in os.environ if n.startswith("PREFECT_")]:
    del os.environ[_name]
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_BATCH_INTERVAL"] = "0.3"

# Never let a developer's own AWS/Modal settings leak into a test.
_SCRUB_PREFIXES = ("MODALKIT_", "AWS_", "MODAL_")
# A modalkit local Prefect server that a test starts lives here, never under the developer's ~/.modalkit.
_MODALKIT_HOME = Path(tempfile.mkdtemp(prefix="modalkit-tests-home-"))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(_SCRUB_PREFIXES) and name != "AWS_CA_BUNDLE":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODALKIT_HOME", str(_MODALKIT_HOME))
    monkeypatch.chdir(tmp_path)
    from modalkit.aws import reset_clients

    reset_clients()
    yield
    reset_clients()


@pytest.fixture(scope="session", autouse=True)
def _no_local_prefect_server_left() -> Iterator[None]:
    """Stop, by its pid, any local Prefect server that a run of `modalkit batch` without an API started."""
    yield
    info = _MODALKIT_HOME / "prefect" / "server.json"
    if info.exists():
        stop_daemon(int(json.loads(info.read_text())["pid"]))


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto_server process for the session (tests use their own bucket and queue names)."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """Point boto3 and s3fs at the moto_server through the standard environment variables."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    from modalkit.aws import reset_clients

    reset_clients()
    return moto_server


@pytest.fixture
def s3(aws: MotoServer) -> Iterator[Any]:
    """A boto3 S3 client straight to moto_server, for setting up inputs and reading back outputs."""
    client = boto3.client("s3", endpoint_url=aws.url, region_name="us-east-1")
    yield client
    client.close()


@pytest.fixture
def sqs(aws: MotoServer) -> Iterator[Any]:
    """A boto3 SQS client straight to moto_server, for creating queues and reading what arrived."""
    client = boto3.client("sqs", endpoint_url=aws.url, region_name="us-east-1")
    yield client
    client.close()


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A temporary Prefect server (SQLite) for the session; yields its API URL. Flows run against it."""
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield str(prefect.settings.PREFECT_API_URL.value())


@pytest.fixture
def unique() -> str:
    """A short unique suffix for bucket and queue names."""
    return uuid.uuid4().hex[:10]
