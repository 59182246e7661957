"""ModalConfig: settings become Modal 1.x objects and decorator arguments, all built offline.

Each dict is checked twice: for what it says (Modal's current names, no None values) and by handing it to the real
Modal decorator, which rejects unknown or deprecated arguments (warnings are errors here).
"""

from __future__ import annotations

import functools
import logging
import re
import tomllib
from pathlib import Path
from typing import Any

import modal
import pytest

from modalkit import modal_config as modal_config_module
from modalkit.modal_config import CONTAINER_REQUIREMENTS, ModalConfig, VolumeReloader
from modalkit.settings import Settings

REPO = Path(__file__).resolve().parents[2]
# Modal 0.x argument names that Modal 1.x rejects or deprecates
OLD_NAMES = {"concurrency_limit", "container_idle_timeout", "allow_concurrent_inputs", "keep_warm"}

FULL_DEPLOYMENT: dict[str, Any] = {
    "gpu": "A10G",
    "cpu": 2.5,
    "memory": 4096,
    "region": ["us-east", "us-west"],
    "volumes": {"/models": "sentiment-weights", "/cache/": "hf-cache"},
    "cloud_bucket_mounts": [
        {
            "mount_point": "/data",
            "bucket_name": "input-bucket",
            "key_prefix": "datasets/",
            "secret": "aws-creds",
            "read_only": True,
        },
        {
            "mount_point": "/r2",
            "bucket_name": "r2-bucket",
            "bucket_endpoint_url": "https://acct.r2.cloudflarestorage.com",
        },
    ],
    "secrets": ["aws-creds", "hf-token"],
    "min_containers": 1,
    "max_containers": 8,
    "scaledown_window": 300,
    "timeout": 900,
    "retries": {"max_retries": 3, "backoff_coefficient": 1.5, "initial_delay": 2.0, "max_delay": 30.0},
    "max_concurrent_inputs": 4,
    "handler_max_concurrent_inputs": 50,
    "secure": True,
}


def make_config(deployment: dict[str, Any] | None = None, **app_settings: Any) -> ModalConfig:
    """ModalConfig of the default settings with these deployment_config and app_settings values on top."""
    data = {"app_settings": {"deployment_config": deployment or {}, **app_settings}}
    return ModalConfig(Settings.load([], data=data))


def all_dicts(config: ModalConfig) -> dict[str, dict[str, Any]]:
    return {
        "app_cls": config.get_app_cls_settings(),
        "batch_worker_cls": config.get_batch_worker_cls_settings(),
        "handler": config.get_handler_settings(),
        "batched": config.get_batched_method_settings(),
        "concurrent": config.get_concurrent_settings(),
        "handler_concurrent": config.get_handler_concurrent_settings(),
        "asgi_app": config.get_asgi_app_settings(),
    }


# --- names ---------------------------------------------------------------------------------------------------


def test_app_name_defaults_to_the_dev_postfix() -> None:
    assert make_config().app_name == "modalkit-dev"


def test_app_name_takes_the_postfix_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODALKIT_APP_POSTFIX", "-prod")
    config = make_config()  # the postfix is not a settings key, so loading must not reject it
    assert config.app_name == "modalkit-prod"


def test_app_name_follows_app_prefix() -> None:
    assert make_config(app_prefix="shop-reviews").app_name == "shop-reviews-dev"


# --- @app.cls arguments --------------------------------------------------------------------------------------


def test_app_cls_settings_map_every_setting_to_modal_1x_arguments() -> None:
    settings = make_config(FULL_DEPLOYMENT).get_app_cls_settings()

    assert isinstance(settings["image"], modal.Image)
    assert settings["gpu"] == "A10G"
    assert settings["cpu"] == 2.5
    assert settings["memory"] == 4096
    assert settings["region"] == ["us-east", "us-west"]
    assert settings["min_containers"] == 1
    assert settings["max_containers"] == 8
    assert settings["scaledown_window"] == 300
    assert settings["timeout"] == 900

    secrets = settings["secrets"]
    assert all(isinstance(s, modal.Secret) for s in secrets)
    assert [s.name for s in secrets] == ["aws-creds", "hf-token"]

    retries = settings["retries"]
    assert isinstance(retries, modal.Retries)
    assert (retries.max_retries, retries.backoff_coefficient) == (3, 1.5)
    assert (retries.initial_delay.total_seconds(), retries.max_delay.total_seconds()) == (2.0, 30.0)

    volumes = settings["volumes"]
    assert set(volumes) == {"/models", "/cache", "/data", "/r2"}  # mount points normalised (no trailing slash)
    assert isinstance(volumes["/models"], modal.Volume)
    assert volumes["/models"].name == "sentiment-weights"
    assert volumes["/cache"].name == "hf-cache"
    # the bucket mounts' fields are checked through Modal's FunctionInfo in the decorator test below
    assert isinstance(volumes["/data"], modal.CloudBucketMount)
    assert isinstance(volumes["/r2"], modal.CloudBucketMount)


def test_app_cls_settings_leave_out_what_is_not_set() -> None:
    settings = make_config().get_app_cls_settings()  # defaults: no GPU, CPU, memory, region, limits or retries

    assert None not in settings.values()
    for unset in ("gpu", "cpu", "memory", "region", "min_containers", "max_containers", "retries"):
        assert unset not in settings
    assert settings["scaledown_window"] == 180
    assert settings["timeout"] == 1800


def test_retries_appear_only_when_max_retries_is_positive() -> None:
    assert "retries" not in make_config({"retries": {"max_retries": 0}}).get_app_cls_settings()
    one = make_config({"retries": 1}).get_app_cls_settings()["retries"]  # the original's plain int form
    assert isinstance(one, modal.Retries)
    assert one.max_retries == 1


def test_batch_worker_leaves_retries_to_the_flow() -> None:
    config = make_config(FULL_DEPLOYMENT)
    worker = config.get_batch_worker_cls_settings()
    assert "retries" not in worker
    assert worker["gpu"] == "A10G"
    assert worker["max_containers"] == 8


def test_handler_settings_have_image_and_secrets_but_no_gpu() -> None:
    settings = make_config(FULL_DEPLOYMENT).get_handler_settings()
    assert isinstance(settings["image"], modal.Image)
    assert [s.name for s in settings["secrets"]] == ["aws-creds", "hf-token"]
    assert settings["region"] == ["us-east", "us-west"]
    assert settings["scaledown_window"] == 300
    assert not {"gpu", "cpu", "memory", "volumes"} & set(settings)
    assert None not in make_config().get_handler_settings().values()


def test_original_setting_names_are_read_but_never_passed_to_modal() -> None:
    # a modalkit.yaml written for the original modalkit still loads, and only Modal 1.x names come out
    # (no modalkit.yaml underneath: it spells max_containers the new way, and one key under two names is an error)
    old = {"concurrency_limit": 5, "container_idle_timeout": 60, "allow_concurrent_inputs": 4}
    config = ModalConfig(Settings.load(data={"app_settings": {"deployment_config": old}}))
    dicts = all_dicts(config)

    assert dicts["app_cls"]["max_containers"] == 5
    assert dicts["app_cls"]["scaledown_window"] == 60
    assert dicts["concurrent"] == {"max_inputs": 4}
    for name, kwargs in {**dicts, **all_dicts(make_config(FULL_DEPLOYMENT))}.items():
        assert not OLD_NAMES & set(kwargs), f"{name} passes an old Modal argument: {OLD_NAMES & set(kwargs)}"


# --- method decorator arguments ------------------------------------------------------------------------------


def test_batched_method_settings_come_from_batch_config() -> None:
    config = make_config(batch_config={"max_batch_size": 7, "wait_ms": 3})
    assert config.get_batched_method_settings() == {"max_batch_size": 7, "wait_ms": 3}


def test_concurrent_settings_for_the_model_class_and_the_handler() -> None:
    config = make_config({"max_concurrent_inputs": 4, "handler_max_concurrent_inputs": 50})
    assert config.get_concurrent_settings() == {"max_inputs": 4}
    assert config.get_handler_concurrent_settings() == {"max_inputs": 50}


@pytest.mark.parametrize("secure", [True, False])
def test_asgi_app_requires_proxy_auth_when_secure(secure: bool) -> None:
    assert make_config({"secure": secure}).get_asgi_app_settings() == {"requires_proxy_auth": secure}


# --- the real decorators accept every dict -------------------------------------------------------------------


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("deployment", [{}, FULL_DEPLOYMENT], ids=["modalkit.yaml", "every-setting"])
def test_real_modal_decorators_accept_every_dict(deployment: dict[str, Any]) -> None:
    config = make_config(deployment, batch_config={"max_batch_size": 7, "wait_ms": 3})
    app = modal.App(name=config.app_name)

    # serialized=True only because these classes are local to the test; Modal wants global ones otherwise
    @app.cls(**config.get_app_cls_settings(), serialized=True)
    class Batched:
        @modal.batched(**config.get_batched_method_settings())
        def run(self, xs: list[int]) -> list[int]:
            return xs

    @app.cls(**config.get_batch_worker_cls_settings(), serialized=True)
    @modal.concurrent(**config.get_concurrent_settings())
    class Concurrent:
        @modal.method()
        def run(self, x: int) -> int:
            return x

    @app.function(**config.get_handler_settings(), serialized=True)
    @modal.concurrent(**config.get_handler_concurrent_settings())
    @modal.asgi_app(**config.get_asgi_app_settings())
    def web() -> Any:  # never called: building the definition is the test
        raise AssertionError

    # Modal recorded what it was given (FunctionInfo is built offline for a local definition)
    batched = Batched().run.info()
    assert batched.batching_info is not None
    assert (batched.batching_info.max_batch_size, batched.batching_info.wait_ms) == (7, 3)
    concurrent = Concurrent().run.info()
    assert concurrent.concurrency_info is not None
    assert concurrent.concurrency_info.max_inputs == config.get_concurrent_settings()["max_inputs"]
    handler = web.info()
    assert handler.web_info is not None
    assert handler.web_info.unauthenticated is not config.get_asgi_app_settings()["requires_proxy_auth"]
    assert handler.gpus == []
    if deployment:
        assert batched.gpus == [("A10G", 1)]
        assert (batched.cpu, batched.memory_mib, batched.timeout, batched.max_retries) == (2.5, 4096, 900, 3)
        assert batched.regions == ["us-east", "us-west"]
        assert set(batched.volumes) == {"/models", "/cache"}
        data, r2 = batched.cloud_bucket_mounts["/data"], batched.cloud_bucket_mounts["/r2"]
        assert (data.bucket_name, data.key_prefix, data.read_only, data.bucket_type) == (
            "input-bucket",
            "datasets/",
            True,
            "s3",
        )
        assert (r2.bucket_name, r2.read_only, r2.bucket_type) == ("r2-bucket", False, "r2")
        assert batched.secrets == ["modal.Secret.from_name('aws-creds')", "modal.Secret.from_name('hf-token')"]
        assert concurrent.max_retries is None


# --- volume reloading ----------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_volume_reloader_reloads_only_after_the_interval() -> None:
    clock = FakeClock()
    reloads: list[float] = []
    reloader = VolumeReloader(lambda: reloads.append(clock.now), interval=60, clock=clock)

    clock.now += 59.9
    assert reloader.maybe_reload() is False
    assert reloads == []
    clock.now += 0.1  # 60 s since the reloader was made
    assert reloader.maybe_reload() is True
    assert reloader.maybe_reload() is False  # the interval counts from the last reload now
    clock.now += 30
    assert reloader.maybe_reload() is False
    clock.now += 30
    assert reloader.maybe_reload() is True
    assert reloads == [1060.0, 1120.0]


def test_volume_reloader_never_reloads_when_the_interval_is_none() -> None:
    clock = FakeClock()
    reloads: list[float] = []
    reloader = VolumeReloader(lambda: reloads.append(clock.now), interval=None, clock=clock)
    for _ in range(3):
        clock.now += 86_400
        assert reloader.maybe_reload() is False
    assert reloads == []


class FakeVolume:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.reloads = 0

    def reload(self) -> None:
        self.reloads += 1
        if self.error is not None:
            raise self.error


def test_reload_volumes_skips_a_failing_volume_and_reloads_the_others(caplog: pytest.LogCaptureFixture) -> None:
    config = make_config()
    broken, good = FakeVolume(RuntimeError("volume is busy")), FakeVolume()
    config._volumes = {"/broken": broken, "/good": good}  # type: ignore[dict-item]

    with caplog.at_level(logging.WARNING, logger="modalkit.modal_config"):
        config.reload_volumes()

    assert (broken.reloads, good.reloads) == (1, 1)
    assert re.search(r"/broken.*volume is busy", caplog.text)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """A fake clock for the reloaders that ModalConfig.volume_reloader() makes."""
    fake = FakeClock()
    monkeypatch.setattr(modal_config_module, "VolumeReloader", functools.partial(VolumeReloader, clock=fake))
    return fake


def test_volume_reloader_from_config_reloads_the_configured_volumes_on_their_interval(clock: FakeClock) -> None:
    config = make_config({"volumes": {"/models": "weights"}, "volume_reload_interval_seconds": 30})
    volume = FakeVolume()
    config._volumes = {"/models": volume}  # type: ignore[dict-item]
    reloader = config.volume_reloader()

    assert reloader.maybe_reload() is False
    clock.now += 30
    assert reloader.maybe_reload() is True
    assert volume.reloads == 1


def test_volume_reloader_from_config_ticks_on_its_interval_without_volumes_as_the_original_did(
    clock: FakeClock,
) -> None:
    # the interval asks for a periodic reload: with no Modal Volume (a bucket mount's files change under it) the
    # pipeline's on_volume_reload still runs on it, as in the original; reloading no volumes does nothing
    reloader = make_config({"volume_reload_interval_seconds": 60}).volume_reloader()
    clock.now += 59
    assert reloader.maybe_reload() is False
    clock.now += 1
    assert reloader.maybe_reload() is True


def test_volume_reloader_last_reload_can_be_moved_back_to_reload_at_once() -> None:
    clock = FakeClock()
    reloads: list[float] = []
    reloader = VolumeReloader(lambda: reloads.append(clock.now), interval=60, clock=clock)

    reloader.last = clock.now - 70  # the original's `service._last_reload_time = time.time() - 70`

    assert reloader.maybe_reload() is True
    assert (reloads, reloader.last) == ([clock.now], clock.now)


def test_volume_reloader_from_config_is_inert_without_an_interval(clock: FakeClock) -> None:
    config = make_config({"volumes": {"/models": "weights"}})
    volume = FakeVolume()
    config._volumes = {"/models": volume}  # type: ignore[dict-item]
    reloader = config.volume_reloader()
    clock.now += 86_400
    assert reloader.maybe_reload() is False
    assert volume.reloads == 0


# --- container requirements ----------------------------------------------------------------------------------


def _requirement_name(spec: str) -> str:
    name = re.split(r"[\s\[<>=!~;@]", spec, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503 normalisation


def test_container_requirements_are_runtime_dependencies_of_the_package() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    runtime = {_requirement_name(dep) for dep in pyproject["project"]["dependencies"]}
    container = [_requirement_name(spec) for spec in CONTAINER_REQUIREMENTS]

    assert len(container) == len(set(container)), "a package is listed twice in CONTAINER_REQUIREMENTS"
    missing = sorted(set(container) - runtime)
    assert not missing, f"CONTAINER_REQUIREMENTS names {missing}, which pyproject.toml's dependencies lack"
    # the container is the model side: nothing from the orchestration or CLI side goes in
    assert not {"prefect", "typer", "rich"} & set(container)


def test_images_carry_the_library_but_not_the_cli_s_managed_prefect_server() -> None:
    from modal.mount import _Mount

    from modalkit.modal_config import python_source_ignore

    # the files Modal's own mount of the package would upload, with the ignore rule the image uses
    mount = _Mount._from_local_python_packages("modalkit", ignore=python_source_ignore("modalkit"))
    files = {str(remote) for entry in mount._entries for _, remote in entry.get_files_to_upload()}

    assert "/root/modalkit/modal_service.py" in files
    assert "/root/modalkit/batch/chunk.py" in files
    assert "/root/modalkit/cli_prefect.py" not in files
