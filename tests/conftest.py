"""Shared fixtures: a clean environment per test, and a real moto_server for S3/SQS tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import MotoServer

# Never let a developer's own AWS/Modal/Prefect settings leak into a test.
_SCRUB_PREFIXES = ("MODALKIT_", "AWS_", "PREFECT_", "MODAL_")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(_SCRUB_PREFIXES) and name != "AWS_CA_BUNDLE":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    from modalkit.aws import reset_clients

    reset_clients()
    yield
    reset_clients()


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
def unique() -> str:
    """A short unique suffix for bucket and queue names."""
    return uuid.uuid4().hex[:10]
