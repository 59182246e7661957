"""InferencePipeline, the user's code, and the isolated runner that batch and online both use.

A pipeline is preprocess -> predict -> postprocess over a list of inputs, one output per input, in order.
:func:`run_isolated` runs a batch so that one bad record never fails its neighbours: a batch that raises is split
in halves until only the records that fail on their own are left, and each of those gets its own
:class:`RecordError`.

Example:
    >>> from pydantic import BaseModel
    >>> from modalkit.inference_pipeline import InferencePipeline, RecordError, run_isolated
    >>> from modalkit.iomodel import OUTPUT_ENVELOPE, FailureRecord, InferenceOutputModel, SuccessRecord
    >>> class In(BaseModel):
    ...     x: float
    >>> class Out(InferenceOutputModel):
    ...     y: float
    >>> class Inverse(InferencePipeline):
    ...     input_model, output_model = In, Out
    ...     def preprocess(self, input_list): return {"x": [i.x for i in input_list]}
    ...     def predict(self, input_list, preprocessed_data): return {"y": [1 / x for x in preprocessed_data["x"]]}
    ...     def postprocess(self, input_list, raw_output): return [Out(y=y) for y in raw_output["y"]]
    >>> outcomes = run_isolated(Inverse("inv", "/tmp", {}), [In(x=2), In(x=0), In(x=4)])
    >>> [o.y if not isinstance(o, RecordError) else o.error_type for o in outcomes]
    [0.5, 'ZeroDivisionError', 0.25]
"""

from __future__ import annotations

import importlib
import inspect
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, Protocol

from pydantic import BaseModel, PrivateAttr, ValidationError

from modalkit.exceptions import ConfigError, DeviceError, ModalkitError, PipelineError, is_retryable
from modalkit.iomodel import OUTPUT_ENVELOPE, FailureRecord, InferenceOutputModel, SuccessRecord
from modalkit.pipeline_modules import find_top_level, not_found_message
from modalkit.settings_errors import did_you_mean

if TYPE_CHECKING:
    from modalkit.settings import Settings

__all__ = [
    "STAGES",
    "FailedOutput",
    "HostStages",
    "InferencePipeline",
    "RecordError",
    "StageClock",
    "as_output",
    "async_result",
    "import_pipeline",
    "is_device_failure",
    "isolate_failed",
    "load_pipeline",
    "outcomes_of",
    "run_isolated",
]

#: The pipeline's stages, in the order they run on a batch.
STAGES = ("preprocess", "predict", "postprocess")

#: How to write each method, for the error raised when a subclass lacks one.
_METHOD_HINTS = {
    "preprocess": "def preprocess(self, input_list: list[YourInput]) -> dict: ...",
    "predict": "def predict(self, input_list: list[YourInput], preprocessed_data: dict) -> dict: ...",
    "postprocess": "def postprocess(self, input_list: list[YourInput], raw_output: dict) -> list[YourOutput]: ...",
}
MAX_ERROR_CHARS = 2000


class InferencePipeline(ABC):
    """Base class of an inference pipeline: one model version, preprocess -> predict -> postprocess.

    Subclasses load their weights in ``__init__`` (heavy imports belong there too, so importing the module stays
    cheap) and name their record schemas in two class attributes:

    * ``input_model``: the pydantic model of one input record; batch rows and HTTP bodies are validated against it.
    * ``output_model``: a subclass of :class:`~modalkit.iomodel.InferenceOutputModel`, one per input.

    Online apps may leave the schemas to ``create_web_endpoints``; batch jobs need them declared. A third, optional
    class attribute, ``parameters``, is a pydantic model of the model entry's other keys: they are then validated
    like the rest of the settings (a typo such as ``tax_rat`` fails, naming the key, before a job writes anything)
    and reach ``__init__`` as keyword arguments of the declared types.

    ``device_stages`` (optional) names the stages that must run on the thread that loaded the model: by default
    only ``predict``. A batch worker runs the other stages on helper threads of the same process, so that the next
    sub-batch is read, validated and preprocessed, and the previous one postprocessed and written, while the device
    runs ``predict`` (CUDA contexts and streams expect one thread); ``preprocess`` also in host processes of its
    own when the pipeline gives :meth:`host_stages` and ``job_config.host_workers`` is above 1. A pipeline whose
    ``preprocess`` touches the GPU (moves tensors to the device, runs a GPU tokenizer) declares it; one whose stages
    share state that is not thread-safe declares all three, and only reading and writing overlap its stages::

        class OnGpuTokens(InferencePipeline):
            device_stages = ("preprocess", "predict")

    Whichever thread runs them, each stage runs on one batch at a time, and ``predict`` always on the same thread.

    ``version`` (optional, a string) names the version of the pipeline's code and weights; a model entry's
    ``version`` key overrides it. It is part of a batch job's identity: after a fix, raise it, and a rerun on the
    old output is refused (naming both versions) instead of skipping every chunk the old version committed; write
    to a new output, or rerun only the old job's failures with ``modalkit replay OLD_OUTPUT NEW_OUTPUT``::

        class Classifier(InferencePipeline):
            version = "2"   # 2: strips HTML before tokenising

    Args:
        model_name: Name of the model (its key in ``model_settings.model_entries``).
        all_model_data_folder: Folder holding every model's files.
        common_settings: Settings shared across models (``model_settings.common``).
        *args: Passed on by subclasses as they see fit.
        **kwargs: The model entry's other keys.
    """

    input_model: ClassVar[type[BaseModel] | None] = None
    output_model: ClassVar[type[InferenceOutputModel] | None] = None
    parameters: ClassVar[type[BaseModel] | None] = None
    version: ClassVar[str | None] = None
    device_stages: ClassVar[tuple[str, ...]] = ("predict",)

    @classmethod
    def validate_parameters(cls, values: Mapping[str, Any], where: str = "the model entry") -> dict[str, Any]:
        """The model entry's keys checked against ``parameters`` (as they are when none is declared).

        Raises:
            ConfigError: an unknown key or a bad value, one line each, named ``<where>.<key>``.
        """
        if cls.parameters is None:
            return dict(values)
        known = set(cls.parameters.model_fields)
        lines = []
        for key in sorted(set(values) - known):
            lines.append(f"{where}.{key}: unknown key{did_you_mean(cls.parameters, (key,))} "
                         f"({cls.__qualname__}.parameters has {', '.join(sorted(known)) or 'none'})")  # fmt: skip
        try:
            checked = cls.parameters.model_validate({k: v for k, v in values.items() if k in known})
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                lines.append(f"{where}.{loc}: {err['msg']} (got {err.get('input')!r})")
            checked = None
        if lines:
            raise ConfigError("invalid model parameters:\n  " + "\n  ".join(lines))
        assert checked is not None
        return {name: getattr(checked, name) for name in cls.parameters.model_fields}

    def __new__(cls, *args: Any, **kwargs: Any) -> InferencePipeline:
        cls._check_methods()
        cls._check_declared_schemas()
        return super().__new__(cls)

    @classmethod
    def _check_methods(cls) -> None:
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if missing:
            hints = "\n  ".join(_METHOD_HINTS.get(name, f"def {name}(...)") for name in missing)
            raise PipelineError(
                f"{cls.__qualname__} cannot be built: it lacks {', '.join(missing)}. Add to the class:\n  {hints}"
            )

    def __init__(
        self,
        model_name: str,
        all_model_data_folder: str,
        common_settings: dict[str, Any],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.model_name = model_name
        self.all_model_data_folder = all_model_data_folder
        self.common_settings = common_settings

    @classmethod
    def _check_declared_schemas(cls) -> None:
        name = cls.__qualname__
        stages = cls.device_stages
        if (
            not isinstance(stages, tuple | list)
            or "predict" not in stages
            or any(stage not in STAGES for stage in stages)
        ):
            raise PipelineError(
                f"{name}.device_stages must be a tuple of stages that holds 'predict' and names only "
                f'{", ".join(repr(s) for s in STAGES)} (e.g. device_stages = ("preprocess", "predict")), '
                f"not {stages!r}"
            )
        if cls.input_model is not None and not (
            inspect.isclass(cls.input_model) and issubclass(cls.input_model, BaseModel)
        ):
            raise PipelineError(
                f"{name}.input_model must be a pydantic model class (class YourInput(BaseModel): ...), "
                f"not {cls.input_model!r}"
            )
        if cls.output_model is not None and not (
            inspect.isclass(cls.output_model) and issubclass(cls.output_model, InferenceOutputModel)
        ):
            raise PipelineError(
                f"{name}.output_model must subclass modalkit.iomodel.InferenceOutputModel "
                f"(class YourOutput(InferenceOutputModel): ...), not {cls.output_model!r}"
            )

    @classmethod
    def require_schemas(cls) -> tuple[type[BaseModel], type[InferenceOutputModel]]:
        """The declared ``(input_model, output_model)``; batch jobs call this before reading any record.

        Raises:
            PipelineError: a schema or a method is missing, with what to add.
        """
        cls._check_methods()  # at planning, before the job writes anything: not only when a worker builds it
        cls._check_declared_schemas()
        lacking = []
        if cls.input_model is None:
            lacking.append("input_model = YourInput  # pydantic model of one input record")
        if cls.output_model is None:
            lacking.append("output_model = YourOutput  # subclass of modalkit.iomodel.InferenceOutputModel")
        if lacking:
            raise PipelineError(
                f"{cls.__qualname__} declares no record schema, which batch jobs need. Add to the class:\n  "
                + "\n  ".join(lacking)
            )
        return cls.input_model, cls.output_model  # type: ignore[return-value]

    def host_stages(self) -> HostStages | None:
        """What a batch worker's host processes run of this pipeline: an object with this pipeline's
        ``preprocess(input_list)``, or None (the default) to keep ``preprocess`` in the worker's own process.

        With ``job_config.host_workers`` above 1 a batch worker (one per device) starts that many host processes
        once, sends each this object (pickled: keep it small, and free of the model and the device: a host process
        must never load one or touch the other), and has them validate and preprocess the sub-batches while
        ``predict`` runs on the thread that loaded the model. Called once per worker, on the loaded pipeline, so it
        may hand over what it learned loading (a vocabulary size, a tokenizer's files). A pipeline whose
        ``preprocess`` needs the device lists it in ``device_stages`` instead, and this is not called::

            class Classifier(InferencePipeline):
                def host_stages(self):
                    return Tokens(self.vocabulary_size)   # a class of its own module, with preprocess()

        Whatever runs it, ``preprocess`` must give the same result for the same records: a sub-batch whose host
        stages raise is run again whole in the worker's process, the way any batch is, and split there. Its large
        arrays reach ``predict`` as views of shared memory that is reused once the sub-batch is written: keep
        nothing of them past ``postprocess``.
        """
        return None

    def on_volume_reload(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Called every ``volume_reload_interval_seconds``, after modalkit reloads the Modal volumes (if any);
        override to reload weights. Does nothing by default."""

    @abstractmethod
    def preprocess(self, input_list: list[Any]) -> dict[str, Any]:
        """Prepare a batch of inputs for the model (tokenise, stack...)."""

    @abstractmethod
    def predict(self, input_list: list[Any], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        """Run the model on the preprocessed batch and return its raw output."""

    @abstractmethod
    def postprocess(self, input_list: list[Any], raw_output: dict[str, Any]) -> list[Any]:
        """Turn the raw output into one output model per input, in input order."""

    def run_inference(self, input_list: list[Any]) -> list[InferenceOutputModel]:
        """Run preprocess -> predict -> postprocess on the whole list.

        Raises:
            PipelineError: postprocess returned a different number of outputs than there were inputs.
        """
        outputs = self.postprocess(input_list, self.predict(input_list, self.preprocess(input_list)))
        _check_count(type(self), len(input_list), outputs)
        return outputs


class HostStages(Protocol):
    """What :meth:`InferencePipeline.host_stages` returns: a pipeline's ``preprocess`` without its model."""

    def preprocess(self, input_list: list[Any]) -> Any:
        """The same as the pipeline's ``preprocess``."""


@dataclass(frozen=True, slots=True)
class RecordError:
    """Why one input failed: the stage, the error's class name and its message."""

    stage: str
    error_type: str
    error: str

    @classmethod
    def from_exception(cls, stage: str, exc: BaseException) -> RecordError:
        text = str(exc) or type(exc).__name__
        if len(text) > MAX_ERROR_CHARS:
            text = text[: MAX_ERROR_CHARS - 3] + "..."
        return cls(stage, type(exc).__name__, text)


class ContractBroken(PipelineError):
    """postprocess returned something other than one output per input: a bug in the pipeline, not in a record."""

    def __init__(self, message: str, got: str = "") -> None:
        super().__init__(message, retryable=False)
        self.got = got or message


class FailedOutput(InferenceOutputModel):
    """The response of a request that failed; it keeps the failure's fields (for the failure queue's record and
    the HTTP error body).

    (A subclass, so that the successes, built by the million in batch jobs, carry no private state to initialise.)
    """

    _failure: RecordError | None = PrivateAttr(default=None)

    @classmethod
    def of(cls, failure: RecordError) -> FailedOutput:
        output = cls(status="error", error=f"{failure.stage}: {failure.error_type}: {failure.error}")
        output._failure = failure
        return output

    @property
    def failure(self) -> RecordError | None:
        """Why the request failed: stage, error type, message."""
        return self._failure


def as_output(outcome: Any) -> InferenceOutputModel:
    """The response of one request from its run_isolated outcome: its output, or an error output that keeps the
    failure's fields."""
    if isinstance(outcome, RecordError):
        return FailedOutput.of(outcome)
    if isinstance(outcome, InferenceOutputModel):
        return outcome
    return InferenceOutputModel(**outcome.model_dump())


def async_result(
    job_id: str, record_id: str | int, output: InferenceOutputModel, request: Any
) -> tuple[str | None, dict[str, Any]]:
    """Where an async request's result goes and what the message says: ``(queue, body)``; the queue is the
    request's success or failure queue (None when it names none), the body a SuccessRecord or FailureRecord."""
    if output.status == "success":
        body = SuccessRecord(job_id=job_id, record_id=record_id, meta=request.meta,
                             output=output.model_dump(mode="json", exclude=OUTPUT_ENVELOPE))  # fmt: skip
        return request.success_queue, body.model_dump(mode="json")
    failure = output.failure if isinstance(output, FailedOutput) else None
    if failure is None:  # an output marked failed by code that gave no fields
        failure = RecordError("predict", "Error", output.error or "the request failed")
    record = FailureRecord(
        job_id=job_id,
        record_id=record_id,
        stage=failure.stage,
        error_type=failure.error_type,
        error=failure.error,
        input=request.message.model_dump(mode="json"),
        meta=request.meta,
    )
    return request.failure_queue, record.model_dump(mode="json")


def _check_count(cls: type, n_inputs: int, outputs: object) -> None:
    if not isinstance(outputs, list | tuple):
        raise ContractBroken(
            f"{cls.__qualname__}.postprocess must return a list with one output per input, "
            f"got {type(outputs).__name__}",
            f"returned {type(outputs).__name__} for {n_inputs} inputs",
        )
    if len(outputs) != n_inputs:
        raise ContractBroken(
            f"{cls.__qualname__}.postprocess returned {len(outputs)} outputs for {n_inputs} inputs; "
            "it must return exactly one output per input, in input order",
            f"returned {len(outputs)} outputs for {n_inputs} inputs",
        )


class _StageFailed(Exception):
    def __init__(self, stage: str, cause: BaseException) -> None:
        self.stage = stage
        self.cause = cause


class StageClock:
    """Runs the pipeline's stages for one thread: adds up the seconds each stage takes (per batch, not per record),
    and runs each stage under its lock when locks are given, so that a stage shared by two threads (a host stage,
    and the retry of a failed batch) never runs twice at once.

    Args:
        locks: One lock per stage, shared by the clocks of every thread running one pipeline; None: no locking.
    """

    __slots__ = ("batched", "batches", "locks", "predict_cpu", "seconds")

    def __init__(self, locks: Mapping[str, threading.Lock] | None = None) -> None:
        self.locks = locks
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        #: calls of ``predict`` (the device's batches, a failed batch's halves included) and the records in them
        self.batches = 0
        self.batched = 0
        #: the process's CPU seconds while ``predict`` ran (all its threads): against ``predict``'s wall, whether
        #: ``predict`` computes on this host or waits on a device (meaningful when nothing else ran meanwhile)
        self.predict_cpu = 0.0

    def predict_cpu_share(self) -> float | None:
        """The process's CPU seconds over ``predict``'s wall seconds; None before ``predict`` ran."""
        wall = self.seconds["predict"]
        return self.predict_cpu / wall if wall > 0 else None

    def call(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` timed (and locked) as ``stage``; a ``predict`` call is counted, with its batch's length."""
        if stage == "predict":
            self.batches += 1
            self.batched += len(args[0])
        cpu = time.process_time() if stage == "predict" else 0.0
        start = time.perf_counter()
        try:
            if self.locks is None:
                return fn(*args)
            with self.locks[stage]:
                return fn(*args)
        finally:
            self.seconds[stage] += time.perf_counter() - start
            if stage == "predict":
                self.predict_cpu += time.process_time() - cpu


def _run_stages(pipeline: InferencePipeline, batch: list[Any], clock: StageClock | None) -> list[Any]:
    stage = "preprocess"
    try:
        if clock is None:
            pre = pipeline.preprocess(batch)
            stage = "predict"
            raw = pipeline.predict(batch, pre)
            stage = "postprocess"
            outputs = pipeline.postprocess(batch, raw)
            _check_count(type(pipeline), len(batch), outputs)
        else:
            pre = clock.call(stage, pipeline.preprocess, batch)
            stage = "predict"
            raw = clock.call(stage, pipeline.predict, batch, pre)
            stage = "postprocess"
            outputs = clock.call(stage, _postprocess_checked, pipeline, batch, raw)
    except Exception as exc:
        raise _StageFailed(stage, exc) from exc
    return list(outputs)


def _postprocess_checked(pipeline: InferencePipeline, batch: list[Any], raw: Any) -> Any:
    outputs = pipeline.postprocess(batch, raw)
    _check_count(type(pipeline), len(batch), outputs)
    return outputs


def _coerce_output(pipeline: InferencePipeline, output: Any) -> Any:
    """The output as an instance of the declared output model, or a RecordError saying why it is not one."""
    model = type(pipeline).output_model
    if isinstance(output, InferenceOutputModel) and output.status == "error":
        # the pipeline flagged this record itself instead of raising
        return RecordError("postprocess", "PipelineReportedError", output.error or "the pipeline reported an error")
    if model is None:
        if isinstance(output, BaseModel):
            return output
        return RecordError(
            "postprocess",
            "InvalidOutput",
            f"postprocess returned {type(output).__name__}, expected a pydantic model per input",
        )
    if isinstance(output, model):
        return output
    try:
        data = output.model_dump() if isinstance(output, BaseModel) else output
        return model.model_validate(data)
    except ValidationError as exc:
        return RecordError("postprocess", "InvalidOutput", f"output does not match {model.__qualname__}: {exc}")


def run_isolated(pipeline: InferencePipeline, inputs: Sequence[Any], clock: StageClock | None = None) -> list[Any]:
    """Run ``inputs`` through the pipeline so that each input gets its own outcome.

    Returns a list as long as ``inputs``, in order: each item is the input's output model, or a
    :class:`RecordError` for an input that failed. When a batch raises, it is split in halves and each half is run
    again, down to single records, so a poison record fails alone and its neighbours still succeed. A batch with no
    bad record costs one pass; ``k`` bad records cost about ``2 k log2(n)`` extra calls. With a ``clock``, each
    stage is timed (and locked) by it.

    Errors that no record causes are raised instead, for the caller to retry the batch: ``MemoryError``,
    ``ConnectionError``/``TimeoutError`` and retryable modalkit errors. An error that means the accelerator itself is
    broken (a CUDA error, a lost GPU) is raised at once as :class:`~modalkit.exceptions.DeviceError`, without
    splitting the batch: every record would fail the same way on this device.
    """
    outcomes: list[Any] = [None] * len(inputs)
    _run_segment(pipeline, list(inputs), 0, outcomes, None, clock)
    return outcomes


def isolate_failed(
    pipeline: InferencePipeline, inputs: Sequence[Any], stage: str, exc: Exception, clock: StageClock | None = None
) -> list[Any]:
    """What :func:`run_isolated` returns for ``inputs`` when their whole batch has already failed at ``stage`` with
    ``exc``: the same outcomes, from the same calls after the first (the batch is not run whole again).

    A stage runner that ran the stages of a batch itself (the batch worker's pipelined executor) hands a batch
    that raised to this. Raises what :func:`run_isolated` raises.
    """
    outcomes: list[Any] = [None] * len(inputs)
    failed = _StageFailed(stage, exc)
    try:
        raise failed from exc
    except _StageFailed:
        _after_failure(pipeline, list(inputs), 0, outcomes, failed, None, clock)
    return outcomes


def outcomes_of(pipeline: InferencePipeline, inputs: Sequence[Any], outputs: Any) -> list[Any]:
    """The outcomes of a batch whose three stages ran: postprocess's ``outputs`` checked (one per input) and each
    made an output model, or a :class:`RecordError` for an output that is not one (as :func:`run_isolated` does).

    Raises:
        ContractBroken: ``outputs`` is not a list of one output per input (hand the batch to
            :func:`isolate_failed` as a ``postprocess`` failure, as :func:`run_isolated` would split it).
    """
    _check_count(type(pipeline), len(inputs), outputs)
    outcomes: list[Any] = [None] * len(inputs)
    _settle(pipeline, list(outputs), 0, outcomes)
    return outcomes


def _contract_broken(pipeline: InferencePipeline, broken: ContractBroken, first: ContractBroken | None) -> NoReturn:
    cls = type(pipeline).__qualname__
    seen = f" (the first batch it failed on: {first.got})" if first is not None and first is not broken else ""
    raise ContractBroken(
        f"{cls}.postprocess broke the pipeline contract: it {broken.got}{seen}; it must return a list of exactly one "
        "output per input, in input order. This is a bug in the pipeline, not in a record: the job stops",
        broken.got,
    ) from broken


def _run_segment(
    pipeline: InferencePipeline,
    inputs: list[Any],
    offset: int,
    outcomes: list[Any],
    first_break: ContractBroken | None = None,
    clock: StageClock | None = None,
) -> None:
    if not inputs:
        return
    try:
        outputs = _run_stages(pipeline, inputs, clock)
    except _StageFailed as failed:
        _after_failure(pipeline, inputs, offset, outcomes, failed, first_break, clock)
        return
    if clock is None:
        _settle(pipeline, outputs, offset, outcomes)
    else:  # making outputs of what postprocess returned is postprocess's time
        clock.call("postprocess", _settle, pipeline, outputs, offset, outcomes)


def _after_failure(
    pipeline: InferencePipeline,
    inputs: list[Any],
    offset: int,
    outcomes: list[Any],
    failed: _StageFailed,
    first_break: ContractBroken | None,
    clock: StageClock | None,
) -> None:
    """A batch failed at ``failed.stage``: raise what no record causes, fail a single record, or split in halves."""
    if isinstance(failed.cause, ContractBroken):
        # split like any failure, in case one record makes it happen; if a single record still does, the
        # pipeline itself is broken
        if len(inputs) == 1:
            _contract_broken(pipeline, failed.cause, first_break)
        first_break = first_break or failed.cause
    else:
        if is_device_failure(failed.cause):
            text = str(failed.cause) or type(failed.cause).__name__
            raise DeviceError(
                f"{failed.stage} failed on a broken device: {type(failed.cause).__name__}: {text}",
                stage=failed.stage,
            ) from failed.cause
        if _is_infrastructure(failed.cause):
            raise failed.cause from None
        if len(inputs) == 1:
            outcomes[offset] = RecordError.from_exception(failed.stage, failed.cause)
            return
    mid = len(inputs) // 2
    _run_segment(pipeline, inputs[:mid], offset, outcomes, first_break, clock)
    _run_segment(pipeline, inputs[mid:], offset + mid, outcomes, first_break, clock)


def _settle(pipeline: InferencePipeline, outputs: list[Any], offset: int, outcomes: list[Any]) -> None:
    model = type(pipeline).output_model
    for i, output in enumerate(outputs, offset):
        # the common case inline (an instance of the declared model, not flagged): no call per record
        if type(output) is model and output.status != "error":
            outcomes[i] = output
        else:
            outcomes[i] = _coerce_output(pipeline, output)


#: Texts of errors that mean the accelerator is broken, not that a record is bad (CUDA, cuDNN, cuBLAS, NCCL, the
#: driver). Running out of memory is not among them: a smaller batch may well fit, so that one is bisected.
_DEVICE_FAILURES = (
    "cuda error",
    "cudnn_status",
    "cublas_status",
    "cudnn error",
    "nccl error",
    "device-side assert",
    "illegal memory access",
    "uncorrectable ecc error",
    "cuda driver",
    "gpu has fallen off the bus",
    "no cuda gpus are available",
)


def is_device_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the device is broken (so the container or process running it must be replaced)."""
    if isinstance(exc, DeviceError):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return "out of memory" not in text and any(marker in text for marker in _DEVICE_FAILURES)


def _is_infrastructure(exc: BaseException) -> bool:
    """Errors no record causes (out of memory, a lost connection, a retryable modalkit error): the whole batch
    should be retried, not split into record failures."""
    return isinstance(exc, MemoryError) or is_retryable(exc)


def import_pipeline(path: str, *, where: str = "pipeline") -> type[InferencePipeline]:
    """Import an InferencePipeline subclass from ``"package.module:Class"``, as ``python -m`` would: a module found
    nowhere on ``sys.path`` is looked for in the working directory (:mod:`modalkit.pipeline_modules`).

    Raises:
        ConfigError: the module or class cannot be found, or is not an InferencePipeline; a module that cannot
            be found says where it was looked for and how to make it importable.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{where}: {path!r} is not an import path of the form 'package.module:Class'")
    find_top_level(module_name)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(f"{missing}."):  # the module itself, or its package
            raise ConfigError(
                f"{where}: cannot import module {module_name!r} ({exc}); {not_found_message(module_name, where)}"
            ) from exc
        raise ConfigError(
            f"{where}: module {module_name!r} imports {missing!r}, which is not installed here ({exc}); install "
            "it (for Modal, list it in app_settings.build_config.pip_packages too)"
        ) from exc
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import module {module_name!r} ({exc})") from exc
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            found_at = getattr(module, "__file__", None)
            raise ConfigError(
                f"{where}: module {module_name!r}{f' ({found_at})' if found_at else ''} has no attribute {attr!r}"
            )
    if not (inspect.isclass(obj) and issubclass(obj, InferencePipeline)):
        raise ConfigError(f"{where}: {path!r} is not a subclass of modalkit.InferencePipeline")
    return obj


def load_pipeline(
    settings: Settings,
    model_name: str | None = None,
    pipeline_cls: type[InferencePipeline] | None = None,
) -> InferencePipeline:
    """Build the pipeline of a model entry: import its class and call it with the entry's keyword arguments.

    Args:
        settings: Loaded settings.
        model_name: Key in ``model_settings.model_entries``; None = the default (or only) model.
        pipeline_cls: The class to use instead of the entry's ``pipeline`` import path.

    Raises:
        ConfigError: unknown model, or an entry without ``pipeline`` and no class given.
        PipelineError: the pipeline's ``__init__`` raised (named with the exception's type and message; not
            retryable: loading it again would raise again).
    """
    name, entry = settings.model_settings.entry(model_name)
    if pipeline_cls is None:
        if entry.pipeline is None:
            raise ConfigError(
                f"model_settings.model_entries.{name}.pipeline is not set; name the class as 'package.module:Class'"
            )
        pipeline_cls = import_pipeline(entry.pipeline, where=f"model_settings.model_entries.{name}.pipeline")
    kwargs = pipeline_cls.validate_parameters(entry.kwargs, f"model_settings.model_entries.{name}")
    try:
        return pipeline_cls(
            model_name=name,
            all_model_data_folder=str(settings.model_settings.local_model_repository_folder),
            common_settings=dict(settings.model_settings.common),
            **kwargs,
        )
    except ModalkitError:
        raise
    except Exception as exc:
        raise PipelineError(
            f"model {name}: the pipeline {pipeline_cls.__module__}.{pipeline_cls.__qualname__} could not be built: "
            f"its __init__ raised {type(exc).__name__}: {exc}",
            retryable=False,
        ) from exc
