"""A job whose worker is fed by host processes (``job_config.host_workers``): a host process killed mid-pipeline
takes its worker down with it, and the job still ends with every record exactly once."""

from __future__ import annotations

import json
from pathlib import Path

from batch_support import assert_record_invariant, read_failures, write_config


def test_a_host_process_killed_mid_pipeline_resumes_with_every_record_exactly_once(
    tmp_path: Path, prefect_api: str
) -> None:
    from flows.batch_inference import batch_inference

    (tmp_path / "in").mkdir()
    records = [{"id": f"r{i}", "text": f"text {i % 13}"} for i in range(400)]
    records[300]["text"] = "KILL-HOST here"  # sub-batch 75 of 100: well past the worker's probe of 48
    (tmp_path / "in" / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    config = write_config(
        tmp_path,
        pipeline="pipelines:HostBound",
        batch_config={"max_batch_size": 4},
        job_config={"chunk_size": "1MiB", "local_workers": 1, "host_workers": 2},
    )
    out = str(tmp_path / "out")
    summary = batch_inference(input_uri=str(tmp_path / "in"), output_uri=out, config=str(config), id_field="id")

    assert (summary["records"], summary["succeeded"], summary["failed"]) == (400, 399, 1)
    (failure,) = read_failures(out)
    # the record kills only a host process: its worker died with it, the crash finder ran the chunk again in the
    # worker's own process, where the record raises
    assert (failure["record_id"], failure["stage"], failure["error_type"]) == ("r300", "preprocess", "ValueError")
    assert len(list((tmp_path / "models").glob("host-killed-*"))) == 1
    assert_record_invariant(out, [r["id"] for r in records], summary=summary)
