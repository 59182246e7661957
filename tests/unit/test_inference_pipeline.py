"""InferencePipeline: construction-time checks, the output count contract, per-record isolation, load_pipeline."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from modalkit.exceptions import ConfigError, DeviceError, PipelineError
from modalkit.inference_pipeline import (
    MAX_ERROR_CHARS,
    ContractBroken,
    InferencePipeline,
    RecordError,
    is_device_failure,
    load_pipeline,
    run_isolated,
)
from modalkit.iomodel import InferenceOutputModel
from modalkit.settings import Settings

STAGES = ("preprocess", "predict", "postprocess")


class Number(BaseModel):
    x: int


class Doubled(InferenceOutputModel):
    y: int


class Doubler(InferencePipeline):
    """Doubles ``x``; a negative ``x`` is a poison record that raises in ``poison_stage``.

    Counts the calls of each stage so tests can check how often the isolated runner ran the pipeline.
    """

    input_model = Number
    output_model = Doubled

    def __init__(
        self,
        model_name: str = "doubler",
        all_model_data_folder: str = "models",
        common_settings: dict[str, Any] | None = None,
        *args: Any,
        poison_stage: str = "predict",
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name, all_model_data_folder, common_settings or {}, *args, **kwargs)
        self.poison_stage = poison_stage
        self.kwargs = kwargs
        self.calls: Counter[str] = Counter()
        self.batch_sizes: list[int] = []

    def _check(self, stage: str, input_list: list[Number]) -> None:
        self.calls[stage] += 1
        bad = [i.x for i in input_list if i.x < 0]
        if stage == self.poison_stage and bad:
            error = {"preprocess": ValueError, "predict": ZeroDivisionError, "postprocess": KeyError}[stage]
            raise error(f"poison record x={bad[0]}")

    def preprocess(self, input_list: list[Number]) -> dict[str, Any]:
        self.batch_sizes.append(len(input_list))
        self._check("preprocess", input_list)
        return {"x": [i.x for i in input_list]}

    def predict(self, input_list: list[Number], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        self._check("predict", input_list)
        return {"y": [2 * x for x in preprocessed_data["x"]]}

    def postprocess(self, input_list: list[Number], raw_output: dict[str, Any]) -> list[Any]:
        self._check("postprocess", input_list)
        return [Doubled(y=y) for y in raw_output["y"]]


class DictDoubler(Doubler):
    """Returns plain dicts from postprocess; ``x == 13`` gets an output that does not fit the output model."""

    def postprocess(self, input_list: list[Number], raw_output: dict[str, Any]) -> list[Any]:
        self.calls["postprocess"] += 1
        return [{"y": "thirteen"} if i.x == 13 else {"y": y} for i, y in zip(input_list, raw_output["y"], strict=True)]


class DropsOne(Doubler):
    def postprocess(self, input_list: list[Number], raw_output: dict[str, Any]) -> list[Any]:
        return [Doubled(y=y) for y in raw_output["y"]][:-1]


def numbers(n: int, poison_at: tuple[int, ...] = ()) -> list[Number]:
    return [Number(x=-i if i in poison_at else i) for i in range(n)]


# --- checks at construction ------------------------------------------------------------------------------


def test_pipeline_missing_predict_fails_at_construction_with_the_signature_to_add() -> None:
    class NoPredict(InferencePipeline):
        def preprocess(self, input_list: list[Any]) -> dict[str, Any]:
            return {}

        def postprocess(self, input_list: list[Any], raw_output: dict[str, Any]) -> list[Any]:
            return []

    with pytest.raises(PipelineError) as info:
        NoPredict("m", "models", {})

    message = str(info.value)
    assert "NoPredict" in message
    assert "lacks predict" in message
    assert "def predict(self, input_list: list[YourInput], preprocessed_data: dict) -> dict: ..." in message
    assert "def preprocess" not in message


def test_pipeline_missing_every_method_lists_all_three() -> None:
    class Empty(InferencePipeline):
        pass

    with pytest.raises(PipelineError) as info:
        Empty("m", "models", {})

    for stage in STAGES:
        assert f"def {stage}(self, input_list" in str(info.value)


@pytest.mark.parametrize("bad", [dict, Number(x=1), "Number", None.__class__])
def test_input_model_that_is_not_a_pydantic_model_fails_at_construction(bad: object) -> None:
    cls = type("BadInput", (Doubler,), {"input_model": bad})

    with pytest.raises(PipelineError, match=r"BadInput\.input_model must be a pydantic model class"):
        cls()


@pytest.mark.parametrize("bad", [dict, Number, Doubled(y=1)])
def test_output_model_that_is_not_an_inference_output_model_fails_at_construction(bad: object) -> None:
    cls = type("BadOutput", (Doubler,), {"output_model": bad})

    with pytest.raises(PipelineError, match=r"BadOutput\.output_model must subclass .*InferenceOutputModel"):
        cls()


def test_pipeline_without_schemas_can_be_built_for_online_apps() -> None:
    cls = type("Schemaless", (Doubler,), {"input_model": None, "output_model": None})

    pipeline = cls()

    assert pipeline.run_inference([Number(x=2)]) == [Doubled(y=4)]


def test_require_schemas_returns_the_declared_models() -> None:
    assert Doubler.require_schemas() == (Number, Doubled)


def test_require_schemas_says_what_to_add() -> None:
    cls = type("Schemaless", (Doubler,), {"input_model": None, "output_model": None})

    with pytest.raises(PipelineError) as info:
        cls.require_schemas()

    message = str(info.value)
    assert "Schemaless declares no record schema" in message
    assert "input_model = YourInput" in message
    assert "output_model = YourOutput" in message


def test_require_schemas_names_only_the_missing_one() -> None:
    cls = type("NoOutput", (Doubler,), {"output_model": None})

    with pytest.raises(PipelineError) as info:
        cls.require_schemas()

    assert "output_model = YourOutput" in str(info.value)
    assert "input_model =" not in str(info.value)


# --- run_inference ------------------------------------------------------------------------------------------


def test_run_inference_returns_one_output_per_input_in_order() -> None:
    assert Doubler().run_inference(numbers(4)) == [Doubled(y=0), Doubled(y=2), Doubled(y=4), Doubled(y=6)]


def test_run_inference_with_wrong_output_count_names_both_counts() -> None:
    with pytest.raises(PipelineError, match=r"DropsOne\.postprocess returned 4 outputs for 5 inputs"):
        DropsOne().run_inference(numbers(5))


def test_run_inference_with_postprocess_not_returning_a_list_is_an_error() -> None:
    class ReturnsDict(Doubler):
        def postprocess(self, input_list: list[Number], raw_output: dict[str, Any]) -> Any:
            return raw_output

    with pytest.raises(PipelineError, match=r"must return a list with one output per input, got dict"):
        ReturnsDict().run_inference(numbers(2))


# --- run_isolated -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "error_type"),
    [("preprocess", "ValueError"), ("predict", "ZeroDivisionError"), ("postprocess", "KeyError")],
)
def test_run_isolated_fails_only_the_poison_records(stage: str, error_type: str) -> None:
    poison = (1, 41, 99)
    pipeline = Doubler(poison_stage=stage)

    outcomes = run_isolated(pipeline, numbers(100, poison_at=poison))

    assert len(outcomes) == 100
    failed = {i: o for i, o in enumerate(outcomes) if isinstance(o, RecordError)}
    assert sorted(failed) == list(poison)
    for i, error in failed.items():
        assert error.stage == stage
        assert error.error_type == error_type
        assert error.error.strip("'") == f"poison record x=-{i}"
    succeeded = [(i, o) for i, o in enumerate(outcomes) if i not in failed]
    assert len(succeeded) == 97
    assert all(o == Doubled(y=2 * i) for i, o in succeeded)  # in input order


def test_run_isolated_splits_a_failing_batch_a_bounded_number_of_times() -> None:
    n, poison = 100, (1, 41, 99)
    pipeline = Doubler(poison_stage="predict")

    run_isolated(pipeline, numbers(n, poison_at=poison))

    # one pass over the batch, then about two runs per level of halving for each poison record
    assert pipeline.calls["preprocess"] <= 1 + 2 * len(poison) * math.ceil(math.log2(n))
    assert pipeline.calls["predict"] == pipeline.calls["preprocess"]


def test_run_isolated_runs_a_clean_batch_once() -> None:
    pipeline = Doubler()

    outcomes = run_isolated(pipeline, numbers(100))

    assert pipeline.calls == Counter({"preprocess": 1, "predict": 1, "postprocess": 1})
    assert pipeline.batch_sizes == [100]
    assert outcomes == [Doubled(y=2 * i) for i in range(100)]


def test_run_isolated_with_no_inputs_does_not_call_the_pipeline() -> None:
    pipeline = Doubler()

    assert run_isolated(pipeline, []) == []
    assert pipeline.calls == Counter()


def test_run_isolated_when_every_record_is_poison() -> None:
    outcomes = run_isolated(Doubler(), [Number(x=-1), Number(x=-2), Number(x=-3)])

    assert [(o.stage, o.error) for o in outcomes] == [
        ("predict", "poison record x=-1"),
        ("predict", "poison record x=-2"),
        ("predict", "poison record x=-3"),
    ]


class BrokenGpu(Doubler):
    """A model on a GPU that has gone bad: every batch fails in predict, whatever its records."""

    def __init__(self, message: str = "CUDA error: an illegal memory access was encountered") -> None:
        super().__init__()
        self.message = message

    def predict(self, input_list: list[Number], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        self.calls["predict"] += 1
        raise RuntimeError(self.message)


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: device-side assert triggered",
        "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED",
        "NCCL error in: ProcessGroupNCCL.cpp:1191, unhandled cuda error",
    ],
)
def test_run_isolated_stops_at_a_broken_device_without_splitting_the_batch(message: str) -> None:
    pipeline = BrokenGpu(message)

    with pytest.raises(DeviceError, match="predict failed on a broken device: RuntimeError") as raised:
        run_isolated(pipeline, numbers(64))

    assert pipeline.calls["predict"] == 1  # not the ~2n calls of bisecting a batch nothing in it can fix
    assert raised.value.stage == "predict"
    assert raised.value.retryable  # on another device the same records succeed
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert is_device_failure(RuntimeError(message))


def test_running_out_of_gpu_memory_is_not_a_broken_device_and_smaller_batches_are_tried() -> None:
    class TooBigForTheGpu(Doubler):
        def predict(self, input_list: list[Number], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
            if len(input_list) > 8:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().predict(input_list, preprocessed_data)

    outcomes = run_isolated(TooBigForTheGpu(), numbers(32))

    assert outcomes == [Doubled(y=2 * i) for i in range(32)]
    assert not is_device_failure(RuntimeError("CUDA error: out of memory"))


def test_run_isolated_coerces_dicts_to_the_output_model() -> None:
    outcomes = run_isolated(DictDoubler(), numbers(3))

    assert outcomes == [Doubled(y=0), Doubled(y=2), Doubled(y=4)]
    assert all(type(o) is Doubled for o in outcomes)


def test_run_isolated_invalid_output_fails_that_record_only() -> None:
    pipeline = DictDoubler()

    outcomes = run_isolated(pipeline, numbers(20))

    error = outcomes[13]
    assert isinstance(error, RecordError)
    assert error.stage == "postprocess"
    assert error.error_type == "InvalidOutput"
    assert "Doubled" in error.error
    assert [o for i, o in enumerate(outcomes) if i != 13] == [Doubled(y=2 * i) for i in range(20) if i != 13]
    assert pipeline.calls["postprocess"] == 1  # a bad output needs no re-run of the batch


def test_run_isolated_without_output_model_requires_pydantic_outputs() -> None:
    cls = type("Schemaless", (DictDoubler,), {"input_model": None, "output_model": None})

    outcomes = run_isolated(cls(), numbers(2))

    assert all(isinstance(o, RecordError) and o.error_type == "InvalidOutput" for o in outcomes)


def test_a_wrong_output_count_that_one_record_reproduces_stops_naming_the_stage_and_both_counts() -> None:
    pipeline = DropsOne()
    with pytest.raises(ContractBroken) as broken:
        run_isolated(pipeline, numbers(256))

    message = str(broken.value)
    assert "DropsOne.postprocess broke the pipeline contract: it returned 0 outputs for 1 inputs" in message
    assert "(the first batch it failed on: returned 255 outputs for 256 inputs)" in message
    assert broken.value.retryable is False
    assert pipeline.calls["predict"] == 9  # halved down to one record, not bisected over all 256


def test_record_error_message_is_bounded() -> None:
    class Loud(Doubler):
        def predict(self, input_list: list[Number], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
            raise RuntimeError("x" * (10 * MAX_ERROR_CHARS))

    (error,) = run_isolated(Loud(), numbers(1))

    assert error.error_type == "RuntimeError"
    assert len(error.error) == MAX_ERROR_CHARS
    assert error.error.endswith("...")


def test_record_error_of_an_exception_without_message_uses_its_type() -> None:
    assert RecordError.from_exception("predict", MemoryError()) == RecordError("predict", "MemoryError", "MemoryError")


# --- load_pipeline -----------------------------------------------------------------------------------------


def settings_for(entry: dict[str, Any] | None, folder: Path = Path("models"), **model_settings: Any) -> Settings:
    return Settings.load(
        data={
            "model_settings": {
                "local_model_repository_folder": str(folder),
                "model_entries": {"doubler": entry},
                **model_settings,
            }
        }
    )


def test_load_pipeline_builds_the_class_from_its_import_path(tmp_path: Path) -> None:
    settings = settings_for(
        {"pipeline": f"{__name__}:Doubler", "poison_stage": "postprocess", "scale": 3},
        folder=tmp_path / "models",
        common={"region": "eu-west-1"},
    )

    pipeline = load_pipeline(settings, "doubler")

    assert type(pipeline) is Doubler
    assert isinstance(pipeline, Doubler)
    assert pipeline.model_name == "doubler"
    assert pipeline.all_model_data_folder == str(tmp_path / "models")
    assert pipeline.common_settings == {"region": "eu-west-1"}
    assert pipeline.poison_stage == "postprocess"
    assert pipeline.kwargs == {"scale": 3}


def test_load_pipeline_without_a_name_loads_the_only_model() -> None:
    pipeline = load_pipeline(settings_for({"pipeline": f"{__name__}:Doubler"}))

    assert pipeline.model_name == "doubler"


def test_load_pipeline_with_an_explicit_class_needs_no_import_path() -> None:
    pipeline = load_pipeline(settings_for(None), "doubler", pipeline_cls=DictDoubler)

    assert type(pipeline) is DictDoubler


def test_load_pipeline_entry_without_pipeline_says_which_key_to_set() -> None:
    with pytest.raises(ConfigError, match=r"model_settings\.model_entries\.doubler\.pipeline is not set"):
        load_pipeline(settings_for({"scale": 3}), "doubler")


@pytest.mark.parametrize(
    ("path", "detail"),
    [
        ("no_such_package.models:Doubler", "cannot import module 'no_such_package.models'"),
        (f"{__name__}:NoSuchClass", "has no attribute 'NoSuchClass'"),
        ("pathlib:Path", "is not a subclass of modalkit.InferencePipeline"),
    ],
)
def test_load_pipeline_bad_import_path_names_the_key(path: str, detail: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_pipeline(settings_for({"pipeline": path}), "doubler")

    message = str(info.value)
    assert message.startswith("model_settings.model_entries.doubler.pipeline:")
    assert detail in message


def test_load_pipeline_unknown_model_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'tripler'.*doubler"):
        load_pipeline(settings_for({"pipeline": f"{__name__}:Doubler"}), "tripler")


def test_load_pipeline_still_checks_the_class() -> None:
    class Incomplete(InferencePipeline):
        pass

    with pytest.raises(PipelineError, match="Incomplete cannot be built"):
        load_pipeline(settings_for(None), "doubler", pipeline_cls=Incomplete)


def test_load_pipeline_with_the_sentiment_example(tmp_path: Path) -> None:
    from modalkit.examples.sentiment import Review, Sentiment

    folder = tmp_path / "models"
    settings = Settings.load(
        data={
            "model_settings": {
                "local_model_repository_folder": str(folder),
                "model_entries": {
                    "sentiment": {"pipeline": "modalkit.examples.sentiment:SentimentPipeline", "n_features": 4096}
                },
            }
        }
    )

    pipeline = load_pipeline(settings, "sentiment")

    assert (folder / "sentiment" / "weights.npz").is_file()
    assert pipeline.require_schemas() == (Review, Sentiment)
    reviews = [Review(text="Absolutely love this kettle, superb value."), Review(text="Terrible phone, do not buy.")]
    outcomes = run_isolated(pipeline, reviews)
    assert [o.label for o in outcomes] == ["positive", "negative"]
    assert all(0.0 <= o.score <= 1.0 for o in outcomes)

    # a second load reads the saved weights instead of fitting again with its own n_features
    entry = {"pipeline": "modalkit.examples.sentiment:SentimentPipeline", "n_features": 8192}
    folder_settings = {"local_model_repository_folder": str(folder), "model_entries": {"sentiment": entry}}
    reloaded = load_pipeline(Settings.load(data={"model_settings": folder_settings}))
    assert reloaded.n_features == 4096
    assert [o.label for o in reloaded.run_inference(reviews)] == ["positive", "negative"]
