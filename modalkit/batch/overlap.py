"""The stages of a chunk's consecutive sub-batches, overlapped on three threads of the worker process.

While the device runs ``predict`` on sub-batch n, a feeder thread reads, parses, validates and preprocesses n+1
(and the ones after it, up to the prefetch depth), and a finisher thread postprocesses n-1, writes its rows and
spools its queue records::

    feeder (helper)    read -> parse, ids, validate -> preprocess        n+1, n+2 ...
    device (caller)    predict (and the pipeline's other device_stages)  n
    finisher (helper)  postprocess -> rows, failure rows -> spool        n-1

``predict``, and every stage a pipeline names in ``device_stages``, runs on the thread that called :meth:`run`
(the worker's main thread, which loaded the model); the others on the two helpers. With host processes
(:mod:`~modalkit.batch.host_pool`) the feeder sends each sub-batch's records to them instead of preprocessing it,
and the device thread takes their answers in input order. A sub-batch any stage of which
raises is run again on the device thread the way :func:`~modalkit.inference_pipeline.run_isolated` runs a batch
(split in halves down to the records that fail alone; what no record causes is raised), while the others keep
flowing. Sub-batches are written in input order. At most ``depth + 2`` sub-batches are alive at once (``depth``
read ahead of the device, one on it, one being written), so memory stays flat whatever the chunk's size.

An exception on a helper thread is raised on the calling thread, as it would have been raised there one sub-batch
after another: the feeder's after the sub-batches read before it, so an earlier sub-batch's error wins. An exception
on the calling thread (a KeyboardInterrupt included) stops the helpers: they leave at their next step (within
``POLL_S``) and are waited for ``STOP_JOIN_S`` at most; they are daemon threads, so a stage stuck in user code
never keeps the process alive.

Each thread times its own work per sub-batch (never per record): the stage seconds of :class:`StageClock`, and the
seconds it waited for the other threads; :attr:`Overlap.threads` says, for each thread, how long it was busy, how
long it waited and how long it lived (busy plus waiting is its life, within the cost of handing sub-batches over).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

from modalkit.batch.host_pool import HostPool
from modalkit.inference_pipeline import (
    STAGES,
    InferencePipeline,
    StageClock,
    isolate_failed,
    outcomes_of,
    run_isolated,
)

__all__ = ["POLL_S", "STOP_JOIN_S", "Overlap", "SubBatch", "ThreadSeconds", "Work"]

#: How often a helper thread that waits looks whether the chunk was stopped.
POLL_S = 0.05
#: How long the calling thread waits for a helper to stop once the chunk failed or was interrupted.
STOP_JOIN_S = 1.0

# what travels on the queues between the threads
_BATCH, _ISOLATE, _END, _DONE, _ERROR = range(5)


class SubBatch:
    """One sub-batch on its way through the stages: the inputs the pipeline gets, what its stages made of them,
    and the first stage that raised on it. The chunk's own bookkeeping lives in a subclass."""

    __slots__ = ("done", "failed", "hosted", "models", "outcomes", "pre", "raw", "slot")

    def __init__(self, models: list[Any]) -> None:
        self.models = models
        #: sent to a host process, which preprocesses it
        self.hosted = False
        #: the host process's shared memory slot holding ``pre``'s buffers, given back once the sub-batch is written
        self.slot: tuple[int, int] | None = None
        self.pre: Any = None
        self.raw: Any = None
        #: one outcome per input (an output model or a RecordError), once the pipeline is through with it
        self.outcomes: list[Any] | None = None
        #: the stage that raised on the whole sub-batch, and what it raised
        self.failed: tuple[str, Exception] | None = None
        #: set by the device thread once it has run a sub-batch the finisher handed back
        self.done: threading.Event | None = None


class Work(Protocol):
    """What the executor asks of the chunk: its sub-batches, read and prepared, and what to do with each."""

    def read(self) -> Iterator[Any]:
        """The chunk's sub-batches as read (timed as ``read``)."""

    def parse(self, raw: Any) -> SubBatch:
        """A sub-batch parsed and validated (timed as ``parse``)."""

    def write(self, batch: SubBatch) -> None:
        """A sub-batch's rows written (timed as ``write``); called in input order."""

    def queue(self, batch: SubBatch) -> None:
        """A sub-batch's queue records spooled (timed as ``queue``); called in input order, after ``write``."""

    def records(self, batch: SubBatch) -> list[Any]:
        """A sub-batch's records as parsed, one per input model (what a host process validates again)."""


class ThreadSeconds(NamedTuple):
    """One thread's time in a chunk: working, waiting for the other threads, and alive."""

    busy: float
    waiting: float
    alive: float


class _Stopped(Exception):
    """The chunk stopped (it failed elsewhere, or was interrupted): a helper leaves."""


class Overlap:
    """Runs a chunk's sub-batches through ``pipeline`` with their stages overlapped (see the module).

    Args:
        pipeline: The loaded pipeline; its ``device_stages`` run on the thread that calls :meth:`run`.
        work: The chunk's sub-batches and what to do with each.
        source: The sub-batches to run, as ``work.read()`` gives them (default: all of them, from ``work.read()``).
        depth: Sub-batches read and preprocessed ahead of the one the device runs (at least 1).
        on_enter: Called (feeder thread) when a sub-batch with inputs enters the pipeline, before preprocess.
        on_leave: Called (finisher thread) when the pipeline is through with it.
        host: Host processes that preprocess the sub-batches instead of the feeder thread
            (:mod:`~modalkit.batch.host_pool`); ``depth`` should be at least their number.
    """

    def __init__(
        self,
        pipeline: InferencePipeline,
        work: Work,
        depth: int,
        on_enter: Callable[[SubBatch], None] | None = None,
        on_leave: Callable[[SubBatch], None] | None = None,
        source: Iterator[Any] | None = None,
        host: HostPool | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.host = host
        self.work = work
        self.source = source
        self.device_stages = tuple(s for s in STAGES if s in type(pipeline).device_stages)
        self.on_enter = on_enter
        self.on_leave = on_leave
        locks = {stage: threading.Lock() for stage in STAGES}  # a stage never runs twice at once
        #: each thread's stage seconds (also ``read``, ``parse``, ``write``, ``queue``)
        self.clocks = {name: StageClock(locks) for name in ("feeder", "device", "finisher")}
        #: the host processes' stage seconds, as they reported them (not a thread of this process)
        self.host_clock = StageClock()
        #: each thread's busy, waiting and alive seconds, once :meth:`run` returned
        self.threads: dict[str, ThreadSeconds] = {}
        self._waits = dict.fromkeys(self.clocks, 0.0)
        self._slots = threading.Semaphore(max(1, depth) + 2)
        self._stop = threading.Event()
        self._inbox: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()  # to the device thread
        self._outbox: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()  # to the finisher

    def run(self) -> None:
        """Run every sub-batch; returns once the last one is written.

        Raises:
            Whatever a stage or the chunk's work raised that is not a record's failure (on whichever thread).
        """
        started = time.perf_counter()
        helpers = [
            threading.Thread(target=self._helper, args=(name, fn), name=f"modalkit-{name}", daemon=True)
            for name, fn in (("feeder", self._feed), ("finisher", self._finish))
        ]
        for thread in helpers:
            thread.start()
        try:
            self._device()
        except BaseException:
            self._stop.set()
            for thread in helpers:
                thread.join(STOP_JOIN_S)
            if self.host is not None:  # answers owed, slots not given back: the worker starts others for its next chunk
                self.host.close()
            raise
        for thread in helpers:
            thread.join()
        self._account("device", time.perf_counter() - started)

    # --- the three threads ---------------------------------------------------------------------------------------

    def _device(self) -> None:
        clock = self.clocks["device"]
        inbox, perf = self._inbox, time.perf_counter
        while True:
            began = perf()
            kind, item = inbox.get()
            self._waits["device"] += perf() - began
            if kind == _BATCH:
                if item.models:
                    if item.hosted:
                        self._from_host(clock, item)
                    for stage in self.device_stages:
                        self._stage(clock, item, stage)
                    if item.failed is not None:
                        self._isolate(clock, item)
                self._outbox.put((_BATCH, item))
            elif kind == _ISOLATE:
                self._isolate(clock, item)
                item.done.set()
            elif kind == _END:
                self._outbox.put((_END, None))
            elif kind == _DONE:
                return
            else:
                raise item
            item = None  # not kept alive while waiting for the next one

    def _feed(self, clock: StageClock) -> None:
        source = self.source if self.source is not None else self.work.read()
        perf = time.perf_counter
        host_preprocess = "preprocess" not in self.device_stages
        while True:
            self._wait_for(lambda timeout: self._slots.acquire(timeout=timeout), "feeder")
            began = perf()
            raw = next(source, None)
            read = perf()
            clock.seconds["read"] = clock.seconds.get("read", 0.0) + read - began
            if raw is None:
                self._slots.release()
                self._inbox.put((_END, None))
                return
            batch: SubBatch | None = self.work.parse(raw)
            raw = None
            assert batch is not None
            clock.seconds["parse"] = clock.seconds.get("parse", 0.0) + perf() - read
            if batch.models:
                if self.on_enter is not None:
                    self.on_enter(batch)
                if host_preprocess:
                    self._check_stop()
                    if self.host is not None:
                        self._to_host(clock, batch)
                    else:
                        self._stage(clock, batch, "preprocess")
            self._inbox.put((_BATCH, batch))
            batch = None

    def _finish(self, clock: StageClock) -> None:
        perf = time.perf_counter
        while True:
            kind, batch = self._wait_for(lambda timeout: self._get(self._outbox, timeout), "finisher")
            if kind == _END:
                self._inbox.put((_DONE, None))
                return
            if batch.models:
                if batch.outcomes is None and batch.failed is None:
                    self._stage(clock, batch, "postprocess")
                if batch.failed is not None:  # run again where predict may run, the way run_isolated would
                    batch.done = threading.Event()
                    self._inbox.put((_ISOLATE, batch))
                    self._wait_for(batch.done.wait, "finisher")
                if self.on_leave is not None:
                    self.on_leave(batch)
            began = perf()
            self.work.write(batch)
            written = perf()
            self.work.queue(batch)
            clock.seconds["write"] = clock.seconds.get("write", 0.0) + written - began
            clock.seconds["queue"] = clock.seconds.get("queue", 0.0) + perf() - written
            if batch.slot is not None:  # written: whatever came of its preprocessed data is out of memory's way
                assert self.host is not None
                self.host.release(batch.slot)
            batch = None
            self._slots.release()

    def _helper(self, name: str, fn: Callable[[StageClock], None]) -> None:
        started = time.perf_counter()
        try:
            fn(self.clocks[name])
        except _Stopped:
            pass
        except BaseException as exc:
            self._stop.set()
            self._inbox.put((_ERROR, exc))
        finally:
            self._account(name, time.perf_counter() - started)

    # --- the stages ----------------------------------------------------------------------------------------------

    def _stage(self, clock: StageClock, batch: SubBatch, stage: str) -> None:
        """Run ``stage`` on ``batch`` unless an earlier stage failed on it; a failure is noted on the batch."""
        if batch.failed is not None or batch.outcomes is not None:
            return
        pipeline = self.pipeline
        try:
            if stage == "preprocess":
                batch.pre = clock.call(stage, pipeline.preprocess, batch.models)
            elif stage == "predict":
                batch.raw = clock.call(stage, pipeline.predict, batch.models, batch.pre)
                batch.pre = None
            else:
                batch.outcomes = clock.call(stage, _postprocess, pipeline, batch.models, batch.raw)
                batch.raw = None
        except Exception as exc:
            batch.failed = (stage, exc)

    def _to_host(self, clock: StageClock, batch: SubBatch) -> None:
        """Send a sub-batch's records to the next host process (the time it takes counted as ``preprocess``)."""
        assert self.host is not None
        began = time.perf_counter()
        self.host.send(self.work.records(batch))
        batch.hosted = True
        clock.seconds["preprocess"] += time.perf_counter() - began

    def _from_host(self, clock: StageClock, batch: SubBatch) -> None:
        """A hosted sub-batch's preprocessed data, once its host process sent it (the wait counted as the device
        thread's waiting); one whose host stages raised is run whole here, the way any batch is run."""
        assert self.host is not None
        began = time.perf_counter()
        try:
            reply = self.host.take(self._stop.is_set, POLL_S)
        except InterruptedError:  # a helper failed: its error is on its way to this thread
            raise self._helper_error() from None
        finally:
            self._waits["device"] += time.perf_counter() - began
        for stage, spent in reply.seconds.items():
            self.host_clock.seconds[stage] = self.host_clock.seconds.get(stage, 0.0) + spent
        if reply.failed:
            batch.outcomes = run_isolated(self.pipeline, batch.models, clock)
        else:
            batch.pre, batch.slot = reply.pre, reply.slot

    def _isolate(self, clock: StageClock, batch: SubBatch) -> None:
        assert batch.failed is not None
        stage, exc = batch.failed
        batch.failed = batch.pre = batch.raw = None
        batch.outcomes = isolate_failed(self.pipeline, batch.models, stage, exc, clock)

    def _helper_error(self) -> BaseException:
        """The error a helper that failed sent to the device thread."""
        deadline = time.perf_counter() + STOP_JOIN_S
        while time.perf_counter() < deadline:
            got = self._get(self._inbox, POLL_S)
            if got is not None and got[0] == _ERROR:
                error: BaseException = got[1]
                return error
        return InterruptedError("the chunk stopped")

    # --- waiting -------------------------------------------------------------------------------------------------

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopped()

    def _wait_for(self, wait: Callable[[float], Any], name: str) -> Any:
        """``wait(timeout)`` until it returns something true, leaving when the chunk stops; the time counted."""
        began = time.perf_counter()
        try:
            while True:
                self._check_stop()
                got = wait(POLL_S)
                if got:
                    return got
        finally:
            self._waits[name] += time.perf_counter() - began

    @staticmethod
    def _get(box: queue.SimpleQueue[tuple[int, Any]], timeout: float) -> tuple[int, Any] | None:
        try:
            return box.get(timeout=timeout)
        except queue.Empty:
            return None

    def _account(self, name: str, alive: float) -> None:
        clock = self.clocks[name]
        self.threads[name] = ThreadSeconds(sum(clock.seconds.values()), self._waits[name], alive)


def _postprocess(pipeline: InferencePipeline, models: list[Any], raw: Any) -> list[Any]:
    return outcomes_of(pipeline, models, pipeline.postprocess(models, raw))
