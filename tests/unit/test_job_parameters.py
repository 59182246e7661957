"""Job parameters are declared once, on ``JobConfig`` (and ``BatchConfig.max_batch_size``): type, default, bounds,
description, and whether each run may override it. ``JobSpec``, the job id, the flows' signatures and the
``modalkit batch`` options follow that declaration; these tests fail when a copy drifts from it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import ByteSize, ValidationError
from pydantic.fields import FieldInfo

from modalkit.batch.job import plan_job, resolve_job_config
from modalkit.batch.planning import job_id_for, list_dataset
from modalkit.iomodel import JobSpec
from modalkit.settings import BatchConfig, JobConfig, Settings, parameter_help, run_parameters
from modalkit.settings_errors import describe_allowed

#: Flow parameters that are not job_config fields (the contract list in the architecture notes, plus config and date).
FLOW_OWN = {"input_uri", "output_uri", "model_name", "config", "date"}
#: What the replay flow takes of its own, and the run parameters it leaves out (with the reason).
REPLAY_OWN = {"job_output_uri", "output_uri", "stages", "model_name", "config"}
REPLAY_LEAVES_OUT = {
    "chunk_size": "the replay's input is one small file of failures",
    "id_field": "replayed records keep the ids the first job gave them",
}


def job_spec_kwargs(**fields: Any) -> dict[str, Any]:
    return {"job_id": "j", "input_uri": "in", "output_uri": "out", "model_name": "m", **fields}


# --- JobSpec: the bounds of the settings it is built from ---------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        (BatchConfig, "max_batch_size", 5000),
        (BatchConfig, "max_batch_size", 0),
        (JobConfig, "chunk_size", 1),
        (JobConfig, "chunk_size", 16 * 1024**3),
        (JobConfig, "max_failure_rate", 1.5),
        (JobConfig, "output_format", "csv"),
        (JobConfig, "backend", "cloud"),
    ],
)
def test_job_spec_refuses_what_the_settings_refuse_naming_the_field(
    section: type[BatchConfig | JobConfig], field: str, value: object
) -> None:
    with pytest.raises(ValidationError, match=field):
        section.model_validate({field: value})
    with pytest.raises(ValidationError, match=field) as refused:
        JobSpec(**job_spec_kwargs(**{field: value}))

    assert [error["loc"] for error in refused.value.errors()] == [(field,)]


def test_job_spec_fields_are_the_settings_fields_type_default_bounds_and_description() -> None:
    declared = {**JobConfig.model_fields, "max_batch_size": BatchConfig.model_fields["max_batch_size"]}
    shared = [name for name in JobSpec.model_fields if name in declared]

    assert set(shared) == {
        "max_batch_size", "chunk_size", "max_failure_rate", "backend", "id_field", "output_format", "success_queue",
        "failure_queue", "prefetch_batches",
    }  # fmt: skip
    for name in shared:
        spec, source = JobSpec.model_fields[name], declared[name]
        assert spec.annotation == source.annotation, name
        assert spec.default == source.default, name
        assert spec.metadata == source.metadata, name
        assert spec.description == source.description, name


def test_job_spec_accepts_the_bounds_themselves() -> None:
    job = JobSpec(**job_spec_kwargs(max_batch_size=1000, chunk_size="64KiB", max_failure_rate=1.0))

    assert (job.max_batch_size, job.chunk_size, job.max_failure_rate) == (1000, 64 * 1024, 1.0)
    assert JobSpec.model_validate_json(job.model_dump_json()) == job  # the form that travels to Modal workers


# --- the job id ---------------------------------------------------------------------------------------------------


def test_job_identity_is_exactly_the_parameters_that_shape_the_output() -> None:
    # a change of this set changes every job's id, so that no output an earlier version wrote would resume
    assert set(JobConfig().identity()) == {
        "chunk_size", "split_csv", "id_field", "output_format", "success_queue", "failure_queue",
    }  # fmt: skip


def test_a_plans_job_id_is_the_one_earlier_versions_gave(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b'{"id": 1, "text": "good"}\n')
    pipeline = "pipelines:PoisonAwareSentiment"
    settings = Settings.load(data={"model_settings": {"model_entries": {"sentiment": {"pipeline": pipeline}}}})
    config = resolve_job_config(settings, chunk_size="64KiB", id_field="id", output_format="parquet")

    plan = plan_job(settings, str(tmp_path / "in"), str(tmp_path / "out"), None, config)

    earlier = {
        "output_uri": str(tmp_path / "out"), "chunk_size": 65536, "split_csv": False, "id_field": "id",
        "output_format": "parquet", "success_queue": None, "failure_queue": None, "pipeline": pipeline,
    }  # fmt: skip
    assert plan.job.job_id == job_id_for(list_dataset(str(tmp_path / "in")), "sentiment", earlier)
    assert plan.job.chunk_size == 65536
    assert plan.job.max_batch_size == settings.app_settings.batch_config.max_batch_size


# --- the flows' signatures ----------------------------------------------------------------------------------------


def flow_annotation(field: FieldInfo) -> Any:
    """The annotation a flow parameter for ``field`` has: the field's type or None (None: take job_config's).
    Sizes are text (``"64MiB"``), as a user writes them."""
    annotation = str if field.annotation is ByteSize else field.annotation
    return annotation | None


def signature_drift(fn: Callable[..., Any], own: set[str], left_out: set[str] = frozenset()) -> list[str]:
    """How ``fn``'s parameters differ from the declared run parameters (empty: none)."""
    parameters = inspect.signature(fn, eval_str=True).parameters
    declared = {name: field for name, field in run_parameters().items() if name not in left_out}
    drift = [
        f"{name}: not a declared run parameter" for name in parameters if name not in declared | dict.fromkeys(own)
    ]
    for name, field in declared.items():
        parameter = parameters.get(name)
        if parameter is None:
            drift.append(f"{name}: missing")
            continue
        if parameter.default is not None:
            drift.append(f"{name}: default {parameter.default!r}, not None (None takes job_config's)")
        if parameter.annotation != flow_annotation(field):
            drift.append(f"{name}: annotated {parameter.annotation}, declared {flow_annotation(field)}")
    return drift


def test_the_batch_flow_takes_every_run_parameter_as_declared() -> None:
    from flows.batch_inference import batch_inference

    assert signature_drift(batch_inference.fn, FLOW_OWN) == []


def test_the_replay_flow_takes_the_run_parameters_as_declared() -> None:
    from flows.replay_failures import replay_failures

    assert signature_drift(replay_failures.fn, REPLAY_OWN, set(REPLAY_LEAVES_OUT)) == []


def test_a_flow_signature_that_drifts_from_the_declaration_is_caught() -> None:
    def drifted(
        input_uri: str,
        output_uri: str,
        backend: Literal["local", "modal", "ray"] | None = None,  # a choice the settings do not have
        chunk_size: str | None = "32MiB",  # a default of its own
        concurrency: int | None = None,
        success_queue: str | None = None,
        failure_queue: str | None = None,
        max_failure_rate: float | None = None,
        output_format: Literal["jsonl", "parquet"] | None = None,
        retries: int | None = None,  # not declared
    ) -> None:  # id_field missing
        """Drifted."""

    assert sorted(signature_drift(drifted, {"input_uri", "output_uri"})) == [
        "backend: annotated typing.Optional[typing.Literal['local', 'modal', 'ray']], declared "
        "typing.Optional[typing.Literal['local', 'modal']]",
        "chunk_size: default '32MiB', not None (None takes job_config's)",
        "id_field: missing",
        "retries: not a declared run parameter",
    ]


# --- the CLI options ----------------------------------------------------------------------------------------------


def test_the_batch_command_has_an_option_per_run_parameter_named_helped_and_defaulted_as_declared() -> None:
    import typer.main

    from modalkit.cli import OPTION_NAMES, app

    command = typer.main.get_command(app).commands["batch"]  # type: ignore[attr-defined]
    options = {param.name: param for param in command.params}
    assert {name: "--" + name.replace("_", "-") for name in run_parameters()} == OPTION_NAMES
    for name, field in run_parameters().items():
        option = options[name]
        assert option.opts == [OPTION_NAMES[name]]
        assert option.default is None  # None: job_config's value
        summary = (field.description or "").split("; empty = ")[0].rstrip(".")
        assert option.help.startswith(summary), name
        if describe_allowed(field) != "a text":
            assert describe_allowed(field) in option.help, name
        default = field.default
        shown = default.human_readable(decimal=False).replace(".0", "") if isinstance(default, ByteSize) else default
        if default is not None:
            assert option.help.endswith(f"Default: job_config ({shown})."), name


def test_the_demos_parameters_are_the_batch_flows(tmp_path: Path) -> None:
    from flows.batch_inference import batch_inference
    from modalkit.demo import prepare_demo

    params = prepare_demo(tmp_path / "demo", records=10).params  # `make deploy` starts a run with them

    assert set(params) <= set(inspect.signature(batch_inference.fn).parameters)
    overrides = {name: value for name, value in params.items() if name in run_parameters()}
    config = resolve_job_config(Settings.load(params["config"]), **overrides)  # within the declared bounds
    assert {name: getattr(config, name) for name in overrides} == overrides


@pytest.mark.parametrize("flow_name", ["batch_inference", "replay_failures"])
def test_prefect_describes_each_flow_parameter_and_the_run_parameters_as_declared(flow_name: str) -> None:
    import flows.batch_inference
    import flows.replay_failures

    module = flows.batch_inference if flow_name == "batch_inference" else flows.replay_failures
    properties = getattr(module, flow_name).parameters.model_dump()["properties"]

    assert all(schema.get("description") for schema in properties.values()), properties
    for name, field in run_parameters().items():
        if name in properties:
            assert properties[name]["description"] == parameter_help(field), name
