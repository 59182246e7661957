"""The ``modalkit`` console script run from a project folder, as a new user runs it: ``modalkit.yaml`` and the
pipeline module ``orders.py`` side by side, ``PYTHONPATH`` naming only the code under test (never the project).

The console script, unlike ``python -m``, does not put the working directory on ``sys.path``: these runs check that
the pipeline module beside the settings is imported anyway (by the CLI, its local worker processes and the
``modalkit serve`` workers), and that what cannot be found is explained.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from support import free_port, stop_process

import modalkit

#: The code under test (the folder holding the ``modalkit`` package this test imported).
CODE_ROOT = Path(modalkit.__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "modalkit"

ORDERS_PY = """
from typing import Any

from pydantic import BaseModel

from modalkit.inference_pipeline import InferencePipeline
from modalkit.iomodel import InferenceOutputModel


class Order(BaseModel):
    order_id: int
    text: str


class Counted(InferenceOutputModel):
    words: int


class Orders(InferencePipeline):
    input_model = Order
    output_model = Counted

    def __init__(self, model_name: str, all_model_data_folder: str, common_settings: dict, **kwargs: Any) -> None:
        super().__init__(model_name, all_model_data_folder, common_settings)

    def preprocess(self, input_list: list[Order]) -> dict:
        return {}

    def predict(self, input_list: list[Order], preprocessed_data: dict) -> dict:
        return {}

    def postprocess(self, input_list: list[Order], raw_output: dict) -> list[Counted]:
        return [Counted(words=len(order.text.split())) for order in input_list]
"""


def project(folder: Path, pipeline: str = "orders:Orders") -> Path:
    """A project folder: modalkit.yaml naming ``pipeline``, orders.py, and an input of three orders."""
    folder.mkdir(parents=True)
    (folder / "orders.py").write_text(ORDERS_PY, encoding="utf-8")
    settings = {
        "app_settings": {
            "queue_config": {"backend": "local", "local_path": str(folder / "queues")},
            "job_config": {"local_workers": 1},
        },
        "model_settings": {"model_entries": {"orders": {"pipeline": pipeline}}},
    }
    (folder / "modalkit.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")
    (folder / "in").mkdir()
    lines = [json.dumps({"order_id": i, "text": "two words" if i % 2 else "three words here"}) for i in range(3)]
    (folder / "in" / "orders.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def console_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(CODE_ROOT), "COLUMNS": "200", **extra}


def modalkit_cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args], cwd=cwd, env=console_env(**env), capture_output=True, text=True, timeout=240,
        check=False,
    )  # fmt: skip


def test_a_pipeline_module_beside_modalkit_yaml_is_imported_by_the_console_script_and_its_workers(
    prefect_api: str, tmp_path: Path
) -> None:
    folder = project(tmp_path / "shop")
    done = modalkit_cli(folder, "batch", "in", "out", "--id-field", "order_id", "--json", PREFECT_API_URL=prefect_api)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["records"], summary["succeeded"], summary["failed"]) == (3, 3, 0)
    rows = [json.loads(line) for line in (folder / "out" / "part-00000.jsonl").read_text().splitlines()]
    assert sorted((r["record_id"], r["words"]) for r in rows) == [(0, 3), (1, 2), (2, 3)]


def test_a_pipeline_module_that_cannot_be_found_is_explained_with_where_modalkit_looked(tmp_path: Path) -> None:
    folder = project(tmp_path / "shop", pipeline="orderz:Orders")
    failed = modalkit_cli(folder, "batch", "in", "out")
    assert failed.returncode != 0
    message = failed.stderr.strip()
    assert "Traceback" not in message
    assert "model_settings.model_entries.orders.pipeline: cannot import module 'orderz'" in message
    assert f"looked in the working directory {folder}" in message
    assert "PYTHONPATH=" in message
    assert not (folder / "out").exists()


def test_without_modalkit_yaml_the_error_names_the_files_looked_for(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    failed = modalkit_cli(tmp_path, "batch", "in", "out")
    assert failed.returncode != 0
    message = " ".join(failed.stderr.split())  # rich may wrap a long line
    assert "Traceback" not in message
    assert f"{tmp_path / 'modalkit.yaml'}" in message
    assert "MODALKIT_CONFIG" in message
    assert "--config" in message


def test_modalkit_serve_workers_import_the_pipeline_module_beside_modalkit_yaml(tmp_path: Path) -> None:
    folder = project(tmp_path / "shop")
    port = free_port()
    err = (tmp_path / "serve.err").open("wb")
    proc = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "serve", "--port", str(port), "--workers", "2"],
        cwd=folder, env=console_env(), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        answered = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answered = httpx.post(f"http://127.0.0.1:{port}/predict_sync", json={"order_id": 1, "text": "a b c"})
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert answered is not None, (tmp_path / "serve.err").read_text()
        assert answered.status_code == 200, answered.text
        assert answered.json()["words"] == 3
    finally:
        stop_process(proc, timeout=30)
        err.close()
