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
