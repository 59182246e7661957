"""After a fix: a pipeline's version is part of its job's identity, a finished job run again says it is finished
and how to go on, and ``modalkit replay`` reruns the failures from the command line (a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from batch_support import read_failures, read_parts, write_config

TESTS_DIR = Path(__file__).resolve().parents[1]
POISON = ["great blender, POISON-PRE inside", "awful charger with POISON-PREDICT", "lovely jacket and POISON-POST"]


@pytest.fixture
def cli(prefect_api: str, tmp_path: Path) -> Any:
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "COLUMNS": "400",
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "modalkit.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=240, check=False)  # fmt: skip

    return run


def test_a_new_version_refuses_the_old_output_and_replay_scores_its_failures_under_their_original_ids(
    cli: Any, tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    lines = [json.dumps({"text": f"Absolutely love it (review {i})"}) for i in range(17)]
    for at, text in zip((3, 9, 14), POISON, strict=True):
        lines.insert(at, json.dumps({"text": text}))
    (tmp_path / "in" / "reviews.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    first = write_config(tmp_path)  # PoisonAwareSentiment: 3 of 20 records fail, over max_failure_rate 0.1
    fixed = tmp_path / "fixed.yaml"
    data = yaml.safe_load(first.read_text(encoding="utf-8"))
    data["model_settings"]["model_entries"]["sentiment"] = {
        "pipeline": "modalkit.examples.sentiment:SentimentPipeline",
        "version": 2,  # the entry's version overrides the class's; a number is read as its text
    }
    fixed.write_text(yaml.safe_dump(data), encoding="utf-8")

    ran = cli("batch", "in", "out", "--config", str(first))
    assert ran.returncode == 1, ran.stderr
    failed_ids = sorted(row["record_id"] for row in read_failures(str(tmp_path / "out")))
    assert len(failed_ids) == 3

    again = cli("batch", "in", "out", "--config", str(first))  # unchanged: finished, and the way on is printed
    assert again.returncode == 1
    [line] = [line for line in again.stderr.splitlines() if "error:" in line]
    assert "is finished" in line
    assert "3 of 20 records failed" in line
    command = f"modalkit replay out out-replay --config {first}"
    assert line.endswith(command)

    tolerant = cli("batch", "in", "out", "--config", str(first), "--max-failure-rate", "0.5")  # completes, exit 0
    assert tolerant.returncode == 0, tolerant.stderr
    assert "is finished (all 1 chunks were committed before this run; nothing ran again)" in tolerant.stderr
    assert tolerant.stderr.rstrip().endswith(command)

    refused = cli("batch", "in", "out", "--config", str(fixed))
    assert refused.returncode == 2
    [line] = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert "pipeline version (none)" in line
    assert "pipeline version '2'" in line
    assert "modalkit replay out NEW_OUTPUT_URI" in line
    assert json.loads((tmp_path / "out" / "_job.json").read_text())["pipeline_version"] is None

    replayed = cli("replay", "out", "out-replay", "--config", str(fixed), "--json")
    assert replayed.returncode == 0, replayed.stderr
    summary = json.loads(replayed.stdout.strip().splitlines()[-1])
    assert (summary["records"], summary["succeeded"], summary["failed"]) == (3, 3, 0)
    assert (summary["replayed"], summary["not_replayable"]) == (3, 0)
    assert sorted(row["record_id"] for row in read_parts(str(tmp_path / "out-replay"))) == failed_ids
    assert json.loads((tmp_path / "out-replay" / "_job.json").read_text())["pipeline_version"] == "2"
