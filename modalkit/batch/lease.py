"""One run of a job at a time: a lease in the job's output, taken atomically, kept alive, taken over when its
holder is gone.

The lease lives under ``_lease/`` as numbered generations (``_lease/00000001.json``, ...). Only a conditional
create (``If-None-Match: *`` on S3, a hard link locally) is needed, which every store here has:

- a run takes the lease by *creating* the next generation; of two runs racing for it exactly one creates it;
- the holder renews by rewriting its own generation (``renewed_at``) every third of the lease's time;
- a generation whose renewals stopped for ``ttl_seconds`` (its holder was SIGKILLed, its machine lost) or that
  was released is taken over by creating the next one; a holder that sees a newer generation has lost the lease
  and stops sending (the flow cancels its runner and fails).

A run that has died is taken over at most ``ttl_seconds`` after its last renewal
(``app_settings.job_config.lease_seconds``, 60 s by default), and at once when it ran on this machine (the same
host, boot and PID namespace) and its process is gone: a user who Ctrl-C's or kills a run and starts it again
waits for nothing. Hosts must agree on the time to within a small
part of that (NTP): ``renewed_at`` is the holder's clock, read by the taker.

Example:
    >>> lease = take_lease(store, "s3://bucket/scored", job_id, ttl_seconds=60)   # doctest: +SKIP
    >>> ...                                                                        # doctest: +SKIP
    >>> lease.release()                                                            # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from modalkit.batch.layout import OutputLayout
from modalkit.batch.storage import Store
from modalkit.exceptions import ConfigError, ModalkitError, StorageError

__all__ = ["JobLease", "LeaseHeld", "LeaseLost", "running_run", "take_lease"]

log = logging.getLogger(__name__)

#: How often ``--wait`` looks again whether the running one ended (at most; a third of the lease's time if less).
WAIT_POLL_SECONDS = 2.0


class LeaseHeld(ConfigError):
    """Another run of the same job holds the lease: this one did not start. ``holder`` is its lease body."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseLost(ModalkitError):
    """This run's lease was taken over (its renewals stopped for the lease's time): it stopped sending."""


class JobLease:
    """A lease this run holds: renewed in a thread until :meth:`release` (or until it is lost).

    Attributes:
        uri: The generation file this run created.
        body: What it says about this run (host, pid, flow run, started_at, renewed_at, ttl_seconds).
    """

    def __init__(self, store: Store, layout: OutputLayout, generation: int, body: dict[str, Any]) -> None:
        self.store = store
        self.layout = layout
        self.generation = generation
        self.uri = layout.lease(generation)
        self.body = body
        self.ttl = float(body["ttl_seconds"])
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._last_renewal = time.monotonic()
        self._thread = threading.Thread(target=self._renew_loop, name="modalkit-lease", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> bool:
        """True once another run took the lease over, or renewals failed for the lease's time."""
        return self._lost.is_set()

    def check(self) -> None:
        """Raise :class:`LeaseLost` when the lease is lost (the flow calls it before sending a chunk)."""
        if self.lost:
            raise LeaseLost(
                f"this run lost its lease on {self.layout.root} (no renewal for {self.ttl:g} s, and another run "
                "may have taken the job over); it stopped sending chunks; run the same command again to resume"
            )

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if _newest_generation(self.store, self.layout) > self.generation:
                    log.error("lease %s was taken over by a newer run; stopping", self.uri)
                    self._lost.set()
                    return
                self.body["renewed_at"] = _now()
                self.store.write_bytes(self.uri, orjson.dumps(self.body))
                self._last_renewal = time.monotonic()
            except Exception as exc:  # a storage outage: try again; past the lease's time it is lost
                log.warning("could not renew lease %s: %s", self.uri, exc)
                if time.monotonic() - self._last_renewal > self.ttl:
                    self._lost.set()
                    return

    def release(self) -> None:
        """Stop renewing and mark the lease released (the next run takes it at once); a lost lease is left as is."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if self.lost:
            return
        try:
            if _newest_generation(self.store, self.layout) == self.generation:
                self.body["released_at"] = _now()
                self.store.write_bytes(self.uri, orjson.dumps(self.body))
        except Exception as exc:  # the lease then expires on its own, ttl_seconds after its last renewal
            log.warning("could not release lease %s: %s", self.uri, exc)


def take_lease(
    store: Store,
    output_uri: str,
    job_id: str,
    ttl_seconds: float,
    wait: bool = False,
    flow_run_id: str | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> JobLease:
    """Take the lease of job ``job_id`` on ``output_uri``, or fail at once naming the run that holds it.

    Args:
        ttl_seconds: How long after its last renewal a lease whose holder is gone is taken over.
        wait: Wait until the running one ends (or its lease expires) instead of failing.
        flow_run_id: The Prefect flow run of this run, shown to a run that is refused.
        on_wait: Told once, in one line, what this run waits for.

    Raises:
        LeaseHeld: another run holds the lease and ``wait`` is False.
    """
    layout = OutputLayout(output_uri)
    now = _now()
    body = {
        "job_id": job_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "flow_run_id": flow_run_id,
        **_this_process(),
        "started_at": now,
        "renewed_at": now,
        "ttl_seconds": ttl_seconds,
        "released_at": None,
    }
    told = False
    while True:
        current = _newest_generation(store, layout)
        holder = _read(store, layout, current) if current else None
        if holder is None or _free(holder):
            body["started_at"] = body["renewed_at"] = _now()
            if store.create_exclusive(layout.lease(current + 1), orjson.dumps(body)):
                _forget_older(store, layout, current + 1)
                return JobLease(store, layout, current + 1, body)
            continue  # another run took it first: look at what it wrote
        if not wait:
            raise LeaseHeld(_held_message(output_uri, holder), holder)
        if on_wait is not None and not told:
            on_wait(f"waiting for the run of job {job_id} that holds {output_uri}: {_describe(holder)}")
            told = True
        time.sleep(min(WAIT_POLL_SECONDS, float(holder.get("ttl_seconds") or ttl_seconds) / 3))


def running_run(store: Store, output_uri: str) -> str | None:
    """What a run taking the lease of ``output_uri`` now would be refused with (the live holder named), or None
    when the lease is free. Reads only: one listing and one small read."""
    layout = OutputLayout(output_uri)
    current = _newest_generation(store, layout)
    holder = _read(store, layout, current) if current else None
    if holder is None or _free(holder):
        return None
    return _held_message(output_uri, holder)


def _newest_generation(store: Store, layout: OutputLayout) -> int:
    generations = [g for g in map(OutputLayout.lease_generation, store.list_names(layout.lease_dir)) if g]
    return max(generations, default=0)


def _read(store: Store, layout: OutputLayout, generation: int) -> dict[str, Any] | None:
    try:
        body = orjson.loads(store.read_bytes(layout.lease(generation)))
    except (orjson.JSONDecodeError, StorageError):
        return None  # unreadable, or replaced meanwhile: try to create the next one (a race is settled there)
    return body if isinstance(body, dict) else None


def _free(holder: dict[str, Any]) -> bool:
    if holder.get("released_at"):
        return True
    return _age(holder) > float(holder.get("ttl_seconds") or 0) or _gone_from_here(holder)


def _this_process() -> dict[str, Any]:
    """What tells this process apart on this machine, beyond host and pid (Linux; empty elsewhere): the boot, the
    PID namespace (containers on one kernel share a boot) and the process's start time (a pid is reused)."""
    try:
        return {
            "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": os.readlink("/proc/self/ns/pid"),
            "process_start": _process_start(os.getpid()),
        }
    except OSError:
        return {}


def _gone_from_here(holder: dict[str, Any]) -> bool:
    """The holder ran on this machine, in this PID namespace, and its process is gone (or a zombie)."""
    if holder.get("host") != socket.gethostname() or not holder.get("process_start"):
        return False
    here = _this_process()
    if not here or any(holder.get(key) != here[key] for key in ("boot_id", "pid_namespace")):
        return False
    try:
        return _process_start(int(holder["pid"])) != holder["process_start"]
    except (OSError, KeyError, TypeError, ValueError):
        return True  # no such process


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), or None for a zombie."""
    stat = _read_text(f"/proc/{pid}/stat")
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _read_text(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read().strip()


def _age(holder: dict[str, Any]) -> float:
    try:
        renewed = dt.datetime.fromisoformat(str(holder["renewed_at"]))
    except (KeyError, ValueError):
        return float("inf")
    return (dt.datetime.now(dt.UTC) - renewed).total_seconds()


def _forget_older(store: Store, layout: OutputLayout, generation: int) -> None:
    """Older generations are history: delete them so ``_lease/`` holds one or two files (best effort)."""
    for name in store.list_names(layout.lease_dir):
        older = OutputLayout.lease_generation(name)
        if older and older < generation:
            try:
                store.delete(layout.lease(older))
            except Exception as exc:
                log.debug("could not delete old lease %s: %s", name, exc)


def _describe(holder: dict[str, Any]) -> str:
    flow_run = f", Prefect flow run {holder['flow_run_id']}" if holder.get("flow_run_id") else ""
    return (
        f"host {holder.get('host')}, pid {holder.get('pid')}{flow_run}, started at {holder.get('started_at')}, "
        f"last renewed {holder.get('renewed_at')} ({_age(holder):.0f} s ago)"
    )


def _held_message(output_uri: str, holder: dict[str, Any]) -> str:
    ttl = float(holder.get("ttl_seconds") or 0)
    return (
        f"job {holder.get('job_id')} is already running on {output_uri} ({_describe(holder)}); this run did not "
        f"start: wait for that one to finish, or pass --wait to start when it ends (if it died, a run on its "
        f"machine takes its lease over at once, a run elsewhere {ttl:g} s after its last renewal)"
    )


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
