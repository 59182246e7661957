"""Collecting a finished job's failure records as the input of a new job (after a fix), keeping their ids.

Each replayable failure (one whose ``input`` was a record object) is written as that object plus the key
``__modalkit_record_id__`` holding its original record id; the new job takes that key as the record id, so the
replayed records keep the ids the first job gave them. Failures whose input could not be parsed (bad JSON, CSV
lines that did not split) cannot be replayed and are counted apart.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import shlex
import shutil
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from modalkit.batch.chunk import REPLAY_ID_KEY
from modalkit.batch.layout import OutputLayout
from modalkit.batch.storage import Store, default_store
from modalkit.exceptions import ConfigError

__all__ = ["ReplayInput", "collect_failures", "finished_message", "replay_command"]

_FAILURE_NAME = re.compile(r"part-(\d+)\.jsonl$")


@dataclass(frozen=True)
class ReplayInput:
    """The replay dataset: where it is, what it holds, and which model the first job used."""

    input_uri: str
    replayable: int
    not_replayable: int
    model_name: str
    source_job_id: str
    #: the replayed job's output and the stages asked for: a rerun into the same output must ask for the same
    job_output_uri: str = ""
    stages: tuple[str, ...] | None = None


def collect_failures(
    job_output_uri: str,
    replay_output_uri: str,
    stages: Iterable[str] | None = None,
    store: Store | None = None,
) -> ReplayInput:
    """Write the failures of the job at ``job_output_uri`` as a dataset under ``<replay_output_uri>/_replay/``.

    Args:
        job_output_uri: Output of a finished job (it has ``_manifest.json``).
        replay_output_uri: Output of the new job; the replay input goes in its ``_replay/`` folder.
        stages: Replay only failures of these stages (e.g. ``["predict"]``); None = every stage.
        store: Where both outputs are read and written; default: the process's store.

    Raises:
        ConfigError: the job has no manifest (it did not finish), there is nothing to replay, or the replay output
            already holds the replay of another job or of other stages.
    """
    job_output_uri = job_output_uri.rstrip("/")
    job_layout, replay_layout = OutputLayout(job_output_uri), OutputLayout(replay_output_uri)
    source_uri = replay_layout.replay_source
    wanted = set(stages) if stages else None
    asked = tuple(sorted(wanted)) if wanted else None
    store = store or default_store()
    if store.exists(source_uri):  # a rerun of the same replay: reuse its input, so the job resumes
        return _previous_replay(store, replay_layout.root, source_uri, job_output_uri, asked)
    manifest_uri = job_layout.manifest
    if not store.exists(manifest_uri):
        name = posixpath.basename(manifest_uri)
        raise ConfigError(f"{job_output_uri} has no {name}: that job has not finished; run it first")
    manifest = orjson.loads(store.read_bytes(manifest_uri))
    staging = store.local_staging_dir(replay_layout.replay_input)
    local = os.path.join(staging, "failures.jsonl")
    replayable = not_replayable = 0
    try:
        with open(local, "wb") as out:
            for uri in _failure_files(job_layout, store, _chunks_without_failures(manifest)):
                for line in store.read_bytes(uri).splitlines():
                    row = orjson.loads(line)
                    if wanted is not None and row.get("stage") not in wanted:
                        continue
                    if not isinstance(row.get("input"), dict):
                        not_replayable += 1
                        continue
                    out.write(orjson.dumps({**row["input"], REPLAY_ID_KEY: row["record_id"]}) + b"\n")
                    replayable += 1
        if replayable == 0:
            raise ConfigError(
                f"job {manifest.get('job_id')} at {job_output_uri} has no failures to replay"
                + (f" in stages {sorted(wanted)}" if wanted else "")
                + (f" ({not_replayable} failed before they could be parsed)" if not_replayable else "")
            )
        store.upload_file(local, replay_layout.replay_input)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    replay = ReplayInput(replay_layout.replay_dir, replayable, not_replayable, str(manifest.get("model_name", "")),
                         str(manifest.get("job_id", "")), job_output_uri, asked)  # fmt: skip
    store.write_bytes(source_uri, orjson.dumps(dataclasses.asdict(replay)))
    return replay


def _failure_files(layout: OutputLayout, store: Store, without: set[int]) -> list[str]:
    """The failure files of the job's committed chunks, in chunk order: one listing of ``_failures/`` and one of
    ``_chunks/``, whatever the number of chunks.

    Only chunks with failures have a failure file (outputs of earlier versions also hold empty ones, which add
    nothing); a failure file without a commit marker (a chunk that failed after its files were written) is not part
    of the job's results; nor are the chunks in ``without``. Paths are where the layout puts them under the job's
    output, not paths a marker recorded (relative to the first job's working directory, or stale when the output
    was moved).
    """
    keep = set(layout.committed_indices(store)) - without
    indices = (_failure_index(name) for name in store.list_names(layout.failures_dir))
    return [layout.failures(i) for i in sorted(i for i in indices if i is not None and i in keep)]


def _chunks_without_failures(manifest: dict[str, object]) -> set[int]:
    """The chunks an output written by an earlier version lists as without failures (their failure files are
    empty, not worth a request each); none for a current one (its manifest lists no chunks)."""
    results = manifest.get("chunk_results")
    if not isinstance(results, list):
        return set()
    return {int(r["index"]) for r in results if isinstance(r, dict) and not r.get("failed")}


def _failure_index(name: str) -> int | None:
    match = _FAILURE_NAME.match(posixpath.basename(name))
    return int(match.group(1)) if match else None


def replay_command(output_uri: str, config: str | None = None, model_name: str | None = None) -> str:
    """The ``modalkit replay`` command that reruns the failures of the job at ``output_uri``, ready to paste.

    Example:
        >>> replay_command("s3://b/scored", "prod.yaml")
        'modalkit replay s3://b/scored s3://b/scored-replay --config prod.yaml'
    """
    words = ["modalkit", "replay", output_uri, output_uri.rstrip("/") + "-replay"]
    if config:
        words += ["--config", config]
    if model_name:
        words += ["--model", model_name]
    return shlex.join(words)


def finished_message(job_id: str, chunks: int, failed: int, records: int, replay: str) -> str:
    """What a run of a job that was already finished says: nothing ran again, and how to rerun its failures."""
    return (
        f"job {job_id} is finished (all {chunks} chunks were committed before this run; nothing ran again): "
        f"{failed} of {records} records failed. After fixing the pipeline, raise its version and rerun the "
        f"failures: {replay}"
    )


def _previous_replay(
    store: Store, replay_output_uri: str, source_uri: str, job_output_uri: str, asked: tuple[str, ...] | None
) -> ReplayInput:
    """The replay already prepared in this output, when it is the one asked for again."""
    data = orjson.loads(store.read_bytes(source_uri))
    previous = ReplayInput(**{**data, "stages": tuple(data["stages"]) if data.get("stages") else None})
    if (previous.job_output_uri, previous.stages) != (job_output_uri, asked):
        raise ConfigError(
            f"{replay_output_uri} already holds the replay of {_describe(previous.job_output_uri, previous.stages)};"
            f" this replay asks for {_describe(job_output_uri, asked)}: use another output"
        )
    return previous


def _describe(job_output_uri: str, stages: tuple[str, ...] | None) -> str:
    return f"{job_output_uri} ({'stages ' + ', '.join(stages) if stages else 'every stage'})"
