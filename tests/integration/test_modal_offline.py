"""The Modal app from ``modalkit.yaml``, written the way the original modalkit's docs show, built and run offline.

The app is a real module file (Modal wants its classes at global scope), written into the test's directory and
imported, so the decorators run exactly as in a user's ``app.py``. Nothing reaches Modal's servers: the app is only
built, and ``Cls().method.local(...)`` runs the ``@modal.enter`` step and the batched method in-process.

No ``from __future__ import annotations`` in this file: Modal reads ``model_name: str = modal.parameter(...)``
annotations as real types.
"""

import importlib.util
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import modal
import modal.exception
import modal.experimental
import pytest
from fastapi import FastAPI

from modalkit.examples.sentiment import Review, SentimentPipeline
from modalkit.iomodel import OUTPUT_ENVELOPE, AsyncInputModel, InferenceOutputModel, SyncInputModel
from modalkit.modal_config import ModalConfig
from modalkit.modal_service import ModalService
from modalkit.settings import Settings
from modalkit.task_queue import LocalQueueBackend, MemoryBackend

REPO_CONFIG = Path(__file__).resolve().parents[2] / "modalkit.yaml"
POSITIVE, NEGATIVE = "Absolutely love it", "Terrible, broke after a day"
POISON = "POISON PILL"

# The user's app.py, as the original modalkit's getting-started guide writes it (plus two more model classes and
# a pipeline that fails on a marker value). `settings` is put in front of it by the fixture.
APP_SOURCE = """
import fastapi
import modal
import modal.exception
import modal.experimental

from modalkit.examples.sentiment import SentimentPipeline
from modalkit.modal_config import ModalConfig
from modalkit.modal_service import ModalService
from modalkit.task_queue import MemoryBackend

modal_config = ModalConfig(settings)
app = modal.App(name=modal_config.app_name)
backend = MemoryBackend()


@app.cls(**modal_config.get_app_cls_settings())
class SentimentApp(ModalService):
    inference_implementation = SentimentPipeline
    model_name: str = modal.parameter(default="sentiment")
    modal_utils: ModalConfig = modal_config


@app.cls(**modal_config.get_app_cls_settings())
class SentimentFromEntry(ModalService):
    # no inference_implementation: the model entry's `pipeline` import path names the class
    model_name: str = modal.parameter(default="sentiment")
    modal_utils: ModalConfig = modal_config


class PoisonablePipeline(SentimentPipeline):
    def predict(self, input_list, preprocessed_data):
        if any(item.text == "POISON PILL" for item in input_list):
            raise ValueError("poisoned review: cannot score it")
        return super().predict(input_list, preprocessed_data)


@app.cls(**modal_config.get_app_cls_settings())
class GuardedApp(ModalService):
    inference_implementation = PoisonablePipeline
    model_name: str = modal.parameter(default="sentiment")
    modal_utils: ModalConfig = modal_config
    queue_backend = backend


@app.function(**modal_config.get_handler_settings())
@modal.concurrent(**modal_config.get_handler_concurrent_settings())
@modal.asgi_app(**modal_config.get_asgi_app_settings())
def web_endpoints():
    from modalkit.examples.sentiment import Review, Sentiment
    from modalkit.modal_service import create_web_endpoints

    return create_web_endpoints(app_cls=SentimentApp, input_model=Review, output_model=Sentiment)
"""


def settings_data(tmp_path: Path, **app_settings: Any) -> dict[str, Any]:
    """Values over modalkit.yaml: the weights and the local queue file go under ``tmp_path``."""
    return {
        "app_settings": {"queue_config": {"local_path": str(tmp_path / "queues")}, **app_settings},
        "model_settings": {"local_model_repository_folder": str(tmp_path / "models")},
    }


def load_settings(tmp_path: Path, **app_settings: Any) -> Settings:
    return Settings.load(REPO_CONFIG, data=settings_data(tmp_path, **app_settings))


@pytest.fixture
def import_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., ModuleType]:
    """Write the app module, with these app_settings over modalkit.yaml, and import it.

    With ``usual_way=True`` the module calls ``ModalConfig()``, which finds the settings through ``MODALKIT_CONFIG``
    (modalkit.yaml, then an overlay file with the test's values); otherwise ``ModalConfig(settings)`` with settings
    loaded explicitly at the top of the module.
    """
    names = iter(range(1_000))

    def load(usual_way: bool = False, **app_settings: Any) -> ModuleType:
        name = f"sentiment_app_{next(names)}"
        path = tmp_path / f"{name}.py"
        data = settings_data(tmp_path, **app_settings)
        if usual_way:
            overlay = tmp_path / f"{name}.yaml"
            overlay.write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML
            monkeypatch.setenv("MODALKIT_CONFIG", f"{REPO_CONFIG},{overlay}")
            source = APP_SOURCE.replace("ModalConfig(settings)", "ModalConfig()")
        else:
            load_call = f"Settings.load({str(REPO_CONFIG)!r}, data={data!r})"
            source = f"from modalkit.settings import Settings\n\nsettings = {load_call}\n{APP_SOURCE}"
        path.write_text(source, encoding="utf-8")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module

    return load


def sync(text: str) -> SyncInputModel[Review]:
    return SyncInputModel[Review](message=Review(text=text))


def async_(text: str, **kwargs: Any) -> AsyncInputModel[Review]:
    return AsyncInputModel[Review](message=Review(text=text), **kwargs)


def bodies(backend: MemoryBackend | LocalQueueBackend, queue: str) -> list[dict[str, Any]]:
    return [json.loads(body) for body in backend.messages(queue)]


# --- building ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("usual_way", [False, True], ids=["ModalConfig(settings)", "ModalConfig()"])
def test_app_from_modalkit_yaml_builds_offline_as_the_original_docs_write_it(
    import_app: Callable[..., ModuleType], usual_way: bool
) -> None:
    app = import_app(usual_way=usual_way)
    shipped = Settings.load(REPO_CONFIG).app_settings  # the app follows the file, whatever it says

    assert isinstance(app.app, modal.App)
    assert app.app.name == shipped.app_prefix + "-dev"
    assert app.modal_config.settings.config_files[0] == REPO_CONFIG
    for cls in (app.SentimentApp, app.SentimentFromEntry, app.GuardedApp):
        assert isinstance(cls, modal.Cls)
        info = cls().process_request.info()
        assert info.method_names == ["process_request"]
        assert info.batching_info is not None
        batch = shipped.batch_config
        assert (info.batching_info.max_batch_size, info.batching_info.wait_ms) == (batch.max_batch_size, batch.wait_ms)
        assert (info.timeout, info.gpus, info.max_retries) == (shipped.deployment_config.timeout, [], None)

    web = app.web_endpoints.info()
    assert web.web_info is not None
    assert web.web_info.unauthenticated  # deployment_config.secure: false
    assert web.concurrency_info is not None
    assert web.concurrency_info.max_inputs == 100
    web_app = app.web_endpoints.local()
    assert isinstance(web_app, FastAPI)
    routes = set(web_app.openapi()["paths"])
    assert {"/predict_sync", "/predict_batch", "/predict_async", "/jobs/{job_id}", "/health", "/metrics"} <= routes


@pytest.mark.filterwarnings("error")
def test_secure_deployment_requires_modal_proxy_auth(import_app: Callable[..., ModuleType]) -> None:
    app = import_app(deployment_config={"secure": True})
    web = app.web_endpoints.info()
    assert web.web_info is not None
    assert not web.web_info.unauthenticated


# --- batching settings ---------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("error")
def test_batched_method_takes_its_settings_from_the_subclass_modal_utils(
    import_app: Callable[..., ModuleType],
) -> None:
    app = import_app(batch_config={"max_batch_size": 7, "wait_ms": 3})
    info = app.SentimentApp().process_request.info()
    assert info.batching_info is not None
    assert (info.batching_info.max_batch_size, info.batching_info.wait_ms) == (7, 3)

    # another subclass with other settings gets its own batching; the first keeps its own
    other_config = ModalConfig(Settings.load(data={"app_settings": {"batch_config": {"max_batch_size": 2}}}))
    other_app = modal.App(name="other")

    @other_app.cls(**other_config.get_app_cls_settings(), serialized=True)  # serialized: local to this test
    class Other(ModalService):
        model_name: str = modal.parameter(default="sentiment")
        modal_utils: ModalConfig = other_config

    other = Other().process_request.info().batching_info
    assert other is not None
    assert (other.max_batch_size, other.wait_ms) == (2, 10)
    again = app.SentimentApp().process_request.info().batching_info
    assert again is not None
    assert (again.max_batch_size, again.wait_ms) == (7, 3)


# --- the local path: @modal.enter, then the batched method -----------------------------------------------------


@pytest.mark.parametrize(
    ("cls_name", "usual_way"),
    [("SentimentApp", False), ("SentimentFromEntry", False), ("SentimentApp", True)],
    ids=["inference_implementation", "entry-pipeline", "ModalConfig()"],
)
def test_process_request_local_loads_the_model_and_answers_each_input_in_order(
    import_app: Callable[..., ModuleType], tmp_path: Path, cls_name: str, usual_way: bool
) -> None:
    app = import_app(usual_way=usual_way)
    inputs = [sync(POSITIVE), async_(NEGATIVE), sync(NEGATIVE), async_(POSITIVE)]

    outputs = getattr(app, cls_name)().process_request.local(inputs)

    assert [o.status for o in outputs] == ["success"] * 4
    assert [o.label for o in outputs] == ["positive", "negative", "negative", "positive"]
    assert all(0.5 < o.score <= 1.0 for o in outputs)
    # load_artefacts (@modal.enter) built the example model, which saved its weights where the settings say
    assert (tmp_path / "models" / "sentiment" / "weights.npz").is_file()


def test_a_poison_input_fails_alone_and_async_results_reach_their_queues(
    import_app: Callable[..., ModuleType],
) -> None:
    app = import_app()
    backend: MemoryBackend = app.backend
    queues = {"success_queue": "results", "failure_queue": "failures"}
    inputs = [
        sync(POSITIVE),
        async_(POISON, **queues, meta={"record_id": "review-2", "tenant": "shop"}),
        async_(NEGATIVE, **queues, meta={"record_id": "review-3"}),
        sync(POISON),
        sync(NEGATIVE),
    ]

    outputs = app.GuardedApp().process_request.local(inputs)

    assert [o.status for o in outputs] == ["success", "error", "success", "error", "success"]
    assert [getattr(o, "label", None) for o in outputs] == ["positive", None, "negative", None, "negative"]
    assert "poisoned review" in (outputs[1].error or "")

    [success] = bodies(backend, "results")
    assert success == {
        "job_id": "local",  # modal.current_function_call_id() outside a container
        "record_id": "review-3",
        "status": "success",
        "output": {"label": "negative", "score": success["output"]["score"]},
        "meta": {"record_id": "review-3"},
    }
    [failure] = bodies(backend, "failures")
    assert failure == {
        "job_id": "local",
        "record_id": "review-2",
        "status": "error",
        "stage": "predict",
        "error_type": "ValueError",
        "error": "poisoned review: cannot score it",
        "input": {"text": POISON},
        "meta": {"record_id": "review-2", "tenant": "shop"},
    }
    assert backend.queues() == ["failures", "results"]  # sync inputs send nothing


def test_async_results_go_to_the_local_queue_backend_named_in_the_settings(
    import_app: Callable[..., ModuleType], tmp_path: Path
) -> None:
    app = import_app(queue_config={"backend": "local", "local_path": str(tmp_path / "queues")})
    inputs = [
        async_(POSITIVE, success_queue="results", failure_queue="failures"),
        async_(NEGATIVE, success_queue="results"),
        sync(POSITIVE),
    ]

    outputs = app.SentimentApp().process_request.local(inputs)

    assert [o.label for o in outputs] == ["positive", "negative", "positive"]
    durable = LocalQueueBackend(tmp_path / "queues")  # a second handle: the records are on disk
    records = bodies(durable, "results")
    # no meta.record_id: the record id is the job id, as with modalkit serve (outside a container, "local")
    assert [(r["status"], r["record_id"], r["output"]["label"]) for r in records] == [
        ("success", "local", "positive"),
        ("success", "local", "negative"),
    ]
    assert durable.messages("failures") == []
    durable.close()


def test_a_pipeline_reported_error_keeps_its_whole_message_on_the_failure_queue(tmp_path: Path) -> None:
    # the original modalkit let a pipeline without declared schemas mark an output as failed itself
    class Flagging(SentimentPipeline):
        output_model = None

        def postprocess(self, input_list: list[Review], raw_output: dict[str, Any]) -> list[Any]:
            outputs = super().postprocess(input_list, raw_output)
            return [
                InferenceOutputModel(status="error", error="language not supported: fr") if "bonjour" in i.text else o
                for i, o in zip(input_list, outputs, strict=True)
            ]

    class Service(ModalService):
        inference_implementation = Flagging
        model_name = "sentiment"
        modal_utils = ModalConfig(load_settings(tmp_path))

    backend = MemoryBackend()
    service = Service(queue_backend=backend)
    service.load_artefacts()
    inputs = [async_("bonjour, un avis", failure_queue="failures"), async_(POSITIVE, failure_queue="failures")]
    outputs = service.process_request(inputs)

    assert [o.status for o in outputs] == ["error", "success"]
    [failure] = bodies(backend, "failures")
    assert (failure["stage"], failure["error_type"], failure["error"]) == (
        "postprocess",
        "PipelineReportedError",
        "language not supported: fr",
    )


# --- constructor injection (the seed's API) --------------------------------------------------------------------


def test_queue_backend_can_be_injected_through_the_constructor(tmp_path: Path) -> None:
    class MyService(ModalService):
        inference_implementation = SentimentPipeline
        model_name = "sentiment"
        modal_utils = ModalConfig(load_settings(tmp_path))

    backend = MemoryBackend()
    service = MyService(queue_backend=backend)

    assert service.queue_backend is backend
    assert MyService.queue_backend is None  # the class (and other instances) keep the configured default
    assert MyService().queue_backend is None

    service.load_artefacts()
    [output] = service.process_request([async_(POSITIVE, success_queue="results")])
    assert output.label == "positive"
    assert [r["output"]["label"] for r in bodies(backend, "results")] == ["positive"]
    assert not (tmp_path / "queues").exists()  # the configured local backend was not used


def test_a_subclass_init_hands_queue_backend_to_super_init_as_the_original_did(tmp_path: Path) -> None:
    # the original's docs and tests: a subclass with its own __init__, used outside Modal (tests, scripts)
    class MyService(ModalService):
        inference_implementation = SentimentPipeline

        def __init__(self, model_name: str, queue_backend: Any = None) -> None:
            super().__init__(queue_backend=queue_backend)
            self.model_name = model_name
            self.modal_utils = ModalConfig(load_settings(tmp_path))

    backend = MemoryBackend()
    service = MyService("sentiment", queue_backend=backend)
    plain = MyService("sentiment")

    assert service.queue_backend is backend
    assert plain.queue_backend is None
    service.load_artefacts()
    [output] = service.process_request([async_(POSITIVE, success_queue="results")])
    assert output.label == "positive"
    assert [r["output"]["label"] for r in bodies(backend, "results")] == ["positive"]


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("parameterised", [True, False], ids=["modal.parameter", "plain attribute"])
def test_modal_accepts_a_subclass_without_its_own_init_and_builds_it_with_no_warning(
    tmp_path: Path, parameterised: bool
) -> None:
    # ModalService takes queue_backend in __init__, yet Modal (which refuses any __init__ on an @app.cls class,
    # inherited ones included) sees none on its subclasses: both ways Modal builds an instance work
    modal_config = ModalConfig(load_settings(tmp_path))
    app = modal.App(name=modal_config.app_name)
    backend = MemoryBackend()
    namespace: dict[str, Any] = {
        "inference_implementation": SentimentPipeline,
        "modal_utils": modal_config,
        "queue_backend": backend,
        "model_name": modal.parameter(default="sentiment") if parameterised else "sentiment",
        "__annotations__": {"model_name": str, "modal_utils": ModalConfig} if parameterised else {},
        "__module__": __name__,
    }
    service_cls = type("Plain", (ModalService,), namespace)

    cls = app.cls(**modal_config.get_app_cls_settings(), serialized=True)(service_cls)

    assert isinstance(cls, modal.Cls)
    [output] = cls().process_request.local([async_(POSITIVE, success_queue="results")])
    assert output.label == "positive"
    assert [r["output"]["label"] for r in bodies(backend, "results")] == ["positive"]


# --- the example model on a shared volume ----------------------------------------------------------------------


def test_containers_that_start_together_on_one_volume_both_save_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Two containers find no weights on the shared volume, fit them, and save at the same moment: the second one
    # saves while the first is between writing its temporary file and renaming it into place.
    folder = str(tmp_path / "volume")
    real_replace = Path.replace
    second: list[SentimentPipeline] = []
    started: list[bool] = []

    def replace_after_a_concurrent_save(self: Path, target: Any) -> Path:
        if not started and str(self).startswith(folder):
            started.append(True)
            second.append(SentimentPipeline("sentiment", folder, {}))
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace_after_a_concurrent_save)
    with caplog.at_level(logging.WARNING, logger="modalkit.examples.sentiment"):
        first = SentimentPipeline("sentiment", folder, {})

    assert "could not save" not in caplog.text
    weights = tmp_path / "volume" / "sentiment"
    assert [p.name for p in weights.iterdir()] == ["weights.npz"]  # no temporary file left behind
    monkeypatch.undo()
    third = SentimentPipeline("sentiment", folder, {})  # a later container loads what was saved
    for pipeline in (first, second[0], third):
        assert [o.label for o in pipeline.run_inference([Review(text=POSITIVE), Review(text=NEGATIVE)])] == [
            "positive",
            "negative",
        ]


# --- what apps written for the original modalkit rely on ----------------------------------------------------------


def test_the_names_the_original_modal_service_module_offered_still_import_from_it() -> None:
    from modalkit import fast_api, modal_service, task_queue

    assert modal_service.create_web_endpoints is fast_api.create_web_endpoints
    assert modal_service.send_response_queue is task_queue.send_response_queue
    assert {"ModalService", "create_web_endpoints", "send_response_queue"} <= set(modal_service.__all__)


def test_load_artefacts_uses_the_instance_modal_utils_over_the_class_one(tmp_path: Path) -> None:
    class Service(ModalService):
        inference_implementation = SentimentPipeline
        model_name = "sentiment"
        modal_utils = ModalConfig(load_settings(tmp_path / "class"))

    service = Service()
    service.modal_utils = ModalConfig(load_settings(tmp_path / "instance"))
    service.load_artefacts()

    assert (tmp_path / "instance" / "models" / "sentiment" / "weights.npz").is_file()
    assert not (tmp_path / "class").exists()
    assert Service.modal_utils.settings.model_settings.local_model_repository_folder == tmp_path / "class" / "models"


def test_an_async_output_carries_the_request_meta_as_the_original_did(tmp_path: Path) -> None:
    class Service(ModalService):
        inference_implementation = SentimentPipeline
        model_name = "sentiment"
        modal_utils = ModalConfig(load_settings(tmp_path))

    service = Service(queue_backend=MemoryBackend())
    service.load_artefacts()

    outputs = service.process_request([async_(POSITIVE, meta={"tenant": "shop"}), sync(NEGATIVE)])

    assert outputs[0].meta == {"tenant": "shop"}
    assert outputs[1].meta == {}
    assert InferenceOutputModel().meta == {}
    assert "meta" not in outputs[0].model_dump(exclude=OUTPUT_ENVELOPE)  # success records' output leaves it out


class CountingReloads(SentimentPipeline):
    def on_volume_reload(self) -> None:
        self.reloads = getattr(self, "reloads", 0) + 1


def test_volumes_reload_on_their_interval_with_the_original_names_for_the_reload_state(tmp_path: Path) -> None:
    # the original kept the state in `_reload_interval` and `_last_reload_time` (time.time() seconds); an app may
    # move the last reload back to force one. No Modal Volume here: the pipeline's hook still runs on the interval
    class Service(ModalService):
        inference_implementation = CountingReloads
        model_name = "sentiment"
        modal_utils = ModalConfig(load_settings(tmp_path, deployment_config={"volume_reload_interval_seconds": 60}))

    service = Service()
    service.load_artefacts()
    pipeline = service.pipeline
    assert isinstance(pipeline, CountingReloads)

    assert service._reload_interval == 60
    assert abs(service._last_reload_time - time.time()) < 5
    service.process_request([sync(POSITIVE)])
    assert getattr(pipeline, "reloads", 0) == 0  # the interval has not passed

    service._last_reload_time = time.time() - 70
    [output] = service.process_request([sync(POSITIVE)])

    assert output.label == "positive"
    assert pipeline.reloads == 1
    assert abs(service._last_reload_time - time.time()) < 5
    service.process_request([sync(POSITIVE)])
    assert pipeline.reloads == 1


class GpuGoneBad(SentimentPipeline):
    """Every batch fails in predict with a CUDA error, whatever its records, and counts the tries."""

    tries: ClassVar[list[int]] = []

    def predict(self, input_list: list[Review], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        GpuGoneBad.tries.append(len(input_list))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_broken_gpu_fails_each_request_of_the_batch_once_and_asks_modal_to_replace_the_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # outside a container modal.experimental.stop_fetching_inputs() raises; record the request instead
    asked: list[bool] = []
    monkeypatch.setattr(modal.experimental, "stop_fetching_inputs", lambda: asked.append(True))

    class Service(ModalService):
        inference_implementation = GpuGoneBad
        model_name = "sentiment"
        modal_utils = ModalConfig(load_settings(tmp_path))

    backend = MemoryBackend()
    service = Service(queue_backend=backend)
    service.load_artefacts()
    GpuGoneBad.tries.clear()
    inputs = [async_(POSITIVE, failure_queue="failures", meta={"record_id": f"r{i}"}) for i in range(6)]

    outputs = service.process_request(inputs)

    assert GpuGoneBad.tries == [6]  # one try; no bisecting a batch that no record broke
    assert [o.status for o in outputs] == ["error"] * 6
    assert all("CUDA error: an illegal memory access" in (o.error or "") for o in outputs)
    assert asked == [True]
    failures = bodies(backend, "failures")
    assert [f["record_id"] for f in failures] == [f"r{i}" for i in range(6)]
    assert {(f["stage"], f["error_type"]) for f in failures} == {("predict", "RuntimeError")}


def test_modal_1_6_refuses_a_custom_constructor_so_a_backend_is_injected_by_keyword_or_class_attribute(
    tmp_path: Path,
) -> None:
    # the original's docs show `def __init__(self, queue_backend=None): super().__init__(queue_backend=...)`;
    # Modal 1.x rejects a subclass's own __init__ on an @app.cls class (README: compatibility); outside Modal it works
    # (test_a_subclass_init_hands_queue_backend_to_super_init_as_the_original_did)
    modal_config = ModalConfig(load_settings(tmp_path))
    app = modal.App(name=modal_config.app_name)

    with pytest.raises(modal.exception.InvalidError, match="cannot have a custom constructor"):

        @app.cls(**modal_config.get_app_cls_settings(), serialized=True)  # defined in a function
        class WithInit(ModalService):
            model_name: str = modal.parameter(default="sentiment")

            def __init__(self, queue_backend: Any = None) -> None:
                super().__init__()

    backend = MemoryBackend()

    @app.cls(**modal_config.get_app_cls_settings(), serialized=True)  # defined in a function
    class WithAttribute(ModalService):
        inference_implementation = SentimentPipeline
        model_name: str = modal.parameter(default="sentiment")
        modal_utils: ModalConfig = modal_config
        queue_backend = backend

    [output] = WithAttribute().process_request.local([async_(POSITIVE, success_queue="results")])
    assert output.label == "positive"
    assert [r["output"]["label"] for r in bodies(backend, "results")] == ["positive"]


# --- the web endpoints on Modal, through an in-process stand-in for the deployed class ----------------------------


class _StandInMethod:
    """``process_request`` of a deployed class as the web function calls it: ``.remote.aio`` runs one input in a
    batch of one here (``.local``, the real batched method's body); ``.spawn.aio`` runs it and returns a call id."""

    def __init__(self, method: Any, calls: list[Any]) -> None:
        self.method = method
        self.calls = calls
        self.remote = self
        self.spawn = self

    async def aio(self, request: Any) -> Any:
        self.calls.append(request)
        (output,) = self.method.local([request])
        if isinstance(request, AsyncInputModel):
            return type("FunctionCall", (), {"object_id": "fc-standin-1"})()
        return output


def test_web_endpoints_on_modal_send_each_request_to_the_model_class_through_an_in_process_stand_in(
    import_app: Callable[..., ModuleType],
) -> None:
    import asyncio

    import httpx

    from modalkit.examples.sentiment import Sentiment
    from modalkit.modal_service import create_web_endpoints

    app = import_app()
    calls: list[Any] = []
    instance = app.GuardedApp()

    class StandInCls:  # the call surface of a modal.Cls: StandInCls(model_name=...).process_request...
        modal_utils = app.modal_config

        def __init__(self, model_name: str) -> None:
            self.model_name = model_name
            self.process_request = _StandInMethod(instance.process_request, calls)

    web = create_web_endpoints(app_cls=StandInCls, input_model=Review, output_model=Sentiment)

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=web)
        async with httpx.AsyncClient(transport=transport, base_url="http://modal") as client:
            return [
                await client.post("/predict_sync", json={"text": POSITIVE}),
                await client.post("/predict_sync", json={"text": POISON}),
                await client.post("/predict_batch", json=[{"text": NEGATIVE}, {"text": POISON}]),
                await client.post("/predict_async", json={"message": {"text": POSITIVE}}),
            ]

    ok, poison, batch, spawned = asyncio.run(main())
    assert (ok.status_code, ok.json()["label"]) == (200, "positive")
    assert poison.status_code == 422
    assert poison.json()["error"].endswith("poisoned review: cannot score it")
    assert [a["status"] for a in batch.json()] == ["success", "error"]
    assert spawned.json() == {"job_id": "fc-standin-1"}
    assert len(calls) == 5  # one call of the model class per record: Modal batches them
    assert all(isinstance(c, SyncInputModel | AsyncInputModel) for c in calls)


# --- GET /jobs/{id} on Modal: the call looked up through the Modal client --------------------------------------------


def test_a_modal_job_id_unknown_to_modal_or_malformed_is_an_unknown_job_and_a_done_one_carries_its_meta() -> None:
    import asyncio

    from modalkit.runners.modal_client import job_status
    from modalkit.runners.online import UnknownJob

    def from_id(job_id: str) -> Any:
        if job_id == "fc-unknown":
            raise modal.exception.NotFoundError("no such call")
        if job_id == "not-an-id":
            raise modal.exception.InvalidError("malformed id")

        class Done:
            class get:  # the call surface of modal.FunctionCall.get
                @staticmethod
                async def aio(timeout: float) -> Any:
                    output = InferenceOutputModel(label="positive")  # type: ignore[call-arg]
                    output.meta = {"ticket": 7}
                    return output

        return Done()

    for job_id in ("fc-unknown", "not-an-id"):
        with pytest.raises(UnknownJob, match=job_id):
            asyncio.run(job_status(job_id, from_id))
    done = asyncio.run(job_status("fc-done", from_id))
    assert (done.status, done.meta, done.result["label"]) == ("success", {"ticket": 7}, "positive")  # type: ignore[index]
