"""How a bad setting is explained: the full key path, the file or variable it came from, "did you mean", and
never a secret's value.

Example:
    ``app_settings.batch_config.max_batch_sise: unknown key; did you mean 'max_batch_size'? (in prod.yaml)``
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import AliasChoices, BaseModel, ByteSize, SecretStr, ValidationError

from modalkit.settings_sources import ENV_PREFIX, Origins

__all__ = ["describe_allowed", "did_you_mean", "explain", "invalid_values"]

_MASK = "**********"


def explain(
    exc: ValidationError,
    root: type[BaseModel],
    origins: Origins,
    init: Mapping[str, Any],
    renamed: Mapping[tuple[str, ...], str] | None = None,
) -> str:
    """One line per error of ``exc`` (raised validating ``root``): key path, what is wrong, where it was set.

    ``renamed`` holds the keys given under an original modalkit name; the line says which name was used.
    """
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        path = ".".join(loc)
        old = (renamed or {}).get(loc)
        if old is not None:
            path += f" (given as {old})"
        where = _origin(loc, origins, init)
        if err["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key{did_you_mean(root, loc)} (in {where})")
        else:
            shown = _short(_redact(root, loc, err.get("input")))
            lines.append(f"{path}: {_problem(root, loc, err)} (got {shown}, in {where})")
    if len(lines) == 1:
        return f"invalid modalkit settings: {lines[0]}"
    return f"invalid modalkit settings, {len(lines)} errors:\n  " + "\n  ".join(lines)


def _problem(root: type[BaseModel], loc: tuple[str, ...], err: Any) -> str:
    """What is wrong, in the words the CLI uses for a bad option (with what is allowed), where the field is known."""
    field = _field_at(root, loc)
    problem = _PROBLEMS.get(err["type"])
    if field is None or problem is None:
        return str(err["msg"])
    return f"{problem}; allowed: {describe_allowed(field)}"


def _field_at(root: type[BaseModel], loc: tuple[str, ...]) -> Any:
    """The field at key path ``loc`` under ``root``, or None (a key of a mapping, an item of a list)."""
    model: type[BaseModel] | None = root
    field = None
    for part in loc:
        if model is None:
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _model_of(field.annotation)
    return field


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _redact(model: type[BaseModel] | None, loc: Sequence[str], value: Any) -> Any:
    """``value`` (the input at ``loc`` under ``model``) with every SecretStr field masked: errors never show secrets."""
    for i, part in enumerate(loc):
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return value
        if _is_secret(field.annotation):
            return _MASK if i == len(loc) - 1 else value
        model = _model_of(field.annotation)
    if model is None or not isinstance(value, Mapping):
        return value
    return {k: _redact(model, (str(k),), v) for k, v in value.items()}


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in get_args(annotation)


def _origin(loc: tuple[str, ...], origins: Origins, init: Mapping[str, Any]) -> str:
    if _lookup(init, loc):
        return "the values passed in"
    # dict/list items: fall back to the nearest enclosing key
    for end in range(len(loc), 0, -1):
        env_name = ENV_PREFIX + "__".join(loc[:end]).upper()
        if any(k.upper() == env_name for k in os.environ):
            return f"environment variable {env_name}"
        # an error on a whole section (e.g. auth_config's api_key/ssm_key check) set by variables for its keys
        nested = sorted(k for k in os.environ if end == len(loc) and k.upper().startswith(env_name + "__"))
        if nested:
            return f"environment variable{'s' if len(nested) > 1 else ''} {', '.join(nested)}"
        if loc[:end] in origins:
            return origins[loc[:end]]
    if Path(".env").is_file():
        return ".env or defaults"
    return "defaults"


def _lookup(data: Mapping[str, Any], loc: tuple[str, ...]) -> bool:
    node: Any = data
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def did_you_mean(root: type[BaseModel], loc: tuple[str, ...]) -> str:
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if model is None:
            return ""
        field = model.model_fields.get(part)
        if field is None:
            return ""
        model = _model_of(field.annotation)
    if model is None:
        return ""
    close = difflib.get_close_matches(loc[-1], list(_key_names(model)), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _key_names(model: type[BaseModel]) -> Iterator[str]:
    """Every key a section accepts: its fields, their aliases and its original modalkit names."""
    for name, field in model.model_fields.items():
        yield name
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            yield from (a for a in alias.choices if isinstance(a, str))
    yield from getattr(model, "legacy_names", {})


def invalid_values(exc: ValidationError, model: type[BaseModel], names: Mapping[str, str] | None = None) -> list[str]:
    """One line per bad value of ``exc`` (raised validating ``model``): the name it was given under, the value,
    what is wrong and what is allowed, never pydantic's boilerplate.

    Args:
        names: How each field was named where the value came from (``chunk_size`` -> ``--chunk-size``).

    Example:
        ``--chunk-size 'abc': not a size; allowed: a size in bytes or with a unit (64KiB, 32MiB), 64KiB to 8GiB``
    """
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        name = (names or {}).get(field, field)
        problem = _PROBLEMS.get(err["type"], err["msg"])
        info = model.model_fields.get(field)
        allowed = f"; allowed: {describe_allowed(info)}" if info is not None else ""
        lines.append(f"{name} {_short(err.get('input'))}: {problem}{allowed}")
    return lines


_PROBLEMS = {
    "byte_size": "not a size",
    "byte_size_unit": "not a size unit",
    "int_parsing": "not a whole number",
    "int_from_float": "not a whole number",
    "float_parsing": "not a number",
    "greater_than_equal": "too small",
    "greater_than": "too small",
    "less_than_equal": "too large",
    "less_than": "too large",
    "literal_error": "not one of the choices",
    "string_too_short": "empty",
    "bool_parsing": "not true or false",
}


def describe_allowed(info: Any) -> str:
    """What a field accepts, in words: its kind and its bounds or choices."""
    low = next((getattr(m, a) for m in info.metadata for a in ("ge", "gt") if hasattr(m, a)), None)
    high = next((getattr(m, a) for m in info.metadata for a in ("le", "lt") if hasattr(m, a)), None)
    annotation = info.annotation
    args = [a for a in get_args(annotation) if a is not type(None)]
    base = args[0] if len(args) == 1 else annotation
    choices = get_args(base) if getattr(base, "__origin__", None) is Literal else ()
    if choices:
        return "one of " + ", ".join(str(c) for c in choices)
    if base is ByteSize:
        return f"a size in bytes or with a unit (64KiB, 32MiB), {_size(low)} to {_size(high)}"
    kind = {int: "a whole number", float: "a number", bool: "true or false", str: "a text"}.get(base, "a value")
    if low is not None and high is not None:
        return f"{kind} from {low} to {high}"
    if low is not None:
        return f"{kind} of at least {low}"
    return kind


def _size(value: Any) -> str:
    if value is None:
        return "any"
    return ByteSize(int(value)).human_readable(decimal=False).replace(".0", "")
