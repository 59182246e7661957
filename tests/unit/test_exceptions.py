"""One error hierarchy: every error modalkit raises is a ModalkitError, keeps ``retryable`` across processes, and
the original modalkit's exception names still catch what they caught."""

from __future__ import annotations

import pickle

import pytest

from modalkit import exceptions
from modalkit.exceptions import (
    AuthConfigError,
    BackendError,
    ConfigError,
    DependencyError,
    DeviceError,
    JobFailed,
    ModalkitError,
    QueueError,
    StorageError,
    TypeValidationError,
)


def test_job_failed_keeps_its_message_retryable_and_summary_when_pickled() -> None:
    summary = {"job_id": "j1", "records": 10, "failed": 3}
    failed = JobFailed("job j1: 2 chunk(s) failed", summary, retryable=True)

    back = pickle.loads(pickle.dumps(failed))

    assert type(back) is JobFailed
    assert str(back) == "job j1: 2 chunk(s) failed"
    assert back.retryable is True
    assert back.summary == summary


@pytest.mark.parametrize("retryable", [True, False])
def test_every_modalkit_error_keeps_retryable_when_pickled(retryable: bool) -> None:
    for cls in (StorageError, QueueError, ConfigError, TypeValidationError, BackendError):
        back = pickle.loads(pickle.dumps(cls("what happened", retryable=retryable)))
        assert (type(back), str(back), back.retryable) == (cls, "what happened", retryable)


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (AuthConfigError, ValueError),
        (DependencyError, ImportError),
        (TypeValidationError, TypeError),
        (BackendError, ValueError),
    ],
)
def test_the_original_exception_names_are_in_our_hierarchy_and_keep_their_builtin_base(
    cls: type[ModalkitError], builtin: type[Exception]
) -> None:
    # code written against the original modalkit catches these as the builtin errors they derived from
    error = cls("not usable")

    assert isinstance(error, ModalkitError)
    assert isinstance(error, builtin)
    assert error.retryable is False
    assert cls.__name__ in exceptions.__all__


class _DiskFull(StorageError):
    """A user's error with its own constructor and an attribute of its own."""

    def __init__(self, path: str, free: int) -> None:
        super().__init__(f"{path}: {free} bytes free", retryable=True)
        self.path = path
        self.free = free


def test_a_subclass_with_its_own_constructor_keeps_its_attributes_when_pickled() -> None:
    back = pickle.loads(pickle.dumps(_DiskFull("/data", 12)))

    assert type(back) is _DiskFull
    assert (str(back), back.retryable, back.path, back.free) == ("/data: 12 bytes free", True, "/data", 12)


def test_modalkits_own_errors_keep_their_attributes_when_pickled() -> None:
    from modalkit.batch.job import InvalidJobParameters
    from modalkit.inference_pipeline import ContractBroken

    device = pickle.loads(pickle.dumps(DeviceError("CUDA error: device lost", stage="preprocess")))
    assert (type(device), str(device), device.retryable, device.stage) == (
        DeviceError, "CUDA error: device lost", True, "preprocess")  # fmt: skip
    invalid = pickle.loads(pickle.dumps(InvalidJobParameters(["chunk_size: 1 (at least 64KiB)"])))
    assert (str(invalid), invalid.lines) == ("invalid job parameter: chunk_size: 1 (at least 64KiB)",
                                             ["chunk_size: 1 (at least 64KiB)"])  # fmt: skip
    broken = pickle.loads(pickle.dumps(ContractBroken("P.postprocess returned 2 outputs for 3 inputs", "returned 2")))
    assert (type(broken), str(broken), broken.got, broken.retryable) == (
        ContractBroken, "P.postprocess returned 2 outputs for 3 inputs", "returned 2", False)  # fmt: skip
