"""The dynamic batcher of ``modalkit serve``: concurrent requests grouped into one pipeline call, with Modal's
``@modal.batched`` semantics (``max_batch_size``, ``wait_ms``), bounded, and off the event loop.

A request joins the queue and waits for its own outcome. A request that finds the pipeline idle, with nobody beside
it and nobody having come while the last batch ran, is run at once: a lone client waits for nobody. Otherwise the
batching loop waits up to ``wait_ms`` for more (until ``max_batch_size``, and only while requests keep arriving: a
1 ms pause ends the wait); under load the requests that arrive while a batch runs form the next one. A batch runs on
one worker thread (the pipeline runs one batch at a time, as a model on one device does); each request gets its own
outcome back (the isolated runner makes a bad record fail only its own request). When ``max_pending`` requests wait,
a new one is refused at once (:class:`Overloaded`: 503 with ``Retry-After``); a request still waiting after
``request_timeout_s`` is answered :class:`TimedOut` (504) and never run; nor is one whose caller was cancelled
before it ran.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ARRIVAL_GAP_S", "BatchStats", "DynamicBatcher", "Overloaded", "TimedOut"]

#: While gathering a batch, a pause this long with no new request ends the wait (before wait_ms is up).
ARRIVAL_GAP_S = 0.001


class Overloaded(Exception):
    """Too many requests wait already; ``retry_after`` is a hint in seconds."""

    def __init__(self, pending: int, retry_after: int) -> None:
        super().__init__(f"{pending} requests are waiting already; try again in {retry_after} s")
        self.retry_after = retry_after


class TimedOut(Exception):
    """The request waited longer than ``request_timeout_s`` for the pipeline, and was not run."""


@dataclass
class BatchStats:
    """What the batcher did: batch sizes (for ``/metrics`` and tests), requests refused and timed out."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    refused: int = 0
    timed_out: int = 0
    sizes: list[int] = field(default_factory=list)

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.largest = max(self.largest, size)
        if len(self.sizes) < 100_000:
            self.sizes.append(size)


class _Request:
    __slots__ = ("future", "item", "state")

    def __init__(self, item: Any, future: asyncio.Future[Any]) -> None:
        self.item = item
        self.future = future
        self.state = "queued"  # -> "running" | "cancelled"


class DynamicBatcher:
    """Groups concurrent :meth:`submit` calls into calls of ``run(items) -> outcomes`` (one outcome per item).

    Args:
        run: Runs a batch; returns one outcome per item, in order (errors as values: a raise fails the batch).
        max_batch_size: Most items per call.
        wait_ms: How long to wait for more items after the first one of a batch.
        max_pending: Items waiting (not yet running) before :meth:`submit` raises :class:`Overloaded`.
        request_timeout_s: How long an item may wait before it is answered :class:`TimedOut`, never run.
        on_batch: Called with each batch's size (metrics).
    """

    def __init__(
        self,
        run: Callable[[list[Any]], Sequence[Any]],
        max_batch_size: int,
        wait_ms: float,
        max_pending: int,
        request_timeout_s: float,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_ms / 1000
        self.max_pending = max_pending
        self.request_timeout_s = request_timeout_s
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._queue: deque[_Request] = deque()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="modalkit-pipeline")
        self._batch_seconds = 0.05  # running estimate of a batch's duration, for Retry-After
        self._in_flight = 0
        self._arrived_while_running = False  # a request came while a batch ran: the next one waits for company

    @property
    def pending(self) -> int:
        """Items waiting to run."""
        return len(self._queue)

    async def submit(self, item: Any) -> Any:
        """The outcome of ``item``, run in a batch with the items submitted around it.

        Raises:
            Overloaded: ``max_pending`` items wait already.
            TimedOut: it waited ``request_timeout_s`` and was not run.
        """
        if len(self._queue) >= self.max_pending:
            self.stats.refused += 1
            batches_ahead = len(self._queue) / self.max_batch_size + 1
            raise Overloaded(len(self._queue), max(1, round(batches_ahead * self._batch_seconds + 0.5)))
        loop = asyncio.get_running_loop()
        request = _Request(item, loop.create_future())
        self._queue.append(request)
        if self._in_flight:
            self._arrived_while_running = True
        self._start(loop)
        assert self._wakeup is not None
        self._wakeup.set()
        timer = loop.call_later(self.request_timeout_s, self._expire, request)
        try:
            return await request.future
        except asyncio.CancelledError:  # the caller was cancelled: a request not yet running is never run
            if request.state == "queued":
                request.state = "cancelled"
            raise
        finally:
            timer.cancel()

    def _expire(self, request: _Request) -> None:
        """``request_timeout_s`` after it came: a request still waiting is answered TimedOut and never run (one
        already running gets its outcome)."""
        if request.state == "queued" and not request.future.done():
            request.state = "cancelled"
            self.stats.timed_out += 1
            request.future.set_exception(TimedOut(f"the request waited {self.request_timeout_s:g} s for the pipeline"))

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = loop.create_task(self._batching_loop())

    async def _batching_loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # wait up to wait_ms for more requests, but only while they keep coming: a quiet gap of ARRIVAL_GAP_S
            # ends the wait, and so does a full batch. A request that finds the pipeline idle with nobody beside it,
            # while none came during the last batch either, waits for nobody: a lone client pays no wait at all
            crowded = self._arrived_while_running or len(self._queue) > 1
            deadline = loop.time() + (self.wait_s if crowded else 0.0)
            while len(self._queue) < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), min(remaining, ARRIVAL_GAP_S))
                except TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            started = time.perf_counter()
            self._in_flight = len(batch)
            self._arrived_while_running = False
            try:
                outcomes = await loop.run_in_executor(self._executor, self.run, [r.item for r in batch])
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(outcomes)} outcomes for {len(batch)} items")
            except Exception as exc:  # no record caused it: every request of the batch gets the error
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
            else:
                for request, outcome in zip(batch, outcomes, strict=True):
                    if not request.future.done():
                        request.future.set_result(outcome)
            finally:
                self._in_flight = 0
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - started)

    def _take(self) -> list[_Request]:
        batch: list[_Request] = []
        while self._queue and len(batch) < self.max_batch_size:
            request = self._queue.popleft()
            if request.state == "queued":
                request.state = "running"
                batch.append(request)
        if batch:
            self.stats.record(len(batch))
            if self.on_batch is not None:
                self.on_batch(len(batch))
        return batch

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until no request waits or runs (at most ``timeout`` seconds)."""
        end = time.monotonic() + timeout
        while (self._queue or self._in_flight) and time.monotonic() < end:
            await asyncio.sleep(0.01)

    def close(self) -> None:
        """Stop the batching loop and the pipeline thread (after the batch in progress)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
