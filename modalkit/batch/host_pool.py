"""Host processes: a batch worker's pipeline host stages (validate again, preprocess) on cores of their own.

A worker (one per device) that runs ``predict`` on its own thread feeds it from ``N`` host processes, started once
per worker (spawned, so they share nothing with the model's process but what they are sent). Each runs the object
the loaded pipeline's :meth:`~modalkit.inference_pipeline.InferencePipeline.host_stages` returns: something small
and picklable, free of the model and the device, with a ``preprocess(input_list)`` method. A sub-batch goes to the
processes in turn (sub-batch ``k`` to process ``k % N``): its records as parsed (the worker parses and validates
them too: it needs their ids and models for ``predict`` and the output rows), which the process validates against
the input model and preprocesses. Each process answers in the order it was asked, so the worker reads the answers
in input order.

What comes back is pickled with protocol 5, its large buffers (numpy arrays) out of band in a slot: an anonymous
shared memory file (``memfd``) of the host process, whose descriptor travels over the process's socket the first
time, mapped once on both sides and reused once the worker gives it back (its sub-batch written), so the worker
unpickles without copying and no page is faulted in twice. Measured (2-core machine, a W3 sub-batch: 256 x 4096
float32, 4 MiB): the worker's thread spent 7.3 ms a sub-batch receiving it pickled through the pipe and 1.0 ms
mapping a fresh file; a fresh file also cost the host process 6-15 ms to fill (page faults), which reused slots
do not pay (W3 with two host processes: 0.57 of the device's bound with a file per sub-batch, 0.66 with slots, on
the same loaded machine). Nothing is left behind when a process dies: the files have no name and go with their
last mapping. A pipeline must therefore not keep its preprocessed arrays past the sub-batch's ``postprocess``.

A sub-batch whose host stages raise comes back as failed; the worker then runs it whole in its own process the way
it runs any batch (:func:`~modalkit.inference_pipeline.run_isolated`), so what its records get does not depend on
where they were preprocessed. The processes ignore Ctrl-C (the worker stops them), die with the worker (a thread in
each waits on its parent's sentinel), and a process that dies makes the worker's current chunk fail with
:class:`HostProcessLost` (a local worker then ends itself, so that its runner's crash finder takes over).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, TypeAdapter

from modalkit.exceptions import ModalkitError
from modalkit.spawn_guard import spawning

if TYPE_CHECKING:  # multiprocessing is imported when host processes start, not with the chunk engine: a command
    # that fails on a bad option must not have loaded it
    from multiprocessing.connection import Connection

__all__ = ["HostPool", "HostProcessLost", "HostReply", "default_host_workers"]

_ALIGN = 64  # numpy wants its buffers aligned; 64 bytes suits every dtype and SIMD width
#: Buffers smaller than this travel inside the pickle (a shared memory file costs a few syscalls).
_INLINE_BYTES = 64 * 1024
#: How long a host process may take to start and build its host stages.
_READY_S = 120.0
#: How long :meth:`HostPool.close` waits for a process to leave before it is killed.
_STOP_S = 1.0


def default_host_workers(cpus_per_worker: float) -> int:
    """``job_config.host_workers`` when it is empty: the CPUs a worker has, less the one its own process keeps (its
    device thread, and parse, validate, postprocess and write); 1 (no host processes) below 3 CPUs. Measured on W3
    with one worker on 2 CPUs: 2 host processes reached 0.65 of the device's bound, the worker's own threads 0.76
    (bench/RESULTS.md, "W3")."""
    return max(1, int(cpus_per_worker) - 1)


class HostProcessLost(ModalkitError):
    """A host process of the worker died (killed, out of memory, or a crash in the host stages' native code)."""


class HostReply:
    """A sub-batch's answer from a host process: its preprocessed data, or that its host stages raised; and the
    process's seconds on it (``preprocess``: validating again, preprocessing and shipping the result)."""

    __slots__ = ("failed", "pre", "seconds", "slot")

    def __init__(self, pre: Any, failed: bool, seconds: dict[str, float], slot: tuple[int, int] | None) -> None:
        self.pre = pre
        self.failed = failed
        self.seconds = seconds
        #: the shared memory slot ``pre``'s buffers live in, to :meth:`HostPool.release` once the sub-batch is written
        self.slot = slot


class HostPool:
    """``processes`` host processes running ``stages.preprocess`` for one worker (see the module).

    Args:
        stages: What the pipeline's ``host_stages()`` returned (pickled to each process once).
        input_model: The pipeline's input model: each process validates a sub-batch's records against it.
        processes: How many processes (at least 1).
    """

    def __init__(self, stages: Any, input_model: type[BaseModel], processes: int) -> None:
        self.size = max(1, processes)
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        self._send_locks = [threading.Lock() for _ in range(self.size)]
        self._ready = [False] * self.size
        #: each process's slots, as mapped here: reused, so that each page is faulted in once
        self._maps: list[dict[int, memoryview]] = [{} for _ in range(self.size)]
        self._sent = 0  # sub-batches sent, ever: the next one goes to process _sent % size
        self._taken = 0  # answers taken, ever
        with spawning():  # the processes start with Ctrl-C blocked (no start-up traceback); the worker stops them
            for n in range(self.size):
                mine, theirs = ctx.Pipe(duplex=True)
                proc = ctx.Process(
                    target=_serve, args=(theirs, stages, input_model, os.getpid()), name=f"modalkit-host-{n}",
                    daemon=True,
                )  # fmt: skip
                proc.start()
                theirs.close()
                self._procs.append(proc)
                self._conns.append(mine)

    @property
    def pids(self) -> list[int]:
        """The host processes' ids."""
        return [p.pid for p in self._procs]

    def alive(self) -> bool:
        """Whether every host process is running."""
        return all(p.is_alive() for p in self._procs)

    def wait_ready(self, timeout: float = _READY_S) -> None:
        """Wait until every process has built its host stages (so that a measurement does not time start-up).

        Raises:
            HostProcessLost: a process died before it was ready, or was not ready within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        for n, conn in enumerate(self._conns):
            if self._ready[n]:
                continue
            while not conn.poll(0.05):
                if not self._procs[n].is_alive():
                    raise self._lost(n)
                if time.monotonic() > deadline:
                    raise HostProcessLost(f"host process {self._procs[n].pid} was not ready in {timeout:.0f} s",
                                          retryable=True)  # fmt: skip
            try:
                conn.recv_bytes()
            except (OSError, EOFError) as exc:
                raise self._lost(n) from exc
            self._ready[n] = True

    def in_flight(self) -> int:
        """Sub-batches sent whose answer was not taken."""
        return self._sent - self._taken

    def send(self, records: list[Any]) -> None:
        """Send a sub-batch's records (as parsed, one per input the pipeline gets) to the next process in turn."""
        n = self._sent % self.size
        with self._send_locks[n]:
            try:
                self._conns[n].send(records)
            except (OSError, EOFError) as exc:
                raise self._lost(n) from exc
        self._sent += 1

    def take(self, stopped: Callable[[], bool], poll_s: float) -> HostReply:
        """The answer to the oldest sub-batch sent and not taken, once it comes (input order).

        Raises:
            HostProcessLost: the process that has it died.
            InterruptedError: ``stopped()`` became true while waiting.
        """
        n = self._taken % self.size
        conn = self._conns[n]
        if not self._ready[n]:
            self.wait_ready()
        while not conn.poll(poll_s):
            if stopped():
                raise InterruptedError("the chunk stopped")
            if not self._procs[n].is_alive():
                raise self._lost(n)
        try:
            status, spans, seconds, payload = pickle.loads(conn.recv_bytes())
            slot = None
            if status == "slot":
                index, size, fresh = payload
                if fresh:  # a new (or larger) shared memory file for this slot: map it once
                    fd = _recv_handle(conn)
                    try:
                        self._maps[n][index] = memoryview(mmap.mmap(fd, size))
                    finally:
                        os.close(fd)
                view = self._maps[n][index]
                (start, length), *rest = spans
                pre = pickle.loads(view[start : start + length], buffers=[view[a : a + b] for a, b in rest])
                slot = (n, index)
            else:
                pre = payload
        except (OSError, EOFError) as exc:
            raise self._lost(n) from exc
        self._taken += 1
        return HostReply(pre, status == "failed", seconds, slot)

    def release(self, slot: tuple[int, int]) -> None:
        """Give a slot back to its process once its sub-batch is written: its buffers are then written over."""
        n, index = slot
        with self._send_locks[n], contextlib.suppress(OSError, ValueError):
            self._conns[n].send(index)

    def close(self) -> None:
        """Stop the processes: ask, then wait ``_STOP_S``, then kill."""
        for conn, lock in zip(self._conns, self._send_locks, strict=True):
            with lock, contextlib.suppress(OSError, ValueError):
                conn.send(None)
        deadline = time.monotonic() + _STOP_S
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(_STOP_S)
        for conn in self._conns:
            conn.close()

    def _lost(self, n: int) -> HostProcessLost:
        code = self._procs[n].exitcode
        how = "is gone" if code is None else f"exited with {code}" if code >= 0 else f"was killed by signal {-code}"
        return HostProcessLost(
            f"host process {self._procs[n].pid} of this worker {how} (see job_config.host_workers)", retryable=True
        )


# --- in the host process -----------------------------------------------------------------------------------------


def _serve(conn: Connection, stages: Any, input_model: type[BaseModel], parent_pid: int) -> None:
    """A host process's loop: records in, preprocessed data out, until told to stop or the worker is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's to handle (its runner stops it)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _die_with_parent(parent_pid)
    validate = TypeAdapter(list[input_model]).validate_python  # type: ignore[valid-type]
    slots = _Slots(conn, parent_pid)
    perf = time.perf_counter
    conn.send_bytes(b"ready")
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        if type(message) is int:  # a slot given back
            slots.free.append(message)
            continue
        began = perf()
        try:
            pre = stages.preprocess(validate(message))
        except Exception:  # the worker runs this sub-batch again itself, and splits it
            conn.send_bytes(pickle.dumps(("failed", None, {"preprocess": perf() - began}, None)))
            continue
        message = None
        slots.reply(pre, began)


class _Slots:
    """A host process's shared memory files, reused: a slot is written again only once the worker gave it back
    (its sub-batch written). A reply that needs one when none is free takes a new one: the worker holds at most
    ``prefetch depth + 2`` sub-batches, so the slots stop growing at about that many."""

    def __init__(self, conn: Connection, parent_pid: int) -> None:
        self.conn = conn
        self.parent_pid = parent_pid
        self.free: list[int] = []
        self.files: list[tuple[int, mmap.mmap]] = []  # (size, mapping) per slot

    def reply(self, pre: Any, began: float) -> None:
        """Send ``pre`` back: pickled, its large buffers in a slot whose descriptor follows when it is new."""
        buffers: list[memoryview] = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            try:
                raw = buffer.raw()
            except BufferError:  # not contiguous: pickled in band
                return True
            if raw.nbytes < _INLINE_BYTES:
                return True
            buffers.append(raw)
            return False

        head = pickle.dumps(pre, protocol=5, buffer_callback=out_of_band)
        if not buffers:
            self.conn.send_bytes(pickle.dumps(("inline", None, _seconds(began), pre), protocol=5))
            return
        spans, end = [(0, len(head))], _aligned(len(head))
        for raw in buffers:
            spans.append((end, raw.nbytes))
            end = _aligned(end + raw.nbytes)
        index, fd = self._slot(end)
        size, mapped = self.files[index]
        mapped[: len(head)] = head
        for (start, length), raw in zip(spans[1:], buffers, strict=True):
            mapped[start : start + length] = raw.cast("B")
        buffers.clear()
        self.conn.send_bytes(pickle.dumps(("slot", spans, _seconds(began), (index, size, fd is not None))))
        if fd is not None:
            try:
                _send_handle(self.conn, fd, self.parent_pid)
            finally:
                os.close(fd)

    def _slot(self, size: int) -> tuple[int, int | None]:
        """A free slot of at least ``size`` bytes, and the descriptor of its file when it is new (or grown)."""
        index = self.free.pop() if self.free else len(self.files)
        if index < len(self.files) and self.files[index][0] >= size:
            return index, None
        size = max(size, 1 << 20)
        fd = os.memfd_create("modalkit-host", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        mapped = mmap.mmap(fd, size)
        if index < len(self.files):
            self.files[index][1].close()
            self.files[index] = (size, mapped)
        else:
            self.files.append((size, mapped))
        return index, fd


def _seconds(began: float) -> dict[str, float]:
    # validating again is part of preprocessing here: the worker's own parse already counts the records' parsing
    return {"preprocess": time.perf_counter() - began}


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _die_with_parent(parent_pid: int) -> None:
    """End this process as soon as the worker is gone, however it ended (SIGKILL included)."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is None or os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, name="modalkit-worker-watch", daemon=True).start()


def _recv_handle(conn: Connection) -> int:
    from multiprocessing.reduction import recv_handle

    return int(recv_handle(conn))


def _send_handle(conn: Connection, fd: int, pid: int) -> None:
    from multiprocessing.reduction import send_handle

    send_handle(conn, fd, pid)
