"""The batch job under stress: killed and resumed, S3/SQS cut mid-job, a dying worker, bad input caught up front.

Every test ends on the job invariant (ARCHITECTURE.md): every input record id appears exactly once across the
part files and the failure files, and ``records == succeeded + failed``. Where queues are named, every success
and every failure reached its queue; exactly once where the design promises it (the local queue, SQS FIFO).

S3 and SQS are a real moto_server; an outage is a :class:`TcpProxy` in front of it, cut and restored. Jobs run
either in this process (the flow, against the session's Prefect server) or as the real ``modalkit batch``
command, which is killed with SIGKILL; every process started here is stopped by its PID.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from batch_support import (
    assert_record_invariant,
    drain_sqs,
    duplicates,
    read_manifest,
    write_config,
)
from support import MotoServer, TcpProxy, stop_process

from flows.batch_inference import JobFailed, batch_inference  # imports Prefect, which sets up its logging
from modalkit.aws import reset_clients
from modalkit.batch.job import plan_job, resolve_job_config, start_job
from modalkit.batch.queueing import RecordSender, read_journal
from modalkit.exceptions import ConfigError, ModalkitError, QueueError, StorageError
from modalkit.settings import Settings
from modalkit.task_queue import LocalQueueBackend

TESTS_DIR = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^\d{5}\.json$")  # a commit marker; not a journal (NNNNN.progress.json) nor a temp file
POLL = 0.02
DEADLINE = 180.0  # only a guard against a hung job; no assertion is about time


# --- data and checks -----------------------------------------------------------------------------------------


def make_records(n: int, pad: int = 0) -> tuple[bytes, list[str], set[str]]:
    """JSONL of ``n`` reviews with ids; returns (data, every id, the ids that must fail).

    Every 37th text makes the model's predict raise for its whole batch (only that record may fail), every 53rd
    is empty (fails validation); ``pad`` adds an ignored field to make records, and so chunks, bigger.
    """
    lines, ids, bad = [], [], set()
    for i in range(n):
        rid = f"r{i:06d}"
        text = "great value, love it" if i % 3 else "terrible, it broke after a day"
        if i % 37 == 5:
            text, _ = f"POISON-PREDICT {text}", bad.add(rid)
        elif i % 53 == 7:
            text, _ = "", bad.add(rid)
        lines.append(json.dumps({"id": rid, "text": text, "pad": "x" * pad}))
        ids.append(rid)
    return ("\n".join(lines) + "\n").encode(), ids, bad


def check_invariant(
    output_uri: str,
    ids: list[str],
    bad: set[str],
    summary: dict[str, Any],
    queued: dict[str, list[dict[str, Any]]] | None = None,
    exactly_once: bool = True,
) -> dict[str, set[str]]:
    """The job invariant (batch_support's one helper) over what the job wrote and queued, and per-record isolation:
    exactly the bad records failed. Returns the ids that succeeded and the ids that failed."""
    outcome = assert_record_invariant(output_uri, ids, queued, summary, exactly_once=exactly_once)
    assert set(outcome["failure"]) == bad  # per-record isolation: exactly the bad records failed
    manifest = read_manifest(output_uri)
    assert (manifest["job_id"], manifest["status"]) == (summary["job_id"], "completed")
    return {"success": set(outcome["success"]), "failure": set(outcome["failure"])}


def local_queue(root: Path, ok: str, bad: str) -> dict[str, list[dict[str, Any]]]:
    backend = LocalQueueBackend(root)
    try:
        return {
            "success": [json.loads(b) for b in backend.messages(ok)],
            "failure": [json.loads(b) for b in backend.messages(bad)],
        }
    finally:
        backend.close()


def sqs_queue(sqs: Any, ok_url: str, bad_url: str) -> dict[str, list[dict[str, Any]]]:
    return {"success": drain_sqs(sqs, ok_url), "failure": drain_sqs(sqs, bad_url)}


# --- where a job stands: markers and manifest, read straight from disk or moto --------------------------------


class Output:
    """A job's output location, read without modalkit (straight from the disk, or from moto without a proxy)."""

    def __init__(self, uri: str, s3: Any = None) -> None:
        self.uri = uri
        self.s3 = s3

    def _names(self, sub: str) -> list[str]:
        if self.s3 is None:
            folder = Path(self.uri, sub)
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        bucket, _, prefix = self.uri.removeprefix("s3://").partition("/")
        listing = self.s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{sub}".lstrip("/"))
        return sorted(obj["Key"].rsplit("/", 1)[-1] for obj in listing.get("Contents", []))

    def markers(self) -> int:
        return sum(1 for name in self._names("_chunks/") if MARKER.match(name))

    def finished(self) -> bool:
        return "_manifest.json" in self._names("")

    def empty(self) -> bool:
        if self.s3 is None:
            return not Path(self.uri).exists()
        return not self._names("")


def wait_until(what: str, condition: Callable[[], bool], alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if not alive():
            pytest.fail(f"the job ended before {what}; make the job longer")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(POLL)


# --- processes, from /proc -----------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, ppid = text.rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = stat[1]
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def spawn_workers(pids: set[int], job: int | None = None) -> set[int]:
    """The local pool's worker processes among ``pids``: multiprocessing ``spawn`` children, and with ``job`` (the
    pid of a ``modalkit batch`` command) the children it forked, which carry its command line."""
    forked = cmdline(job) if job is not None else None
    return {pid for pid in pids if "spawn_main" in cmdline(pid) or (forked and cmdline(pid) == forked)}


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def survivors(pids: set[int]) -> set[int]:
    """The processes of ``pids`` still alive once they had a fair chance to exit."""
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(POLL)
    return {p for p in pids if alive(p)}


# --- the CLI -------------------------------------------------------------------------------------------------


class Cli:
    """``python -m modalkit.cli batch ...`` as a real process, output in files (no pipe to fill)."""

    def __init__(self, tmp_path: Path, prefect_api: str) -> None:
        self.tmp_path = tmp_path
        self.env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(TESTS_DIR)}
        self.runs = 0

    def start(self, *args: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
        self.runs += 1
        out, err = self.tmp_path / f"cli-{self.runs}.out", self.tmp_path / f"cli-{self.runs}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "modalkit.cli", "batch", *args],
                env=self.env, cwd=self.tmp_path, stdout=stdout, stderr=stderr,
            )  # fmt: skip
        return proc, out, err

    def run(self, *args: str) -> tuple[int, str, str]:
        proc, out, err = self.start(*args)
        try:
            rc = proc.wait(timeout=DEADLINE)
        finally:
            stop_process(proc)
        return rc, out.read_text(), err.read_text()

    def summary(self, *args: str) -> dict[str, Any]:
        rc, out, err = self.run(*args)
        assert rc == 0, f"exit {rc}: {err[-3000:]}"
        return dict(json.loads(out.strip().splitlines()[-1]))

    def start_and_kill(self, output: Output, *args: str) -> None:
        """Start the job, SIGKILL it once two chunks are committed, and check it took its workers with it."""
        proc, _, err = self.start(*args)
        tree: set[int] = set()
        try:
            wait_until("two chunks were committed", lambda: output.markers() >= 2, lambda: proc.poll() is None)
            tree = descendants(proc.pid)
            workers = spawn_workers(tree, proc.pid)
            assert workers, (
                f"no worker process under the job (pid {proc.pid}): {[cmdline(p) for p in tree]}\n"
                f"{err.read_text(errors='replace')[-3000:]}"
            )
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
            left = survivors(tree)
            assert left == set(), f"orphans outlived the killed job: {[cmdline(p) for p in left]}"
            assert not output.finished(), "the job finished before it was killed; make it longer"
        finally:
            stop_process(proc)
            kill_all(tree)


def batch_args(input_uri: str, output_uri: str, config: Path, ok: str, bad: str) -> list[str]:
    return [input_uri, output_uri, "--config", str(config), "--id-field", "id",
            "--success-queue", ok, "--failure-queue", bad, "--json"]  # fmt: skip


# --- AWS fixtures --------------------------------------------------------------------------------------------


@pytest.fixture
def direct(s3: Any, sqs: Any) -> dict[str, Any]:
    """boto3 clients straight to moto_server (never through a proxy), to set up and read back."""
    return {"s3": s3, "sqs": sqs}


def make_queues(sqs: Any, unique: str, *, fifo: bool) -> tuple[str, str, str, str]:
    """(success name, its URL, failure name, its URL)."""
    out = []
    for stem in ("ok", "bad"):
        name = f"{stem}-{unique}" + (".fifo" if fifo else "")
        attributes = {"FifoQueue": "true"} if fifo else {}
        out += [name, sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]]
    return out[0], out[1], out[2], out[3]


# --- 1. killed with SIGKILL, run again -----------------------------------------------------------------------


@pytest.mark.slow
def test_killed_job_resumes_from_committed_chunks_with_local_queue(tmp_path: Path, prefect_api: str) -> None:
    data, ids, bad = make_records(20_000, pad=20)  # ~26 chunks of 64 KiB
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "reviews.jsonl").write_bytes(data)
    config = write_config(tmp_path, batch_config={"max_batch_size": 16})
    out = str(tmp_path / "out")
    cli = Cli(tmp_path, prefect_api)
    args = batch_args(str(tmp_path / "in"), out, config, "ok", "bad")

    cli.start_and_kill(Output(out), *args)
    summary = cli.summary(*args)

    assert 2 <= summary["chunks_skipped"] < summary["chunks"]
    check_invariant(out, ids, bad, summary, local_queue(tmp_path / "queues", "ok", "bad"))


@pytest.mark.slow
def test_killed_job_resumes_with_sqs_fifo_queues_exactly_once(
    tmp_path: Path, prefect_api: str, direct: dict[str, Any], unique: str
) -> None:
    data, ids, bad = make_records(300, pad=2000)  # ~10 chunks of 64 KiB, 300 messages at most per queue
    bucket = f"resume-{unique}"
    direct["s3"].create_bucket(Bucket=bucket)
    direct["s3"].put_object(Bucket=bucket, Key="in/reviews.jsonl", Body=data)
    ok, ok_url, bad_q, bad_url = make_queues(direct["sqs"], unique, fifo=True)
    config = write_config(tmp_path, queue_config={"backend": "sqs"}, batch_config={"max_batch_size": 4})
    out = f"s3://{bucket}/out"
    cli = Cli(tmp_path, prefect_api)
    args = batch_args(f"s3://{bucket}/in/", out, config, ok, bad_q)

    cli.start_and_kill(Output(out, direct["s3"]), *args)
    summary = cli.summary(*args)

    assert 2 <= summary["chunks_skipped"] < summary["chunks"]
    check_invariant(out, ids, bad, summary, sqs_queue(direct["sqs"], ok_url, bad_url))


# --- 2. S3 or SQS unreachable for a few seconds mid-job ------------------------------------------------------


class Outage(threading.Thread):
    """Cuts ``proxy`` for ``seconds`` once the job has committed a chunk (and has not finished)."""

    def __init__(self, proxy: TcpProxy, output: Output, seconds: float = 4.0) -> None:
        super().__init__(daemon=True)
        self.proxy = proxy
        self.output = output
        self.seconds = seconds
        self.stop = threading.Event()
        self.cut_mid_job = False

    def run(self) -> None:
        while not self.stop.is_set() and self.output.markers() < 1:
            time.sleep(POLL)
        if self.stop.is_set() or self.output.finished():
            return
        self.proxy.cut()
        try:
            self.cut_mid_job = not self.output.finished()
            self.stop.wait(self.seconds)
        finally:
            self.proxy.restore()


@pytest.mark.slow
@pytest.mark.parametrize("service", ["s3", "sqs"])
def test_outage_mid_job_loses_no_record(
    service: str,
    aws: MotoServer,
    direct: dict[str, Any],
    tmp_path: Path,
    prefect_api: str,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    record_property: Callable[[str, object], None],
) -> None:
    data, ids, bad = make_records(300, pad=1500)  # ~8 chunks
    bucket = f"outage-{unique}"
    direct["s3"].create_bucket(Bucket=bucket)
    direct["s3"].put_object(Bucket=bucket, Key="in/reviews.jsonl", Body=data)
    ok, ok_url, bad_q, bad_url = make_queues(direct["sqs"], unique, fifo=False)
    config = write_config(
        tmp_path,
        batch_config={"max_batch_size": 8},
        # one attempt per send: an outage of seconds fails windows and chunks, so the chunk retries and the
        # queue journal are what gets tested, not just the senders' patience
        queue_config={"backend": "sqs", "max_send_attempts": 1},
        job_config={"chunk_retries": 4, "retry_delay_seconds": 1},
    )
    out = f"s3://{bucket}/out"
    params = {"input_uri": f"s3://{bucket}/in/", "output_uri": out, "config": str(config), "id_field": "id",
              "success_queue": ok, "failure_queue": bad_q}  # fmt: skip
    proxy = TcpProxy(aws.port)
    monkeypatch.setenv(f"AWS_ENDPOINT_URL_{service.upper()}", proxy.url)  # the job reaches this service via the proxy
    reset_clients()
    outage = Outage(proxy, Output(out, direct["s3"]))
    runs = 1
    outage.start()
    try:
        failed: JobFailed | None = None
        try:
            summary = batch_inference(**params)
        except JobFailed as exc:
            failed = exc
        if failed is not None:
            assert failed.retryable, f"a job failed by a short outage should say a rerun may complete it: {failed}"
            outage.join()
            runs += 1
            summary = batch_inference(**params)
            assert summary["chunks_skipped"] >= 1
    finally:
        outage.stop.set()
        outage.join()
        proxy.close()
        monkeypatch.delenv(f"AWS_ENDPOINT_URL_{service.upper()}")  # read back straight from moto
        reset_clients()

    assert outage.cut_mid_job, "the outage never happened while the job ran; make the job longer"
    queued = sqs_queue(direct["sqs"], ok_url, bad_url)
    # at least once: standard queues may repeat what a retried chunk resent
    check_invariant(out, ids, bad, summary, queued, exactly_once=False)
    repeated = duplicates([b["record_id"] for b in queued["success"] + queued["failure"]])
    record_property("runs", runs)
    record_property("repeated_messages", sum(repeated.values()) - len(repeated))
    print(f"{service} outage: {runs} run(s), {len(repeated)} records sent more than once: {sorted(repeated)[:10]}")


def test_a_failed_window_of_records_holds_the_journal_back(tmp_path: Path) -> None:
    """A window that fails must not be covered by the journal of a later one, or the retry would skip it."""
    journal = str(tmp_path / "00000.progress.json")
    queue = GatedQueue()
    first = RecordSender(queue, "ok", None, journal, group_id="g")
    send_windows(first, windows=3)
    queue.gate.set()  # the first window fails, with the two behind it already handed over
    with pytest.raises(QueueError):
        first.close()

    retry = RecordSender(queue, "ok", None, journal, group_id="g", skip_before=read_journal(journal))
    send_windows(retry, windows=3)
    retry.close()

    assert sorted(set(queue.received)) == list(range(12)), "records lost between a failed attempt and its retry"


class GatedQueue:
    """A queue backend (the public ``QueueBackend`` protocol): the first send waits for ``gate``, then fails."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls = 0
        self.received: list[int] = []

    async def send_message(self, queue_name: str, message: str) -> bool:
        self.calls += 1
        if self.calls == 1:
            self.gate.wait(timeout=60)
            raise ConnectionError("queue unreachable")
        self.received.append(json.loads(message)["n"])
        return True


def send_windows(sender: RecordSender, windows: int, size: int = 4) -> None:
    for window in range(windows):
        for n in range(window * size, (window + 1) * size):
            sender.add("success", n, f"job:{n}", json.dumps({"n": n}).encode())
        sender.end_window((window + 1) * size)


# --- 4. a local worker process dies mid-chunk ----------------------------------------------------------------


class RetryLog(logging.Handler):
    """Collects the log lines that announce a retry: Prefect's task runs, and the local runner's own reruns of a
    chunk whose worker died."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Retry" in message or "worker died" in message:
            self.lines.append(message)


@pytest.fixture
def retry_log() -> Iterator[RetryLog]:
    handler = RetryLog()
    loggers = [logging.getLogger("prefect.task_runs"), logging.getLogger("modalkit.runners.local")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


class WorkerKiller(threading.Thread):
    """SIGKILLs one local worker of this process once the job has committed a chunk (and has not finished)."""

    def __init__(self, output: Output) -> None:
        super().__init__(daemon=True)
        self.output = output
        self.before = spawn_workers(descendants(os.getpid()))  # workers of earlier tests are not this job's
        self.stop = threading.Event()
        self.killed: int | None = None

    def run(self) -> None:
        while not self.stop.is_set() and self.output.markers() < 1:
            time.sleep(POLL)
        workers = sorted(spawn_workers(descendants(os.getpid())) - self.before)
        if self.stop.is_set() or self.output.finished() or not workers:
            return
        os.kill(workers[0], signal.SIGKILL)
        self.killed = workers[0]


@pytest.mark.slow
def test_local_worker_killed_mid_chunk_costs_only_a_retry(
    tmp_path: Path, prefect_api: str, retry_log: RetryLog
) -> None:
    data, ids, bad = make_records(12_000, pad=20)  # ~16 chunks
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "reviews.jsonl").write_bytes(data)
    config = write_config(tmp_path, batch_config={"max_batch_size": 16})
    out = str(tmp_path / "out")
    killer = WorkerKiller(Output(out))
    killer.start()
    try:
        summary = batch_inference(str(tmp_path / "in"), out, config=str(config), id_field="id",
                                  success_queue="ok", failure_queue="bad")  # fmt: skip
    finally:
        killer.stop.set()
        killer.join()

    assert killer.killed is not None, "no worker was killed while the job ran; make the job longer"
    assert not alive(killer.killed)
    assert any("a local worker died" in line for line in retry_log.lines), retry_log.lines
    assert summary["chunks_skipped"] == 0
    check_invariant(out, ids, bad, summary, local_queue(tmp_path / "queues", "ok", "bad"))


# --- 3. fail fast, writing nothing ---------------------------------------------------------------------------


@dataclass
class BadJob:
    """A job that must be refused before it writes anything."""

    input_uri: str
    output_uri: str
    config: Path
    error: type[ModalkitError]
    words: list[str]  # the message must name these (the URI, model or queue at fault)
    untouched: Callable[[], None]  # asserts that nothing was written
    model: str | None = None
    queues: tuple[str, str] = ("ok", "bad")

    def flow_params(self) -> dict[str, Any]:
        return {"input_uri": self.input_uri, "output_uri": self.output_uri, "config": str(self.config),
                "model_name": self.model, "id_field": "id", "success_queue": self.queues[0],
                "failure_queue": self.queues[1]}  # fmt: skip

    def cli_args(self) -> list[str]:
        args = batch_args(self.input_uri, self.output_uri, self.config, *self.queues)
        return [*args, "--model", self.model] if self.model else args


def no_local_messages(root: Path) -> None:
    if root.exists():  # nothing should even have opened it, but what counts is that no queue got a message
        backend = LocalQueueBackend(root)
        try:
            assert backend.queues() == []
        finally:
            backend.close()


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def bad_job(case: str, tmp_path: Path, direct: dict[str, Any], unique: str) -> BadJob:
    good = tmp_path / "in"
    good.mkdir()
    (good / "reviews.jsonl").write_bytes(make_records(20)[0])
    config = write_config(tmp_path)
    out = tmp_path / "out"

    def local_untouched() -> None:
        assert Output(str(out)).empty(), f"{out} was written: {sorted(tree(out))}"
        no_local_messages(tmp_path / "queues")

    if case == "missing-local-input":
        missing = str(tmp_path / "no-such-dir")
        return BadJob(missing, str(out), config, StorageError, [missing, "does not exist"], local_untouched)
    if case == "unknown-model":
        return BadJob(str(good), str(out), config, ConfigError, ["no-such-model"], local_untouched, "no-such-model")
    if case == "unsupported-file":
        (good / "notes.txt").write_text("not records\n")
        return BadJob(str(good), str(out), config, ConfigError, [str(good), "notes.txt"], local_untouched)
    if case == "output-of-another-job":
        other = tmp_path / "other"
        other.mkdir()
        (other / "reviews.jsonl").write_bytes(make_records(30)[0])
        settings = Settings.load(str(config))
        job_config = resolve_job_config(settings, id_field="id", success_queue="ok", failure_queue="bad")
        plan = plan_job(settings, str(other), str(out), None, job_config)
        start_job(plan)  # the other job claims the output, as its first step does
        before = tree(out)

        def claim_untouched() -> None:
            assert tree(out) == before
            no_local_messages(tmp_path / "queues")

        words = [str(out), f"already holds job {plan.job.job_id}"]
        return BadJob(str(good), str(out), config, ConfigError, words, claim_untouched)

    bucket = f"failfast-{unique}"
    direct["s3"].create_bucket(Bucket=bucket)
    s3_out = Output(f"s3://{bucket}/out", direct["s3"])

    def bucket_untouched() -> None:
        assert direct["s3"].list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
        no_local_messages(tmp_path / "queues")

    if case == "missing-s3-input":
        missing = f"s3://{bucket}/no-such-prefix"
        return BadJob(missing, s3_out.uri, config, StorageError, [missing, "does not exist"], bucket_untouched)
    if case == "missing-sqs-queue":
        sqs_config = write_config(tmp_path, queue_config={"backend": "sqs"})
        missing = f"missing-{unique}"
        bad_url = direct["sqs"].create_queue(QueueName=f"bad-{unique}")["QueueUrl"]

        def queues_untouched() -> None:
            bucket_untouched()
            attributes = direct["sqs"].get_queue_attributes(QueueUrl=bad_url, AttributeNames=["All"])["Attributes"]
            assert attributes["ApproximateNumberOfMessages"] == "0"

        return BadJob(str(good), s3_out.uri, sqs_config, QueueError, [repr(missing), "does not exist"],
                      queues_untouched, queues=(missing, f"bad-{unique}"))  # fmt: skip
    raise AssertionError(case)


BAD_JOBS = ["missing-local-input", "missing-s3-input", "unknown-model", "missing-sqs-queue",
            "output-of-another-job", "unsupported-file"]  # fmt: skip


@pytest.mark.parametrize("case", BAD_JOBS)
def test_bad_job_fails_fast_in_the_flow_writing_nothing(
    case: str, tmp_path: Path, prefect_api: str, direct: dict[str, Any], unique: str
) -> None:
    job = bad_job(case, tmp_path, direct, unique)

    with pytest.raises(job.error) as raised:
        batch_inference(**job.flow_params())

    for word in job.words:
        assert word in str(raised.value)
    job.untouched()


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_JOBS)
def test_bad_job_fails_fast_on_the_command_line_writing_nothing(
    case: str, tmp_path: Path, prefect_api: str, direct: dict[str, Any], unique: str
) -> None:
    job = bad_job(case, tmp_path, direct, unique)

    rc, stdout, stderr = Cli(tmp_path, prefect_api).run(*job.cli_args())

    assert (rc, stdout) == (2, ""), stderr[-3000:]
    print(stderr)
    message = stderr[stderr.rindex("error:") :]
    for word in job.words:
        assert word in message
    job.untouched()


# --- 5. many small objects on S3 -----------------------------------------------------------------------------


def output_objects(s3: Any, bucket: str, prefix: str) -> list[str]:
    """Every object key under ``prefix`` (one paginated listing, straight from moto)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.mark.slow
def test_5000_small_s3_objects_are_packed_into_chunks_resumed_after_sigkill_each_record_once(
    tmp_path: Path, prefect_api: str, direct: dict[str, Any], unique: str
) -> None:
    files, per_file = 5_000, 3
    data, ids, bad = make_records(files * per_file, pad=60)
    lines = data.splitlines(keepends=True)
    bucket = f"many-{unique}"
    s3 = direct["s3"]
    s3.create_bucket(Bucket=bucket)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: s3.put_object(Bucket=bucket, Key=f"in/part-{n:05d}.jsonl",
                                              Body=b"".join(lines[n * per_file : (n + 1) * per_file])),
                      range(files)))  # fmt: skip
    config = write_config(tmp_path, batch_config={"max_batch_size": 32})
    out = f"s3://{bucket}/out"
    cli = Cli(tmp_path, prefect_api)
    args = [f"s3://{bucket}/in/", out, "--config", str(config), "--id-field", "id", "--json"]

    cli.start_and_kill(Output(out, s3), *args)
    summary = cli.summary(*args)

    assert 2 <= summary["chunks_skipped"] < summary["chunks"]
    check_invariant(out, ids, bad, summary)
    # what the output costs grows with the chunks, not the files: per chunk a part file (when a record succeeded), a
    # failure file (when one failed), the id hashes and the marker; per job _job.json and _manifest.json; per run
    # of it (two here) at most a lease
    written = output_objects(s3, bucket, "out/")
    kinds = collections.Counter(re.sub(r"\d{5,}", "N", key.removeprefix("out/")) for key in written)
    chunks = summary["chunks"]
    assert chunks <= files // 50, f"{chunks} chunks for {files} small files: they were not packed"
    assert kinds["_chunks/N.json"] == kinds["_ids/N.npz"] == chunks
    assert kinds["part-N.jsonl"] <= chunks
    assert kinds["_failures/part-N.jsonl"] <= chunks
    assert (kinds["_job.json"], kinds["_manifest.json"]) == (1, 1)
    assert 1 <= kinds["_lease/N.json"] <= 2  # a generation a run; a newer one may replace a dead run's
    expected = {"part-N.jsonl", "_failures/part-N.jsonl", "_chunks/N.json", "_ids/N.npz", "_job.json",
                "_manifest.json", "_lease/N.json"}  # fmt: skip
    assert set(kinds) <= expected, f"objects of other kinds: {set(kinds) - expected}"
    assert len(written) <= 4 * chunks + 4
    print(f"{files} objects, {len(ids)} records: {chunks} chunks, {len(written)} objects written: {dict(kinds)}")
