"""LocalQueueBackend on a real SQLite file, across real processes; MemoryBackend basics."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import stop_process

from modalkit.settings import QueueConfig
from modalkit.task_queue import (
    InMemoryBackend,
    LocalQueueBackend,
    MemoryBackend,
    QueueMessage,
    create_backend,
    deliver,
    deliver_sync,
)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalQueueBackend]:
    backend = LocalQueueBackend(tmp_path / "queues")
    try:
        yield backend
    finally:
        backend.close()


def run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=120, check=False
    )


# --- reading and taking --------------------------------------------------------------------------------------


def test_sent_messages_are_readable_and_received_oldest_first(local: LocalQueueBackend) -> None:
    local.send_batch("results", ["r0", "r1", QueueMessage("r2")])
    local.send_batch("results", ["r3", "r4"])
    local.send_batch("failures", ["f0"])

    assert local.messages("results") == ["r0", "r1", "r2", "r3", "r4"]
    assert local.count("results") == 5
    assert local.queues() == ["failures", "results"]

    assert local.receive("results", max_messages=2) == ["r0", "r1"]
    assert local.messages("results") == ["r2", "r3", "r4"]
    assert local.receive("results") == ["r2", "r3", "r4"]
    assert local.receive("results") == []
    assert local.count("results") == 0
    assert local.queues() == ["failures"]
    assert local.messages("failures") == ["f0"]


def test_messages_survive_a_new_backend_on_the_same_directory(tmp_path: Path) -> None:
    first = LocalQueueBackend(tmp_path / "q")
    first.send_batch("results", ["a", "b"])
    first.close()

    second = LocalQueueBackend(tmp_path / "q")
    try:
        assert second.messages("results") == ["a", "b"]
    finally:
        second.close()


def test_async_protocol_and_deliver(local: LocalQueueBackend) -> None:
    assert asyncio.run(local.send_message("results", "one")) is True
    assert asyncio.run(deliver(local, "results", ["two", QueueMessage("three")])) == 2
    assert deliver_sync(local, "results", ["four"]) == 1
    assert deliver_sync(local, "results", []) == 0

    assert local.messages("results") == ["one", "two", "three", "four"]


def test_create_backend_local_uses_the_configured_path(tmp_path: Path) -> None:
    backend = create_backend(QueueConfig(backend="local", local_path=tmp_path / "configured"))

    assert isinstance(backend, LocalQueueBackend)
    try:
        backend.send_batch("results", ["x"])
        assert (tmp_path / "configured" / LocalQueueBackend.FILE_NAME).is_file()
    finally:
        backend.close()
    assert create_backend(QueueConfig(backend="none")) is None


# --- durability and concurrency across processes -------------------------------------------------------------

KILLED_SENDER = """
    import os, signal, sys
    from modalkit.task_queue import LocalQueueBackend, QueueMessage

    backend = LocalQueueBackend(sys.argv[1])
    backend.send_batch("results", [f"first-{i}" for i in range(50)])
    backend.send_batch("results", [QueueMessage(f"second-{i}", dedup_id=f"d{i}") for i in range(50)])
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_messages_survive_a_sender_killed_right_after_send_batch(tmp_path: Path) -> None:
    root = tmp_path / "queues"

    child = run_child(KILLED_SENDER, str(root))

    assert child.returncode == -signal.SIGKILL, child.stderr
    backend = LocalQueueBackend(root)
    try:
        expected = [f"first-{i}" for i in range(50)] + [f"second-{i}" for i in range(50)]
        assert backend.messages("results") == expected
    finally:
        backend.close()


CONCURRENT_SENDER = """
    import sys
    from modalkit.task_queue import LocalQueueBackend

    root, tag, count, open_early = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "open-early"
    backend = LocalQueueBackend(root)
    if open_early:
        backend.count("results")
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(count):  # one transaction per message, so the senders contend for the file
        backend.send_batch("results", [f"{tag}-{i}"])
    backend.close()
    print("done", flush=True)
"""


def send_all_at_once(root: Path, tags: list[str], count: int, *, open_early: bool) -> None:
    """Start one sender process per tag, let them all send ``count`` messages at once, and check they succeed."""
    with contextlib.ExitStack() as stack:
        senders: list[subprocess.Popen[str]] = []
        for tag in tags:
            argv = [str(root), tag, str(count), "open-early" if open_early else "open-late"]
            sender = stack.enter_context(
                subprocess.Popen(
                    [sys.executable, "-c", textwrap.dedent(CONCURRENT_SENDER), *argv],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            stack.callback(stop_process, sender)  # runs before its pipes close, also when the test fails
            senders.append(sender)
        for sender in senders:
            assert sender.stdout is not None
            assert sender.stdout.readline().strip() == "ready"
        for sender in senders:
            assert sender.stdin is not None
            sender.stdin.write("go\n")
            sender.stdin.flush()
        outcomes = [sender.communicate(timeout=120) for sender in senders]

    for sender, (out, err) in zip(senders, outcomes, strict=True):
        assert sender.returncode == 0, err
        assert out.strip() == "done"


def stored_messages(root: Path) -> list[str]:
    backend = LocalQueueBackend(root)
    try:
        return backend.messages("results")
    finally:
        backend.close()


def test_two_processes_sending_at_once_lose_nothing(tmp_path: Path) -> None:
    tags = ["alpha", "beta"]

    send_all_at_once(tmp_path / "queues", tags, 200, open_early=True)

    stored = stored_messages(tmp_path / "queues")
    assert Counter(stored) == Counter(f"{tag}-{i}" for tag in tags for i in range(200))
    for tag in tags:  # each sender's messages keep the order it sent them in
        assert [m for m in stored if m.startswith(f"{tag}-")] == [f"{tag}-{i}" for i in range(200)]


def test_processes_creating_the_queue_file_at_once_all_succeed(tmp_path: Path) -> None:
    # the first open of a new file switches it to WAL; several processes doing that at once must not fail
    tags = [f"p{n}" for n in range(6)]
    for round_ in range(4):  # the race is lost only some of the time: run it a few times
        root = tmp_path / f"new-queues-{round_}"

        send_all_at_once(root, tags, 5, open_early=False)

        assert Counter(stored_messages(root)) == Counter(f"{t}-{i}" for t in tags for i in range(5))


# --- deduplication -------------------------------------------------------------------------------------------


def test_a_dedup_id_is_stored_once_per_queue_even_from_two_backends(tmp_path: Path) -> None:
    first = LocalQueueBackend(tmp_path / "q")
    second = LocalQueueBackend(tmp_path / "q")
    try:
        first.send_batch("results", [QueueMessage("attempt-1", dedup_id="record-7"), "plain", "plain"])
        second.send_batch("results", [QueueMessage("attempt-2", dedup_id="record-7")])
        first.send_batch("results", [QueueMessage("attempt-3", dedup_id="record-7")])
        second.send_batch("failures", [QueueMessage("on-another-queue", dedup_id="record-7")])

        assert first.messages("results") == ["attempt-1", "plain", "plain"]
        assert second.messages("results") == ["attempt-1", "plain", "plain"]
        assert first.messages("failures") == ["on-another-queue"]
    finally:
        first.close()
        second.close()


def test_duplicate_dedup_ids_within_one_batch_are_stored_once(local: LocalQueueBackend) -> None:
    local.send_batch("results", [QueueMessage("a", dedup_id="x"), QueueMessage("b", dedup_id="x"), "c"])

    assert local.messages("results") == ["a", "c"]


# --- memory --------------------------------------------------------------------------------------------------


def test_memory_backend_keeps_messages_per_queue() -> None:
    backend = MemoryBackend()

    backend.send_batch("results", ["a", QueueMessage("b", dedup_id="1"), QueueMessage("b again", dedup_id="1")])
    assert asyncio.run(backend.send_message("failures", "f")) is True
    assert deliver_sync(backend, "results", ["c"]) == 1

    assert backend.messages("results") == ["a", "b", "c"]
    assert backend.messages("failures") == ["f"]
    assert backend.messages("never-used") == []
    assert backend.queues() == ["failures", "results"]
    backend.clear()
    assert backend.queues() == []
    backend.send_batch("results", [QueueMessage("b after clear", dedup_id="1")])
    assert backend.messages("results") == ["b after clear"]


def test_in_memory_backend_is_the_original_name_and_config_uses_the_shared_instance() -> None:
    assert InMemoryBackend is MemoryBackend
    assert MemoryBackend.shared() is MemoryBackend.shared()
    assert create_backend(QueueConfig(backend="memory")) is MemoryBackend.shared()
    assert MemoryBackend() is not MemoryBackend.shared()
