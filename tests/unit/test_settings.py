"""Settings: YAML layers, env and .env precedence, key-path errors, bounds, aliases and model entries.

Every test runs in its own empty working directory with no MODALKIT_ variables (see conftest's autouse fixture).
"""

from __future__ import annotations

import concurrent.futures
import re
import textwrap
import threading
from pathlib import Path

import pytest
from pydantic import SecretStr

from modalkit.exceptions import ConfigError
from modalkit.settings import Settings

MAX_BATCH_ENV = "MODALKIT_APP_SETTINGS__BATCH_CONFIG__MAX_BATCH_SIZE"


def write(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


@pytest.fixture
def base_and_prod() -> tuple[Path, Path]:
    base = write(
        "base.yaml",
        """
        app_settings:
          app_prefix: shop
          batch_config:
            max_batch_size: 8
            wait_ms: 5
          build_config:
            apt_packages: [git, curl]
        model_settings:
          model_entries:
            reviews:
              pipeline: pkg.mod:Reviews
              threshold: 0.5
        """,
    )
    prod = write(
        "prod.yaml",
        """
        app_settings:
          batch_config:
            max_batch_size: 64
          build_config:
            apt_packages: [ffmpeg]
        model_settings:
          model_entries:
            reviews:
              threshold: 0.9
        """,
    )
    return base, prod


def assert_base_then_prod(settings: Settings) -> None:
    app = settings.app_settings
    assert app.batch_config.max_batch_size == 64  # prod.yaml, the later layer, wins
    assert app.batch_config.wait_ms == 5  # kept from base.yaml: nested mappings are merged key by key
    assert app.app_prefix == "shop"
    assert app.build_config.apt_packages == ["ffmpeg"]  # lists are replaced, not concatenated
    entry = settings.model_settings.model_entries["reviews"]
    assert entry.pipeline == "pkg.mod:Reviews"
    assert entry.kwargs == {"threshold": 0.9}


# --- where the YAML comes from ---------------------------------------------------------------------------


def test_no_config_file_needed_and_defaults_apply() -> None:
    settings = Settings()

    assert settings.config_files == ()
    assert settings.app_settings.batch_config.max_batch_size == 256
    assert settings.app_settings.job_config.chunk_size == 32 * 1024 * 1024
    assert settings.model_settings.model_entries == {}


def test_modalkit_yaml_in_working_directory_is_read() -> None:
    write("modalkit.yaml", "app_settings:\n  batch_config:\n    max_batch_size: 12\n")

    settings = Settings()

    assert settings.app_settings.batch_config.max_batch_size == 12
    assert settings.config_files == (Path("modalkit.yaml"),)


def test_modalkit_config_layers_later_file_wins(
    base_and_prod: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODALKIT_CONFIG", "base.yaml,prod.yaml")

    settings = Settings()

    assert_base_then_prod(settings)
    assert settings.config_files == base_and_prod


def test_modalkit_config_replaces_working_directory_file(
    base_and_prod: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    write("modalkit.yaml", "app_settings:\n  app_prefix: from-cwd\n  batch_config:\n    wait_ms: 999\n")
    monkeypatch.setenv("MODALKIT_CONFIG", "base.yaml, prod.yaml")

    settings = Settings()

    assert settings.app_settings.app_prefix == "shop"
    assert settings.app_settings.batch_config.wait_ms == 5
    assert Path("modalkit.yaml") not in settings.config_files


@pytest.mark.parametrize(
    "config",
    [
        pytest.param("base.yaml,prod.yaml", id="comma-separated"),
        pytest.param([Path("base.yaml"), Path("prod.yaml")], id="list-of-paths"),
    ],
)
def test_load_reads_the_given_layers_instead_of_modalkit_config(
    config: str | list[Path], base_and_prod: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    write("other.yaml", "app_settings:\n  app_prefix: other\n")
    monkeypatch.setenv("MODALKIT_CONFIG", "other.yaml")

    settings = Settings.load(config)

    assert_base_then_prod(settings)
    assert settings.config_files == base_and_prod


def test_loads_in_parallel_threads_each_read_their_own_files_and_blame_their_own_file() -> None:
    layers = {n: write(f"team{n}.yaml", f"app_settings:\n  batch_config:\n    max_batch_size: {n}\n") for n in (1, 2)}
    typos = {n: write(f"typo{n}.yaml", f"app_settings:\n  batch_config:\n    wait_mss: {n}\n") for n in (1, 2)}
    start = threading.Barrier(2)

    def load_many(n: int) -> tuple[set[object], set[str]]:
        start.wait()
        sizes: set[object] = set()
        errors: set[str] = set()
        for _ in range(25):
            settings = Settings.load(layers[n])
            sizes.add((settings.app_settings.batch_config.max_batch_size, settings.config_files))
            with pytest.raises(ConfigError) as refused:
                Settings.load([layers[n], typos[n]])
            errors.add(str(refused.value))
        return sizes, errors

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = dict(zip((1, 2), pool.map(load_many, (1, 2)), strict=True))

    for n in (1, 2):
        assert results[n] == (
            {(n, (layers[n],))},
            {
                "invalid modalkit settings: app_settings.batch_config.wait_mss: unknown key; did you mean 'wait_ms'? "
                f"(in typo{n}.yaml)"
            },
        )


def test_empty_yaml_file_means_defaults() -> None:
    write("empty.yaml", "# nothing set yet\n")

    settings = Settings.load("empty.yaml")

    assert settings.app_settings.batch_config.max_batch_size == 256
    assert settings.config_files == (Path("empty.yaml"),)


# --- precedence: init kwargs > env > .env > YAML ----------------------------------------------------------


def test_env_var_beats_yaml_and_keeps_the_other_yaml_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    write("modalkit.yaml", "app_settings:\n  batch_config:\n    max_batch_size: 8\n    wait_ms: 5\n")
    monkeypatch.setenv(MAX_BATCH_ENV, "128")

    batch = Settings().app_settings.batch_config

    assert batch.max_batch_size == 128
    assert batch.wait_ms == 5


def test_dotenv_in_working_directory_is_read() -> None:
    write(".env", f"{MAX_BATCH_ENV}=48\nMODALKIT_APP_SETTINGS__APP_PREFIX=from-dotenv\n")

    settings = Settings()

    assert settings.app_settings.batch_config.max_batch_size == 48
    assert settings.app_settings.app_prefix == "from-dotenv"


def test_sources_precedence_is_init_then_env_then_dotenv_then_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    # each field is set by every source up to the one that must win
    write(
        ".env",
        f"""
        {MAX_BATCH_ENV}=1
        MODALKIT_APP_SETTINGS__BATCH_CONFIG__WAIT_MS=1
        MODALKIT_APP_SETTINGS__DEPLOYMENT_CONFIG__TIMEOUT=1
        MODALKIT_APP_SETTINGS__APP_PREFIX=dotenv
        """,
    )
    write(
        "modalkit.yaml",
        """
        app_settings:
          batch_config:
            max_batch_size: 2
            wait_ms: 2
          deployment_config:
            timeout: 2
        """,
    )
    monkeypatch.setenv(MAX_BATCH_ENV, "3")
    monkeypatch.setenv("MODALKIT_APP_SETTINGS__BATCH_CONFIG__WAIT_MS", "3")

    settings = Settings.load(data={"app_settings": {"batch_config": {"max_batch_size": 4}}})

    app = settings.app_settings
    assert app.batch_config.max_batch_size == 4  # init kwargs beat env, .env and YAML
    assert app.batch_config.wait_ms == 3  # env beats .env and YAML
    assert app.deployment_config.timeout == 1  # .env beats YAML
    assert app.app_prefix == "dotenv"  # .env beats the defaults


def test_dotenv_takes_effect_beside_the_shipped_yaml_that_sets_every_key() -> None:
    shipped = Path(__file__).resolve().parents[2] / "modalkit.yaml"
    write("modalkit.yaml", shipped.read_text(encoding="utf-8"))
    write(".env", f"{MAX_BATCH_ENV}=48\n")

    assert Settings().app_settings.batch_config.max_batch_size == 48


def test_a_typo_in_dotenv_is_blamed_on_dotenv_not_on_the_yaml() -> None:
    write("modalkit.yaml", "app_settings:\n  batch_config:\n    max_batch_size: 8\n")
    write(".env", "MODALKIT_APP_SETTINGS__BATCH_CONFIG__MAX_BATCH_SISE=7\n")

    with pytest.raises(ConfigError, match=r"max_batch_sise: unknown key; did you mean 'max_batch_size'\? \(in \.env\)"):
        Settings()


def test_a_bad_default_model_in_a_users_layer_is_blamed_on_that_layer() -> None:
    shipped = Path(__file__).resolve().parents[2] / "modalkit.yaml"
    write("modalkit.yaml", shipped.read_text(encoding="utf-8"))
    write("prod.yaml", "model_settings:\n  default_model: nowhere\n")

    with pytest.raises(
        ConfigError, match=r"model_settings.default_model: .*'nowhere' is not one of model_entries .*in prod\.yaml\)"
    ):
        Settings.load("modalkit.yaml,prod.yaml")


def test_init_kwargs_merge_with_the_other_sources() -> None:
    write("modalkit.yaml", "app_settings:\n  app_prefix: from-yaml\n  batch_config:\n    wait_ms: 7\n")

    settings = Settings(app_settings={"batch_config": {"max_batch_size": 3}})

    assert settings.app_settings.batch_config.max_batch_size == 3
    assert settings.app_settings.batch_config.wait_ms == 7
    assert settings.app_settings.app_prefix == "from-yaml"


def test_dotenv_may_hold_modalkit_variables_that_are_not_settings() -> None:
    write(".env", "MODALKIT_APP_POSTFIX=-prod\nMODALKIT_CONFIG=nowhere.yaml\nUNRELATED=1\n")

    assert Settings().app_settings.batch_config.max_batch_size == 256


# --- errors name the key path and where it came from ------------------------------------------------------


def test_typo_in_yaml_names_full_key_path_file_and_suggestion(base_and_prod: tuple[Path, Path]) -> None:
    write("prod.yaml", "app_settings:\n  batch_config:\n    max_batch_sise: 16\n")

    with pytest.raises(ConfigError) as info:
        Settings.load("base.yaml,prod.yaml")

    message = str(info.value)
    assert "app_settings.batch_config.max_batch_sise" in message
    assert "prod.yaml" in message
    assert "base.yaml" not in message  # the typo is in the later layer only
    assert "did you mean 'max_batch_size'" in message


def test_a_single_bad_key_is_one_line_naming_the_key_the_file_and_the_suggestion() -> None:
    write("prod.yaml", "app_settings:\n  job_config:\n    chunk_sise: 1MiB\n")

    with pytest.raises(ConfigError) as info:
        Settings.load("prod.yaml")

    assert str(info.value) == (
        "invalid modalkit settings: app_settings.job_config.chunk_sise: unknown key; did you mean 'chunk_size'? "
        "(in prod.yaml)"
    )


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("chunk_size", "1", "too small; allowed: a size in bytes or with a unit (64KiB, 32MiB), 64KiB to 8GiB"),
        ("max_failure_rate", "2", "too large; allowed: a number from 0.0 to 1.0"),
        ("output_format", "csv", "not one of the choices; allowed: one of jsonl, parquet"),
    ],
)
def test_an_out_of_bounds_job_parameter_in_yaml_says_what_is_allowed_in_one_line(
    key: str, value: str, problem: str
) -> None:
    write("prod.yaml", f"app_settings:\n  job_config:\n    {key}: {value}\n")

    with pytest.raises(ConfigError) as info:
        Settings.load("prod.yaml")

    got = repr(int(value)) if value.isdigit() else repr(value)
    assert (
        str(info.value)
        == f"invalid modalkit settings: app_settings.job_config.{key}: {problem} (got {got}, in prod.yaml)"
    )


def test_typo_in_top_level_yaml_key_is_caught() -> None:
    write("modalkit.yaml", "app_setings:\n  app_prefix: x\n")

    with pytest.raises(
        ConfigError, match=r"app_setings: unknown key; did you mean 'app_settings'\? \(in modalkit.yaml\)"
    ):
        Settings()


def test_typo_in_env_var_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODALKIT_APP_SETTINGS__BATCH_CONFIG__MAX_BATCH_SISE", "16")

    with pytest.raises(ConfigError) as info:
        Settings()

    message = str(info.value)
    assert "app_settings.batch_config.max_batch_sise: unknown key" in message
    assert "environment variable MODALKIT_APP_SETTINGS__BATCH_CONFIG__MAX_BATCH_SISE" in message


def test_out_of_bounds_value_in_yaml_names_key_value_and_file() -> None:
    write("prod.yaml", "app_settings:\n  batch_config:\n    max_batch_size: 0\n")

    with pytest.raises(ConfigError) as info:
        Settings.load("prod.yaml")

    message = str(info.value)
    assert "app_settings.batch_config.max_batch_size" in message
    assert "got 0" in message
    assert "prod.yaml" in message


def test_out_of_bounds_value_in_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    write("modalkit.yaml", "app_settings:\n  batch_config:\n    max_batch_size: 8\n")
    monkeypatch.setenv(MAX_BATCH_ENV, "5000")

    with pytest.raises(ConfigError, match=f"environment variable {MAX_BATCH_ENV}"):
        Settings()


def test_every_bad_key_is_reported_at_once() -> None:
    write("modalkit.yaml", "app_settings:\n  batch_config:\n    max_batch_size: 0\n    wait_ms: -5\n")

    with pytest.raises(ConfigError) as info:
        Settings()

    message = str(info.value)
    assert "2 errors" in message
    assert "app_settings.batch_config.max_batch_size" in message
    assert "app_settings.batch_config.wait_ms" in message


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("batch_config", "max_batch_size", 0),
        ("batch_config", "max_batch_size", 1001),
        ("batch_config", "wait_ms", -1),
        ("deployment_config", "scaledown_window", 1),
        ("job_config", "chunk_size", "1KiB"),
        ("job_config", "max_failure_rate", 1.5),
        ("job_config", "output_format", "csv"),
    ],
)
def test_values_out_of_bounds_are_rejected(section: str, key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"app_settings\.{section}\.{key}:"):
        Settings.load(data={"app_settings": {section: {key: value}}})


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("batch_config", "max_batch_size", 1),
        ("batch_config", "max_batch_size", 1000),
        ("batch_config", "wait_ms", 0),
        ("deployment_config", "scaledown_window", 2),
        ("job_config", "max_failure_rate", 1.0),
    ],
)
def test_values_at_the_bounds_are_accepted(section: str, key: str, value: object) -> None:
    settings = Settings.load(data={"app_settings": {section: {key: value}}})

    assert getattr(getattr(settings.app_settings, section), key) == value


def test_chunk_size_accepts_units() -> None:
    write("modalkit.yaml", "app_settings:\n  job_config:\n    chunk_size: 64MiB\n")

    assert Settings().app_settings.job_config.chunk_size == 67_108_864


def test_min_containers_above_max_containers_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"min_containers \(5\) is greater than max_containers \(2\)"):
        Settings.load(data={"app_settings": {"deployment_config": {"min_containers": 5, "max_containers": 2}}})


# --- files -------------------------------------------------------------------------------------------------


def test_missing_file_in_modalkit_config_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    write("base.yaml", "app_settings:\n  app_prefix: shop\n")
    monkeypatch.setenv("MODALKIT_CONFIG", "base.yaml,configs/prod.yaml")

    with pytest.raises(ConfigError, match=r"configs/prod\.yaml"):
        Settings()


def test_missing_file_given_to_load_is_named() -> None:
    with pytest.raises(ConfigError, match=r"staging\.yaml.*does not exist"):
        Settings.load("staging.yaml")


def test_invalid_yaml_names_file_and_line() -> None:
    write(
        "broken.yaml",
        """
        app_settings:
          batch_config:
            max_batch_size: [1
            wait_ms: 3
        """,
    )

    with pytest.raises(ConfigError) as info:
        Settings.load("broken.yaml")

    message = str(info.value)
    assert "broken.yaml" in message
    assert "line 4" in message


def test_yaml_whose_top_level_is_not_a_mapping_is_rejected() -> None:
    write("list.yaml", "- app_settings\n- model_settings\n")

    with pytest.raises(ConfigError, match=r"list\.yaml.*mapping"):
        Settings.load("list.yaml")


# --- compatibility with the original modalkit's keys -------------------------------------------------------


def test_original_modalkit_key_aliases_are_accepted() -> None:
    write(
        "modalkit.yaml",
        """
        app_settings:
          deployment_config:
            concurrency_limit: 5
            container_idle_timeout: 30
            allow_concurrent_inputs: 4
            retries: 3
          build_config:
            extra_run_commands: "echo hello"
        """,
    )

    app = Settings().app_settings

    deployment = app.deployment_config
    assert deployment.max_containers == 5
    assert deployment.scaledown_window == 30
    assert deployment.max_concurrent_inputs == 4
    assert deployment.retries.max_retries == 3
    assert app.build_config.extra_run_commands == ["echo hello"]


def test_aliases_are_bounded_like_the_fields_they_name() -> None:
    with pytest.raises(ConfigError, match="container_idle_timeout"):
        Settings.load(data={"app_settings": {"deployment_config": {"container_idle_timeout": 1}}})


DEPLOYMENT = "app_settings:\n  deployment_config:\n"


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        pytest.param("concurrency_limit: 3", "concurrency_limit: 5", 5, id="old-name-in-both-layers"),
        pytest.param("concurrency_limit: 3", "max_containers: 7", 7, id="old-then-new"),
        pytest.param("max_containers: 7", "concurrency_limit: 3", 3, id="new-then-old"),
        pytest.param("concurrency_limit: 3", "gpu: T4", 3, id="old-name-kept-under-a-later-layer"),
    ],
)
def test_original_key_names_in_every_layer_merge_with_the_new_names(first: str, second: str, expected: int) -> None:
    write("a.yaml", f"{DEPLOYMENT}    {first}\n    container_idle_timeout: 60\n")
    write("b.yaml", f"{DEPLOYMENT}    {second}\n")

    deployment = Settings.load("a.yaml,b.yaml").app_settings.deployment_config

    assert deployment.max_containers == expected
    assert deployment.scaledown_window == 60


def test_an_original_key_name_in_the_environment_beats_the_new_name_in_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    write("modalkit.yaml", f"{DEPLOYMENT}    max_containers: 7\n    allow_concurrent_inputs_handler: 5\n")
    monkeypatch.setenv("MODALKIT_APP_SETTINGS__DEPLOYMENT_CONFIG__CONCURRENCY_LIMIT", "4")
    monkeypatch.setenv("MODALKIT_APP_SETTINGS__DEPLOYMENT_CONFIG__HANDLER_MAX_CONCURRENT_INPUTS", "9")

    deployment = Settings().app_settings.deployment_config

    assert (deployment.max_containers, deployment.handler_max_concurrent_inputs) == (4, 9)


def test_a_key_and_its_original_name_in_one_file_is_an_error_naming_both_and_the_file() -> None:
    write("a.yaml", f"{DEPLOYMENT}    max_containers: 7\n    concurrency_limit: 3\n")

    with pytest.raises(ConfigError, match=r"deployment_config\.max_containers and .*concurrency_limit .*a\.yaml"):
        Settings.load("a.yaml")


def test_the_original_field_names_are_readable_on_the_config_objects() -> None:
    from modalkit.settings import DeploymentConfig

    deployment = DeploymentConfig(concurrency_limit=3, container_idle_timeout=45, allow_concurrent_inputs=2,
                                  allow_concurrent_inputs_handler=20)  # fmt: skip

    assert (deployment.max_containers, deployment.concurrency_limit) == (3, 3)
    assert (deployment.scaledown_window, deployment.container_idle_timeout) == (45, 45)
    assert (deployment.max_concurrent_inputs, deployment.allow_concurrent_inputs) == (2, 2)
    assert (deployment.handler_max_concurrent_inputs, deployment.allow_concurrent_inputs_handler) == (20, 20)


def test_volumes_may_be_none_or_a_list_of_volume_models_as_in_the_original() -> None:
    from modalkit.settings import DeploymentConfig, Volume

    assert DeploymentConfig(volumes=None).volumes == {}
    listed = DeploymentConfig(volumes=[Volume(mount_point="/models", volume_name="weights"),
                                       {"mount_point": "/data", "volume_name": "data"}])  # fmt: skip
    assert listed.volumes == {"/models": "weights", "/data": "data"}
    write("modalkit.yaml", f"{DEPLOYMENT}    volumes: null\n")
    assert Settings().app_settings.deployment_config.volumes == {}


# --- model entries -----------------------------------------------------------------------------------------


def test_model_entry_names_its_pipeline_and_passes_other_keys_as_kwargs() -> None:
    write(
        "modalkit.yaml",
        """
        model_settings:
          model_entries:
            reviews:
              pipeline: "shop.models.reviews:ReviewClassifier"
              threshold: 0.7
              labels: [bad, good]
        """,
    )

    entry = Settings().model_settings.model_entries["reviews"]

    assert entry.pipeline == "shop.models.reviews:ReviewClassifier"
    assert entry.kwargs == {"threshold": 0.7, "labels": ["bad", "good"]}


def test_model_entry_without_pipeline_is_valid() -> None:
    write("modalkit.yaml", "model_settings:\n  model_entries:\n    reviews:\n")

    name, entry = Settings().model_settings.entry("reviews")

    assert name == "reviews"
    assert entry.pipeline is None
    assert entry.kwargs == {}


@pytest.mark.parametrize("pipeline", ["shop.models.ReviewClassifier", "shop models:Cls", "shop.models:", ":Cls"])
def test_invalid_pipeline_import_path_is_rejected(pipeline: str) -> None:
    with pytest.raises(ConfigError, match=r"model_settings\.model_entries\.reviews\.pipeline.*package\.module:Class"):
        Settings.load(data={"model_settings": {"model_entries": {"reviews": {"pipeline": pipeline}}}})


def entries(*names: str, default: str | None = None) -> Settings:
    model_settings: dict[str, object] = {"model_entries": {n: {"pipeline": f"pkg.mod:{n.title()}"} for n in names}}
    if default is not None:
        model_settings["default_model"] = default
    return Settings.load(data={"model_settings": model_settings})


def test_entry_without_name_is_the_only_model() -> None:
    name, entry = entries("reviews").model_settings.entry()

    assert name == "reviews"
    assert entry.pipeline == "pkg.mod:Reviews"


def test_entry_without_name_is_the_default_model() -> None:
    name, _ = entries("reviews", "spam", default="spam").model_settings.entry()

    assert name == "spam"


def test_entry_without_name_and_no_default_lists_known_models() -> None:
    with pytest.raises(ConfigError, match=r"default_model.*reviews, spam"):
        entries("spam", "reviews").model_settings.entry()


def test_entry_with_unknown_name_lists_known_models() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'revews'.*reviews, spam"):
        entries("spam", "reviews").model_settings.entry("revews")


def test_entry_with_no_models_configured_says_so_and_names_the_files_looked_for(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no model is configured") as none_read:
        Settings().model_settings.entry()
    assert f"{tmp_path / 'modalkit.yaml'} does not exist" in str(none_read.value)
    assert "MODALKIT_CONFIG is not set" in str(none_read.value)
    empty = tmp_path / "empty.yaml"
    empty.write_text("app_settings: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"model_settings.model_entries is empty in {re.escape(str(empty))}"):
        Settings.load(empty).model_settings.entry()


def test_default_model_must_be_a_model_entry() -> None:
    with pytest.raises(
        ConfigError, match=r"model_settings.default_model: Value error, 'spam' is not one of model_entries"
    ):
        entries("reviews", default="spam")


# --- auth --------------------------------------------------------------------------------------------------


def test_api_key_and_ssm_key_together_are_rejected_without_showing_the_key() -> None:
    auth = {"api_key": "sk-live-123456", "ssm_key": "/prod/api-key"}

    with pytest.raises(ConfigError) as info:
        Settings.load(data={"app_settings": {"auth_config": auth}})

    message = str(info.value)
    assert "app_settings.auth_config" in message
    assert "either api_key or ssm_key" in message
    assert "sk-live-123456" not in message


def test_api_key_and_ssm_key_together_from_env_names_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODALKIT_APP_SETTINGS__AUTH_CONFIG__API_KEY", "sk-live-123456")
    monkeypatch.setenv("MODALKIT_APP_SETTINGS__AUTH_CONFIG__SSM_KEY", "/prod/api-key")

    with pytest.raises(ConfigError) as info:
        Settings()

    message = str(info.value)
    assert "MODALKIT_APP_SETTINGS__AUTH_CONFIG__API_KEY" in message
    assert "MODALKIT_APP_SETTINGS__AUTH_CONFIG__SSM_KEY" in message
    assert "sk-live-123456" not in message


def test_invalid_api_key_value_is_not_shown_in_the_error() -> None:
    write("modalkit.yaml", "app_settings:\n  auth_config:\n    api_key: [sk-live-123456]\n")

    with pytest.raises(ConfigError, match=r"app_settings\.auth_config\.api_key") as info:
        Settings()

    assert "sk-live-123456" not in str(info.value)


def test_api_key_is_a_secret_that_is_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODALKIT_APP_SETTINGS__AUTH_CONFIG__API_KEY", "sk-live-123456")

    settings = Settings()

    api_key = settings.app_settings.auth_config.api_key
    assert isinstance(api_key, SecretStr)
    assert api_key.get_secret_value() == "sk-live-123456"
    assert "sk-live-123456" not in repr(settings)
    assert "sk-live-123456" not in str(settings)
    assert "sk-live-123456" not in settings.model_dump_json()


# --- one default per setting: the code's and the shipped modalkit.yaml's agree -----------------------------

REPO_YAML = Path(__file__).resolve().parents[2] / "modalkit.yaml"
# what the shipped file sets on purpose: the example's own name and model, not defaults
EXAMPLE_KEYS = {
    ("app_settings", "app_prefix"),
    ("model_settings", "default_model"),
    ("model_settings", "model_entries"),
}


def _leaves(data: object, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    if isinstance(data, dict) and data and path not in EXAMPLE_KEYS:
        return {k: v for key, value in data.items() for k, v in _leaves(value, (*path, str(key))).items()}
    return {path: data}


def test_the_shipped_modalkit_yaml_gives_every_setting_its_code_default() -> None:
    import yaml

    shipped = yaml.safe_load(REPO_YAML.read_text(encoding="utf-8"))
    from_file = Settings.load(REPO_YAML).model_dump(mode="json")
    defaults = Settings().model_dump(mode="json")

    differ = {
        ".".join(path): (_at(from_file, path), _at(defaults, path))
        for path in _leaves(shipped)
        if path not in EXAMPLE_KEYS and _at(from_file, path) != _at(defaults, path)
    }
    assert differ == {}  # (shipped value, code default) of each key that disagrees


def _at(data: object, path: tuple[str, ...]) -> object:
    for part in path:
        data = data[part] if isinstance(data, dict) else None
    return data
