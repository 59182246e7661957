"""How settings are found and layered: YAML layers, the environment, ``.env``, and the original key names.

Sources, highest precedence first: keyword arguments, ``MODALKIT_`` environment variables, ``.env`` (the
environment written down, so it ranks as one), then the YAML layers (``MODALKIT_CONFIG=a.yaml,b.yaml`` or
``./modalkit.yaml``; later files win, mappings merged key by key by pydantic-settings' own
``YamlConfigSettingsSource`` with ``deep_merge``). The sources are merged key by key too
(:meth:`SourceChain.values`). Each source's keys are first renamed from the original modalkit's names
(``concurrency_limit`` -> ``max_containers``...), so an old name in one layer merges with a new one in the next
instead of both reaching validation. Each YAML key remembers the file it came from, for error messages.

One :class:`SourceChain` per load holds the files it reads and what it learns on the way (where each key came
from, which keys were given under an old name); it is handed to each source and merges them, so loads share no
state, across threads included.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    YamlConfigSettingsSource,
)

from modalkit.exceptions import ConfigError

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "ENV_PREFIX",
    "Origins",
    "Renamed",
    "SourceChain",
    "YamlLayers",
    "config_files_from_env",
    "no_model_hint",
    "rename_legacy_keys",
]

ENV_PREFIX = "MODALKIT_"
DEFAULT_CONFIG_FILE = "modalkit.yaml"
# environment variables that belong to modalkit but are not settings fields
_NON_SETTINGS_ENV = frozenset({"config", "app_postfix", "home", "prefect_idle_seconds", "serve_model"})

#: Where each YAML key came from: key path -> file name.
Origins = dict[tuple[str, ...], str]
#: Keys given under an original name: key path (today's name) -> the name used.
Renamed = dict[tuple[str, ...], str]


def config_files_from_env(environ: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """The YAML layers to read: ``MODALKIT_CONFIG`` (comma-separated) or ``./modalkit.yaml`` if it exists."""
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_PREFIX + "CONFIG", "").strip()
    if raw:
        return tuple(Path(p.strip()) for p in raw.split(",") if p.strip())
    default = Path(DEFAULT_CONFIG_FILE)
    return (default,) if default.is_file() else ()


def no_model_hint(files: Sequence[Path]) -> str:
    """What to say when settings read from ``files`` configure no model: the files read, or, when none was, the
    ones looked for (the working directory's ``modalkit.yaml``; ``MODALKIT_CONFIG`` was not set) and how to name
    one."""
    if files:
        return f"model_settings.model_entries is empty in {', '.join(str(f) for f in files)}; add a model entry there"
    looked_for = Path.cwd() / DEFAULT_CONFIG_FILE
    return (
        f"no settings file was read: {ENV_PREFIX}CONFIG is not set and {looked_for} does not exist; run modalkit "
        f"from the folder holding modalkit.yaml, pass --config PATH, set {ENV_PREFIX}CONFIG=PATH[,PATH...], or "
        "start a project here with `modalkit init`"
    )


def rename_legacy_keys(
    model: type[BaseModel], data: Any, path: tuple[str, ...] = (), renamed: Renamed | None = None
) -> Any:
    """``data`` (one source's values for ``model``) with the original modalkit's key names renamed to today's.

    A section declares its old names in a ``legacy_names`` class attribute (old -> new); sections nest, so every
    level is walked. Both names in one mapping of one source is an error: which one was meant is not knowable.
    Each renamed key is recorded in ``renamed``, if given.

    Raises:
        ConfigError: a mapping holds a key and its old name both.
    """
    if not isinstance(data, Mapping):
        return data
    legacy: Mapping[str, str] = getattr(model, "legacy_names", {})
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = legacy.get(str(raw_key), str(raw_key))
        if key in out:
            old = next(k for k, v in legacy.items() if v == key)
            where = ".".join(path) + "." if path else ""
            raise ConfigError(f"{where}{key} and {where}{old} (its old name) are both set; keep one")
        if key != raw_key and renamed is not None:
            renamed[(*path, key)] = str(raw_key)
        field = model.model_fields.get(key)
        section = field.annotation if field is not None else None
        if isinstance(section, type) and issubclass(section, BaseModel):
            value = rename_legacy_keys(section, value, (*path, key), renamed)
        out[key] = value
    return out


class YamlLayers(YamlConfigSettingsSource):
    """The YAML layers, deep-merged in order by pydantic-settings, each read with modalkit's checks first.

    Every file must exist and hold a mapping; invalid YAML is reported with its line and column; legacy key names
    are renamed per file; :attr:`origins` records the file of every key (the files are read on construction).
    """

    def __init__(self, settings_cls: type[BaseSettings], files: Sequence[Path], renamed: Renamed | None = None) -> None:
        self.origins: Origins = {}
        self.renamed = renamed
        self.files = tuple(files)
        self._root = settings_cls  # _read_file runs inside super().__init__, before it sets settings_cls
        for file in self.files:
            if not file.is_file():
                raise ConfigError(f"config file {str(file)!r} does not exist (from {ENV_PREFIX}CONFIG or the caller)")
        super().__init__(settings_cls, yaml_file=list(self.files), deep_merge=True)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            loaded = yaml.safe_load(Path(file_path).read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{file_path}:{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from exc
        if loaded is None:
            return {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{file_path}: the top level must be a mapping of keys, not {type(loaded).__name__}")
        try:
            data: dict[str, Any] = rename_legacy_keys(self._root, loaded, renamed=self.renamed)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {Path(file_path).name})") from None
        _record_origins((), data, self.origins, Path(file_path).name)
        return data


def _record_origins(path: tuple[str, ...], value: Any, origins: Origins, source: str) -> None:
    if path:
        origins[path] = source
    if isinstance(value, Mapping):
        for k, v in value.items():
            _record_origins((*path, str(k)), v, origins, source)


class _RenamingSource(PydanticBaseSettingsSource):
    """Another source's values with the original key names renamed (environment, ``.env``)."""

    def __init__(
        self,
        inner: PydanticBaseSettingsSource,
        renamed: Renamed,
        drop: frozenset[str] = frozenset(),
        origins: Origins | None = None,
        name: str = "",
    ) -> None:
        super().__init__(inner.settings_cls)
        self.inner = inner
        self.renamed = renamed
        self.drop = drop
        self.origins = origins
        self.name = name

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return self.inner.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        data = {k: v for k, v in self.inner().items() if k.lower() not in self.drop}
        renamed: dict[str, Any] = rename_legacy_keys(self.settings_cls, data, renamed=self.renamed)
        if self.origins is not None:  # the keys it sets are its own, whatever a YAML file of lower rank says
            _record_leaf_origins((), renamed, self.origins, self.name)
        return renamed


def _record_leaf_origins(path: tuple[str, ...], value: Any, origins: Origins, source: str) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _record_leaf_origins((*path, str(k)), v, origins, source)
    elif path:
        origins[path] = source


@dataclass
class SourceChain:
    """One load of the settings: the YAML layers it reads, and what it learns on the way, for error messages.

    Made for one load (:meth:`modalkit.settings.Settings.load` or ``Settings()``) and passed to its sources.

    Attributes:
        files: The YAML layers, in order (later files win).
        origins: Where each key came from: the YAML file, or ``.env``.
        renamed: The keys given under an original modalkit name, and that name.
    """

    files: tuple[Path, ...]
    origins: Origins = field(default_factory=dict)
    renamed: Renamed = field(default_factory=dict)

    def values(self, settings_cls: type[BaseSettings], init: Mapping[str, Any]) -> dict[str, Any]:
        """Every source's values for ``settings_cls``, merged key by key; ``init`` (already renamed) ranks first.

        Raises:
            ConfigError: a YAML file is missing or invalid, or a source holds a key and its old name both.
        """
        yaml_layers = YamlLayers(settings_cls, self.files, self.renamed)  # reads the files, records their keys
        self.origins.update(yaml_layers.origins)
        env = _RenamingSource(EnvSettingsSource(settings_cls), self.renamed)
        dotenv = DotEnvSettingsSource(settings_cls)
        # .env is the environment written down: it ranks as one; ``MODALKIT_CONFIG`` and friends there are
        # modalkit's variables, not settings keys; the keys it sets are recorded as its own
        dotenv_source = _RenamingSource(dotenv, self.renamed, _NON_SETTINGS_ENV, self.origins, ".env")
        layers = [InitSettingsSource(settings_cls, init_kwargs=dict(init))(), env(), dotenv_source(), yaml_layers()]
        merged: dict[str, Any] = {}
        for layer in reversed(layers):  # lowest rank first, each higher one merged over it
            merged = _merge(merged, layer)
        return merged


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``: mappings key by key, anything else replaced (lists are not concatenated)."""
    out = dict(base)
    for key, value in over.items():
        below = out.get(key)
        out[key] = _merge(below, value) if isinstance(below, Mapping) and isinstance(value, Mapping) else value
    return out
