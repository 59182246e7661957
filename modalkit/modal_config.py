"""ModalConfig: turns settings into Modal objects and decorator arguments (Modal 1.x names).

Nothing here talks to Modal's servers: images, volumes, secrets and bucket mounts are lazy Modal objects that
resolve when the app is deployed or run. Build the app the usual way:

Example:
    >>> import modal
    >>> from modalkit.modal_config import ModalConfig
    >>> from modalkit.settings import Settings
    >>> modal_config = ModalConfig(Settings.load(data={"app_settings": {"app_prefix": "demo"}}))
    >>> app = modal.App(name=modal_config.app_name)
    >>> sorted(modal_config.get_batched_method_settings())
    ['max_batch_size', 'wait_ms']
"""

from __future__ import annotations

import logging
import os
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from modalkit.exceptions import ConfigError
from modalkit.pipeline_modules import find_top_level, not_found_message
from modalkit.settings import AppSettings, ModelSettings, MountType, Settings

if TYPE_CHECKING:
    import modal

__all__ = ["CONTAINER_REQUIREMENTS", "ModalConfig", "VolumeReloader"]

log = logging.getLogger(__name__)

#: What modalkit needs inside a container (the model side: no Prefect, no CLI). Kept in step with pyproject.toml.
CONTAINER_REQUIREMENTS = (
    "pydantic>=2.9",
    "pydantic-settings>=2.7",
    "pyyaml>=6.0",
    "fsspec>=2024.10",
    "s3fs>=2024.10",
    "boto3>=1.35",
    "pyarrow>=17",
    "numpy>=1.26",
    "orjson>=3.10",
    "fastapi>=0.115",
)
#: Where the settings files go inside the container; MODALKIT_CONFIG points there.
REMOTE_CONFIG_DIR = "/opt/modalkit/config"
#: Modules of the modalkit package that belong to the CLI, never to a container: left out of images.
CLI_ONLY_MODULES = frozenset({"cli_prefect.py"})


class ModalConfig:
    """Modal settings for an app, built from :class:`~modalkit.settings.Settings`.

    Args:
        settings: Loaded settings; None loads them the usual way (``MODALKIT_CONFIG`` or ``./modalkit.yaml``,
            the environment, ``.env``) at construction, not at import.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = Settings() if settings is None else settings  # Settings(): Settings.load()'s sources
        self._volumes: dict[str, modal.Volume] | None = None

    # --- names ---------------------------------------------------------------------------------------------

    @property
    def app_settings(self) -> AppSettings:
        """The application settings."""
        return self.settings.app_settings

    @property
    def model_settings(self) -> ModelSettings:
        """The model settings."""
        return self.settings.model_settings

    @property
    def app_postfix(self) -> str:
        """``MODALKIT_APP_POSTFIX`` from the environment, default ``-dev``."""
        return os.getenv("MODALKIT_APP_POSTFIX", "-dev")

    @property
    def app_name(self) -> str:
        """The Modal app name: ``app_prefix`` + postfix."""
        return self.app_settings.app_prefix + self.app_postfix

    @property
    def region(self) -> str | list[str] | None:
        """Modal region(s) to run in."""
        return self.app_settings.deployment_config.region

    # --- storage -------------------------------------------------------------------------------------------

    @property
    def volumes(self) -> dict[str, modal.Volume]:
        """Modal volumes by mount point (looked up by name when the app runs; made once and cached)."""
        if self._volumes is None:
            import modal

            self._volumes = {
                PurePosixPath(mount).as_posix(): modal.Volume.from_name(name)
                for mount, name in self.app_settings.deployment_config.volumes.items()
            }
        return self._volumes

    @property
    def cloud_bucket_mounts(self) -> dict[str, modal.CloudBucketMount]:
        """Bucket mounts by mount point."""
        import modal

        mounts = {}
        for cfg in self.app_settings.deployment_config.cloud_bucket_mounts:
            mounts[cfg.mount_point] = modal.CloudBucketMount(
                bucket_name=cfg.bucket_name,
                bucket_endpoint_url=cfg.bucket_endpoint_url,
                key_prefix=cfg.key_prefix,
                secret=modal.Secret.from_name(cfg.secret) if cfg.secret else None,
                oidc_auth_role_arn=cfg.oidc_auth_role_arn,
                read_only=cfg.read_only,
                requester_pays=cfg.requester_pays,
            )
        return mounts

    @property
    def all_volumes(self) -> dict[str, modal.Volume | modal.CloudBucketMount]:
        """Volumes and bucket mounts together, as ``volumes=`` takes them."""
        return {**self.volumes, **self.cloud_bucket_mounts}

    def secrets(self) -> list[modal.Secret]:
        """The configured Modal secrets."""
        import modal

        return [modal.Secret.from_name(name) for name in self.app_settings.deployment_config.secrets]

    # --- image ---------------------------------------------------------------------------------------------

    def get_image(self) -> modal.Image:
        """The container image: base, apt/pip packages, run commands, env, workdir, then local sources and files.

        modalkit's own requirements are installed unless ``build_config.install_modalkit_requirements`` is false,
        and the settings files this config was loaded from are added, with ``MODALKIT_CONFIG`` pointing at them, so
        the container reads the same settings.
        """
        import modal

        build = self.app_settings.build_config
        if build.image:
            ref = build.image if _has_tag(build.image) else f"{build.image}:{build.tag}"
            if build.python_version:
                image = modal.Image.from_registry(ref, add_python=build.python_version)
            else:
                image = modal.Image.from_registry(ref)  # the original's call
        else:
            image = modal.Image.debian_slim(python_version=build.python_version)
        if build.apt_packages:
            image = image.apt_install(*build.apt_packages)
        requirements = [*(CONTAINER_REQUIREMENTS if build.install_modalkit_requirements else ()), *build.pip_packages]
        if requirements:
            image = image.pip_install(*requirements)
        if build.extra_run_commands:
            image = image.run_commands(*build.extra_run_commands)
        env = dict(build.env)
        remote_configs = [
            f"{REMOTE_CONFIG_DIR}/{i:02d}-{path.name}" for i, path in enumerate(self.settings.config_files)
        ]
        if remote_configs:
            env["MODALKIT_CONFIG"] = ",".join(remote_configs)
        if env:
            image = image.env(env)
        image = image.workdir(build.workdir)
        # files added last: they are mounted when a container starts instead of being baked into a layer
        for source in self.python_sources():
            image = image.add_local_python_source(source, ignore=python_source_ignore(source))
        for path, remote in zip(self.settings.config_files, remote_configs, strict=True):
            image = image.add_local_file(path, remote)
        for mount in self.app_settings.deployment_config.mounts:
            if mount.type == MountType.FILE:
                image = image.add_local_file(mount.local_path, mount.remote_path)
            else:
                image = image.add_local_dir(mount.local_path, remote_path=mount.remote_path)
        return image

    def python_sources(self) -> list[str]:
        """The local Python packages and modules the image ships: ``build_config.local_python_sources``, then the
        module of each model entry's ``pipeline`` that is local (found here outside the installed packages, the
        working directory included, as :func:`~modalkit.inference_pipeline.import_pipeline` finds it).

        Shipping the pipeline's module rather than asking for it in ``local_python_sources``: the settings already
        name it, and a container that cannot import its pipeline would be the first sign of the omission (after
        the deploy, at the first request or chunk). A module installed here (``site-packages``) is left to
        ``pip_packages``.

        Raises:
            ConfigError: a pipeline's module is found neither here nor in anything the image installs (no
                ``pip_packages``, ``extra_run_commands`` or registry ``image``), naming the entry and where it was
                looked for: at deploy time, not in a container.
        """
        build = self.app_settings.build_config
        sources = list(build.local_python_sources)
        for name, entry in self.model_settings.model_entries.items():
            if not entry.pipeline:
                continue
            module = entry.pipeline.partition(":")[0]
            top = module.partition(".")[0]
            if not top or top in sources or top == "modalkit":
                continue
            spec = find_top_level(module)
            where = f"model_settings.model_entries.{name}.pipeline"
            if spec is None:
                if build.pip_packages or build.extra_run_commands or build.image:
                    log.warning("%s: module %r is not found here; the image must install it", where, top)
                    continue
                raise ConfigError(
                    f"{where}: module {top!r} cannot be shipped to Modal: it is not found here and the image "
                    f"installs nothing that could hold it; {not_found_message(module, where)}, or list its "
                    "package in app_settings.build_config.pip_packages"
                )
            if _installed(spec.origin or next(iter(spec.submodule_search_locations or ()), None)):
                continue
            log.info("%s: shipping the local module %r in the image", where, top)
            sources.append(top)
        return sources

    # --- decorator arguments -------------------------------------------------------------------------------

    def _retries(self) -> modal.Retries | None:
        import modal

        retry = self.app_settings.deployment_config.retries
        if retry.max_retries == 0:
            return None
        return modal.Retries(
            max_retries=retry.max_retries,
            backoff_coefficient=retry.backoff_coefficient,
            initial_delay=retry.initial_delay,
            max_delay=retry.max_delay,
        )

    def get_app_cls_settings(self) -> dict[str, Any]:
        """Keyword arguments for ``@app.cls(...)`` of the model class: image, GPU, volumes, secrets, scaling."""
        deploy = self.app_settings.deployment_config
        settings = {
            "image": self.get_image(),
            "gpu": deploy.gpu,
            "cpu": deploy.cpu,
            "memory": deploy.memory,
            "region": deploy.region,
            "secrets": self.secrets(),
            "volumes": self.all_volumes,
            "min_containers": deploy.min_containers,
            "max_containers": deploy.max_containers,
            "scaledown_window": deploy.scaledown_window,
            "timeout": deploy.timeout,
            "retries": self._retries(),
        }
        return {k: v for k, v in settings.items() if v is not None}

    def get_batch_worker_cls_settings(self) -> dict[str, Any]:
        """Keyword arguments for ``@app.cls(...)`` of the batch worker: like the model class, one chunk per call.

        The flow retries chunks itself (a chunk is idempotent), so Modal's own retries are left off here. No
        ``@modal.concurrent``: one chunk at a time per container keeps ``predict`` on one thread (see
        :class:`~modalkit.modal_service.BatchWorker`).
        """
        settings = self.get_app_cls_settings()
        settings.pop("retries", None)
        return settings

    def get_handler_settings(self) -> dict[str, Any]:
        """Keyword arguments for ``@app.function(...)`` of the web handler: image and secrets, no GPU."""
        deploy = self.app_settings.deployment_config
        settings = {
            "image": self.get_image(),
            "secrets": self.secrets(),
            "region": deploy.region,
            "scaledown_window": deploy.scaledown_window,
            "timeout": deploy.timeout,
        }
        return {k: v for k, v in settings.items() if v is not None}

    def get_batched_method_settings(self) -> dict[str, Any]:
        """Keyword arguments for ``@modal.batched(...)``: ``max_batch_size`` and ``wait_ms``."""
        batch = self.app_settings.batch_config
        return {"max_batch_size": batch.max_batch_size, "wait_ms": batch.wait_ms}

    def get_concurrent_settings(self) -> dict[str, Any]:
        """Keyword arguments for ``@modal.concurrent(...)`` on a model class without dynamic batching."""
        return {"max_inputs": self.app_settings.deployment_config.max_concurrent_inputs}

    def get_handler_concurrent_settings(self) -> dict[str, Any]:
        """Keyword arguments for ``@modal.concurrent(...)`` on the web handler."""
        return {"max_inputs": self.app_settings.deployment_config.handler_max_concurrent_inputs}

    def get_asgi_app_settings(self) -> dict[str, Any]:
        """Keyword arguments for ``@modal.asgi_app(...)``: Modal proxy auth when ``deployment_config.secure``."""
        return {"requires_proxy_auth": self.app_settings.deployment_config.secure}

    # --- volumes at run time -------------------------------------------------------------------------------

    def reload_volumes(self) -> None:
        """Reload every volume now; a volume that fails to reload is logged and skipped."""
        for mount, volume in self.volumes.items():
            try:
                volume.reload()
            except Exception as exc:
                log.warning("reloading the volume at %s failed: %s", mount, exc)

    def volume_reloader(self) -> VolumeReloader:
        """A reloader that reloads the volumes at most every ``volume_reload_interval_seconds``.

        It ticks on that interval even when no Modal Volume is mounted, as the original modalkit did: the caller runs
        the pipeline's ``on_volume_reload`` then (a bucket mount's files change without a reload).
        """
        interval = self.app_settings.deployment_config.volume_reload_interval_seconds
        return VolumeReloader(lambda: self.reload_volumes(), interval)  # looked up at each reload


class VolumeReloader:
    """Reloads volumes on an interval, checked cheaply before each batch (not a reload per batch).

    Args:
        reload: What reloads the volumes; None: nothing to reload, never ticks.
        interval: Seconds between reloads; None disables reloading.
        clock: Time source, ``time.time`` seconds (the original modalkit's clock), replaceable in tests.

    Attributes:
        last: When the last reload was (or the reloader was made), on ``clock``; move it back to reload sooner.
    """

    def __init__(
        self,
        reload: Callable[[], None] | None,
        interval: float | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._reload = reload
        self.interval = interval
        self._clock = clock
        self.last = clock()

    def maybe_reload(self) -> bool:
        """Reload if the interval has passed since the last reload; True when it did."""
        if self._reload is None or self.interval is None:
            return False
        now = self._clock()
        if now - self.last < self.interval:
            return False
        self._reload()
        self.last = now
        return True


def python_source_ignore(package: str) -> Callable[[Path], bool]:
    """Which files of a local Python package an image leaves out: all but ``.py`` files (Modal's default), and for
    modalkit itself its CLI-only modules (the managed Prefect server has no business in a container)."""
    from modal.file_pattern_matcher import NON_PYTHON_FILES

    cli_only = CLI_ONLY_MODULES if package == "modalkit" else frozenset()
    return lambda path: path.as_posix() in cli_only or bool(NON_PYTHON_FILES(path))


def _installed(origin: str | None) -> bool:
    """Whether a module found at ``origin`` is an installed package (or the standard library), not a local one."""
    if not origin or origin in ("built-in", "frozen"):
        return True
    parts = Path(origin).resolve().parts
    return "site-packages" in parts or "dist-packages" in parts or Path(origin).resolve().is_relative_to(_STDLIB)


_STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def _has_tag(image: str) -> bool:
    last = image.rsplit("/", 1)[-1]
    return ":" in last or "@" in last
