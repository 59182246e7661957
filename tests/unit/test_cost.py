"""The price table: Modal's published rates by default, a deployment's own prices, local runs free unless priced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from batch_support import write_config

from modalkit.batch.cost import Rate, rate_for
from modalkit.batch.efficiency import job_cost
from modalkit.batch.job import plan_job, resolve_job_config
from modalkit.exceptions import ConfigError
from modalkit.iomodel import ChunkResult, StageSeconds
from modalkit.settings import Settings


def settings(**app: object) -> Settings:
    return Settings.load(data={"app_settings": app})


@pytest.mark.parametrize(
    ("gpu", "per_hour"),
    [("H100", 3.9492), ("A100-80GB", 2.4984), ("L40S", 1.9512), ("L4", 0.7992), ("T4", 0.5904)],
)
def test_a_modal_gpu_container_costs_modals_published_gpu_rate_plus_its_default_cpu_and_memory(
    gpu: str, per_hour: float
) -> None:
    rate = rate_for(settings(deployment_config={"gpu": gpu}), "modal")
    # Modal reserves 0.125 cores and 128 MiB for a container that asks for none, and bills them
    expected = per_hour + 0.125 * 0.04716 + 0.125 * 0.007992
    assert rate.usd_per_second * 3600 == pytest.approx(expected)
    assert (rate.gpu, rate.cpu, rate.memory_gib) == (gpu, 0.125, 0.125)
    assert "modal.com/pricing" in rate.source
    assert "2026" in rate.source


def test_a_container_prices_each_gpu_of_a_count_and_its_reserved_cores_and_memory() -> None:
    rate = rate_for(settings(deployment_config={"gpu": "L4:2", "cpu": 8, "memory": 32768}), "modal")
    assert rate.usd_per_hour == pytest.approx(2 * 0.7992 + 8 * 0.04716 + 32 * 0.007992)
    assert (rate.gpu, rate.cpu, rate.memory_gib) == ("L4:2", 8, 32)


def test_the_gpu_argument_replaces_the_configured_type_and_modals_spellings_are_priced() -> None:
    s = settings(deployment_config={"gpu": "T4"})
    assert rate_for(s, "modal", gpu="h100!").gpu == "h100!"
    h100 = rate_for(s, "modal", gpu="H100").usd_per_hour
    assert rate_for(s, "modal", gpu="h100!").usd_per_hour == pytest.approx(h100)
    assert rate_for(s, "modal", gpu="A100").usd_per_hour < rate_for(s, "modal", gpu="A100-80GB").usd_per_hour


def test_a_cpu_only_container_costs_its_cores_and_memory() -> None:
    rate = rate_for(settings(deployment_config={"cpu": 2, "memory": 4096}), "modal")
    assert rate.gpu is None
    assert rate.usd_per_hour == pytest.approx(2 * 0.04716 + 4 * 0.007992)


def test_a_layer_that_prices_one_gpu_type_keeps_the_published_rates_of_the_others() -> None:
    s = settings(
        deployment_config={"gpu": "H100"},
        pricing={"gpu_usd_per_hour": {"h100": 2.0, "MI300X": 3.0}, "cpu_core_usd_per_hour": 0, "source": "our deal"},
    )
    assert rate_for(s, "modal").usd_per_hour == pytest.approx(2.0 + 0.125 * 0.007992)
    assert rate_for(s, "modal", gpu="MI300X").usd_per_hour == pytest.approx(3.0 + 0.125 * 0.007992)
    assert rate_for(s, "modal", gpu="T4").usd_per_hour == pytest.approx(0.5904 + 0.125 * 0.007992)
    assert rate_for(s, "modal").source == "our deal"


def test_a_deployment_with_its_own_price_per_container_hour_is_priced_at_it() -> None:
    s = settings(deployment_config={"gpu": "H100", "usd_per_hour": 3.0})
    assert rate_for(s, "modal").usd_per_hour == pytest.approx(3.0)
    assert "deployment_config.usd_per_hour" in rate_for(s, "modal").source
    # another GPU type is not what that price was agreed for: the table prices it
    assert rate_for(s, "modal", gpu="T4").usd_per_hour == pytest.approx(0.5904 + 0.125 * (0.04716 + 0.007992))


def test_an_unknown_gpu_type_fails_in_one_line_naming_the_key_and_the_known_types() -> None:
    with pytest.raises(ConfigError) as error:
        rate_for(settings(deployment_config={"gpu": "H1000"}), "modal")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("app_settings.deployment_config.gpu: unknown GPU type 'H1000'")
    assert "app_settings.pricing.gpu_usd_per_hour" in message
    assert "A100-80GB" in message
    assert "T4" in message
    with pytest.raises(ConfigError, match=r"^gpu: unknown GPU type 'X9'"):
        rate_for(settings(), "modal", gpu="X9")


def test_local_workers_cost_nothing_unless_the_machine_is_priced_and_then_each_its_share() -> None:
    assert rate_for(settings(), "local").usd_per_second == 0.0
    s = settings(pricing={"local_usd_per_hour": 1.2}, job_config={"local_workers": 4})
    rate = rate_for(s, "local")
    assert rate.usd_per_hour == pytest.approx(0.3)
    assert rate.gpu is None
    assert "local_usd_per_hour" in rate.source


def test_a_negative_price_is_refused_naming_its_key() -> None:
    with pytest.raises(ConfigError, match=r"app_settings\.pricing\.gpu_usd_per_hour\.T4"):
        settings(pricing={"gpu_usd_per_hour": {"T4": -1}})


# --- a job's cost, from its chunks --------------------------------------------------------------------------------


def chunk(index: int, worker: str, started_at: float, seconds: float, predict: float, **extra: Any) -> ChunkResult:
    return ChunkResult(index=index, records=100, succeeded=90, failed=10, worker=worker, started_at=started_at,
                       seconds=seconds, stages=StageSeconds(predict=predict), **extra)  # fmt: skip


def test_container_seconds_are_the_chunk_walls_plus_start_up_gaps_and_the_tail_until_the_job_ended() -> None:
    results = [
        chunk(0, "a", 110.0, 10.0, 6.0, cold_start_seconds=2.0, model_load_seconds=5.0, ready_at=107.0,
              batches=4, batched_records=100),
        chunk(1, "a", 121.0, 10.0, 7.0, batches=4, batched_records=100),  # 1 s after chunk 0 ended
        chunk(2, "b", 111.0, 5.0, 5.0, model_load_seconds=1.0, ready_at=111.0, batches=2, batched_records=100),
    ]  # fmt: skip
    rate = Rate(0.01, None, 1, 1, "test")

    bill = job_cost(results, rate, ended_at=135.0, max_batch_size=64)

    assert bill.idle == {
        "cold_start": 2.0, "model_load": 6.0, "host_wait": 7.0,  # (10 - 6) + (10 - 7) + (5 - 5)
        "between_chunks": 4.0,  # a: ready at 107, first chunk at 110; then 1 s between its chunks
        "after_last": 4.0 + 19.0,  # a ended 131, b ended 116; the job at 135
    }  # fmt: skip
    assert bill.device_seconds == pytest.approx(18.0)
    assert bill.container_seconds == pytest.approx(25.0 + 2.0 + 6.0 + 4.0 + 23.0)  # walls + what it states
    fields = bill.summary_fields()
    assert fields["cost_usd"] == pytest.approx(60.0 * 0.01)
    assert fields["cost_per_1000"] == pytest.approx(0.6 / 300 * 1000)
    assert fields["cost_per_1000_succeeded"] == pytest.approx(0.6 / 270 * 1000)
    assert fields["cost_failed_usd"] == pytest.approx(0.6 * 30 / 300)
    assert fields["mean_batch_size"] == pytest.approx(300 / 10)
    assert fields["records_per_device_second"] == pytest.approx(300 / 18.0, abs=0.1)
    note = fields["cost_note"]
    assert "; 38% went to workers idle after their last chunk, until the job ended: smaller chunks" in note
    assert "batches averaged 30 records of max_batch_size 64" in fields["cost_note"]


def test_a_modal_container_is_billed_its_scaledown_window_after_its_last_chunk_not_until_the_job_ends() -> None:
    s = settings(deployment_config={"gpu": "L4", "scaledown_window": 60})
    rate = rate_for(s, "modal")
    bill = job_cost([chunk(0, "ta-1", 10.0, 5.0, 4.0), chunk(1, "ta-2", 10.0, 5.0, 4.0)], rate, ended_at=1000.0,
                    max_batch_size=8)  # fmt: skip
    assert bill.idle["after_last"] == 120.0
    assert bill.cost_usd == pytest.approx(130.0 * rate.usd_per_second)


def test_an_earlier_runs_chunks_count_their_walls_and_start_up_and_untimed_chunks_their_walls_only() -> None:
    earlier = chunk(0, "old", 10.0, 4.0, 3.0, skipped=True, model_load_seconds=2.0, ready_at=5.0)
    untimed = ChunkResult(index=1, records=10, succeeded=10, worker="new", started_at=100.0, seconds=6.0)
    bill = job_cost([earlier, untimed], Rate(1.0, None, 1, 1, "t"), ended_at=106.0, max_batch_size=8)
    assert bill.idle == {"cold_start": 0.0, "model_load": 2.0, "host_wait": 1.0, "between_chunks": 0.0,
                         "after_last": 0.0}  # fmt: skip
    assert bill.device_seconds == 3.0
    assert bill.container_seconds == pytest.approx(4.0 + 2.0 + 6.0)


def test_the_note_advises_modal_settings_for_modal_containers_and_local_ones_for_local_workers() -> None:
    started = chunk(0, "w", 10.0, 1.0, 0.5, cold_start_seconds=30.0, ready_at=10.0)
    local = job_cost([started], Rate(1.0, None, 1, 1, "t"), ended_at=11.0, max_batch_size=8).note()
    modal = job_cost([started], Rate(1.0, None, 1, 1, "t"), ended_at=11.0, max_batch_size=8, backend="modal").note()
    assert "job_config.local_workers" in str(local)
    assert "min_containers" not in str(local)
    assert "deployment_config.min_containers" in str(modal)


def test_a_modal_job_on_a_gpu_type_the_price_table_does_not_know_fails_at_planning_naming_the_key(
    tmp_path: Path,
) -> None:
    settings = Settings.load(str(write_config(tmp_path, deployment_config={"gpu": "H1000"})))
    config = resolve_job_config(settings, backend="modal")
    with pytest.raises(ConfigError, match=r"^app_settings\.deployment_config\.gpu: unknown GPU type 'H1000'"):
        plan_job(settings, "s3://in/x", "s3://out/y", None, config)
