"""Dated partitions: a nightly run reads the night of its scheduled start (UTC) or the night it is told to."""

from __future__ import annotations

import datetime as dt

import pytest

from modalkit.batch.partition import fill_partition, is_template, partition_date
from modalkit.exceptions import ConfigError

NIGHT = dt.date(2026, 11, 20)


def test_date_and_a_strftime_format_fill_with_the_night() -> None:
    assert fill_partition("s3://b/reviews/{date}/", NIGHT) == "s3://b/reviews/2026-11-20/"
    assert fill_partition("s3://b/reviews/{date:%Y/%m/%d}/part", NIGHT) == "s3://b/reviews/2026/11/20/part"
    assert fill_partition("s3://b/{date}/x-{date:%Y%m%d}", NIGHT) == "s3://b/2026-11-20/x-20261120"


def test_a_uri_without_a_field_is_left_as_it_is_and_doubled_braces_are_literal() -> None:
    assert not is_template("s3://b/reviews/")
    assert fill_partition("s3://b/reviews/", NIGHT) == "s3://b/reviews/"
    assert not is_template("data/{{raw}}/")
    assert fill_partition("data/{{raw}}/{date}", NIGHT) == "data/{raw}/2026-11-20"
    assert is_template("data/{date}/")


def test_the_night_is_the_utc_date_of_the_scheduled_start_not_of_now() -> None:
    late = dt.datetime(2026, 11, 20, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5)))  # 04:30 UTC on the 21st
    assert partition_date(None, late) == dt.date(2026, 11, 21)
    assert partition_date(None, dt.datetime(2026, 11, 20, 2, 0, tzinfo=dt.UTC)) == NIGHT
    assert partition_date(None, dt.datetime(2026, 11, 20, 2, 0)) == NIGHT  # naive: taken as UTC


def test_a_date_parameter_overrides_the_scheduled_start_for_a_backfill() -> None:
    assert partition_date("2026-10-01", dt.datetime(2026, 11, 20, 2, 0, tzinfo=dt.UTC)) == dt.date(2026, 10, 1)


def test_a_bad_date_parameter_is_one_error_naming_the_parameter_and_the_value() -> None:
    with pytest.raises(ConfigError, match=r"parameter date: '2026-13-01' is not a date; use YYYY-MM-DD"):
        partition_date("2026-13-01", None)


@pytest.mark.parametrize(
    ("uri", "shown"),
    [("s3://b/{day}/", "{day}"), ("s3://b/{date!r}/", "{date!r}"), ("s3://b/{0}/", "{0}"), ("s3://b/{}/", "{}")],
)
def test_a_field_other_than_date_is_an_error_naming_the_uri_parameter_and_the_field(uri: str, shown: str) -> None:
    with pytest.raises(ConfigError) as caught:
        fill_partition(uri, NIGHT, "output_uri")
    assert str(caught.value).startswith(f"output_uri: {uri!r} has the field {shown};")


def test_a_malformed_template_is_an_error_naming_the_uri_parameter() -> None:
    with pytest.raises(ConfigError, match=r"^input_uri: 's3://b/\{date/' is not a valid template"):
        fill_partition("s3://b/{date/", NIGHT)
