"""The estimate's model (``modalkit estimate``): records from bytes per record, chunks scheduled on the job's
workers (largest first, bounded by the cores), the start and the cost, on a calibration given by hand; and the
sample's windows spread over a real input's files, or the whole input when it is no larger than the sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modalkit.batch.estimate import Calibration, JobModel, ModeRun, Sample, model_job, sample_windows
from modalkit.batch.job import JobPlan
from modalkit.batch.planning import list_dataset, plan_chunks
from modalkit.batch.storage import default_store
from modalkit.iomodel import ByteRange, ChunkResult, ChunkSpec, JobSpec, StageSeconds

RECORD_BYTES = 100
RECORD_SECONDS = 0.01


def chunk(index: int, size: int) -> ChunkSpec:
    return ChunkSpec(job_id="j", index=index, uri=f"{index}.jsonl", key=f"{index}.jsonl", format="jsonl",
                     extent=ByteRange(), size=size)  # fmt: skip


def calibration(start_seconds: float = 1.5, load_seconds: float = 1.0) -> Calibration:
    """Two windows of 50 records (100 bytes each), each standing for half of a 400,000-byte input, 0.01 s a record
    run one after another, 80% of it in predict, one core busy while they ran."""
    results = [ChunkResult(index=i, records=50, succeeded=50, seconds=0.5,
                           stages=StageSeconds(parse=0.1, predict=0.4, device_busy=0.8)) for i in range(2)]  # fmt: skip
    return Calibration(
        sample=Sample([chunk(0, 50 * RECORD_BYTES), chunk(1, 50 * RECORD_BYTES)], [200_000.0, 200_000.0], False),
        sequential=ModeRun(results, cpu_seconds=1.0),
        overlapped=None,
        overlap=False,
        load_seconds=load_seconds,
        start_seconds=start_seconds,
        batch_size=64,
    )


def plan(chunks: int = 4, records_each: int = 1000) -> JobPlan:
    job = JobSpec(job_id="j", input_uri="in", output_uri="out", model_name="m")
    specs = [chunk(i, records_each * RECORD_BYTES) for i in range(chunks)]
    return JobPlan(job=job, chunks=specs, total_bytes=chunks * records_each * RECORD_BYTES)


def test_local_job_records_come_from_bytes_per_record_and_its_chunks_share_the_workers() -> None:
    found = model_job(plan(), calibration(), JobModel("local", workers=2, cores=8), 0.01, plan_seconds=0.5)

    assert found.records == 4000  # 400,000 bytes at the sample's 100 bytes a record
    # 4 chunks of 10 s on 2 workers: 20 s; the first worker starts (1.5 s) while the job is planned (0.5 s)
    assert found.seconds == pytest.approx(1.5 + 20.0)
    # the job holds its 2 workers' share of the machine throughout: cost = seconds x workers x rate
    assert found.billed_seconds == pytest.approx(2 * found.seconds)
    assert found.cost_usd == pytest.approx(found.billed_seconds * 0.01)
    assert found.cost_per_1000 == pytest.approx(found.cost_usd / 4000 * 1000)
    assert found.bottleneck is not None
    assert found.bottleneck.kind == "device"  # predict is 80% of a record
    assert json.loads(json.dumps(found.summary())).keys() == {
        "records", "seconds", "cost_usd", "cost_per_1000", "bottleneck", "sample_records",
    }  # fmt: skip


def test_local_workers_beyond_the_cores_go_no_faster_than_the_cores_and_the_jobs_own_process_counts() -> None:
    many = model_job(plan(), calibration(), JobModel("local", workers=8, cores=2), 0.0, plan_seconds=0.0)
    crowded = model_job(plan(), calibration(), JobModel("local", 8, 2, orchestrator_cpu_s=4.0), 0.0, 0.0)

    # 40 s of one core's work on 2 cores: 20 s, not the 10 s that 4 workers would take on 4 cores
    assert many.seconds == pytest.approx(1.5 + 20.0)
    assert crowded.seconds == pytest.approx(1.5 + (40.0 + 4.0) / 2)


def test_modal_containers_each_cold_start_load_and_are_billed_until_their_last_chunk() -> None:
    model = JobModel("modal", workers=3, cores=2, gpu="L4", cold_start_s=10.0)
    found = model_job(plan(), calibration(load_seconds=2.0), model, 0.001, plan_seconds=0.5)

    # largest first on 3 containers: one runs two chunks (20 s), two run one (10 s); each starts in 10 + 2 s
    assert found.seconds == pytest.approx(0.5 + 12.0 + 20.0)
    assert found.billed_seconds == pytest.approx((12 + 20) + (12 + 10) + (12 + 10))
    assert found.cost_usd == pytest.approx(found.billed_seconds * 0.001)


def write_files(folder: Path, files: int, lines: int) -> None:
    folder.mkdir()
    for f in range(files):
        rows = [json.dumps({"id": f * lines + i, "text": f"review {i:06d} of file {f}"}) for i in range(lines)]
        (folder / f"part-{f}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_the_sample_is_spread_over_the_inputs_files_in_windows_of_about_its_share(tmp_path: Path) -> None:
    write_files(tmp_path / "in", files=4, lines=2000)
    files = list_dataset(str(tmp_path / "in"))
    chunks = plan_chunks(files, 1 << 20)

    sample = sample_windows(files, chunks, 2000, split_csv=False, store=default_store())
    windows = sample.windows

    assert not sample.whole
    assert sample.shares == [sum(c.size for c in chunks) / 4] * 4  # each stands for a quarter of the input
    assert [w.key for w in windows] == [f"part-{f}.jsonl" for f in range(4)]  # one window in each quarter
    record_bytes = sum(f.size for f in files) / 8000
    assert sum(w.size for w in windows) == pytest.approx(2000 * record_bytes, rel=0.1)
    assert all(w.extent.start > 0 for w in windows if isinstance(w.extent, ByteRange))  # not only the heads


def test_an_input_no_larger_than_the_sample_is_sampled_whole(tmp_path: Path) -> None:
    write_files(tmp_path / "in", files=2, lines=400)
    files = list_dataset(str(tmp_path / "in"))
    chunks = plan_chunks(files, 1 << 20)

    sample = sample_windows(files, chunks, 1000, split_csv=False, store=default_store())

    assert sample.whole
    assert sample.windows == chunks


@pytest.mark.parametrize(("predict_cpu", "cpus", "overlap", "record_seconds", "probe_seconds"), [
    # the CPU idle through predict: 4 sub-batches of 64 one after another, then overlapped
    (0.04, None, True, 0.004, 4 * 64 * (0.01 - 0.004)),
    # the CPU busy, the worker's CPUs not known: 24 sub-batches each way, the slower way's 24 the cost
    (0.8, None, True, 0.004, 24 * 64 * (0.01 - 0.004)),
    # the CPU busy and the worker has one: 4 sub-batches one after another, then the rest the same way (no cost)
    (0.8, 1.0, False, 0.01, 0.0),
])  # fmt: skip
def test_a_workers_first_chunk_pays_four_sub_batches_alone_when_predict_waits_or_fills_the_cpus_else_both_ways(
    predict_cpu: float, cpus: float | None, overlap: bool, record_seconds: float, probe_seconds: float
) -> None:
    results = [ChunkResult(index=i, records=50, succeeded=50, seconds=0.5,
                           stages=StageSeconds(parse=0.1, predict=0.4, device_busy=0.8)) for i in range(2)]  # fmt: skip
    faster = [r.model_copy(update={"seconds": 0.4}) for r in results]  # overlapped: 1.25x
    cal = calibration().__class__(**{
        **calibration().__dict__,
        "sequential": ModeRun(results, cpu_seconds=1.0, predict_cpu=predict_cpu),
        "overlapped": ModeRun(faster, cpu_seconds=1.0, busiest_seconds=0.4),
        "overlap": overlap,
        "cpus": cpus,
    })  # fmt: skip

    found = model_job(plan(chunks=1, records_each=4000), cal, JobModel("local", 1, cores=8), 0.0, plan_seconds=0.0)

    assert (cal.waits, cal.busy_cpus) == (predict_cpu == 0.04, cpus is not None)
    # 4,000 records at the chosen way's seconds a record (overlapped: the busiest thread's 0.4 s over 100 records;
    # one after another: 1.0 s over 100) after a start of 1.5 s
    assert found.seconds == pytest.approx(1.5 + 4000 * record_seconds + probe_seconds)
