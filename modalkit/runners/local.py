"""The local runner: worker processes that each load the pipeline once, like containers, and run chunks.

The embedded default where batch jobs run. A chunk *reference* goes to a worker; the worker reads the input,
writes the results and returns counts. Workers are started with ``spawn`` (safe beside the threads of the flow
process), or forked while the process starting them runs no other thread (on Linux: ``modalkit batch`` starts its
workers before it starts importing Prefect in a thread when its plan comes at once, and a forked worker need not
import modalkit again: half a second saved on this machine). Each loads the pipeline as it starts, and dies with
its parent (a thread in each waits on the parent's sentinel), so a job killed with SIGKILL leaves no worker behind
to race its rerun.

Example:
    >>> from modalkit.runners.local import LocalRunner
    >>> with LocalRunner(settings, "sentiment", workers=2) as runner:  # doctest: +SKIP
    ...     result = runner.run_chunk(job, chunk)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import ForkProcess, SpawnContext, SpawnProcess
from typing import Any

from modalkit.batch.crashes import CrashPlan, CrashTracker
from modalkit.batch.host_pool import HostProcessLost, default_host_workers
from modalkit.exceptions import DeviceError, RemoteError
from modalkit.iomodel import ChunkResult, ChunkSpec, JobSpec
from modalkit.runners.deadline import ChunkDeadline, ChunkTimedOut
from modalkit.settings import Settings
from modalkit.spawn_guard import spawning

__all__ = ["LocalRunner", "default_workers"]

log = logging.getLogger(__name__)

# per worker process: the processor built on the first chunk
_worker_state: dict[str, Any] = {}


def default_workers() -> int:
    """One worker per CPU this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _die_with_parent(parent_pid: int) -> None:
    """End this worker as soon as the job's process is gone, however it ended (SIGKILL included).

    A thread waits on the parent's sentinel (a pipe multiprocessing keeps open in the parent, closed by its
    death). Not Linux's ``PR_SET_PDEATHSIG``: that fires when the parent *thread* that spawned the worker ends,
    and a worker is spawned by whichever thread submits work first (a lane, the thread starting the first chunks),
    so a worker died with its lane, and one killed while it waited for work left the pool's queue locked.
    """
    parent = multiprocessing.parent_process()
    if os.getppid() != parent_pid or parent is None:  # the parent died before this worker started
        os._exit(1)

    def watch() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, name="modalkit-parent-watch", daemon=True).start()


class _ForkedWorker(ForkProcess):
    """A worker forked from this process: it starts with this process's signal handlers (while processes start,
    :func:`~modalkit.spawn_guard.spawning`'s, which only note a signal), so it is forked with SIGTERM blocked and
    takes the default action back before it unblocks it: a SIGTERM from the pool (which stops its workers so) is
    never lost, even one sent the moment it was forked."""

    def start(self) -> None:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def run(self) -> None:  # SIGINT stays blocked, as spawning() left it, until _init_worker ignores it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        super().run()


class _ForkWhileAlone(SpawnContext):
    """``spawn``, but a process started while this one runs no other thread is forked (Linux only): it starts with
    what this process has imported. Forking a process with threads can copy a lock another thread holds; with
    none, nothing is held. The pool still takes it for ``spawn`` (it starts workers as work comes, one at a time)."""

    def Process(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]  # a class there, a factory here
        if sys.platform == "linux" and threading.active_count() == 1:
            return _ForkedWorker(*args, **kwargs)
        return SpawnProcess(*args, **kwargs)


def _init_worker(settings: Settings, model_name: str, parent_pid: int, host_workers: int, cpus: float) -> None:
    from modalkit.ast_guard import install

    install()  # a chunk's stages run on three threads (modalkit/batch/overlap.py)
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the pool
    _worker_state.update(settings=settings, model_name=model_name, host_workers=host_workers, cpus=cpus)
    _warm()  # a worker is started to run chunks: it loads the pipeline at once, while its first chunk is found


def _processor() -> Any:
    processor = _worker_state.get("processor")
    if processor is None:
        from modalkit.batch.chunk import ChunkProcessor
        from modalkit.batch.worker_start import WorkerStart
        from modalkit.inference_pipeline import load_pipeline
        from modalkit.queues import create_backend

        settings: Settings = _worker_state["settings"]
        start = WorkerStart.measure(lambda: load_pipeline(settings, _worker_state["model_name"]))
        processor = ChunkProcessor(
            start.value,
            create_backend(settings.app_settings.queue_config),
            host_workers=_worker_state["host_workers"],
            cpus=_worker_state["cpus"],
        )
        processor.started(start)
        _worker_state["processor"] = processor
    return processor


def _warm() -> None:
    with contextlib.suppress(Exception):  # the first chunk raises it again, with its real message
        _processor()


def _run_chunk(job: JobSpec, chunk: ChunkSpec, crash: CrashPlan) -> ChunkResult:
    processor = _processor()
    with open(_started_file(crash), "w", encoding="utf-8") as fh:  # for the runner: who runs it, since when
        fh.write(f"{os.getpid()} {time.time()!r}")
    try:
        result: ChunkResult = processor.process(job, chunk, crash)
    except HostProcessLost:
        # as if this worker had died where its host process did (a record that crashes a tokenizer's native code):
        # the runner's crash finder runs the chunk again, narrowed down, in a fresh worker
        os._exit(70)
    return result


def _started_file(crash: CrashPlan) -> str:
    return crash.breadcrumb + ".started"


def _started_at(crash: CrashPlan) -> float | None:
    started = _read_started(crash)
    return None if started is None else started[1]


def _read_started(crash: CrashPlan) -> tuple[int, float] | None:
    """(pid, start time) of the worker running the chunk's attempt, once it has begun."""
    try:
        with open(_started_file(crash), encoding="utf-8") as fh:
            pid, began = fh.read().split()
        return int(pid), float(began)
    except (OSError, ValueError):
        return None


def _start_idle(pool: concurrent.futures.ProcessPoolExecutor) -> bool:
    """One more worker process in ``pool`` (unless it is full), started without handing the pool work, and counted
    as idle so that the next task goes to it rather than to a process of its own. This leans on the stdlib pool's
    internals (CPython 3.9-3.13 have them); False when they are not there."""
    processes = getattr(pool, "_processes", None)
    size = getattr(pool, "_max_workers", None)
    spawn = getattr(pool, "_spawn_process", None)
    idle = getattr(pool, "_idle_worker_semaphore", None)
    if processes is None or size is None or spawn is None or idle is None:
        return False
    if len(processes) < size:
        spawn()
        idle.release()
    return True


class _WorkerDied(Exception):
    """The process running a chunk died (the pool it belonged to is restarted)."""


class LocalRunner:
    """A pool of worker processes running chunks of one model; the workers start (and load it) at once.

    Args:
        settings: Settings the workers use (pickled to them once).
        model_name: The model every worker loads.
        workers: How many processes; default one per CPU. This is also ``slots``, the chunks it runs at once.
        host_workers: Host processes per worker (``job_config.host_workers``, see
            :class:`~modalkit.batch.chunk.ChunkProcessor`); default: the settings' value, else the CPUs per worker
            less one (:func:`~modalkit.batch.host_pool.default_host_workers`; 1, none, below 3 CPUs a worker).
        start: Start the workers now, so that they load the model while the caller plans the job.
        chunk_timeout_s: How long an attempt may run once a worker has begun it (``job_config.chunk_timeout_s``;
            None: the adaptive limit of :class:`~modalkit.runners.deadline.ChunkDeadline`). Past it, the worker
            is killed and the attempt fails as :class:`~modalkit.runners.deadline.ChunkTimedOut`.
    """

    def __init__(
        self,
        settings: Settings,
        model_name: str,
        workers: int | None = None,
        start: bool = True,
        chunk_timeout_s: float | None = None,
        host_workers: int | None = None,
    ) -> None:
        self.settings = settings
        self.model_name = model_name
        self.workers = workers or default_workers()
        self.host_workers = (
            host_workers
            or settings.app_settings.job_config.host_workers
            or default_host_workers(default_workers() / self.workers)
        )
        self.slots = self.workers
        self.deadline = ChunkDeadline(chunk_timeout_s)
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._stopped = False
        self._crash_dir = tempfile.mkdtemp(prefix="modalkit-crumbs-")  # where workers say what is in flight
        if start:
            self.start()

    def __enter__(self) -> LocalRunner:
        return self

    def start(self) -> None:
        """Start every worker now and have each load the pipeline, so that this overlaps the caller's planning.

        A pipeline that fails to load fails the first chunk with its real error. Called by the constructor unless
        ``start=False``.
        """
        self.warm(self.workers)

    def warm(self, workers: int) -> None:
        """Have ``workers`` more worker processes start now, each loading the pipeline as it starts (up to the
        pool's size). They are started without handing the pool any work, so the pool's own threads do not start
        yet: while the caller runs no other thread, each is forked (:class:`_ForkWhileAlone`)."""
        pool = self._pool()
        with spawning():
            for _ in range(workers):
                if not _start_idle(pool):  # pragma: no cover - a pool without the stdlib's internals: a task each
                    pool.submit(_warm)

    def resize(self, workers: int) -> None:
        """Run at most ``workers`` chunks at once from now on (``slots``), in at most that many processes: the
        caller knows, once it has planned, how many chunks there are. The workers started already stay."""
        self.workers = self.slots = max(1, workers)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pool(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._stopped:
                raise RemoteError("the local workers were stopped; no more chunks run", retryable=False)
            if self._executor is None:
                with spawning():  # its queues may start multiprocessing's resource tracker
                    self._executor = concurrent.futures.ProcessPoolExecutor(
                        max_workers=self.workers,
                        mp_context=_ForkWhileAlone(),
                        initializer=_init_worker,
                        initargs=(
                            self.settings,
                            self.model_name,
                            os.getpid(),
                            self.host_workers,
                            default_workers() / self.workers,
                        ),
                    )
            return self._executor

    def run_chunk(self, job: JobSpec, chunk: ChunkSpec) -> ChunkResult:
        """Run one chunk on a worker and wait for its counts.

        When a worker dies on it, the chunk runs again here, narrowed down by where the deaths happened
        (:mod:`modalkit.batch.crashes`): a record that kills its worker fails alone, as ``WorkerCrashed``.

        Raises:
            ChunkTimedOut: the attempt ran past the deadline; its worker was killed (retryable; the pool restarts,
                so the chunks beside it run again too: the stdlib pool cannot lose one worker alone).
            RemoteError: a worker died outside the pipeline, or too often (retryable; the pool is restarted).
            ModalkitError: what the chunk raised (storage, queue, pipeline errors keep their type).
        """
        tracker = CrashTracker(os.path.join(self._crash_dir, f"{job.job_id}-{chunk.index:05d}.inflight"))
        while True:
            try:
                return self._run_once(job, chunk, tracker.plan())
            except _WorkerDied as died:
                if not tracker.died():
                    raise RemoteError(
                        f"a local worker died while running chunk {chunk.index} ({chunk.key}), outside the pipeline "
                        f"or {tracker.deaths} times; it will be retried",
                        retryable=True,
                    ) from died.__cause__
                log.warning("a local worker died running chunk %05d (%s); running it again, narrowed down (%d "
                            "records one at a time, %d not run again)", chunk.index, chunk.key,
                            len(tracker.careful), len(tracker.killers))  # fmt: skip

    def _run_once(self, job: JobSpec, chunk: ChunkSpec, crash: CrashPlan) -> ChunkResult:
        pool = self._pool()
        try:
            with contextlib.suppress(OSError):
                os.remove(_started_file(crash))  # an earlier attempt's
            with spawning():  # a submit may spawn a worker
                future = pool.submit(_run_chunk, job, chunk, crash)  # raises BrokenProcessPool if a worker just died
            return self.deadline.wait(future.result, lambda: _started_at(crash), chunk)
        except ChunkTimedOut:
            self._stop_attempt(pool, future, crash)
            raise
        except concurrent.futures.CancelledError as exc:
            raise RemoteError(f"chunk {chunk.index} ({chunk.key}) was not run: the workers were stopped") from exc
        except DeviceError:
            # the worker that met it sits on a broken device: retire this pool's workers (after their current
            # chunks) so that the retry, and every later chunk, runs in fresh processes
            self._restart(pool)
            raise
        except BrokenProcessPool as exc:
            if self._stopped:
                raise RemoteError(f"chunk {chunk.index} ({chunk.key}) was stopped with the workers") from exc
            self._restart(pool)
            raise _WorkerDied() from exc
        finally:
            with contextlib.suppress(OSError):
                os.remove(_started_file(crash))

    def _stop_attempt(
        self, pool: concurrent.futures.ProcessPoolExecutor, future: concurrent.futures.Future[Any], crash: CrashPlan
    ) -> None:
        """Kill the worker running a timed-out attempt (only a kill stops a hung pipeline) and restart the pool."""
        future.cancel()
        started = _read_started(crash)
        processes = getattr(pool, "_processes", None) or {}  # the stdlib keeps them there
        process = processes.get(started[0]) if started else None
        if process is not None:
            log.warning("killing local worker %d, stuck on a chunk past its time limit", process.pid)
            with contextlib.suppress(Exception):
                process.kill()
                process.join(timeout=5)
            self._restart(pool)

    def _restart(self, broken: concurrent.futures.ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is broken:
                self._executor = None
        broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the workers (after their current chunks)."""
        with self._lock:
            self._stopped = True
            executor, self._executor = self._executor, None
        if executor is not None:
            processes = list((getattr(executor, "_processes", None) or {}).values())  # the stdlib keeps them there
            executor.shutdown(wait=True, cancel_futures=True)
            for process in processes:  # started by warm() and never handed work: the pool's threads never ran
                if process.is_alive():
                    process.terminate()
                    process.join(timeout=5)
        shutil.rmtree(self._crash_dir, ignore_errors=True)

    def cancel(self) -> None:
        """Kill the workers now: their chunks stay uncommitted, and threads waiting on them get a RemoteError."""
        with self._lock:
            self._stopped = True
            executor, self._executor = self._executor, None
        shutil.rmtree(self._crash_dir, ignore_errors=True)
        if executor is None:
            return
        processes = list((getattr(executor, "_processes", None) or {}).values())  # the stdlib keeps them there
        manager = getattr(executor, "_executor_manager_thread", None)
        executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            with contextlib.suppress(Exception):
                process.kill()
        for process in processes:
            with contextlib.suppress(Exception):
                process.join(timeout=5)
        if manager is not None:
            # the pool's manager thread closes its wake-up pipe as it ends; an exit while it still runs races it
            # (Python 3.11: the exit hook writes to the pipe just closed, OSError EBADF and a traceback)
            manager.join(timeout=5)
