"""What a real job cost, as a user sees it: ``modalkit batch --json`` (a real subprocess, the example sentiment model
on local files, the local machine priced) reports container-seconds that add up to its chunks' walls plus the
start-up and idle seconds it states, dollars that are those seconds times the price, and per-1,000 figures that are
the dollars over the records; the manifest, the report in Prefect, the ``modalkit.job.completed`` event and the CLI
table carry them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from batch_support import read_manifest, write_config
from test_cli_timings import completed_event_of, report_of, run_cli, write_reviews

from modalkit.batch.efficiency import usd
from modalkit.batch.layout import OutputLayout

MACHINE_USD_PER_HOUR = 7.2  # two local workers: $3.60 an hour, $0.001 a second each


def markers(out: str, chunks: int) -> list[dict[str, Any]]:
    layout = OutputLayout(out)
    return [json.loads(Path(layout.marker(i)).read_text(encoding="utf-8")) for i in range(chunks)]


def test_a_local_jobs_cost_adds_up_from_its_chunks_and_shows_in_json_manifest_report_event_and_table(
    tmp_path: Path, prefect_api: str
) -> None:
    write_reviews(tmp_path / "in", 3000)
    config = str(write_config(tmp_path, pricing={"local_usd_per_hour": MACHINE_USD_PER_HOUR}))
    out = str(tmp_path / "out")
    args = ["batch", str(tmp_path / "in"), out, "--config", config, "--id-field", "id", "--chunk-size", "64KiB"]

    first = run_cli(tmp_path, prefect_api, *args, "--json")

    assert first.returncode == 0, first.stderr
    summary: dict[str, Any] = json.loads(first.stdout.strip().splitlines()[-1])
    chunks = markers(out, summary["chunks"])
    assert summary["chunks"] > 1
    idle = summary["device_idle_seconds"]
    assert list(idle) == ["cold_start", "model_load", "host_wait", "between_chunks", "after_last"]
    walls = sum(c["seconds"] for c in chunks)
    # the start-up it states is what the workers reported with their first chunks, each worker once
    assert idle["cold_start"] == pytest.approx(sum(c["cold_start_seconds"] for c in chunks), abs=0.01)
    assert idle["model_load"] == pytest.approx(sum(c["model_load_seconds"] for c in chunks), abs=0.01)
    workers = {c["worker"] for c in chunks}
    assert 1 <= len(workers) <= 2
    assert sum(1 for c in chunks if c["model_load_seconds"] > 0) == len(workers)
    assert idle["model_load"] > 0
    stated = idle["cold_start"] + idle["model_load"] + idle["between_chunks"] + idle["after_last"]
    assert summary["container_seconds"] == pytest.approx(walls + stated, abs=0.01)
    assert summary["device_seconds"] == pytest.approx(sum(c["stages"]["predict"] for c in chunks), abs=0.01)
    assert summary["device_seconds"] + idle["host_wait"] == pytest.approx(walls, abs=0.01)
    assert summary["price_usd_per_hour"] == pytest.approx(MACHINE_USD_PER_HOUR / 2)
    assert summary["cost_usd"] == pytest.approx(summary["container_seconds"] * 0.001, rel=1e-3)
    assert summary["cost_per_1000"] == pytest.approx(summary["cost_usd"] / summary["records"] * 1000, rel=1e-3)
    assert summary["cost_per_1000_succeeded"] == pytest.approx(
        summary["cost_usd"] / summary["succeeded"] * 1000, rel=1e-3
    )
    batches = sum(c["batches"] for c in chunks)
    assert summary["mean_batch_size"] == pytest.approx(sum(c["batched_records"] for c in chunks) / batches, abs=0.01)
    assert 0 < summary["mean_batch_size"] <= summary["max_batch_size"] == 64
    rounding = 0.0005 / summary["device_seconds"]  # device_seconds is rounded to the millisecond
    assert summary["records_per_device_second"] == pytest.approx(
        summary["records"] / summary["device_seconds"], rel=rounding + 0.001
    )
    assert "local_usd_per_hour" in summary["price_source"]
    assert summary["cost_note"].startswith("the device was busy ")

    manifest = read_manifest(out)
    cost_keys = ("container_seconds", "device_seconds", "device_idle_seconds", "cost_usd", "cost_per_1000")
    assert {k: manifest[k] for k in cost_keys} == {k: summary[k] for k in cost_keys}
    report = report_of(summary["job_id"])
    assert "## Where the money went" in report
    assert f"{usd(summary['cost_usd'])} ({usd(summary['cost_per_1000'])} per 1,000 records" in report
    assert summary["cost_note"] in report
    event = completed_event_of(summary["job_id"])
    assert {k: event[k] for k in cost_keys} == {k: summary[k] for k in cost_keys}

    # every chunk committed: the chunks' walls and their workers' start-up come from the markers (an earlier run's
    # idle seconds between and after chunks are not kept)
    again = run_cli(tmp_path, prefect_api, *args)

    assert again.returncode == 0, again.stderr
    table = " ".join(again.stdout.replace("│", " ").split())
    earlier = (walls + idle["cold_start"] + idle["model_load"]) * 0.001
    assert re.search(r"cost \$([\d.e-]+) \(\$[\d.e-]+ per 1,000 records, \$[\d.e-]+ per 1,000 succeeded", table)
    shown = float(re.search(r"cost \$([\d.e-]+)", table).group(1))  # type: ignore[union-attr]
    assert shown == pytest.approx(earlier, rel=0.01)  # three significant digits
    assert re.search(r"container-seconds [\d.]+ s: device busy [\d.]+ s \(\d+%\), idle: cold start", table)
    assert "where the money went the device was busy" in table


def test_a_local_job_on_an_unpriced_machine_costs_nothing_and_says_so() -> None:
    from modalkit.batch.cost import rate_for
    from modalkit.batch.efficiency import job_cost
    from modalkit.iomodel import ChunkResult, StageSeconds
    from modalkit.settings import Settings

    rate = rate_for(Settings.load(data={}), "local")
    chunk = ChunkResult(index=0, records=10, succeeded=10, started_at=1.0, seconds=2.0, worker="w",
                        stages=StageSeconds(predict=1.0))  # fmt: skip
    fields = job_cost([chunk], rate, ended_at=3.0, max_batch_size=8).summary_fields()
    assert (fields["cost_usd"], fields["cost_per_1000"]) == (0.0, 0.0)
    assert fields["container_seconds"] == pytest.approx(2.0)
