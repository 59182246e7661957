"""Stragglers: a chunk that hangs is stopped after ``job_config.chunk_timeout_s`` and retried elsewhere, once.

The pipeline (``pipelines:HangsOnce``) blocks forever on a ``HANG`` record the first time any worker meets it, and
writes that worker's pid to a flag file; the job must finish anyway, with the chunk committed once and the record
invariant intact, and the hung worker process must be gone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from batch_support import assert_record_invariant, write_config

from flows.batch_inference import JobFailed, batch_inference
from modalkit.task_queue import LocalQueueBackend

MARKER = re.compile(r"^\d{5}\.json$")  # a commit marker, not a journal or a temp file


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _write_inputs(folder: Path) -> list[str]:
    """Three files of 30 reviews (about 37 KB each, so that each is a chunk of its own at a 64 KiB chunk size, not
    packed with the others); the second file's 8th record hangs the pipeline once."""
    folder.mkdir()
    ids = []
    for f in range(3):
        lines = []
        for i in range(30):
            rid = f"f{f}-r{i:03d}"
            text = "HANG great value" if (f, i) == (1, 7) else ("great value" if i % 2 else "broke after a day")
            lines.append(json.dumps({"id": rid, "text": text, "pad": "x" * 1200}))
            ids.append(rid)
        (folder / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ids


@pytest.mark.timeout(90)  # the guard: without a chunk timeout the job waits on the hung chunk forever
def test_hung_chunk_is_killed_retried_once_and_committed_once(
    tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = tmp_path / "hung.flag"
    monkeypatch.setenv("TEST_HANG_FLAG", str(flag))
    ids = _write_inputs(tmp_path / "in")
    config = write_config(
        tmp_path,
        pipeline="pipelines:HangsOnce",
        job_config={"chunk_timeout_s": 2, "retry_delay_seconds": 0.1, "local_workers": 2},
    )
    out = tmp_path / "out"

    summary = batch_inference(str(tmp_path / "in"), str(out), config=str(config), id_field="id",
                              success_queue="ok", failure_queue="bad")  # fmt: skip

    assert summary["status"] == "completed"
    assert summary["chunks"] == 3
    hung_pid = int(flag.read_text())
    attempts = [int(p) for p in (tmp_path / "hung.flag.attempts").read_text().split()]
    assert len(attempts) == 2, f"the hung chunk ran {len(attempts)} times, not twice (one hang, one retry)"
    assert attempts[0] == hung_pid
    assert attempts[1] != hung_pid, "the retry ran in another worker process"
    assert not _alive(hung_pid), f"the hung worker {hung_pid} still runs"
    markers = sorted(p.name for p in (out / "_chunks").iterdir() if MARKER.match(p.name))
    assert markers == ["00000.json", "00001.json", "00002.json"]  # one marker per chunk: committed once
    backend = LocalQueueBackend(tmp_path / "queues")
    try:
        queued = {
            "success": [json.loads(b) for b in backend.messages("ok")],
            "failure": [json.loads(b) for b in backend.messages("bad")],
        }
    finally:
        backend.close()
    outcome = assert_record_invariant(str(out), ids, queued, summary)
    assert outcome["failure"] == []


@pytest.mark.timeout(90)
def test_chunk_that_hangs_every_time_fails_the_job_after_its_retries_naming_the_setting(
    tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = tmp_path / "hangs.pids"
    monkeypatch.setenv("TEST_HANG_FLAG", str(flag))
    _write_inputs(tmp_path / "in")
    config = write_config(
        tmp_path,
        pipeline="pipelines:HangsAlways",
        job_config={"chunk_timeout_s": 1, "chunk_retries": 1, "retry_delay_seconds": 0.1, "local_workers": 2},
    )

    with pytest.raises(JobFailed) as failed:
        batch_inference(str(tmp_path / "in"), str(tmp_path / "out"), config=str(config), id_field="id")

    pids = [int(p) for p in flag.read_text().split()]
    assert len(pids) == 2  # 1 + chunk_retries attempts, each in its own worker
    assert not any(_alive(pid) for pid in pids)
    message = str(failed.value)
    assert "chunk 00001" in message
    assert "time limit of 1 s" in message
    assert "app_settings.job_config.chunk_timeout_s" in message
