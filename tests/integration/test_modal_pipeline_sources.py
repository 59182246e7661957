"""A Modal image built offline from a project whose pipeline module sits beside ``modalkit.yaml``: the module is
shipped into the containers with modalkit, and one that cannot be shipped stops the deploy, not a container."""

from pathlib import Path

import pytest
from modal._utils.async_utils import synchronizer
from modal.mount import _Mount

from modalkit.exceptions import ConfigError
from modalkit.modal_config import ModalConfig, python_source_ignore
from modalkit.settings import Settings

ORDERS_PY = """
from modalkit.examples.sentiment import SentimentPipeline


class Orders(SentimentPipeline):
    pass
"""


def settings_for(*pipelines: str, **build: object) -> Settings:
    entries = {f"m{i}": {"pipeline": p} for i, p in enumerate(pipelines)}
    return Settings.load(
        data={
            "app_settings": {"build_config": build},
            "model_settings": {"model_entries": entries, "default_model": "m0"},
        }
    )


def test_a_local_pipeline_module_is_shipped_into_the_image_beside_modalkit(tmp_path: Path) -> None:
    (tmp_path / "orders.py").write_text(ORDERS_PY, encoding="utf-8")  # the working directory (conftest chdir)
    config = ModalConfig(settings_for("orders:Orders", "modalkit.examples.sentiment:SentimentPipeline"))

    assert config.python_sources() == ["modalkit", "orders"]
    image = config.get_app_cls_settings()["image"]  # what @app.cls(...) gets at deploy time
    assert {"modalkit", "orders"} <= set(synchronizer._translate_in(image)._added_python_source_set)
    # what Modal uploads for these sources: the pipeline module lands on the container's /root
    mount = _Mount._from_local_python_packages("orders", ignore=python_source_ignore("orders"))
    files = {str(remote) for entry in mount._entries for _, remote in entry.get_files_to_upload()}
    assert files == {"/root/orders.py"}


def test_a_pipeline_module_already_in_local_python_sources_or_installed_is_not_added_again(tmp_path: Path) -> None:
    (tmp_path / "orders.py").write_text(ORDERS_PY, encoding="utf-8")
    config = ModalConfig(
        settings_for("orders:Orders", "pydantic.main:BaseModel", local_python_sources=["modalkit", "orders"])
    )
    assert config.python_sources() == ["modalkit", "orders"]


def test_a_pipeline_module_that_cannot_be_shipped_stops_the_deploy_naming_it(tmp_path: Path) -> None:
    config = ModalConfig(settings_for("orderz:Orders"))
    with pytest.raises(ConfigError) as caught:
        config.get_app_cls_settings()
    message = str(caught.value)
    assert message.startswith("model_settings.model_entries.m0.pipeline: module 'orderz' cannot be shipped to Modal")
    assert f"looked in the working directory {tmp_path}" in message
    assert "pip_packages" in message


def test_a_pipeline_module_the_image_may_install_is_left_to_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ModalConfig(settings_for("orderz:Orders", pip_packages=["orderz==1.0"]))
    assert config.python_sources() == ["modalkit"]
    assert "module 'orderz' is not found here; the image must install it" in caplog.text
