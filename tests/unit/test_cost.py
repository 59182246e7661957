"""The price table: Modal's published rates by default, a deployment's own prices, local runs free unless priced."""

from __future__ import annotations

import pytest

from modalkit.batch.cost import rate_for
from modalkit.exceptions import ConfigError
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
