"""Flow ``replay-failures``: run the failure records of a finished job again (after a fix) as a new job.

The replayed records keep their original record ids, so the new job's part files and queue records line up with
the first job's. Failures that were never parsed (bad JSON) cannot be replayed and are reported apart.

    prefect deployment run 'replay-failures/ad-hoc' -p job_output_uri=s3://b/scored/ -p output_uri=s3://b/replay-1/
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import Flow, flow, get_run_logger

from flows.batch_inference import batch_inference, describe_run_parameters
from modalkit.batch.storage import default_store
from tasks.replay import collect

__all__ = ["build_replay_flow", "replay_failures"]


def build_replay_flow(batch_flow: Flow[..., dict[str, Any]] = batch_inference) -> Flow[..., dict[str, Any]]:
    """The ``replay-failures`` flow, running the replay as ``batch_flow`` (default: ``batch_inference``)."""

    @flow(name="replay-failures", log_prints=False)
    @describe_run_parameters
    def replay_failures(
        job_output_uri: str,
        output_uri: str,
        stages: list[str] | None = None,
        model_name: str | None = None,
        backend: Literal["local", "modal"] | None = None,
        concurrency: int | None = None,
        success_queue: str | None = None,
        failure_queue: str | None = None,
        max_failure_rate: float | None = None,
        output_format: Literal["jsonl", "parquet"] | None = None,
        config: str | None = None,
    ) -> dict[str, Any]:
        """Replay the failures of the job at ``job_output_uri`` into ``output_uri``.

        Args:
            job_output_uri: The output of the finished job whose failures are replayed.
            output_uri: Where the replay's results go (a new job).
            stages: Replay only the failures of these stages (parse, validate, preprocess, predict, postprocess).
            model_name: The model in model_settings.model_entries. Default: the one the first job used.
            config: The YAML settings layers, comma-separated. Default: MODALKIT_CONFIG or ./modalkit.yaml.

        ``stages`` limits the replay to failures of those stages (e.g. ``["predict"]``). The model defaults to the one
        the first job used. Returns the new job's summary plus ``source_job_id``, ``replayed`` and ``not_replayable``.
        """
        replay = collect(job_output_uri, output_uri, stages, default_store())
        get_run_logger().info(
            "replaying %d failures of job %s (%d could not be parsed and are left out)",
            replay.replayable, replay.source_job_id, replay.not_replayable,
        )  # fmt: skip
        summary = batch_flow(
            input_uri=replay.input_uri,
            output_uri=output_uri,
            model_name=model_name or replay.model_name or None,
            backend=backend,
            concurrency=concurrency,
            success_queue=success_queue,
            failure_queue=failure_queue,
            max_failure_rate=max_failure_rate,
            output_format=output_format,
            config=config,
        )
        return {
            **summary,
            "source_job_id": replay.source_job_id,
            "replayed": replay.replayable,
            "not_replayable": replay.not_replayable,
        }

    return replay_failures


replay_failures = build_replay_flow()
