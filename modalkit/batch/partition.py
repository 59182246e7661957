"""Dated partitions: ``input_uri`` / ``output_uri`` templates with ``{date}`` (ISO, ``2026-12-01``) or
``{date:FORMAT}`` (``strftime``, e.g. ``{date:%Y/%m/%d}``), filled with one night's date.

The nightly deployment fills them from its flow run's *scheduled* start time in UTC, so a run that starts late, or a
backfill of an old night, reads that night's partition and not today's; a ``date`` parameter (``YYYY-MM-DD``)
overrides it. A URI without a ``{`` is left as it is.
"""

from __future__ import annotations

import datetime as dt
import string

from modalkit.exceptions import ConfigError

__all__ = ["fill_partition", "is_template", "partition_date"]


def is_template(uri: str) -> bool:
    """True when ``uri`` holds a ``{date}`` field to fill."""
    return any(field is not None for _, field, _, _ in _parse(uri, "uri"))


def partition_date(date: str | None, scheduled: dt.datetime | None, name: str = "parameter date") -> dt.date:
    """The night a run reads: ``date`` when given (``YYYY-MM-DD``), else the UTC date of ``scheduled`` (the flow
    run's scheduled start), else today in UTC.

    Raises:
        ConfigError: ``date`` is not a date (the message names it as ``name`` and shows the value).
    """
    if date:
        try:
            return dt.date.fromisoformat(date.strip())
        except ValueError:
            raise ConfigError(f"{name}: {date!r} is not a date; use YYYY-MM-DD, e.g. 2026-11-30") from None
    when = scheduled or dt.datetime.now(dt.UTC)
    if when.tzinfo is None:  # a naive time is taken as UTC
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).date()


def fill_partition(uri: str, day: dt.date, name: str = "input_uri") -> str:
    """``uri`` with every ``{date}`` / ``{date:FORMAT}`` replaced by ``day``.

    Raises:
        ConfigError: a field other than ``date``, or a malformed template; the message names ``name`` and the field.
    """
    out: list[str] = []
    for literal, field, spec, conversion in _parse(uri, name):
        out.append(literal)
        if field is None:
            continue
        if field != "date" or conversion:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ConfigError(f"{name}: {uri!r} has the field {shown}; a partition template knows only {{date}} "
                              "and {date:FORMAT} (e.g. {date:%Y/%m/%d})")  # fmt: skip
        out.append(day.strftime(spec) if spec else day.isoformat())
    return "".join(out)


def _parse(uri: str, name: str) -> list[tuple[str, str | None, str | None, str | None]]:
    try:
        return list(string.Formatter().parse(uri))
    except ValueError as exc:
        raise ConfigError(f"{name}: {uri!r} is not a valid template ({exc}); write {{date}} or {{date:%Y/%m/%d}}, "
                          "and {{ or }} for a literal brace") from None  # fmt: skip
