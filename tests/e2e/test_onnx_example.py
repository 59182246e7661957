"""The ONNX Runtime example (``modalkit.examples.onnx_text``) as a user runs it: ``modalkit batch`` end to end.

It needs the ``onnx`` extra (``make test`` installs it with ``dev``); where it is missing the tests are skipped,
saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from batch_support import assert_record_invariant, read_failures, read_parts, write_config

from modalkit.examples.onnx_text import OnnxSentimentPipeline, choose_providers
from modalkit.examples.sentiment import Review, SentimentPipeline
from modalkit.exceptions import ConfigError

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[dev]'")
pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install -e '.[dev]'")

PIPELINE = "modalkit.examples.onnx_text:OnnxSentimentPipeline"
TEXTS = ["Absolutely love it, great value", "Terrible, it broke after a day", "It is okay, nothing special",
         "The kettle is not flimsy at all.", "!!!"]  # fmt: skip


def test_a_batch_job_on_the_onnx_example_scores_every_record_once_as_the_numpy_model_does(
    prefect_api: str, tmp_path: Path
) -> None:
    records = [{"id": f"r{i:04d}", "text": f"{TEXTS[i % len(TEXTS)]} (review {i})"} for i in range(300)]
    data = tmp_path / "in"
    data.mkdir()
    (data / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    config = write_config(tmp_path, PIPELINE, job_config={"id_field": "id"})
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "modalkit.cli", "batch", str(data), str(out), "--config", str(config), "--json"],
        cwd=tmp_path,
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["records"], summary["succeeded"], summary["failed"]) == (300, 300, 0)
    assert_record_invariant(str(out), [r["id"] for r in records], summary=summary)
    assert read_failures(str(out)) == []
    # the model was built once and saved in the model folder, where the next load finds it
    assert (tmp_path / "models" / "sentiment" / "model.onnx").is_file()
    # the ONNX graph is the sentiment example's model: the same labels, the same scores to float32 precision
    reference = SentimentPipeline("sentiment", str(tmp_path / "numpy-model"), {})
    expected = reference.run_inference([Review(text=r["text"]) for r in records])
    rows = {row["record_id"]: row for row in read_parts(str(out))}
    for record, want in zip(records, expected, strict=True):
        assert rows[record["id"]]["label"] == want.label
        assert rows[record["id"]]["score"] == pytest.approx(want.score, abs=1e-5)


def test_the_onnx_example_chooses_its_device_at_load_and_declares_predict_its_only_device_stage(
    tmp_path: Path,
) -> None:
    pipe = OnnxSentimentPipeline("sentiment-onnx", str(tmp_path), {})
    import onnxruntime

    expected = "CUDAExecutionProvider" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else None
    assert pipe.provider == (expected or "CPUExecutionProvider")
    assert OnnxSentimentPipeline.device_stages == ("predict",)
    assert OnnxSentimentPipeline("sentiment-onnx", str(tmp_path), {}, device="cpu").provider == "CPUExecutionProvider"


def test_asking_for_cuda_where_onnx_runtime_has_none_fails_in_one_line_naming_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        choose_providers("cuda", ["CPUExecutionProvider"])
    message = str(err.value)
    assert "\n" not in message
    assert "device: cuda" in message
    assert "onnxruntime-gpu" in message
