"""Queue backends as apps written for the original modalkit use them, and as the batch engine asks them.

Every backend refuses a message that is not a string with the same clear, non-retryable error; backends are built
by name with keyword arguments and registered as classes; ``send_response_queue`` sends through the configured
backend; and whether a job's queues exist is asked of the backend through the protocol, for any backend.
SQS is a real moto_server.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from modalkit.batch.job import plan_job, resolve_job_config
from modalkit.exceptions import BackendError, ConfigError, DependencyError, QueueError, TypeValidationError
from modalkit.queues import (
    BatchQueueBackend,
    LocalQueueBackend,
    MemoryBackend,
    QueueMessage,
    SQSBackend,
    create_backend,
    deliver,
    register_backend,
    registry,
)
from modalkit.settings import QueueConfig, Settings
from modalkit.task_queue import CustomRedisExample, TaskIQExample, send_response_queue


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backends registered by a test disappear after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


@pytest.fixture
def queue(sqs: Any, unique: str) -> tuple[str, str]:
    name = f"orig-{unique}"
    return name, sqs.create_queue(QueueName=name)["QueueUrl"]


def received(sqs: Any, url: str) -> list[str]:
    response = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
    return [m["Body"] for m in response.get("Messages", [])]


BACKENDS: dict[str, Callable[[Path], BatchQueueBackend]] = {
    "memory": lambda tmp: MemoryBackend(),
    "local": lambda tmp: LocalQueueBackend(tmp / "queues"),
    "sqs": lambda tmp: SQSBackend(),
}


@pytest.fixture(params=sorted(BACKENDS))
def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[BatchQueueBackend, str]]:
    """Each built-in backend, with a queue it can send to (SQS: a real queue in moto_server)."""
    name = "results"
    if request.param == "sqs":
        sqs = request.getfixturevalue("sqs")
        name = f"types-{request.getfixturevalue('unique')}"
        sqs.create_queue(QueueName=name)
    backend = BACKENDS[request.param](tmp_path)
    yield backend, name
    backend.close()


@pytest.mark.parametrize("body", [{"ok": True}, b'{"ok": true}', 7, None], ids=["dict", "bytes", "int", "none"])
def test_every_backend_refuses_a_message_that_is_not_a_string_with_one_clear_non_retryable_error(
    any_backend: tuple[BatchQueueBackend, str], body: object
) -> None:
    backend, name = any_backend

    for send in (
        lambda: backend.send_batch(name, [body]),  # type: ignore[list-item]
        lambda: backend.send_batch(name, [QueueMessage(body)]),  # type: ignore[arg-type]
        lambda: asyncio.run(backend.send_message(name, body)),  # type: ignore[arg-type]
    ):
        with pytest.raises(
            TypeValidationError, match=rf"Expected string, got .*: a message for queue '{name}'"
        ) as raised:
            send()
        assert raised.value.retryable is False
        assert isinstance(raised.value, QueueError | TypeError)


def test_a_batch_holding_one_message_that_is_not_a_string_sends_none_of_it(tmp_path: Path) -> None:
    for backend in (MemoryBackend(), LocalQueueBackend(tmp_path / "q")):
        with pytest.raises(TypeValidationError):
            backend.send_batch("results", ["fine", {"not": "a string"}])  # type: ignore[list-item]
        assert backend.messages("results") == []


def test_create_backend_by_name_takes_keyword_arguments_as_the_original_did(tmp_path: Path) -> None:
    local = create_backend("local", root=tmp_path / "named")
    memory = create_backend("memory")
    sqs = create_backend("sqs", queue_url="https://sqs.us-east-1.amazonaws.com/123456789012/scored")

    assert isinstance(local, LocalQueueBackend)
    assert local.root == tmp_path / "named"
    assert isinstance(memory, MemoryBackend)
    assert memory is not MemoryBackend.shared()  # a new one each time, as the original made
    assert isinstance(sqs, SQSBackend)
    assert sqs.queue_url("scored") == "https://sqs.us-east-1.amazonaws.com/123456789012/scored"
    assert create_backend("none") is None


def test_create_backend_by_name_accepts_a_whole_queue_config_dump_as_the_original_passed_it() -> None:
    # the original's send_response_queue did create_backend(config.backend, **config.model_dump())
    config = QueueConfig(backend="sqs", max_send_attempts=3, message_group_id="g1")

    backend = create_backend(config.backend, **config.model_dump())

    assert isinstance(backend, SQSBackend)
    assert (backend.max_send_attempts, backend.message_group_id) == (3, "g1")


def test_sqs_backend_with_an_unknown_keyword_names_it() -> None:
    with pytest.raises(BackendError, match=r"unknown keyword.*queue_ur1"):
        SQSBackend(queue_ur1="https://example")


def test_sqs_backend_queue_url_keyword_sends_to_that_queue_without_a_lookup(sqs: Any, queue: tuple[str, str]) -> None:
    name, url = queue
    backend = SQSBackend(queue_url=url)
    lookups: list[Any] = []
    backend.client.meta.events.register("before-call.sqs.GetQueueUrl", lambda **kw: lookups.append(kw))

    assert asyncio.run(backend.send_message(name, '{"via": "queue_url"}')) is True

    assert received(sqs, url) == ['{"via": "queue_url"}']
    assert lookups == []


def test_sqs_backend_is_available_and_sends_as_the_original_said_when_boto3_was_installed(
    sqs: Any, queue: tuple[str, str]
) -> None:
    name, url = queue
    backend = SQSBackend()

    assert backend.available is True  # boto3 is one of modalkit's requirements
    assert asyncio.run(backend.send_message(name, '{"n": 1}')) is True
    assert received(sqs, url) == ['{"n": 1}']


def test_an_sqs_backend_marked_unavailable_sends_nothing_and_says_so(sqs: Any, queue: tuple[str, str]) -> None:
    name, url = queue
    backend = SQSBackend()
    backend.available = False  # the original's switch: this backend cannot send

    assert asyncio.run(backend.send_message(name, '{"n": 1}')) is False  # the protocol's "not sent"
    with pytest.raises(QueueError, match=rf"SQSBackend is not available.*{name}"):
        backend.send_batch(name, ['{"n": 2}'])
    with pytest.raises(QueueError, match="not available"):  # modalkit's own sends never lose it silently
        asyncio.run(deliver(backend, name, ['{"n": 3}']))
    assert received(sqs, url) == []


class RecordingBackend:
    """A backend class as the original modalkit's docs show one: the async protocol and keyword arguments."""

    def __init__(self, broker_url: str = "memory://", prefix: str = "") -> None:
        self.broker_url = broker_url
        self.prefix = prefix
        self.sent: list[tuple[str, str]] = []

    async def send_message(self, queue_name: str, message: str) -> bool:
        self.sent.append((self.prefix + queue_name, message))
        return True


@pytest.mark.usefixtures("isolated_registry")
def test_register_backend_with_a_class_builds_it_by_name_and_from_a_queue_config() -> None:
    register_backend("recording", RecordingBackend)

    by_name = create_backend("recording", prefix="p-")
    from_config = create_backend(QueueConfig(backend="recording", broker_url="redis://cache:6379"))

    assert isinstance(by_name, RecordingBackend)
    assert by_name.prefix == "p-"
    assert isinstance(from_config, RecordingBackend)
    assert from_config.broker_url == "redis://cache:6379"  # the config fields its constructor takes, no others


@pytest.mark.usefixtures("isolated_registry")
def test_register_backend_with_a_class_whose_constructor_does_not_fit_says_so() -> None:
    register_backend("recording", RecordingBackend)

    with pytest.raises(BackendError, match=r"'recording' \(RecordingBackend\) cannot be built.*colour"):
        create_backend("recording", colour="blue")


def test_send_response_queue_sends_through_the_configured_backend_and_returns_true(tmp_path: Path) -> None:
    config = {"app_settings": {"queue_config": {"backend": "local", "local_path": str(tmp_path / "q")}}}
    Path("modalkit.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")  # the working directory's settings

    assert send_response_queue("results", json.dumps({"status": "success"})) is True

    assert LocalQueueBackend(tmp_path / "q").messages("results") == ['{"status": "success"}']


def test_send_response_queue_refuses_a_message_that_is_not_a_string() -> None:
    # the original's words first ("Expected string"), then which queue and how to fix it
    with pytest.raises(TypeValidationError, match=r"^Expected string, got dict: a message for queue 'results' must be"):
        send_response_queue("results", {"status": "success"})  # type: ignore[arg-type]


def test_send_response_queue_raises_when_no_backend_is_configured() -> None:
    Path("modalkit.yaml").write_text("app_settings:\n  queue_config:\n    backend: none\n", encoding="utf-8")

    with pytest.raises(QueueError, match=r"'results'.*backend is 'none'"):
        send_response_queue("results", "{}")


class CheckingBackend(BatchQueueBackend):
    """A custom backend that knows which of its queues exist."""

    def __init__(self, existing: Sequence[str] = ("scored",)) -> None:
        self.existing = set(existing)
        self.checked: list[list[str]] = []

    def send_batch(self, queue_name: str, messages: Sequence[str | QueueMessage]) -> int:
        return len(messages)

    def check_queues(self, queue_names: Sequence[str]) -> None:
        self.checked.append(list(queue_names))
        for name in queue_names:
            if name not in self.existing:
                raise QueueError(f"queue {name!r} does not exist on the checking backend")


@pytest.mark.usefixtures("isolated_registry")
def test_a_job_asks_any_backend_whether_its_queues_exist_before_writing_anything(tmp_path: Path) -> None:
    backend = CheckingBackend()
    register_backend("checking", lambda config: backend)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "great"}\n', encoding="utf-8")
    settings = Settings.load(
        data={
            "app_settings": {"queue_config": {"backend": "checking"}},
            "model_settings": {"model_entries": {"m": {"pipeline": "modalkit.examples.sentiment:SentimentPipeline"}}},
        }
    )
    job = resolve_job_config(settings, success_queue="scored", failure_queue="scored-failures")

    with pytest.raises(QueueError, match="'scored-failures' does not exist on the checking backend"):
        plan_job(settings, str(tmp_path / "in"), str(tmp_path / "out"), None, job)

    assert backend.checked == [["scored", "scored-failures"]]
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError):
        create_backend(QueueConfig(backend="no-such-backend"))


# --- the original's example backends ------------------------------------------------------------------------------


def test_importing_task_queue_imports_neither_taskiq_nor_redis() -> None:
    code = "import sys, modalkit.task_queue as q; q.TaskIQExample, q.CustomRedisExample; print(sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert "'taskiq'" not in loaded
    assert "'redis'" not in loaded


def test_the_taskiq_example_without_taskiq_installed_says_which_package_to_install() -> None:
    if importlib.util.find_spec("taskiq") is not None:
        pytest.skip("taskiq is installed here")

    with pytest.raises(DependencyError, match=r"TaskIQExample needs taskiq.*pip install taskiq"):
        TaskIQExample()


def test_the_redis_example_without_redis_installed_says_which_package_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)

    with pytest.raises(DependencyError, match=r"CustomRedisExample needs redis.*pip install redis"):
        CustomRedisExample()


def test_the_redis_example_sends_each_message_to_its_list_as_the_original_did() -> None:
    # the original's CustomRedisExample, against an in-process Redis (burner-redis, installed with Prefect)
    burner = pytest.importorskip("burner_redis")
    example = CustomRedisExample(client=burner.BurnerRedis())

    assert asyncio.run(example.send_message("results", '{"n": 1}')) is True
    assert asyncio.run(example.send_message("results", '{"n": 2}')) is True

    async def stored() -> list[bytes]:
        return list(await example.redis.lrange("results", 0, -1))

    assert asyncio.run(stored()) == [b'{"n": 2}', b'{"n": 1}']  # LPUSH: the newest first
