"""Flow ``replay-failures``: a job's failures, run again after the model was fixed, as a new job.

The first job runs ``pipelines:PoisonAwareSentiment``, whose stages raise on poison texts; the "fix" is a settings
file whose model entry points at the plain ``modalkit.examples.sentiment:SentimentPipeline``. Flows run in this
process against the session's Prefect test server, chunks on the local worker pool.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from batch_support import duplicates, read_failures, read_manifest, read_parts, write_config

from modalkit.exceptions import ConfigError

FIXED_PIPELINE = "modalkit.examples.sentiment:SentimentPipeline"
GOOD_TEXTS = ["Absolutely love it, great value", "Terrible, it broke after a day", "It is fine, nothing special"]
# stage that raises -> the text that makes it raise in PoisonAwareSentiment
POISON = {
    "preprocess": "great blender, POISON-PRE inside",
    "predict": "awful charger with POISON-PREDICT",
    "postprocess": "lovely jacket and POISON-POST",
}
BAD_JSON = '{"text": "an unterminated string'
NOT_AN_OBJECT = '["a", "json", "array"]'
NO_TEXT = '{"body": "the text is under the wrong key"}'


def write_input(folder: Path) -> dict[str, Any]:
    """One JSONL file: good reviews with poison and malformed lines among them; record ids are ``key:byte``."""
    folder.mkdir(parents=True)
    lines = [json.dumps({"text": f"{GOOD_TEXTS[i % 3]} (review {i})"}) for i in range(240)]
    specials = {
        30: ("preprocess", json.dumps({"text": POISON["preprocess"], "sku": "A-1"})),
        90: ("predict", json.dumps({"text": POISON["predict"], "sku": "B-2"})),
        150: ("postprocess", json.dumps({"text": POISON["postprocess"], "sku": "C-3"})),
        60: ("parse", BAD_JSON),
        120: ("not-an-object", NOT_AN_OBJECT),
        200: ("validate", NO_TEXT),
    }
    for index in sorted(specials, reverse=True):
        lines.insert(index, specials[index][1])
    ids_by_kind: dict[str, str] = {}
    offset = 0
    for line in lines:
        for kind, special in specials.values():
            if line == special:
                ids_by_kind[kind] = f"reviews.jsonl:{offset}"
        offset += len(line.encode()) + 1
    (folder / "reviews.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"records": len(lines), "ids": ids_by_kind}


def fixed_config(tmp_path: Path) -> Path:
    """The same settings as the first job's, with the model entry pointing at the plain (fixed) pipeline."""
    data = yaml.safe_load(write_config(tmp_path).read_text(encoding="utf-8"))
    data["model_settings"]["model_entries"]["sentiment"]["pipeline"] = FIXED_PIPELINE
    path = tmp_path / "modalkit-fixed.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def first_job(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished job with failures of every kind (run once for this module's tests)."""
    from flows.batch_inference import batch_inference

    root = tmp_path_factory.mktemp("first-job")
    data = write_input(root / "in")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # relative paths, as in `modalkit batch in out`; the replays later run from elsewhere
        summary = batch_inference(input_uri="in", output_uri="out", config=str(write_config(root)),
                                  max_failure_rate=0.5)  # fmt: skip
    return {**data, "root": root, "output": root / "out", "summary": summary}


def test_first_job_fails_each_bad_record_with_its_stage(first_job: dict[str, Any]) -> None:
    summary, ids = first_job["summary"], first_job["ids"]
    assert summary["output_uri"] == "out"
    assert summary["records"] == first_job["records"] == summary["succeeded"] + summary["failed"]
    assert summary["failed"] == 6
    stages = {row["record_id"]: row["stage"] for row in read_failures(str(first_job["output"]))}
    assert stages == {
        ids["preprocess"]: "preprocess",
        ids["predict"]: "predict",
        ids["postprocess"]: "postprocess",
        ids["parse"]: "parse",
        ids["not-an-object"]: "validate",
        ids["validate"]: "validate",
    }


def test_replay_after_a_fix_keeps_the_original_record_ids_and_leaves_out_unparsed_lines(
    first_job: dict[str, Any], tmp_path: Path
) -> None:
    from flows.replay_failures import replay_failures

    ids = first_job["ids"]
    out = tmp_path / "replay"

    result = replay_failures(
        job_output_uri=str(first_job["output"]), output_uri=str(out), config=str(fixed_config(tmp_path)),
        max_failure_rate=0.5,  # the record without text fails again: the fix was to the model, not the data
    )  # fmt: skip

    assert result["source_job_id"] == first_job["summary"]["job_id"]
    assert result["job_id"] != first_job["summary"]["job_id"]
    # 3 poison records and the record without text were parsed objects; bad JSON and the JSON array were not
    assert (result["replayed"], result["not_replayable"]) == (4, 2)
    assert result["records"] == 4 == result["succeeded"] + result["failed"]
    assert (result["succeeded"], result["failed"]) == (3, 1)  # the fix cures the poison, not a missing field
    assert result["output_uri"] == str(out)
    assert result["chunks_skipped"] == 0

    parts = read_parts(str(out))
    assert sorted(row["record_id"] for row in parts) == sorted(ids[s] for s in ("preprocess", "predict", "postprocess"))
    by_id = {row["record_id"]: row for row in parts}
    assert by_id[ids["preprocess"]]["label"] == "positive"  # "great blender"
    assert by_id[ids["predict"]]["label"] == "negative"  # "awful charger"
    [still_failing] = read_failures(str(out))
    assert still_failing["record_id"] == ids["validate"]
    assert still_failing["stage"] == "validate"
    assert still_failing["input"] == json.loads(NO_TEXT)  # the original record, without modalkit's own id key
    manifest = read_manifest(str(out))
    assert manifest["job_id"] == result["job_id"]
    assert manifest["parameters"]["model_name"] == "sentiment"  # the first job's model, by default


def test_replay_of_one_stage_replays_only_that_stage(first_job: dict[str, Any], tmp_path: Path) -> None:
    from flows.replay_failures import replay_failures

    out = tmp_path / "replay-predict"

    result = replay_failures(
        job_output_uri=str(first_job["output"]), output_uri=str(out), stages=["predict"],
        config=str(fixed_config(tmp_path)),
    )  # fmt: skip

    assert (result["replayed"], result["not_replayable"]) == (1, 0)
    assert (result["records"], result["succeeded"], result["failed"]) == (1, 1, 0)
    assert [row["record_id"] for row in read_parts(str(out))] == [first_job["ids"]["predict"]]
    assert read_failures(str(out)) == []


def test_replay_of_a_stage_with_only_unparsed_failures_says_there_is_nothing_to_replay(
    first_job: dict[str, Any], tmp_path: Path
) -> None:
    from flows.replay_failures import replay_failures

    out = tmp_path / "replay-parse"
    with pytest.raises(ConfigError, match=r"no failures to replay in stages \['parse'\] \(1 failed before they"):
        replay_failures(job_output_uri=str(first_job["output"]), output_uri=str(out), stages=["parse"],
                        config=str(fixed_config(tmp_path)))  # fmt: skip
    assert not (out / "_job.json").exists()  # no job was started


def test_running_the_same_replay_again_resumes_instead_of_failing(first_job: dict[str, Any], tmp_path: Path) -> None:
    from flows.replay_failures import replay_failures

    out = tmp_path / "replay"
    params = {
        "job_output_uri": str(first_job["output"]), "output_uri": str(out), "config": str(fixed_config(tmp_path)),
        "max_failure_rate": 0.5,
    }  # fmt: skip
    first = replay_failures(**params)

    again = replay_failures(**params)

    assert again["job_id"] == first["job_id"]
    assert again["chunks_skipped"] == again["chunks"] == first["chunks"] >= 1
    assert (again["replayed"], again["not_replayable"]) == (first["replayed"], first["not_replayable"]) == (4, 2)
    assert (again["records"], again["succeeded"], again["failed"]) == (first["records"], first["succeeded"],
                                                                       first["failed"])  # fmt: skip
    ids = [row["record_id"] for row in read_parts(str(out))] + [row["record_id"] for row in read_failures(str(out))]
    assert duplicates(ids) == {}
    assert len(ids) == 4


def test_replay_into_an_output_holding_another_replay_is_refused(first_job: dict[str, Any], tmp_path: Path) -> None:
    from flows.replay_failures import replay_failures

    out = tmp_path / "replay"
    params = {"job_output_uri": str(first_job["output"]), "output_uri": str(out), "config": str(fixed_config(tmp_path))}
    replay_failures(**params, stages=["predict"])

    # every stage, into the output that holds the predict-only replay: not silently the predict-only one again
    with pytest.raises(ConfigError, match=r"already holds the replay of .* \(stages predict\); .*every stage"):
        replay_failures(**params, max_failure_rate=0.5)
    assert [row["record_id"] for row in read_parts(str(out))] == [first_job["ids"]["predict"]]


def test_replay_refuses_a_job_output_without_a_manifest(first_job: dict[str, Any], tmp_path: Path) -> None:
    from flows.replay_failures import replay_failures

    unfinished = tmp_path / "unfinished"
    shutil.copytree(first_job["output"], unfinished)
    (unfinished / "_manifest.json").unlink()  # what a job killed before its end leaves
    out = tmp_path / "replay"

    with pytest.raises(ConfigError, match=r"has no _manifest\.json: that job has not finished"):
        replay_failures(job_output_uri=str(unfinished), output_uri=str(out), config=str(fixed_config(tmp_path)))
    assert not out.exists()
