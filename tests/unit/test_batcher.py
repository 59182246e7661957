"""The dynamic batcher of ``modalkit serve``, in one event loop: who waits for whom, who is run, who is refused.

The batch function here is real code that records the batches it got; a ``threading.Event`` holds a batch running
where a test needs requests to arrive meanwhile. ``asyncio.wait_for`` guards only keep a broken batcher from hanging
the suite; nothing here asserts on how fast anything is.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from modalkit.runners import batcher as batcher_module
from modalkit.runners.batcher import DynamicBatcher, Overloaded, TimedOut


class Recorder:
    """A batch function: doubles each item, records each batch; ``hold`` keeps a batch running until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.hold: threading.Event | None = None
        self.started = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        if self.hold is not None:
            self.hold.wait(10)
        return [2 * i for i in items]


def make(run: Callable[[list[Any]], Any], **kw: Any) -> DynamicBatcher:
    options: dict[str, Any] = {"max_batch_size": 8, "wait_ms": 50, "max_pending": 100, "request_timeout_s": 30.0}
    options.update(kw)
    return DynamicBatcher(run, **options)


def test_a_lone_request_is_run_at_once_not_after_wait_ms_or_the_arrival_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    # with a one-minute wait and a one-minute arrival gap, any waiting at all would trip the 5 s guard
    monkeypatch.setattr(batcher_module, "ARRIVAL_GAP_S", 60.0)
    recorder = Recorder()
    batcher = make(recorder, wait_ms=60_000)

    async def main() -> list[int]:
        return [await asyncio.wait_for(batcher.submit(i), 5) for i in range(3)]

    try:
        assert asyncio.run(main()) == [0, 2, 4]
    finally:
        batcher.close()
    assert recorder.batches == [[0], [1], [2]]


def test_requests_that_arrive_while_a_batch_runs_form_the_next_batch_and_each_gets_its_own_outcome() -> None:
    recorder = Recorder()
    recorder.hold = threading.Event()
    batcher = make(recorder, max_batch_size=8)

    async def main() -> list[int]:
        first = asyncio.ensure_future(batcher.submit(100))
        await asyncio.get_running_loop().run_in_executor(None, recorder.started.wait, 5)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(10)]
        await asyncio.sleep(0.05)
        recorder.hold.set()  # type: ignore[union-attr]
        return list(await asyncio.wait_for(asyncio.gather(first, *rest), 10))

    try:
        assert asyncio.run(main()) == [200, *(2 * i for i in range(10))]
    finally:
        batcher.close()
    assert recorder.batches == [[100], list(range(8)), [8, 9]]  # never over max_batch_size, order kept
    assert batcher.stats.largest == 8


def test_a_request_that_waits_past_its_timeout_is_answered_timed_out_and_never_run() -> None:
    recorder = Recorder()
    recorder.hold = threading.Event()
    batcher = make(recorder, request_timeout_s=0.2)

    async def main() -> tuple[Any, Any]:
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.get_running_loop().run_in_executor(None, recorder.started.wait, 5)
        late = asyncio.ensure_future(batcher.submit(2))
        done = await asyncio.wait_for(asyncio.gather(late, return_exceptions=True), 5)
        recorder.hold.set()  # type: ignore[union-attr]
        return await asyncio.wait_for(first, 5), done[0]

    try:
        first, late = asyncio.run(main())
    finally:
        batcher.close()
    assert first == 2  # it was running when its timeout came: it gets its outcome
    assert isinstance(late, TimedOut)
    assert recorder.batches == [[1]]
    assert batcher.stats.timed_out == 1


def test_a_request_whose_caller_was_cancelled_before_it_ran_is_never_run() -> None:
    recorder = Recorder()
    recorder.hold = threading.Event()
    batcher = make(recorder)

    async def main() -> None:
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.get_running_loop().run_in_executor(None, recorder.started.wait, 5)
        gone = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        recorder.hold.set()  # type: ignore[union-attr]
        await asyncio.wait_for(first, 5)
        assert await asyncio.wait_for(batcher.submit(3), 5) == 6

    try:
        asyncio.run(main())
    finally:
        batcher.close()
    assert recorder.batches == [[1], [3]]


def test_a_full_queue_refuses_at_once_with_a_retry_after_hint_and_runs_what_it_took() -> None:
    recorder = Recorder()
    recorder.hold = threading.Event()
    batcher = make(recorder, max_pending=2)

    async def main() -> tuple[list[int], BaseException]:
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.get_running_loop().run_in_executor(None, recorder.started.wait, 5)
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(4)
        recorder.hold.set()  # type: ignore[union-attr]
        return list(await asyncio.wait_for(asyncio.gather(first, *waiting), 5)), refused.value

    try:
        answers, refused = asyncio.run(main())
    finally:
        batcher.close()
    assert answers == [2, 4, 6]
    assert isinstance(refused, Overloaded)
    assert refused.retry_after >= 1
    assert [i for batch in recorder.batches for i in batch] == [1, 2, 3]
    assert batcher.stats.refused == 1


def test_a_batch_function_that_raises_fails_every_request_of_that_batch_and_the_next_batch_runs() -> None:
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return items

    batcher = make(run)

    async def main() -> tuple[Any, int]:
        failed = await asyncio.gather(batcher.submit(1), return_exceptions=True)
        return failed[0], await asyncio.wait_for(batcher.submit(2), 5)

    try:
        failed, after = asyncio.run(main())
    finally:
        batcher.close()
    assert isinstance(failed, RuntimeError)
    assert str(failed) == "device lost"
    assert after == 2
