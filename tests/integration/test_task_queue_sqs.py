"""SQSBackend against a real moto_server: batching, large bodies in S3, FIFO ids, missing queues, outages."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import botocore.config
import pytest
from support import MotoServer, TcpProxy

from modalkit.aws import reset_clients
from modalkit.exceptions import ConfigError, QueueError
from modalkit.iomodel import FailureRecord
from modalkit.queues import registry
from modalkit.settings import QueueConfig
from modalkit.task_queue import (
    S3_POINTER_CLASS,
    MemoryBackend,
    QueueMessage,
    SQSBackend,
    create_backend,
    deliver,
    deliver_sync,
    register_backend,
    resolve_message_body,
)

KIB = 1024


# --- fixtures and helpers ------------------------------------------------------------------------------------


@pytest.fixture
def make_queue(sqs: Any, unique: str) -> Callable[..., tuple[str, str]]:
    """Create a queue with a unique name; returns (name, url)."""

    def make(stem: str = "q", *, fifo: bool = False) -> tuple[str, str]:
        name = f"{stem}-{unique}" + (".fifo" if fifo else "")
        attributes = {"FifoQueue": "true", "ContentBasedDeduplication": "false"} if fifo else {}
        return name, sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]

    return make


@pytest.fixture
def proxy(aws: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpProxy]:
    """A TCP proxy in front of moto_server; modalkit's shared clients go through it."""
    proxy = TcpProxy(aws.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    reset_clients()
    try:
        yield proxy
    finally:
        proxy.close()
        reset_clients()


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backends registered by a test disappear after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def drain(sqs: Any, url: str) -> list[dict[str, Any]]:
    """Receive and delete every message on the queue (FIFO groups unlock once their messages are deleted)."""
    received: list[dict[str, Any]] = []
    while True:
        response = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        batch = response.get("Messages", [])
        if not batch:
            return received
        received.extend(batch)
        sqs.delete_message_batch(
            QueueUrl=url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)],
        )


def bodies(messages: list[dict[str, Any]]) -> list[str]:
    return [m["Body"] for m in messages]


def records(n: int, tag: str = "r") -> list[str]:
    return [json.dumps({"id": f"{tag}{i}", "value": i}) for i in range(n)]


def queue_names(sqs: Any, prefix: str) -> list[str]:
    return [url.rsplit("/", 1)[-1] for url in sqs.list_queues(QueueNamePrefix=prefix).get("QueueUrls", [])]


# --- batching ------------------------------------------------------------------------------------------------


def test_send_batch_delivers_every_record_in_calls_of_at_most_ten(make_queue: Any, sqs: Any) -> None:
    name, url = make_queue()
    backend = SQSBackend()
    calls: list[str] = []
    entries_per_call: list[int] = []

    def count_call(model: Any, **_: Any) -> None:
        calls.append(model.name)

    def count_entries(params: dict[str, Any], **_: Any) -> None:
        entries_per_call.append(len(params["Entries"]))

    backend.client.meta.events.register("before-call.sqs.SendMessageBatch", count_call)
    backend.client.meta.events.register("before-parameter-build.sqs.SendMessageBatch", count_entries)
    expected = records(25)

    assert backend.send_batch(name, expected) == 25

    assert len(calls) == 3
    assert sorted(entries_per_call, reverse=True) == [10, 10, 5]
    assert Counter(bodies(drain(sqs, url))) == Counter(expected)


def test_identical_bodies_on_a_standard_queue_all_arrive(make_queue: Any, sqs: Any) -> None:
    name, url = make_queue()
    expected = ['{"same": true}'] * 3 + ['{"other": 1}']

    SQSBackend().send_batch(name, expected)

    assert Counter(bodies(drain(sqs, url))) == Counter(expected)


def test_a_queue_url_may_be_given_instead_of_a_name(make_queue: Any, sqs: Any) -> None:
    _, url = make_queue()

    SQSBackend().send_batch(url, ["by-url"])

    assert bodies(drain(sqs, url)) == ["by-url"]


# --- large bodies --------------------------------------------------------------------------------------------


def test_large_body_is_stored_in_s3_behind_an_extended_client_pointer(
    make_queue: Any, sqs: Any, s3: Any, unique: str
) -> None:
    name, url = make_queue()
    bucket = f"large-{unique}"
    s3.create_bucket(Bucket=bucket)
    backend = SQSBackend(large_message_uri=f"s3://{bucket}/bodies/")
    large = json.dumps({"id": "big", "blob": "x" * (300 * KIB)})
    small = json.dumps({"id": "small"})

    backend.send_batch(name, [large, small])

    received = {m["Body"]: m for m in drain(sqs, url)}
    assert small in received
    assert large not in received
    [pointer_body] = [body for body in received if body != small]
    assert len(pointer_body.encode()) < KIB
    class_name, pointer = json.loads(pointer_body)
    assert class_name == S3_POINTER_CLASS
    assert pointer["s3BucketName"] == bucket
    assert pointer["s3Key"].startswith("bodies/")
    attributes = received[pointer_body]["MessageAttributes"]
    assert attributes["ExtendedPayloadSize"]["StringValue"] == str(len(large.encode()))
    stored = s3.get_object(Bucket=bucket, Key=pointer["s3Key"])["Body"].read().decode()
    assert stored == large
    assert resolve_message_body(pointer_body) == large
    assert resolve_message_body(pointer_body, s3) == large
    assert backend.resolve_body(pointer_body) == large
    assert backend.resolve_body(small) == small


def test_large_body_without_large_message_uri_is_an_error(make_queue: Any, sqs: Any) -> None:
    name, url = make_queue()
    backend = SQSBackend(large_message_threshold=64 * KIB)

    with pytest.raises(QueueError, match="large_message_uri") as excinfo:
        backend.send_batch(name, ["small", "x" * (100 * KIB)])

    assert not excinfo.value.retryable
    assert drain(sqs, url) == []


def test_a_large_failure_record_without_large_message_uri_is_sent_with_the_start_of_its_input(
    make_queue: Any, sqs: Any
) -> None:
    name, url = make_queue()
    backend = SQSBackend(large_message_threshold=64 * KIB)
    record = FailureRecord(
        job_id="j", record_id=3, stage="predict", error_type="RuntimeError", error="boom", input="x" * (100 * KIB)
    )

    backend.send_batch(name, [record.model_dump_json()])

    (body,) = bodies(drain(sqs, url))
    assert len(body.encode()) <= 64 * KIB
    sent = FailureRecord.model_validate_json(body)
    assert sent.input_truncated
    assert sent.model_dump(exclude={"input", "input_truncated"}) == record.model_dump(exclude={"input"})


def test_large_body_that_cannot_be_stored_in_s3_is_a_queue_error(make_queue: Any, sqs: Any, unique: str) -> None:
    name, url = make_queue()
    backend = SQSBackend(large_message_threshold=64 * KIB, large_message_uri=f"s3://no-such-bucket-{unique}/x")

    with pytest.raises(QueueError, match=f"no-such-bucket-{unique}") as excinfo:
        backend.send_batch(name, ["small", "x" * (100 * KIB)])

    assert not excinfo.value.retryable
    assert drain(sqs, url) == []


# --- FIFO ----------------------------------------------------------------------------------------------------


def test_fifo_messages_carry_group_and_dedup_ids_and_keep_their_order(make_queue: Any, sqs: Any) -> None:
    name, url = make_queue("ordered", fifo=True)
    expected = records(15)

    SQSBackend(message_group_id="jobs").send_batch(name, expected)

    received = drain(sqs, url)
    assert bodies(received) == expected
    assert {m["Attributes"]["MessageGroupId"] for m in received} == {"jobs"}
    dedup_ids = [m["Attributes"]["MessageDeduplicationId"] for m in received]
    assert all(dedup_ids)
    assert len(set(dedup_ids)) == len(expected)


def test_fifo_message_ids_given_by_the_caller_are_used(make_queue: Any, sqs: Any) -> None:
    name, url = make_queue("ids", fifo=True)

    SQSBackend().send_batch(name, [QueueMessage("a", dedup_id="record-1", group_id="tenant-7")])

    [message] = drain(sqs, url)
    assert message["Attributes"]["MessageGroupId"] == "tenant-7"
    assert message["Attributes"]["MessageDeduplicationId"] == "record-1"


def test_fifo_messages_with_the_same_dedup_id_are_delivered_once(make_queue: Any, sqs: Any) -> None:
    name, url = make_queue("dedup", fifo=True)
    backend = SQSBackend()

    backend.send_batch(name, [QueueMessage('{"try": 1}', dedup_id="record-1"), QueueMessage("other", dedup_id="r2")])
    backend.send_batch(name, [QueueMessage('{"try": 2}', dedup_id="record-1")])

    assert bodies(drain(sqs, url)) == ['{"try": 1}', "other"]


# --- missing queue -------------------------------------------------------------------------------------------


def test_missing_queue_is_an_error_and_is_never_created(sqs: Any, unique: str) -> None:
    name = f"missing-{unique}"

    with pytest.raises(QueueError) as excinfo:
        SQSBackend().send_batch(name, ["lost?"])

    message = str(excinfo.value)
    assert name in message
    assert "never creates queues" in message
    assert not excinfo.value.retryable
    assert queue_names(sqs, name) == []


# --- async protocol ------------------------------------------------------------------------------------------


def test_async_send_message_returns_true_and_delivers(make_queue: Any, sqs: Any) -> None:
    name, url = make_queue()
    backend = SQSBackend()

    assert asyncio.run(backend.send_message(name, '{"async": true}')) is True
    assert asyncio.run(deliver(backend, name, ["a", QueueMessage("b")])) == 2

    assert Counter(bodies(drain(sqs, url))) == Counter(['{"async": true}', "a", "b"])


class RefusingBackend:
    """A third-party backend that reports failure as False, as the original modalkit protocol allows."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def send_message(self, queue_name: str, message: str) -> bool:
        self.calls.append((queue_name, message))
        return False


class BrokenBackend:
    async def send_message(self, queue_name: str, message: str) -> bool:
        raise RuntimeError("broker unreachable")


def test_deliver_raises_when_a_custom_backend_returns_false() -> None:
    backend = RefusingBackend()

    with pytest.raises(QueueError, match="results"):
        asyncio.run(deliver(backend, "results", ["a", "b"]))
    with pytest.raises(QueueError, match="RefusingBackend"):
        deliver_sync(backend, "results", ["a"])

    assert backend.calls[0] == ("results", "a")


def test_deliver_translates_a_custom_backend_exception() -> None:
    with pytest.raises(QueueError, match="broker unreachable") as excinfo:
        asyncio.run(deliver(BrokenBackend(), "results", ["a"]))

    assert isinstance(excinfo.value.__cause__, RuntimeError)


# --- outages -------------------------------------------------------------------------------------------------


def _client_without_botocore_retries() -> Any:
    # every refused connection reaches modalkit's own retry loop, so the test does not depend on botocore's luck
    config = botocore.config.Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=30)
    return boto3.session.Session().client("sqs", region_name="us-east-1", config=config)


class AttemptCounter:
    """Counts HTTP attempts and completed calls on a real client through botocore's event hooks."""

    def __init__(self, client: Any) -> None:
        self.attempts = 0
        self.calls = 0
        self.first_attempt = threading.Event()
        client.meta.events.register("before-send.sqs", self._on_send)
        client.meta.events.register("after-call.sqs", self._on_call)

    def _on_send(self, **_: Any) -> None:
        self.attempts += 1
        self.first_attempt.set()

    def _on_call(self, **_: Any) -> None:
        self.calls += 1


@pytest.mark.parametrize(
    ("client_kind", "resolve_first"),
    [
        pytest.param("shared", False, id="shared-client"),
        pytest.param("no-botocore-retries", False, id="lookup-during-cut"),
        pytest.param("no-botocore-retries", True, id="send-during-cut"),
    ],
)
def test_send_survives_a_short_cut_and_every_message_arrives_once(
    proxy: TcpProxy, make_queue: Any, sqs: Any, client_kind: str, resolve_first: bool
) -> None:
    name, url = make_queue()
    client = _client_without_botocore_retries() if client_kind == "no-botocore-retries" else None
    backend = SQSBackend(client, max_send_attempts=8)
    if resolve_first:
        backend.queue_url(name)
    counter = AttemptCounter(backend.client)
    expected = records(25)

    proxy.cut()
    with ThreadPoolExecutor(max_workers=1) as pool:
        sending = pool.submit(backend.send_batch, name, expected)
        assert counter.first_attempt.wait(timeout=30)
        time.sleep(1.5)
        proxy.restore()
        assert sending.result(timeout=120) == 25

    assert counter.attempts > counter.calls, "the cut should have failed at least one attempt"
    assert Counter(bodies(drain(sqs, url))) == Counter(expected)


def test_cut_longer_than_the_retry_budget_raises_a_retryable_error(proxy: TcpProxy, make_queue: Any, sqs: Any) -> None:
    name, url = make_queue()
    backend = SQSBackend(_client_without_botocore_retries(), max_send_attempts=2)
    backend.queue_url(name)
    counter = AttemptCounter(backend.client)

    proxy.cut()
    with pytest.raises(QueueError) as excinfo:
        backend.send_batch(name, records(5))
    proxy.restore()

    assert excinfo.value.retryable
    assert name in str(excinfo.value)
    assert counter.attempts == 2
    assert drain(sqs, url) == []
    # the same backend works again once the endpoint is back, which is what makes the error worth retrying
    assert backend.send_batch(name, ["after"]) == 1
    assert bodies(drain(sqs, url)) == ["after"]


# --- construction --------------------------------------------------------------------------------------------


def test_from_config_builds_a_working_backend(make_queue: Any, sqs: Any, s3: Any, unique: str) -> None:
    name, url = make_queue()
    bucket = f"cfg-{unique}"
    s3.create_bucket(Bucket=bucket)
    config = QueueConfig(
        backend="sqs",
        large_message_threshold=2 * KIB,
        large_message_uri=f"s3://{bucket}/big",
        max_send_attempts=3,
        message_group_id="cfg-group",
    )

    backend = SQSBackend.from_config(config)
    backend.send_batch(name, ["small", "y" * (4 * KIB)])

    assert (backend.max_send_attempts, backend.message_group_id) == (3, "cfg-group")
    received = bodies(drain(sqs, url))
    assert Counter(backend.resolve_body(b) for b in received) == Counter(["small", "y" * (4 * KIB)])
    assert s3.list_objects_v2(Bucket=bucket, Prefix="big/")["KeyCount"] == 1


def test_create_backend_builds_a_working_sqs_backend(make_queue: Any, sqs: Any) -> None:
    name, url = make_queue()

    backend = create_backend(QueueConfig(backend="sqs"))

    assert isinstance(backend, SQSBackend)
    assert deliver_sync(backend, name, ["via-config"]) == 1
    assert bodies(drain(sqs, url)) == ["via-config"]


@pytest.mark.usefixtures("isolated_registry")
def test_create_backend_with_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="kafka") as excinfo:
        create_backend(QueueConfig(backend="kafka"))

    for known in ("local", "memory", "none", "sqs"):
        assert known in str(excinfo.value)


@pytest.mark.usefixtures("isolated_registry")
def test_register_backend_makes_a_custom_name_work() -> None:
    built: list[QueueConfig] = []
    target = MemoryBackend()

    def factory(config: QueueConfig) -> MemoryBackend:
        built.append(config)
        return target

    register_backend("custom", factory)
    config = QueueConfig(backend="custom")
    backend = create_backend(config)

    assert backend is target
    assert built == [config]
    assert asyncio.run(deliver(backend, "results", ["hello"])) == 1
    assert target.messages("results") == ["hello"]
