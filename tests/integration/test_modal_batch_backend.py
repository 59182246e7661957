"""The ``modal`` batch backend, through an in-process stand-in for Modal, on S3 and SQS in a real moto_server.

There is no Modal cloud here. The app is ``modalkit/modal_app.py`` itself, imported afresh with a settings file in
the test's directory named by ``MODALKIT_CONFIG`` (as ``modal deploy`` imports it). The stand-in takes the place
of ``modal.Cls.from_name(app_name, class_name)`` through the seam the flow itself is built with
(``build_batch_flow(partial(open_runner, modal_lookup=standin))``), with the same call surface:
``from_name(app, cls)(model_name=...).process_chunk.remote(job, chunk)`` and ``.spawn(job, chunk)``, whose call
has ``get(timeout=...)`` and ``cancel(terminate_containers=...)``. Its ``remote`` pickles the arguments and the
result (as Modal does across the wire), keeps a pool of "containers" (one ``modal.Cls`` object each, used one
call at a time), and runs the real class code through Modal's own ``.local()``, so ``@modal.enter`` runs once per
container; ``spawn`` runs that in a thread of its own. What the stand-in cannot show: Modal's scheduling, image
build, real network failures, and a cancel that stops the container's code (a cancelled call's thread runs on:
the stand-in can only retire its container so that no later call gets it).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import pickle
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import modal
import modal.exception
import modal.experimental
import pytest
from batch_support import (
    assert_record_invariant,
    drain_sqs,
    duplicates,
    read_failures,
    read_manifest,
    read_parts,
    write_config,
)

import modalkit.modal_service
from flows.batch_inference import build_batch_flow
from modalkit.exceptions import ConfigError, RemoteError
from modalkit.iomodel import ByteRange, ChunkSpec, JobSpec
from modalkit.runners import open_runner
from modalkit.runners.modal_client import ModalChunkClient
from modalkit.settings import Settings

REPO_CONFIG = Path(__file__).resolve().parents[2] / "modalkit.yaml"
SUMMARY_KEYS = {
    "job_id", "records", "succeeded", "failed", "chunks", "chunks_skipped", "seconds", "records_per_s", "output_uri",
}  # fmt: skip


# --- the stand-in for Modal -------------------------------------------------------------------------------------


class InProcessModal:
    """Stands in for ``modal.Cls.from_name``: the "deployed" apps are modules of this process.

    Like the real one, looking a class up is lazy: an app that is not deployed fails at the first ``.remote()``
    call, with Modal's own ``NotFoundError``. ``before_call(method, args)`` may raise, to play a failing call.
    """

    def __init__(self, *deployed: ModuleType) -> None:
        self.apps = {module.app.name: module for module in deployed}
        self.lookups: list[tuple[str, str, dict[str, Any]]] = []
        self.calls: list[dict[str, Any]] = []  # every .remote() call: method, chunk index, payload size
        self.containers: list[Any] = []  # every modal Obj started
        self.before_call: Callable[[str, tuple[Any, ...]], None] | None = None
        self.retired: list[Any] = []  # containers that called modal.experimental.stop_fetching_inputs()
        self.cancelled: list[dict[str, Any]] = []  # every FunctionCall.cancel(): chunk index, terminate_containers
        self._idle: dict[tuple[str, str, str], list[Any]] = {}
        self._lock = threading.Lock()
        self._current = threading.local()

    def stop_fetching_inputs(self) -> None:
        """What ``modal.experimental.stop_fetching_inputs()`` does in a container: it gets no more inputs."""
        self.retired.append(self._current.container)

    def __call__(self, app_name: str, class_name: str) -> _StandinCls:
        return _StandinCls(self, app_name, class_name)

    def remote(
        self,
        app_name: str,
        class_name: str,
        params: dict[str, Any],
        method: str,
        args: tuple[Any, ...],
        call: _StandinCall | None = None,
    ) -> Any:
        payload = pickle.dumps(args)  # what would travel to the container
        with self._lock:
            self.calls.append({"method": method, "chunk": args[1].get("index"), "payload_bytes": len(payload)})
        module = self.apps.get(app_name)
        if module is None or not isinstance(getattr(module, class_name, None), modal.Cls):
            raise modal.exception.NotFoundError(
                f"Lookup failed for Cls '{class_name}' from the '{app_name}' app: "
                f"App '{app_name}' not found in environment 'main'."
            )
        if self.before_call is not None:
            self.before_call(method, args)
        container = self._take(module, app_name, class_name, params)
        self._current.container = container
        if call is not None:
            call.container = container
        try:
            result = getattr(container, method).local(*pickle.loads(payload))
        finally:
            self._give_back(app_name, class_name, params, container)
        return pickle.loads(pickle.dumps(result))  # and what would travel back

    def _take(self, module: ModuleType, app_name: str, class_name: str, params: dict[str, Any]) -> Any:
        key = (app_name, class_name, json.dumps(params, sort_keys=True))
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if idle:
                return idle.pop()
            container = getattr(module, class_name)(**params)  # a modal Obj: @modal.enter runs on its first call
            self.containers.append(container)
            return container

    def _give_back(self, app_name: str, class_name: str, params: dict[str, Any], container: Any) -> None:
        with self._lock:
            if any(container is retired for retired in self.retired):
                return  # Modal replaces it: later calls start a new container
            self._idle[(app_name, class_name, json.dumps(params, sort_keys=True))].append(container)


class _StandinCls:
    def __init__(self, modal_: InProcessModal, app_name: str, class_name: str) -> None:
        self._modal, self._app_name, self._class_name = modal_, app_name, class_name

    def __call__(self, **params: Any) -> _StandinObj:
        self._modal.lookups.append((self._app_name, self._class_name, params))
        return _StandinObj(self._modal, self._app_name, self._class_name, params)


class _StandinObj:
    def __init__(self, modal_: InProcessModal, app_name: str, class_name: str, params: dict[str, Any]) -> None:
        self._modal, self._app_name, self._class_name, self._params = modal_, app_name, class_name, params

    def __getattr__(self, method: str) -> _StandinMethod:
        return _StandinMethod(self, method)


class _StandinMethod:
    def __init__(self, obj: _StandinObj, method: str) -> None:
        self._obj, self._method = obj, method

    def remote(self, *args: Any) -> Any:
        o = self._obj
        return o._modal.remote(o._app_name, o._class_name, o._params, self._method, args)

    def spawn(self, *args: Any) -> _StandinCall:
        return _StandinCall(self, args)


class _StandinCall:
    """A spawned call (``modal.FunctionCall``): the call runs in a daemon thread; ``get`` waits for it."""

    def __init__(self, method: _StandinMethod, args: tuple[Any, ...]) -> None:
        self._modal = method._obj._modal
        self.chunk = args[1].get("index")
        self.container: Any = None
        self._done = threading.Event()
        self._outcome: tuple[bool, Any] = (False, None)
        o = method._obj
        run = functools.partial(self._modal.remote, o._app_name, o._class_name, o._params, method._method, args, self)
        threading.Thread(target=self._run, args=(run,), daemon=True).start()

    def _run(self, run: Callable[[], Any]) -> None:
        try:
            self._outcome = (True, run())
        except BaseException as exc:
            self._outcome = (False, exc)
        self._done.set()

    def get(self, timeout: float | None = None) -> Any:
        if not self._done.wait(timeout):
            raise modal.exception.TimeoutError("the call has not finished")  # what Modal raises
        ok, value = self._outcome
        if not ok:
            raise value
        return value

    def cancel(self, terminate_containers: bool = False) -> None:
        self._modal.cancelled.append({"chunk": self.chunk, "terminate_containers": terminate_containers})
        if terminate_containers and self.container is not None:
            self._modal.retired.append(self.container)  # Modal stops it: later calls start a new container


# --- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """Settings for ``pipelines:PoisonAwareSentiment`` with records going to SQS."""
    return write_config(tmp_path, queue_config={"backend": "sqs"}, job_config={"retry_delay_seconds": 0.1})


def deploy(config: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``modalkit/modal_app.py`` itself, imported afresh with these settings (as ``modal deploy`` would)."""
    monkeypatch.setenv("MODALKIT_CONFIG", str(config))
    monkeypatch.delitem(sys.modules, "modalkit.modal_app", raising=False)
    module = importlib.import_module("modalkit.modal_app")
    monkeypatch.delitem(sys.modules, "modalkit.modal_app")  # forgotten again after the test
    return module


@pytest.fixture
def app_module(config: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The app deployed with the test's settings."""
    return deploy(config, monkeypatch)


@pytest.fixture
def standin(app_module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> InProcessModal:
    """The stand-in, with the app "deployed"; a container that asks Modal to stop sending it inputs is retired."""
    fake = InProcessModal(app_module)
    monkeypatch.setattr(modal.experimental, "stop_fetching_inputs", fake.stop_fetching_inputs)
    return fake


def flow_on(modal_: InProcessModal) -> Any:
    """Flow ``batch-inference`` whose Modal runner looks classes up in ``modal_`` instead of Modal's servers."""
    return build_batch_flow(functools.partial(open_runner, modal_lookup=modal_))


@pytest.fixture
def pipeline_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Model names, one per pipeline the batch worker class loaded (in its @modal.enter step)."""
    loads: list[str] = []
    real = modalkit.modal_service.load_pipeline

    def counting(settings: Any, model_name: str, *args: Any) -> Any:
        loads.append(model_name)
        return real(settings, model_name, *args)

    monkeypatch.setattr(modalkit.modal_service, "load_pipeline", counting)
    return loads


def upload_dataset(s3: Any, bucket: str, n_good: int) -> dict[str, Any]:
    """Two JSONL files under s3://bucket/in/ with poison records and one bad-JSON line; ids in the ``id`` field."""
    s3.create_bucket(Bucket=bucket)
    texts = ["Absolutely love it, great value", "Terrible, it broke after a day", "It is fine, nothing special"]
    # long reviews: few records per 64KiB chunk, so few messages for moto's SQS to hold
    filler = "The parcel came on the day promised and the box was intact. " * 10
    good = [json.dumps({"id": f"r{i:05d}", "text": f"{texts[i % 3]} (review {i}). {filler}"}) for i in range(n_good)]
    poison = {
        "p-pre": json.dumps({"id": "p-pre", "text": "has POISON-PRE"}),
        "p-predict": json.dumps({"id": "p-predict", "text": "has POISON-PREDICT"}),
        "p-post": json.dumps({"id": "p-post", "text": "has POISON-POST"}),
    }
    half = n_good // 2
    first = [*good[:10], poison["p-pre"], *good[10:half], '{"id": "broken", "text": "unterminated']
    second = [*good[half : half + 30], poison["p-predict"], *good[half + 30 :], poison["p-post"]]
    sizes = []
    for key, lines in (("in/reviews-a.jsonl", first), ("in/reviews-b.jsonl", second)):
        body = ("\n".join(lines) + "\n").encode()
        sizes.append(len(body))
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    return {"records": n_good + 4, "good": {f"r{i:05d}" for i in range(n_good)}, "poison": set(poison), "sizes": sizes}


# --- a job on the modal backend ------------------------------------------------------------------------------------


def test_modal_backend_via_in_process_modal_standin_scores_an_s3_dataset_with_every_record_once(
    prefect_api: str, standin: InProcessModal, app_module: ModuleType, config: Path, s3: Any, sqs: Any,
    unique: str, pipeline_loads: list[str],
) -> None:  # fmt: skip
    batch_inference = flow_on(standin)

    bucket = f"modal-{unique}"
    data = upload_dataset(s3, bucket, n_good=240)
    assert all(size > 64 * 1024 for size in data["sizes"])  # each file is cut into 2+ chunks of 64KiB
    ok_url = sqs.create_queue(QueueName=f"ok-{unique}")["QueueUrl"]
    bad_url = sqs.create_queue(QueueName=f"bad-{unique}")["QueueUrl"]

    summary = batch_inference(
        input_uri=f"s3://{bucket}/in/", output_uri=f"s3://{bucket}/out/", backend="modal", config=str(config),
        id_field="id", concurrency=3, success_queue=f"ok-{unique}", failure_queue=f"bad-{unique}",
    )  # fmt: skip

    assert set(summary) >= SUMMARY_KEYS
    assert summary["records"] == data["records"] == summary["succeeded"] + summary["failed"]
    assert (summary["succeeded"], summary["failed"]) == (240, 4)
    assert summary["chunks"] == sum(-(-size // (64 * 1024)) for size in data["sizes"])
    assert summary["chunks_skipped"] == 0
    assert summary["output_uri"] == f"s3://{bucket}/out"
    out = summary["output_uri"]
    parts, failures = read_parts(out), read_failures(out)
    ids = [r["record_id"] for r in parts] + [r["record_id"] for r in failures]
    assert duplicates(ids) == {}
    assert {r["record_id"] for r in parts} == data["good"]
    assert {r["record_id"]: r["stage"] for r in failures if r["record_id"] in data["poison"]} == {
        "p-pre": "preprocess", "p-predict": "predict", "p-post": "postprocess",
    }  # fmt: skip
    assert read_manifest(out)["job_id"] == summary["job_id"]
    # the records reached the queues from the "containers"
    assert sorted(m["record_id"] for m in drain_sqs(sqs, ok_url)) == sorted(data["good"])
    assert len(drain_sqs(sqs, bad_url)) == 4

    # the flow looked the worker class up by name in the app the settings name, for the job's model
    assert (app_module.app.name, "BatchWorker", {"model_name": "sentiment"}) in standin.lookups
    # one call per chunk, each carrying a chunk reference, never the chunk's records
    assert sorted(call["chunk"] for call in standin.calls) == list(range(summary["chunks"]))
    assert all(call["method"] == "process_chunk" for call in standin.calls)
    assert max(call["payload_bytes"] for call in standin.calls) < 4 * 1024 < 64 * 1024
    # the model loaded once per container (@modal.enter), not once per chunk
    assert 1 <= len(standin.containers) <= 3  # concurrency=3
    assert pipeline_loads == ["sentiment"] * len(standin.containers)


def test_modal_backend_via_in_process_modal_standin_resumes_a_finished_job_without_calling_modal(
    prefect_api: str, standin: InProcessModal, config: Path, s3: Any, unique: str
) -> None:
    batch_inference = flow_on(standin)

    bucket = f"resume-{unique}"
    data = upload_dataset(s3, bucket, n_good=300)
    params = {"input_uri": f"s3://{bucket}/in", "output_uri": f"s3://{bucket}/out", "backend": "modal",
              "config": str(config), "id_field": "id"}  # fmt: skip
    first = batch_inference(**params)
    calls = len(standin.calls)

    again = batch_inference(**params)

    assert again["job_id"] == first["job_id"]
    assert again["chunks_skipped"] == again["chunks"] == first["chunks"]
    assert again["records"] == first["records"] == data["records"]
    assert len(standin.calls) == calls  # every chunk was committed: the resume made no Modal call at all
    assert duplicates([r["record_id"] for r in read_parts(first["output_uri"])]) == {}


def test_modal_backend_via_in_process_modal_standin_sends_only_the_uncommitted_chunks_of_a_resumed_job(
    prefect_api: str, standin: InProcessModal, config: Path, s3: Any, unique: str
) -> None:
    batch_inference = flow_on(standin)
    bucket = f"partial-{unique}"
    data = upload_dataset(s3, bucket, n_good=300)
    params = {"input_uri": f"s3://{bucket}/in", "output_uri": f"s3://{bucket}/out", "backend": "modal",
              "config": str(config), "id_field": "id"}  # fmt: skip
    first = batch_inference(**params)
    assert first["chunks"] >= 3
    # as if the job had been killed before chunks 0 and 2 committed
    for index in (0, 2):
        s3.delete_object(Bucket=bucket, Key=f"out/_chunks/{index:05d}.json")
    before = len(standin.calls)

    again = batch_inference(**params)

    assert sorted(call["chunk"] for call in standin.calls[before:]) == [0, 2]
    assert again["chunks_skipped"] == first["chunks"] - 2
    assert again["records"] == data["records"] == again["succeeded"] + again["failed"]
    ids = [r["record_id"] for r in read_parts(again["output_uri"])] + [
        r["record_id"] for r in read_failures(again["output_uri"])
    ]
    assert duplicates(ids) == {}
    assert len(ids) == data["records"]


@pytest.mark.parametrize(
    ("input_uri", "output_uri", "local"),
    [("in", "s3://{bucket}/out", "in"), ("s3://{bucket}/in", "results/out", "results/out")],
    ids=["local-input", "local-output"],
)
def test_modal_backend_via_in_process_modal_standin_refuses_local_paths(
    prefect_api: str, standin: InProcessModal, config: Path, s3: Any, unique: str, tmp_path: Path,
    input_uri: str, output_uri: str, local: str,
) -> None:  # fmt: skip
    batch_inference = flow_on(standin)

    bucket = f"local-{unique}"
    upload_dataset(s3, bucket, n_good=20)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "reviews.jsonl").write_text('{"id": "a", "text": "great"}\n', encoding="utf-8")

    with pytest.raises(ConfigError, match=rf"backend 'modal' .* cannot reach the local path\(s\) {local}; use s3://"):
        batch_inference(input_uri=input_uri.format(bucket=bucket), output_uri=output_uri.format(bucket=bucket),
                        backend="modal", config=str(config))  # fmt: skip

    assert standin.calls == []
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="out/")
    assert not (tmp_path / "results").exists()


# --- Modal errors, translated -------------------------------------------------------------------------------------


def test_modal_backend_via_in_process_modal_standin_retries_a_chunk_after_a_modal_connection_error(
    prefect_api: str, standin: InProcessModal, config: Path, s3: Any, unique: str
) -> None:
    batch_inference = flow_on(standin)

    bucket = f"retry-{unique}"
    data = upload_dataset(s3, bucket, n_good=240)
    dropped: list[int] = []

    def drop_the_first_call_of_chunk_1(method: str, args: tuple[Any, ...]) -> None:
        if args[1]["index"] == 1 and not dropped:
            dropped.append(1)
            raise modal.exception.ConnectionError("connection to Modal's servers was lost")

    standin.before_call = drop_the_first_call_of_chunk_1

    summary = batch_inference(input_uri=f"s3://{bucket}/in", output_uri=f"s3://{bucket}/out", backend="modal",
                              config=str(config), id_field="id")  # fmt: skip

    assert dropped == [1]
    assert [call["chunk"] for call in standin.calls].count(1) == 2  # retried once, by the flow
    assert summary["records"] == data["records"] == summary["succeeded"] + summary["failed"]
    ids = [r["record_id"] for r in read_parts(summary["output_uri"])]
    ids += [r["record_id"] for r in read_failures(summary["output_uri"])]
    assert duplicates(ids) == {}
    assert len(ids) == data["records"]


def test_modal_backend_via_in_process_modal_standin_fails_fast_when_the_app_is_not_deployed(
    prefect_api: str, app_module: ModuleType, config: Path, s3: Any, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.batch_inference import JobFailed

    nothing_deployed = InProcessModal()
    batch_inference = flow_on(nothing_deployed)
    bucket = f"undeployed-{unique}"
    upload_dataset(s3, bucket, n_good=240)
    app_name = app_module.app.name

    with pytest.raises(JobFailed, match=rf"Modal app '{app_name}'.*not found") as raised:
        batch_inference(input_uri=f"s3://{bucket}/in", output_uri=f"s3://{bucket}/out", backend="modal",
                        config=str(config), id_field="id", concurrency=1)  # fmt: skip

    assert len(nothing_deployed.calls) == 1  # not retried, and no other chunk was started
    summary = raised.value.summary
    assert summary is not None
    assert (summary["records"], summary["chunks"]) == (0, 4)


def test_modal_backend_via_in_process_modal_standin_retries_a_chunk_that_met_a_broken_gpu_on_a_new_container(
    prefect_api: str, tmp_path: Path, s3: Any, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines import FirstGpuBroken

    FirstGpuBroken.built.clear()
    config = write_config(
        tmp_path, "pipelines:FirstGpuBroken", queue_config={"backend": "none"}, job_config={"retry_delay_seconds": 0.1}
    )
    standin = InProcessModal(deploy(config, monkeypatch))
    monkeypatch.setattr(modal.experimental, "stop_fetching_inputs", standin.stop_fetching_inputs)
    bucket = f"gpu-{unique}"
    data = upload_dataset(s3, bucket, n_good=240)

    summary = flow_on(standin)(input_uri=f"s3://{bucket}/in", output_uri=f"s3://{bucket}/out", backend="modal",
                               config=str(config), id_field="id", concurrency=1)  # fmt: skip

    assert len(standin.retired) == 1  # the container on the broken GPU asked to be replaced, once
    assert len(standin.containers) == 2
    assert len(standin.calls) == summary["chunks"] + 1  # the chunk that met the broken GPU ran again, elsewhere
    assert (summary["records"], summary["succeeded"], summary["failed"]) == (data["records"], 240, 4)
    ids = [r["record_id"] for r in read_parts(summary["output_uri"])]
    ids += [r["record_id"] for r in read_failures(summary["output_uri"])]
    assert duplicates(ids) == {}
    assert len(ids) == data["records"]


@pytest.mark.timeout(120)  # the guard: without a chunk timeout the job waits on the hung call forever
def test_modal_backend_via_in_process_modal_standin_cancels_a_hung_call_and_commits_its_chunk_once(
    prefect_api: str, tmp_path: Path, s3: Any, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_HANG_FLAG", str(tmp_path / "hung.flag"))
    config = write_config(tmp_path, "pipelines:HangsOnce", queue_config={"backend": "none"},
                          job_config={"retry_delay_seconds": 0.1, "chunk_timeout_s": 3})  # fmt: skip
    standin = InProcessModal(deploy(config, monkeypatch))
    bucket = f"hang-{unique}"
    s3.create_bucket(Bucket=bucket)
    ids = []
    for f in range(3):  # three files of ~38 KB, one chunk each (not packed); the second's 5th record hangs once
        rows = [{"id": f"f{f}-{i:02d}", "text": "HANG, then fine" if (f, i) == (1, 4) else "great value",
                 "pad": "x" * 1900} for i in range(20)]  # fmt: skip
        ids += [row["id"] for row in rows]
        s3.put_object(Bucket=bucket, Key=f"in/part-{f}.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows))

    summary = flow_on(standin)(input_uri=f"s3://{bucket}/in", output_uri=f"s3://{bucket}/out", backend="modal",
                               config=str(config), id_field="id", concurrency=1)  # fmt: skip

    assert summary["status"] == "completed"
    assert sorted(call["chunk"] for call in standin.calls) == [0, 1, 1, 2]  # the hung chunk ran again, once
    assert standin.cancelled == [{"chunk": 1, "terminate_containers": True}]
    assert len(standin.retired) == 1  # the hung container got no more chunks
    assert len(standin.containers) == 2
    markers = s3.list_objects_v2(Bucket=bucket, Prefix="out/_chunks/")["Contents"]
    assert sorted(m["Key"] for m in markers if m["Key"].endswith("1.json")) == ["out/_chunks/00001.json"]
    assert_record_invariant(summary["output_uri"], ids, summary=summary)


def chunk_ref() -> tuple[JobSpec, ChunkSpec]:
    job = JobSpec(job_id="j1", input_uri="s3://b/in", output_uri="s3://b/out", model_name="sentiment")
    chunk = ChunkSpec(
        job_id="j1", index=7, uri="s3://b/in/a.jsonl", key="a.jsonl", format="jsonl", extent=ByteRange(), size=10
    )
    return job, chunk


def test_modal_chunk_client_via_in_process_modal_standin_makes_a_modal_connection_error_a_retryable_remote_error(
    app_module: ModuleType,
) -> None:
    standin = InProcessModal(app_module)

    def lose_the_connection(method: str, args: tuple[Any, ...]) -> None:
        raise modal.exception.ConnectionError("connection to Modal's servers was lost")

    standin.before_call = lose_the_connection
    client = ModalChunkClient(app_module.app.name, "sentiment", cls_lookup=standin)

    with pytest.raises(RemoteError, match=r"chunk 7 \(a\.jsonl\) on Modal app 'modalkit-dev'.*ConnectionError") as e:
        client.run_chunk(*chunk_ref())

    assert e.value.retryable
    assert isinstance(e.value.__cause__, modal.exception.ConnectionError)


def test_modal_chunk_client_via_in_process_modal_standin_makes_app_not_found_a_config_error_naming_the_app() -> None:
    client = ModalChunkClient("modalkit-prod", "sentiment", cls_lookup=InProcessModal())

    with pytest.raises(ConfigError, match=r"Modal app 'modalkit-prod'.*App 'modalkit-prod' not found") as e:
        client.run_chunk(*chunk_ref())

    assert not e.value.retryable
    assert isinstance(e.value.__cause__, modal.exception.NotFoundError)


# --- the app module modal deploy uses -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("error")
def test_modal_app_module_builds_offline_from_the_repo_modalkit_yaml(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MODALKIT_CONFIG", str(REPO_CONFIG))
    monkeypatch.delitem(sys.modules, "modalkit.modal_app", raising=False)  # import it afresh, and forget it after

    modal_app = importlib.import_module("modalkit.modal_app")
    shipped = Settings.load(REPO_CONFIG).app_settings  # the test checks the app follows the file, whatever it says

    assert isinstance(modal_app.app, modal.App)
    assert modal_app.app.name == shipped.app_prefix + "-dev"
    assert modal_app.modal_config.settings.config_files[0] == REPO_CONFIG
    assert isinstance(modal_app.Model, modal.Cls)
    assert isinstance(modal_app.BatchWorker, modal.Cls)
    worker = modal_app.BatchWorker(model_name="sentiment").process_chunk.info()
    assert worker.method_names == ["process_chunk"]
    assert worker.batching_info is None  # one chunk per call
    assert (worker.timeout, worker.max_retries) == (shipped.deployment_config.timeout, None)  # the flow retries
    online = modal_app.Model().process_request.info()
    assert online.batching_info is not None
    assert online.batching_info.max_batch_size == shipped.batch_config.max_batch_size
    assert Settings.load(REPO_CONFIG).model_settings.entry()[0] == modal_app.DEFAULT_MODEL
    web = modal_app.web.info()
    assert web.web_info is not None  # the HTTP endpoints, a function of their own beside the batched class
    assert web.concurrency_info is not None
    routes = set(modal_app.web.local().openapi()["paths"])
    assert {"/predict_sync", "/predict_batch", "/predict_async", "/jobs/{job_id}", "/health", "/metrics"} <= routes


# --- packed chunks: a worker reads every file of its chunk, and one of an earlier version is refused -----------------


class EarlierVersionModal(InProcessModal):
    """The stand-in, playing a batch worker deployed with a modalkit before packed chunks: it reads a chunk's JSON
    without ``more`` (its ChunkSpec has no such field) and says nothing of ``pieces``."""

    def remote(self, app_name: str, class_name: str, params: dict[str, Any], method: str, args: tuple[Any, ...],
               call: Any = None) -> Any:  # fmt: skip
        if method == "process_chunk":
            job, chunk = args
            args = (job, {k: v for k, v in chunk.items() if k != "more"})
        result = super().remote(app_name, class_name, params, method, args, call)
        if isinstance(result, dict):
            result.pop("pieces", None)
        return result


def packed_job(s3: Any, bucket: str) -> tuple[JobSpec, ChunkSpec]:
    from modalkit.batch.planning import list_dataset, plan_chunks

    s3.create_bucket(Bucket=bucket)
    for name in ("a", "b", "c"):
        s3.put_object(Bucket=bucket, Key=f"in/{name}.jsonl", Body=b'{"text": "great value"}\n' * 4)
    (chunk,) = plan_chunks(list_dataset(f"s3://{bucket}/in"), 64 * 1024, "j0")
    job = JobSpec(job_id="j0", input_uri=f"s3://{bucket}/in", output_uri=f"s3://{bucket}/out", model_name="sentiment")
    return job, chunk


def test_a_modal_worker_reads_every_file_of_a_packed_chunk(app_module: ModuleType, s3: Any, unique: str) -> None:
    job, chunk = packed_job(s3, f"packed-{unique}")
    client = ModalChunkClient(app_module.app.name, "sentiment", cls_lookup=InProcessModal(app_module))
    assert (client.run_chunk(job, chunk).records, len(chunk.pieces())) == (12, 3)


def test_a_modal_worker_of_an_earlier_version_is_refused_a_packed_chunk_naming_the_fix(
    app_module: ModuleType, s3: Any, unique: str
) -> None:
    job, chunk = packed_job(s3, f"packed-{unique}")
    client = ModalChunkClient(app_module.app.name, "sentiment", cls_lookup=EarlierVersionModal(app_module))
    with pytest.raises(RemoteError, match=r"read chunk 0 as one file, not the 3 files.*redeploy it") as e:
        client.run_chunk(job, chunk)
    assert not e.value.retryable
