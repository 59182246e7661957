"""``modalkit serve`` as a real process on a free loopback port, called over HTTP with httpx: the routes, the error
matrix, auth, dynamic batching, backpressure and timeouts, async jobs that survive a crash, and a graceful stop.

The pipeline is the example sentiment model with probes (``tests/pipelines.py: ServeProbe``): it echoes each text
so every caller can check it got its own answer, and it appends each batch's size to a file, so the tests assert on
the pipeline's own counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from batch_support import write_config
from support import free_port, stop_process

from modalkit.task_queue import LocalQueueBackend

TESTS_DIR = Path(__file__).resolve().parents[1]
POISON = "POISON-PREDICT in this one"


class Server:
    """A ``modalkit serve`` process; ``url`` once ``/health`` answers 200."""

    def __init__(
        self, tmp_path: Path, config: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> None:
        self.tmp_path = tmp_path
        self.args = args
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "PROBE_LOG": str(tmp_path / "batches.log"),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_healthy: bool = True) -> Server:
        self.stderr = self.tmp_path / f"serve-{self.port}.err"
        with self.stderr.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "modalkit.cli", "serve", "--port", str(self.port), "--config", str(self.config),
                 *self.args],
                cwd=self.tmp_path, env=self.env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
            )  # fmt: skip
        if wait_healthy:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"modalkit serve exited: {self.stderr.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("modalkit serve never became healthy")

    def batches(self) -> list[int]:
        log = self.tmp_path / "batches.log"
        return [int(n) for n in log.read_text().split()] if log.exists() else []

    def stop(self) -> int:
        assert self.proc is not None
        stop_process(self.proc, timeout=30)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the server and every process it started (a crash of its machine)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def group(self) -> list[int]:
        """The processes alive in the server's process group (itself and its workers)."""
        assert self.proc is not None
        alive = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError):
                    if os.getpgid(int(entry.name)) == self.proc.pid and _running(int(entry.name)):
                        alive.append(int(entry.name))
        return alive


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def config_for(tmp_path: Path, **app: Any) -> Path:
    return write_config(tmp_path, pipeline="pipelines:ServeProbe", **app)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    config = config_for(tmp_path, queue_config={"allowed_queues": ["ok", "bad"]},
                        batch_config={"max_batch_size": 32, "wait_ms": 20})  # fmt: skip
    srv = Server(tmp_path, config).start()
    try:
        yield srv
    finally:
        srv.stop()


# --- routes and the error matrix ---------------------------------------------------------------------------------


def test_sync_call_answers_the_record_and_a_poison_record_gets_its_error_alone(server: Server) -> None:
    ok = httpx.post(f"{server.url}/predict_sync", json={"text": "great kettle, love it"})
    assert ok.status_code == 200
    assert (ok.json()["status"], ok.json()["echo"], ok.json()["label"]) == (
        "success",
        "great kettle, love it",
        "positive",
    )

    bad = httpx.post(f"{server.url}/predict_sync", json={"text": POISON})
    assert bad.status_code == 422
    assert bad.json() == {"status": "error", "stage": "predict", "error_type": "RuntimeError",
                          "error": "predict failed on a POISON-PREDICT text"}  # fmt: skip
    assert "Traceback" not in bad.text


def test_batch_call_answers_each_item_in_order_and_fails_only_the_bad_ones(server: Server) -> None:
    items = [{"text": "great"}, {"text": POISON}, {"txt": "no text"}, {"text": "awful, broke"}]
    reply = httpx.post(f"{server.url}/predict_batch", json=items)
    assert reply.status_code == 200
    answers = reply.json()
    assert [a["status"] for a in answers] == ["success", "error", "error", "success"]
    assert [answers[0]["echo"], answers[3]["echo"]] == ["great", "awful, broke"]
    assert (answers[1]["stage"], answers[1]["error_type"]) == ("predict", "RuntimeError")
    assert (answers[2]["stage"], answers[2]["error_type"]) == ("validate", "ValidationError")
    assert "field 'text': Field required" in answers[2]["error"]


def test_bad_bodies_get_422_with_the_field_errors_and_oversized_ones_413_before_they_are_read(server: Server) -> None:
    missing = httpx.post(f"{server.url}/predict_sync", json={"txt": "x"})
    assert missing.status_code == 422
    assert (missing.json()["stage"], missing.json()["error"]) == ("validate", "field 'text': Field required")
    not_json = httpx.post(
        f"{server.url}/predict_sync", content=b"not json", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 422
    huge = b'{"text": "' + b"x" * (32 * 1024 * 1024) + b'"}'
    too_large = httpx.post(f"{server.url}/predict_sync", content=huge, headers={"content-type": "application/json"})
    assert too_large.status_code == 413
    assert too_large.json()["error_type"] == "PayloadTooLarge"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted as the body arrives
        yield b'{"text": "'
        for _ in range(32):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    chunked = httpx.post(f"{server.url}/predict_sync", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413


def metric(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


def test_metrics_count_what_the_server_costs_device_busy_seconds_container_seconds_load_price_and_dollars(
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path, pricing={"local_usd_per_hour": 36.0}, job_config={"local_workers": 2})
    srv = Server(tmp_path, config).start()
    try:
        before = metric(httpx.get(f"{srv.url}/metrics").text, "modalkit_device_busy_seconds_total")
        httpx.post(f"{srv.url}/predict_batch", json=[{"text": f"great {i}"} for i in range(20)])
        text = httpx.get(f"{srv.url}/metrics").text
    finally:
        srv.stop()
    busy = metric(text, "modalkit_device_busy_seconds_total")
    up = metric(text, "modalkit_container_seconds")
    assert busy > before
    assert 0 < busy < up
    assert metric(text, "modalkit_model_load_seconds") > 0
    assert metric(text, "modalkit_price_usd_per_hour") == 18.0  # the machine's $36 an hour over two local workers
    # the dollars at the scrape: the seconds up then at $0.005 a second (read a moment after the seconds gauge)
    assert metric(text, "modalkit_cost_usd") == pytest.approx(up * 0.005, abs=0.005)
    assert metric(text, "modalkit_batch_size_sum") >= 20


def test_an_async_request_naming_a_queue_off_the_allowlist_gets_403(server: Server) -> None:
    reply = httpx.post(f"{server.url}/predict_async", json={"message": {"text": "x"}, "success_queue": "elsewhere"})
    assert reply.status_code == 403
    assert "elsewhere" in reply.json()["error"]


def test_health_metrics_and_openapi_show_the_pipelines_own_models(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    httpx.post(f"{server.url}/predict_sync", json={"text": "great"})
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'modalkit_http_requests_total{route="/predict_sync",status="200"} 1.0' in metrics
    assert "modalkit_batch_size_count" in metrics
    assert "modalkit_queue_depth" in metrics
    schemas = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]
    assert {"_EchoIn", "_Echoed"} <= set(schemas)


# --- batching, backpressure, timeouts ----------------------------------------------------------------------------


def test_32_concurrent_clients_are_batched_and_each_of_320_calls_gets_its_own_answer(server: Server) -> None:
    async def main() -> list[tuple[str, dict[str, Any]]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            sem = asyncio.Semaphore(32)

            async def call(i: int) -> tuple[str, dict[str, Any]]:
                async with sem:
                    text = f"review number {i}: great value"
                    reply = await client.post("/predict_sync", json={"text": text})
                    return text, reply.json()

            return await asyncio.gather(*(call(i) for i in range(320)))

    before = len(server.batches())
    results = asyncio.run(main())
    assert all(answer["echo"] == text for text, answer in results)
    sizes = server.batches()[before:]
    assert sum(sizes) == 320
    assert max(sizes) > 1, sizes  # the pipeline itself saw batches, not 320 single calls


def burst(srv: Server, n: int) -> list[httpx.Response]:
    """``n`` sync calls sent at once."""

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/predict_sync", json={"text": f"t{i}"}) for i in range(n)))

    return asyncio.run(main())


def test_a_full_batcher_answers_503_with_retry_after(tmp_path: Path) -> None:
    config = config_for(tmp_path, batch_config={"max_batch_size": 1, "wait_ms": 0, "max_pending": 2})
    srv = Server(tmp_path, config, {"PROBE_DELAY": "0.3"}).start()
    try:
        replies = burst(srv, 12)
    finally:
        srv.stop()
    codes = sorted(r.status_code for r in replies)
    assert 200 in codes
    refused = [r for r in replies if r.status_code == 503]
    assert refused, codes
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert sum(srv.batches()) == codes.count(200)  # what was refused never ran


def test_a_request_that_waited_past_its_timeout_gets_504_and_is_never_run(tmp_path: Path) -> None:
    config = config_for(tmp_path, batch_config={"max_batch_size": 1, "wait_ms": 0, "request_timeout_s": 0.5})
    srv = Server(tmp_path, config, {"PROBE_DELAY": "0.4"}).start()
    try:
        replies = burst(srv, 5)
        time.sleep(1.0)  # anything still to run would run now
    finally:
        srv.stop()
    codes = [r.status_code for r in replies]
    assert 504 in codes, codes
    assert 200 in codes, codes
    assert sum(srv.batches()) == codes.count(200)  # the ones answered 504 never reached the pipeline


# --- auth --------------------------------------------------------------------------------------------------------


def test_a_static_api_key_guards_every_route_but_health(tmp_path: Path) -> None:
    config = config_for(tmp_path, auth_config={"api_key": "s3cret-key"})
    srv = Server(tmp_path, config).start()
    try:
        missing = httpx.post(f"{srv.url}/predict_sync", json={"text": "great"})
        wrong = httpx.post(f"{srv.url}/predict_sync", json={"text": "great"}, headers={"x-api-key": "nope"})
        right = httpx.post(f"{srv.url}/predict_sync", json={"text": "great"}, headers={"x-api-key": "s3cret-key"})
        health = httpx.get(f"{srv.url}/health")
    finally:
        srv.stop()
    assert (missing.status_code, wrong.status_code, right.status_code, health.status_code) == (401, 401, 200, 200)
    assert sum(srv.batches()) == 1  # the refused calls did no work


def test_an_ssm_key_is_read_from_parameter_store_and_a_rotation_keeps_the_old_key_for_a_grace_period(
    tmp_path: Path, aws: Any
) -> None:
    import boto3

    ssm = boto3.client("ssm", endpoint_url=aws.url, region_name="us-east-1")
    name = f"/modalkit/test/{tmp_path.name}"
    ssm.put_parameter(Name=name, Value="first-key", Type="SecureString")
    config = config_for(tmp_path, auth_config={"ssm_key": name, "ssm_refresh_seconds": 1})
    srv = Server(tmp_path, config, {"AWS_ENDPOINT_URL": aws.url, "AWS_ACCESS_KEY_ID": "testing",
                                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}).start()  # fmt: skip
    try:

        def call(key: str) -> int:
            return httpx.post(f"{srv.url}/predict_sync", json={"text": "x"}, headers={"x-api-key": key}).status_code

        assert (call("first-key"), call("second-key")) == (200, 401)
        ssm.put_parameter(Name=name, Value="second-key", Type="SecureString", Overwrite=True)
        time.sleep(1.2)
        assert (call("second-key"), call("first-key")) == (200, 200)  # the old one, for a grace period
        time.sleep(2.5)
        assert (call("second-key"), call("first-key")) == (200, 401)
    finally:
        srv.stop()


# --- async jobs ----------------------------------------------------------------------------------------------------


def wait_job(url: str, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: dict[str, Any] = httpx.get(f"{url}/jobs/{job_id}").json()
        if status["status"] in ("success", "error"):
            return status
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} never finished")


def queued(tmp_path: Path, queue: str) -> list[dict[str, Any]]:
    backend = LocalQueueBackend(tmp_path / "queues")
    try:
        return [json.loads(m) for m in backend.messages(queue)]
    finally:
        backend.close()


def test_an_async_job_lands_on_its_queue_with_its_meta_and_its_status_says_so(server: Server, tmp_path: Path) -> None:
    reply = httpx.post(f"{server.url}/predict_async", json={"message": {"text": "great"}, "success_queue": "ok",
                                                            "failure_queue": "bad", "meta": {"ticket": 7}})  # fmt: skip
    assert reply.status_code == 200
    job_id = reply.json()["job_id"]
    status = wait_job(server.url, job_id)
    assert status["status"] == "success"
    assert status["result"]["echo"] == "great"
    (message,) = queued(tmp_path, "ok")
    assert (message["job_id"], message["status"], message["meta"]) == (job_id, "success", {"ticket": 7})
    assert httpx.get(f"{server.url}/jobs/nope").status_code == 404  # an id never issued


def test_an_async_job_accepted_before_a_crash_runs_once_after_a_restart(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.write_text("closed")
    config = config_for(tmp_path, queue_config={"allowed_queues": ["ok"]})
    srv = Server(tmp_path, config, {"PROBE_GATE": str(gate)}).start()
    reply = httpx.post(f"{srv.url}/predict_async", json={"message": {"text": "great"}, "success_queue": "ok"})
    job_id = reply.json()["job_id"]
    srv.kill()  # SIGKILL while the job waits at the gate: it has not run
    assert queued(tmp_path, "ok") == []
    gate.unlink()
    again = Server(tmp_path, config)
    again.port, again.url = srv.port, srv.url
    again.start()
    try:
        assert wait_job(again.url, job_id)["status"] == "success"
    finally:
        again.stop()
    messages = queued(tmp_path, "ok")
    assert [m["job_id"] for m in messages] == [job_id]  # ran once, landed once


# --- stopping ------------------------------------------------------------------------------------------------------


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    srv = Server(tmp_path, config, {"PROBE_DELAY": "1.0"}).start()
    assert srv.proc is not None

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            call = asyncio.create_task(client.post("/predict_sync", json={"text": "great"}))
            await asyncio.sleep(0.3)
            os.kill(srv.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
            return await call

    reply = asyncio.run(main())
    assert reply.status_code == 200
    assert srv.proc.wait(timeout=30) == 0
    assert "Traceback" not in srv.stderr.read_text()


def test_an_async_job_lands_on_a_moto_sqs_queue_with_its_meta(tmp_path: Path, sqs: Any, aws: Any, unique: str) -> None:
    from batch_support import drain_sqs

    ok = f"serve-ok-{unique}"
    url = sqs.create_queue(QueueName=ok)["QueueUrl"]
    config = config_for(tmp_path, queue_config={"backend": "sqs", "allowed_queues": [ok]})
    env = {"AWS_ENDPOINT_URL": aws.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1"}  # fmt: skip
    srv = Server(tmp_path, config, env).start()
    try:
        request = {"message": {"text": "great"}, "success_queue": ok, "meta": {"order": "A-17"}}
        reply = httpx.post(f"{srv.url}/predict_async", json=request)
        job_id = reply.json()["job_id"]
        assert wait_job(srv.url, job_id)["status"] == "success"
    finally:
        srv.stop()
    (message,) = drain_sqs(sqs, url)
    assert (message["job_id"], message["status"], message["meta"]) == (job_id, "success", {"order": "A-17"})
    assert message["output"]["echo"] == "great"


def test_model_name_selects_a_model_entry_and_an_unknown_one_is_a_400_naming_the_entries(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["model_settings"]["model_entries"]["second"] = {"pipeline": "pipelines:ServeProbe"}
    config.write_text(yaml.safe_dump(data))
    srv = Server(tmp_path, config).start()
    try:
        default = httpx.post(f"{srv.url}/predict_sync", json={"text": "great"})
        second = httpx.post(f"{srv.url}/predict_sync?model_name=second", json={"text": "great"})
        unknown = httpx.post(f"{srv.url}/predict_sync?model_name=nope", json={"text": "great"})
    finally:
        srv.stop()
    assert (default.status_code, second.status_code) == (200, 200)
    assert unknown.status_code == 400
    assert "unknown model 'nope'" in unknown.json()["error"]
    assert (tmp_path / "models" / "second" / "weights.npz").is_file()  # the second entry loaded its own model


# --- several server processes ---------------------------------------------------------------------------------------


def test_workers_2_serves_from_two_processes_runs_unfinished_jobs_once_and_stops_them_all(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.write_text("closed")
    pids, loads = tmp_path / "pids.log", tmp_path / "loads.log"
    config = config_for(tmp_path, queue_config={"allowed_queues": ["ok"]}, batch_config={"max_batch_size": 4})
    env = {"PROBE_GATE": str(gate), "PROBE_PIDS": str(pids), "PROBE_LOADS": str(loads)}
    srv = Server(tmp_path, config, env, args=("--workers", "2")).start()
    jobs = [
        httpx.post(f"{srv.url}/predict_async", json={"message": {"text": f"job {i}"}, "success_queue": "ok"})
        for i in range(4)
    ]
    assert [r.status_code for r in jobs] == [200] * 4
    srv.kill()  # the machine dies with every job still at the gate: none has run
    assert queued(tmp_path, "ok") == []
    loads.unlink()

    again = Server(tmp_path, config, env, args=("--workers", "2"))
    again.port, again.url = srv.port, srv.url
    again.start()
    try:
        # both processes have loaded the model and found the four unfinished jobs before any can finish
        deadline = time.monotonic() + 60
        while len(loads.read_text().split()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        gate.unlink()
        for reply in jobs:
            assert wait_job(again.url, reply.json()["job_id"])["status"] == "success"

        async def one_client(i: int) -> list[str]:
            async with httpx.AsyncClient(base_url=again.url, timeout=60) as client:  # its own connection
                replies = [await client.post("/predict_sync", json={"text": f"c{i} r{j}"}) for j in range(4)]
            return [r.json()["echo"] for r in replies]

        async def clients() -> list[list[str]]:
            return list(await asyncio.gather(*(one_client(i) for i in range(32))))

        answers = asyncio.run(clients())
        workers = {pid for pid in again.group() if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()}
        served_by = {int(p) for p in pids.read_text().split()}
    finally:
        code = again.stop()
        left = again.group()  # at once: the server must not return before every process it started is gone
    assert answers == [[f"c{i} r{j}" for j in range(4)] for i in range(32)]
    assert len(workers) == 2
    assert served_by == workers  # both server processes ran batches, and only they did
    assert sorted(m["job_id"] for m in queued(tmp_path, "ok")) == sorted(r.json()["job_id"] for r in jobs)
    assert sum(again.batches()) == 4 + 32 * 4  # each job ran once, in one process only, and each call once
    assert code == 0
    assert left == []  # no worker (nor multiprocessing's resource tracker) outlives the server


# --- one online core: modalkit serve and Modal answer alike ----------------------------------------------------------

DEVICE_BROKEN = {
    "status": "error",
    "stage": "predict",
    "error_type": "RuntimeError",
    "error": "predict failed on a broken device: RuntimeError: CUDA error: an illegal memory access was encountered",
}
CONNECTION_LOST = {
    "status": "error",
    "stage": "predict",
    "error_type": "ConnectionError",
    "error": "the feature store refused the connection",
}


class _StandInProcessRequest:
    """``process_request`` of the deployed class as the web function calls it (``.remote.aio``): here it runs the
    request in-process, in a batch of one, through a real ``ModalService`` instance."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.remote = self

    async def aio(self, request: Any) -> Any:
        (output,) = self.service.process_request([request])
        return output


def modal_web_app_through_an_in_process_stand_in(config: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``create_web_endpoints`` over a ``ModalService`` subclass run in this process (nothing reaches Modal)."""
    import modal.experimental
    from pipelines import _Echoed, _EchoIn

    from modalkit.modal_config import ModalConfig
    from modalkit.modal_service import ModalService, create_web_endpoints
    from modalkit.settings import Settings

    monkeypatch.setattr(modal.experimental, "stop_fetching_inputs", lambda: None)  # outside a container it raises
    config_of_the_app = ModalConfig(Settings.load(config))

    class Probe(ModalService):
        model_name = "sentiment"
        modal_utils = config_of_the_app

    services: dict[str, Probe] = {}

    class StandInCls:  # StandInCls(model_name=...).process_request.remote.aio(request), as on a modal.Cls
        modal_utils = config_of_the_app

        def __init__(self, model_name: str) -> None:
            if model_name not in services:
                services[model_name] = Probe()
                services[model_name].model_name = model_name
                services[model_name].load_artefacts()
            self.process_request = _StandInProcessRequest(services[model_name])

    return create_web_endpoints(app_cls=StandInCls, input_model=_EchoIn, output_model=_Echoed)


def call_in_process(app: Any, path: str, body: Any) -> httpx.Response:
    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://modal") as client:
            if body is None:
                return await client.get(path)
            return await client.post(path, json=body)

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("kind", "expected"), [("cuda", DEVICE_BROKEN), ("connection", CONNECTION_LOST)], ids=["cuda", "connection"]
)
def test_a_device_or_connection_error_is_503_alike_from_modalkit_serve_and_the_in_process_modal_stand_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, expected: dict[str, Any]
) -> None:
    config = write_config(tmp_path, pipeline="pipelines:FailsInPredict")
    srv = Server(tmp_path, config, {"PROBE_RAISE": kind}).start()
    try:
        served = httpx.post(f"{srv.url}/predict_sync", json={"text": "great"})
    finally:
        srv.stop()
    monkeypatch.setenv("PROBE_RAISE", kind)
    on_modal = call_in_process(modal_web_app_through_an_in_process_stand_in(config, monkeypatch), "/predict_sync",
                               {"text": "great"})  # fmt: skip

    for reply in (served, on_modal):
        assert (reply.status_code, reply.json()) == (503, expected)  # not 422: the record is not at fault
        assert int(reply.headers["retry-after"]) >= 1
    assert "Traceback" not in srv.stderr.read_text()


def test_a_broken_device_makes_modalkit_serve_unhealthy_and_every_later_request_503(tmp_path: Path) -> None:
    config = write_config(tmp_path, pipeline="pipelines:FailsInPredict")
    srv = Server(tmp_path, config, {"PROBE_RAISE": "cuda"}).start()
    try:
        first = httpx.post(f"{srv.url}/predict_sync", json={"text": "great"})
        health = httpx.get(f"{srv.url}/health")
        later = httpx.post(f"{srv.url}/predict_batch", json=[{"text": "fine"}])
        job = httpx.post(f"{srv.url}/predict_async", json={"message": {"text": "fine"}})
    finally:
        srv.stop()
    assert first.status_code == 503
    assert health.status_code == 503
    assert health.json()["error_type"] == "DeviceBroken"
    for reply in (later, job):
        assert reply.status_code == 503
        assert reply.json()["error_type"] == "DeviceBroken"
        assert int(reply.headers["retry-after"]) >= 1


def test_a_connection_error_leaves_modalkit_serve_healthy(tmp_path: Path) -> None:
    config = write_config(tmp_path, pipeline="pipelines:FailsInPredict")
    srv = Server(tmp_path, config, {"PROBE_RAISE": "connection"}).start()
    try:
        first = httpx.post(f"{srv.url}/predict_sync", json={"text": "great"})
        health = httpx.get(f"{srv.url}/health")
    finally:
        srv.stop()
    assert first.status_code == 503
    assert health.status_code == 200


# --- each model entry validates against its own schema ----------------------------------------------------------------


def test_model_name_validates_the_body_against_that_models_own_schema(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["model_settings"]["model_entries"]["flat"] = {"pipeline": "pipelines:FlatRate"}
    config.write_text(yaml.safe_dump(data))
    srv = Server(tmp_path, config).start()
    both = {"text": "great", "amount": 10, "currency": "USD"}  # valid for both schemas
    try:
        flat = httpx.post(f"{srv.url}/predict_sync?model_name=flat", json=both)
        default = httpx.post(f"{srv.url}/predict_sync", json=both)
        only_default = httpx.post(f"{srv.url}/predict_sync?model_name=flat", json={"text": "great"})
        batch = httpx.post(f"{srv.url}/predict_batch?model_name=flat", json=[both, {"text": "great"}])
        job = httpx.post(f"{srv.url}/predict_async?model_name=flat", json={"message": {"text": "great"}})
        schema = httpx.get(f"{srv.url}/openapi.json").json()
    finally:
        srv.stop()
    assert (flat.status_code, flat.json()["euros"]) == (200, 5.0)
    assert (default.status_code, default.json()["echo"]) == (200, "great")
    assert only_default.status_code == 422
    assert only_default.json()["stage"] == "validate"
    assert "field 'amount': Field required" in only_default.json()["error"]
    assert [a["status"] for a in batch.json()] == ["success", "error"]
    assert "field 'amount'" in batch.json()[1]["error"]
    assert job.status_code == 422
    assert "field 'message.amount': Field required" in job.json()["error"]
    assert {"_EchoIn", "_Amount"} <= set(schema["components"]["schemas"])  # OpenAPI shows each model's schema
    body = schema["paths"]["/predict_sync"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"#/components/schemas/_EchoIn", "#/components/schemas/_Amount"} == {s["$ref"] for s in body["oneOf"]}


# --- one error body --------------------------------------------------------------------------------------------------


def test_every_error_has_the_one_error_body(server: Server) -> None:
    missing = httpx.post(f"{server.url}/predict_sync", json={"txt": "x"})
    not_json = httpx.post(
        f"{server.url}/predict_sync", content=b"not json", headers={"content-type": "application/json"}
    )
    not_utf8 = httpx.post(f"{server.url}/predict_sync", content=b'{"text": "\xff\xfe"}',
                          headers={"content-type": "application/json"})  # fmt: skip
    bad_async = httpx.post(f"{server.url}/predict_async", json={"message": {"text": "x"}, "surprise": 1})
    not_a_list = httpx.post(f"{server.url}/predict_batch", json={"text": "x"})
    no_route = httpx.get(f"{server.url}/nowhere")
    assert (missing.status_code, missing.json()) == (422, {
        "status": "error", "stage": "validate", "error_type": "ValidationError", "error": "field 'text': Field required"
    })  # fmt: skip
    for reply in (not_json, not_utf8):
        assert reply.status_code == 422
        assert (reply.json()["status"], reply.json()["stage"], reply.json()["error_type"]) == (
            "error", "parse", "JSONDecodeError",
        )  # fmt: skip
    assert (bad_async.status_code, bad_async.json()["stage"]) == (422, "validate")
    assert "field 'surprise'" in bad_async.json()["error"]
    assert (not_a_list.status_code, not_a_list.json()["stage"]) == (422, "validate")
    assert (no_route.status_code, no_route.json()["error_type"]) == (404, "NotFound")
    for reply in (missing, not_json, not_utf8, bad_async, not_a_list, no_route):
        assert set(reply.json()) == {"status", "stage", "error_type", "error"}, reply.json()


# --- open routes -----------------------------------------------------------------------------------------------------


def test_with_an_api_key_only_health_is_open_unless_open_routes_opens_more(tmp_path: Path) -> None:
    guarded = ("/metrics", "/docs", "/redoc", "/openapi.json")
    config = config_for(tmp_path, auth_config={"api_key": "s3cret-key"})
    srv = Server(tmp_path, config).start()
    try:
        without = {path: httpx.get(f"{srv.url}{path}").status_code for path in ("/health", *guarded)}
        keyed = {path: httpx.get(f"{srv.url}{path}", headers={"x-api-key": "s3cret-key"}).status_code
                 for path in guarded}  # fmt: skip
    finally:
        srv.stop()
    assert without == {"/health": 200, **dict.fromkeys(guarded, 401)}
    assert keyed == dict.fromkeys(guarded, 200)

    config = config_for(tmp_path, auth_config={"api_key": "s3cret-key", "open_routes": ["/health", "/metrics"]})
    srv = Server(tmp_path, config).start()
    try:
        opened = {path: httpx.get(f"{srv.url}{path}").status_code for path in ("/health", *guarded)}
        predict = httpx.post(f"{srv.url}/predict_sync", json={"text": "great"})
    finally:
        srv.stop()
    assert opened == {"/health": 200, "/metrics": 200, "/docs": 401, "/redoc": 401, "/openapi.json": 401}
    assert predict.status_code == 401


# --- jobs ------------------------------------------------------------------------------------------------------------


def test_a_jobs_status_carries_its_meta_and_an_id_never_issued_is_404(server: Server) -> None:
    reply = httpx.post(f"{server.url}/predict_async", json={"message": {"text": "great"}, "meta": {"ticket": 7}})
    status = wait_job(server.url, reply.json()["job_id"])
    unknown = httpx.get(f"{server.url}/jobs/never-issued")
    assert (status["status"], status["meta"]) == ("success", {"ticket": 7})
    assert unknown.status_code == 404
    assert unknown.json() == {"status": "error", "stage": None, "error_type": "UnknownJob",
                              "error": "no job with id 'never-issued'"}  # fmt: skip


def test_model_name_validates_against_that_models_own_schema_through_the_in_process_modal_stand_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_for(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["model_settings"]["model_entries"]["flat"] = {"pipeline": "pipelines:FlatRate"}
    config.write_text(yaml.safe_dump(data))
    web = modal_web_app_through_an_in_process_stand_in(config, monkeypatch)
    both = {"text": "great", "amount": 10, "currency": "USD"}

    flat = call_in_process(web, "/predict_sync?model_name=flat", both)
    default = call_in_process(web, "/predict_sync", both)
    only_default = call_in_process(web, "/predict_sync?model_name=flat", {"text": "great"})
    schemas = call_in_process(web, "/openapi.json", None).json()["components"]["schemas"]

    assert (flat.status_code, flat.json()["euros"]) == (200, 5.0)
    assert (default.status_code, default.json()["echo"]) == (200, "great")
    assert (only_default.status_code, only_default.json()["stage"]) == (422, "validate")
    assert "field 'amount': Field required" in only_default.json()["error"]
    assert {"_EchoIn", "_Amount"} <= set(schemas)


def test_an_async_job_caught_by_a_broken_device_stays_queued_and_runs_once_after_a_restart(tmp_path: Path) -> None:
    config = config_for(tmp_path, queue_config={"allowed_queues": ["ok", "bad"]})
    config.write_text(config.read_text().replace("pipelines:ServeProbe", "pipelines:FailsInPredict"))
    broken = Server(tmp_path, config, {"PROBE_RAISE": "cuda"}).start()
    try:
        reply = httpx.post(f"{broken.url}/predict_async", json={"message": {"text": "great"}, "success_queue": "ok",
                                                                "failure_queue": "bad"})  # fmt: skip
        job_id = reply.json()["job_id"]
        deadline = time.monotonic() + 30
        while httpx.get(f"{broken.url}/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        status = httpx.get(f"{broken.url}/jobs/{job_id}").json()["status"]
    finally:
        broken.stop()
    assert status == "queued"  # the record was not at fault: no failure record, the job waits for a working device
    assert queued(tmp_path, "bad") == []

    again = Server(tmp_path, config).start()  # a working device
    try:
        assert wait_job(again.url, job_id)["status"] == "success"
    finally:
        again.stop()
    assert [m["job_id"] for m in queued(tmp_path, "ok")] == [job_id]
