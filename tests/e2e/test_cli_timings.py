"""Where a real job's time went, as a user sees it: ``modalkit batch --json`` (a real subprocess, the example
sentiment model on local files) prints a summary whose stage seconds and device busy share come from the chunk
engine's own timings, the manifest and the report in Prefect carry them, and the same job run again (every chunk
committed) shows them in its table from the commit markers; the ``modalkit.job.completed`` event carries them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from batch_support import read_manifest, write_config

TESTS_DIR = Path(__file__).resolve().parents[1]
STAGES = ["read", "parse", "preprocess", "predict", "postprocess", "write", "queue"]


def run_cli(tmp_path: Path, prefect_api: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m modalkit.cli ARGS`` in ``tmp_path``, against the session's Prefect server."""
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "COLUMNS": "200",  # rich wraps at 80 columns when not on a terminal
    }
    return subprocess.run([sys.executable, "-m", "modalkit.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240, check=False)  # fmt: skip


def write_reviews(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    texts = ["Absolutely love it, great value", "Terrible, it broke after a day", "It is okay, nothing special"]
    rows = [json.dumps({"id": f"r{i:05d}", "text": f"{texts[i % 3]} (review {i})"}) for i in range(n)]
    (folder / "reviews.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")


def report_of(job_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"batch-report-{job_id}"]))
        )
    assert artifacts, f"no report of job {job_id}"
    return str(artifacts[-1].data)


def completed_event_of(job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The payload of job ``job_id``'s ``modalkit.job.completed`` event, as the Prefect server stored it."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            wanted = EventFilter(event=EventNameFilter(name=["modalkit.job.completed"]),
                                 resource=EventResourceFilter(id=[f"modalkit.job.{job_id}"]))  # fmt: skip
            page = client.read_events(filter=wanted, limit=50)
            found = [e.payload for e in page.events if e.payload.get("job_id") == job_id]
            if found or time.monotonic() > deadline:
                assert found, f"no modalkit.job.completed event of job {job_id}"
                return dict(found[0])
            time.sleep(0.5)


def test_a_job_reports_where_its_time_went_in_json_manifest_report_event_and_again_from_its_markers(
    tmp_path: Path, prefect_api: str
) -> None:
    write_reviews(tmp_path / "in", 3000)
    config = str(write_config(tmp_path))
    out = str(tmp_path / "out")
    args = ["batch", str(tmp_path / "in"), out, "--config", config, "--id-field", "id", "--chunk-size", "64KiB"]

    first = run_cli(tmp_path, prefect_api, *args, "--json")

    assert first.returncode == 0, first.stderr
    summary: dict[str, Any] = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["chunks"] > 1
    stages = summary["stage_seconds"]
    assert stages is not None, "the chunks reported no stage timings"
    assert list(stages) == STAGES
    assert stages["predict"] > 0
    assert stages["read"] + stages["parse"] > 0
    assert summary["timed_chunks"] == summary["chunks"]
    assert 0 < summary["device_busy_fraction"] <= 1
    assert summary["device_busy_fraction"] == pytest.approx(stages["predict"] / summary["chunk_seconds"], abs=0.01)
    assert summary["bottleneck"] in ("device", "host")
    assert summary["bottleneck_note"].startswith(summary["bottleneck"] + ": ")
    manifest = read_manifest(out)
    assert {k: manifest[k] for k in ("stage_seconds", "device_busy_fraction", "bottleneck")} == {
        k: summary[k] for k in ("stage_seconds", "device_busy_fraction", "bottleneck")
    }
    report = report_of(summary["job_id"])
    assert "## Where the time went" in report
    assert "| predict (device) |" in report
    assert f"**Bottleneck:** {summary['bottleneck']}: " in report
    event = completed_event_of(summary["job_id"])
    assert {k: event[k] for k in ("stage_seconds", "device_busy_fraction", "bottleneck_note")} == {
        k: summary[k] for k in ("stage_seconds", "device_busy_fraction", "bottleneck_note")
    }

    again = run_cli(tmp_path, prefect_api, *args)  # every chunk committed: the timings come from the markers

    assert again.returncode == 0, again.stderr
    table = " ".join(again.stdout.replace("│", " ").split())
    assert "where the time went" in table
    assert f"device busy {summary['device_busy_fraction']:.0%} of the chunks'" in table
    assert f"bottleneck {summary['bottleneck']}: " in table
