"""Helpers for batch-job tests: settings files, and reading back outputs and queues (local or S3/SQS)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import yaml

from modalkit.batch import storage


def write_config(tmp_path: Path, pipeline: str = "pipelines:PoisonAwareSentiment", **app_settings: Any) -> Path:
    """A settings file for ``pipeline`` (model ``sentiment``) with a local queue under ``tmp_path``.

    Keyword arguments are merged into ``app_settings`` (e.g. ``job_config={"chunk_size": "64KiB"}``).
    """
    app: dict[str, Any] = {
        "batch_config": {"max_batch_size": 64},
        "queue_config": {"backend": "local", "local_path": str(tmp_path / "queues")},
        "job_config": {"chunk_size": "64KiB", "local_workers": 2, "retry_delay_seconds": 0.2},
    }
    for key, value in app_settings.items():
        if isinstance(value, dict) and isinstance(app.get(key), dict):
            app[key] = {**app[key], **value}
        else:
            app[key] = value
    data = {
        "app_settings": app,
        "model_settings": {
            "local_model_repository_folder": str(tmp_path / "models"),
            "default_model": "sentiment",
            "model_entries": {"sentiment": {"pipeline": pipeline}},
        },
    }
    path = tmp_path / "modalkit-test.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _lines(uri: str) -> list[bytes]:
    return [line for line in storage.default_store().read_bytes(uri).splitlines() if line.strip()]


def _listing(output_uri: str, prefix: str) -> list[str]:
    fs, path = storage.default_store().filesystem(output_uri)
    root = path.rstrip("/")
    protocol = "s3://" if output_uri.startswith("s3://") else ""
    if not fs.exists(root):
        return []
    fs.invalidate_cache()
    return sorted(f"{protocol}{name}" for name in fs.find(root) if name[len(root) :].lstrip("/").startswith(prefix))


def read_parts(output_uri: str) -> list[dict[str, Any]]:
    """Every success row of every part file (JSONL or Parquet)."""
    rows: list[dict[str, Any]] = []
    for uri in _listing(output_uri, "part-"):
        if uri.endswith(".parquet"):
            import io

            import pyarrow.parquet as pq

            for row in pq.read_table(io.BytesIO(storage.default_store().read_bytes(uri))).to_pylist():
                extra = row.pop("_extra", None)  # an output model's extra fields, as JSON: back in the row
                rows.append({**row, **json.loads(extra)} if extra else row)
        else:
            rows.extend(orjson.loads(line) for line in _lines(uri))
    return rows


def read_failures(output_uri: str) -> list[dict[str, Any]]:
    """Every row of every ``_failures/part-NNNNN.jsonl``."""
    return [orjson.loads(line) for uri in _listing(output_uri, "_failures/") for line in _lines(uri)]


def read_manifest(output_uri: str) -> dict[str, Any]:
    return dict(json.loads(storage.default_store().read_bytes(storage.join(output_uri, "_manifest.json"))))


def drain_sqs(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    """Receive and delete every message of an SQS queue; bodies parsed as JSON."""
    bodies: list[dict[str, Any]] = []
    while True:
        resp = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        messages = resp.get("Messages", [])
        if not messages:
            return bodies
        for msg in messages:
            bodies.append(json.loads(msg["Body"]))
        sqs.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
        )


def duplicates(ids: list[Any]) -> dict[Any, int]:
    """Ids that appear more than once, with their counts."""
    return {k: n for k, n in Counter(ids).items() if n > 1}


def assert_record_invariant(
    output_uri: str,
    input_ids: list[Any],
    queued: dict[str, list[dict[str, Any]]] | None = None,
    summary: dict[str, Any] | None = None,
    exactly_once: bool = True,
) -> dict[str, list[Any]]:
    """The batch contract's invariant over everything a job left, in one place.

    Every input record id appears exactly once across the part files and the failure files; the manifest (and the
    summary, when given) counts what the files hold; each queue in ``queued`` (``"success"`` / ``"failure"``: the
    parsed bodies it held) holds exactly the records of its output files, each once (``exactly_once``) or at
    least once (a standard SQS queue after a crash), and the manifest's queued counts are what the queues hold.
    Ids are compared with their JSON types (``7`` and ``"7"`` are different ids). Returns the ids of each kind.
    """
    part_ids = [row["record_id"] for row in read_parts(output_uri)]
    failure_ids = [row["record_id"] for row in read_failures(output_uri)]
    everything = part_ids + failure_ids
    typed = [json.dumps(i) for i in everything]
    assert duplicates(typed) == {}, f"records in the output more than once: {sorted(duplicates(typed))[:10]}"
    missing = sorted(set(map(json.dumps, input_ids)) - set(typed))
    foreign = sorted(set(typed) - set(map(json.dumps, input_ids)))
    assert not missing, f"{len(missing)} input records in no output file: {missing[:10]}"
    assert not foreign, f"{len(foreign)} output records that are not inputs: {foreign[:10]}"
    assert len(everything) == len(input_ids)
    manifest = read_manifest(output_uri)
    counts = (len(everything), len(part_ids), len(failure_ids))
    assert (manifest["records"], manifest["succeeded"], manifest["failed"]) == counts, "the manifest's counts"
    if summary is not None:
        assert (summary["records"], summary["succeeded"], summary["failed"]) == counts, "the summary's counts"
    for kind, status, ids in (("success", "success", part_ids), ("failure", "error", failure_ids)):
        if queued is None or kind not in queued:
            continue
        bodies = queued[kind]
        assert {(b["job_id"], b["status"]) for b in bodies} <= {(manifest["job_id"], status)}
        on_queue = [json.dumps(b["record_id"]) for b in bodies]
        if exactly_once:
            assert duplicates(on_queue) == {}, f"the {kind} queue repeats records"
        assert set(on_queue) == set(map(json.dumps, ids)), f"the {kind} queue differs from the output files"
        assert manifest[f"queued_{kind}"] == len(set(on_queue)), f"the manifest's queued_{kind}"
    return {"success": part_ids, "failure": failure_ids}
