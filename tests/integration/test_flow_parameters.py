"""Flow ``batch-inference`` run against a Prefect test server: a bad parameter fails the run within a second of its
start (before any import of the pipeline, listing or worker), and the reason of a failed run is in its logs at ERROR
(what ``prefect deployment run ... --watch`` prints), not only in the state message.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import pytest
from batch_support import write_config

from flows.batch_inference import batch_inference


def _failure_log(flow_run_id: Any) -> Any:
    """The run's ``batch-inference failed: ...`` log line at ERROR, once the API has it (logs go in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + 10
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            found = [log for log in logs if log.level >= 40 and log.message.startswith("batch-inference failed: ")]
            if found or time.monotonic() > deadline:
                assert found, [log.message for log in logs]
                return found[-1]
            time.sleep(0.2)


def _started(flow_run_id: Any) -> dt.datetime:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    assert run.start_time is not None
    return run.start_time


@pytest.mark.parametrize(
    ("uris", "params", "named"),
    [
        (("in/{date}", "out/{date}"), {"date": "2026-13-01"}, "parameter date: '2026-13-01' is not a date"),
        (("in", "out"), {"date": "yesterday"}, "parameter date: 'yesterday' is not a date"),  # an adhoc run's
        (("in", "out"), {"chunk_size": "lots"}, "chunk_size"),
        (("in", "out"), {"model_name": "sentimnt"}, "sentimnt"),
    ],
)
def test_a_bad_parameter_fails_the_run_within_a_second_and_logs_the_reason_at_error(
    tmp_path: Path, prefect_api: str, uris: tuple[str, str], params: dict[str, Any], named: str
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"id": "r1", "text": "fine"}) + "\n", encoding="utf-8")
    config = write_config(tmp_path, pipeline="pipelines:PoisonAwareSentiment")

    state = batch_inference(str(tmp_path / uris[0]), str(tmp_path / uris[1]), config=str(config),
                            return_state=True, **params)  # fmt: skip

    assert state.is_failed()
    assert named in str(state.message)
    failure = _failure_log(state.state_details.flow_run_id)
    assert named in failure.message
    seconds = (failure.timestamp - _started(state.state_details.flow_run_id)).total_seconds()
    print(f"{params}: the reason logged {seconds:.3f} s after the flow run started")
    assert seconds < 1.0
    assert not (tmp_path / uris[1].split("/")[0]).exists()  # nothing written


def test_a_failed_job_logs_its_reason_at_error_as_the_flow_ends(tmp_path: Path, prefect_api: str) -> None:
    config = write_config(tmp_path)

    state = batch_inference(str(tmp_path / "missing"), str(tmp_path / "out"), config=str(config), return_state=True)

    assert state.is_failed()
    assert "missing does not exist" in _failure_log(state.state_details.flow_run_id).message
