"""A full disk and a read-only output, for real: small tmpfs file systems mounted for the test.

Each error must be a StorageError that names the file it was writing, must not be retryable (another attempt on
the same disk meets the same error, so the flow must not spend its retries on it), and must commit nothing.
Mounting needs root (CAP_SYS_ADMIN); where the test process may not mount, these tests are skipped and say why.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipelines import PoisonAwareSentiment

from modalkit.batch.chunk import process_chunk
from modalkit.batch.planning import list_dataset, plan_chunks
from modalkit.exceptions import StorageError
from modalkit.iomodel import JobSpec


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` with ``options`` (e.g. ``size=64k`` or ``ro``), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory: pytest.TempPathFactory) -> PoisonAwareSentiment:
    return PoisonAwareSentiment("sentiment", str(tmp_path_factory.mktemp("models")), {})


def one_chunk_job(tmp_path: Path, records: int, output: Path) -> tuple[JobSpec, object]:
    source = tmp_path / "in"
    source.mkdir()
    lines = [json.dumps({"text": f"Absolutely love it, great value, review number {i}"}) for i in range(records)]
    (source / "reviews.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (chunk,) = plan_chunks(list_dataset(str(source)), 10**9, "job")
    job = JobSpec(job_id="job", input_uri=str(source), output_uri=str(output), model_name="sentiment")
    return job, chunk


def test_a_full_disk_fails_the_chunk_with_a_non_retryable_error_naming_the_part_file(
    tmp_path: Path, sentiment: PoisonAwareSentiment
) -> None:
    with tmpfs(tmp_path / "small", "size=64k") as small:
        job, chunk = one_chunk_job(tmp_path, 4000, small / "out")  # about 300 KiB of part rows

        with pytest.raises(StorageError, match=r"part file of chunk 0 .*No space left on device") as raised:
            process_chunk(job, chunk, sentiment)  # type: ignore[arg-type]

        assert raised.value.retryable is False
        assert [p.name for p in (small / "out").iterdir()] == []  # no staging directory, no part file, no marker


def test_a_read_only_output_fails_the_chunk_with_a_non_retryable_error_naming_the_output(
    tmp_path: Path, sentiment: PoisonAwareSentiment
) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=64k") as read_only:
        job, chunk = one_chunk_job(tmp_path, 10, read_only / "out")

        with pytest.raises(StorageError, match=rf"{read_only}/out.*Read-only file system") as raised:
            process_chunk(job, chunk, sentiment)  # type: ignore[arg-type]

        assert raised.value.retryable is False
