"""The one place numbers from a server are read: finite, in range, or None; never raises."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenjournal._numbers import (
    MAX_EPOCH,
    MAX_NUMBER_TEXT,
    MAX_SECONDS,
    bounded,
    epoch_or_iso,
    epoch_seconds,
    finite,
    http_date,
    positive_seconds,
    retry_after,
)

HUGE = 10**400
ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([HUGE, -HUGE, 10**5000]),
    st.floats(),
    st.text(max_size=80),
    st.sampled_from(["nan", "inf", "-Infinity", "1e999", "9" * 400, "", " 1 "]),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=400, deadline=None)
@given(value=ANYTHING)
def test_every_reader_is_total_and_finite(value: Any) -> None:
    for reader in (finite, epoch_seconds, epoch_or_iso, positive_seconds):
        number = reader(value)
        assert number is None or (isinstance(number, float) and math.isfinite(number))
    seconds = positive_seconds(value)
    assert seconds is None or 0 < seconds <= MAX_SECONDS
    for at in (epoch_seconds(value), epoch_or_iso(value)):
        assert at is None or 0 <= at <= MAX_EPOCH
    if isinstance(value, str):
        wait = retry_after(value, 1_700_000_000.0)
        assert wait is None or 0 <= wait <= MAX_SECONDS


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, HUGE, -HUGE, True, "1", None])
def test_an_unusable_epoch_is_none(value: object) -> None:
    assert epoch_seconds(value) is None


def test_epochs_in_range_and_milliseconds() -> None:
    assert epoch_seconds(1_700_000_000) == 1_700_000_000.0
    assert epoch_seconds(MAX_EPOCH + 1) is None and epoch_seconds(-1) is None
    assert epoch_or_iso(1_700_000_000_000) == 1_700_000_000.0  # JavaScript milliseconds
    assert epoch_or_iso("2023-11-14T22:13:20Z") == 1_700_000_000.0
    assert epoch_or_iso("2023-11-14T22:13:20") == 1_700_000_000.0  # naive reads as UTC
    assert epoch_or_iso("0001-01-01T00:00:00-23:59") is None
    assert epoch_or_iso(1e308) is None and epoch_or_iso("x" * 10_000) is None


def test_seconds_are_positive_and_capped() -> None:
    assert positive_seconds("900") == 900.0 and positive_seconds(0.5) == 0.5
    assert positive_seconds(1e300) == MAX_SECONDS and positive_seconds(HUGE) is None
    assert positive_seconds(60, maximum=30) == 30
    for bad in (0, -1, "soon", True, math.nan, "inf", "9" * 400):
        assert positive_seconds(bad) is None


def test_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert retry_after("2.5", now) == 2.5 and retry_after("-3", now) == 0.0
    assert retry_after(None, now) is None and retry_after("inf", now) is None
    assert retry_after("1e999", now) is None and retry_after("9" * 400, now) is None
    assert retry_after("Tue, 14 Nov 2023 22:13:30 GMT", now) == 10.0
    assert retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now) == MAX_SECONDS


@pytest.fixture
def east_of_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local zone is UTC+3, so a naive time read as local time is 3 h off."""
    monkeypatch.setenv("TZ", "EAT-3")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_strings_are_numbers_only_when_asked() -> None:
    assert finite("5") is None and finite("5", strings=True) == 5.0
    assert bounded("5", 0, 10) is None and bounded("5", 0, 10, strings=True) == 5.0


def test_bounds_are_inclusive_and_zero_is_an_epoch() -> None:
    assert bounded(0, 0, 1) == 0.0 and bounded(1, 0, 1) == 1.0
    assert epoch_seconds(0) == 0.0 and epoch_seconds(0.5) == 0.5
    assert epoch_or_iso(0) == 0.0 and epoch_or_iso("1970-01-01T00:00:00Z") == 0.0


def test_number_text_up_to_the_limit_is_read_and_longer_is_refused() -> None:
    at_limit = "0" * (MAX_NUMBER_TEXT - 2) + "10"
    assert finite(at_limit, strings=True) == 10.0
    assert finite("1" + "0" * MAX_NUMBER_TEXT, strings=True) is None
    assert retry_after(at_limit, 0.0) == 10.0
    padded = "Tue, 14 Nov 2023 22:13:20" + " " * (MAX_NUMBER_TEXT - 30) + "+0000"
    assert len(padded) == MAX_NUMBER_TEXT and http_date(padded) == 1_700_000_000.0
    assert http_date(padded.replace("+0000", " +0000")) is None  # one past the limit
    iso = "2023-11-14T22:13:20." + "0" * (MAX_NUMBER_TEXT - 20)
    assert len(iso) == MAX_NUMBER_TEXT and epoch_or_iso(iso) == 1_700_000_000.0
    assert epoch_or_iso(iso + "0") is None


def test_milliseconds_start_past_1e11_seconds() -> None:
    assert epoch_or_iso(1e11) == 1e11  # the year 5138 in seconds, still seconds
    assert epoch_or_iso(1e11 + 0.5) == pytest.approx(1e8)  # milliseconds


@pytest.mark.usefixtures("east_of_utc")
def test_zones_are_honoured_and_a_missing_one_is_utc_whatever_the_local_zone() -> None:
    assert epoch_or_iso("2023-11-14T22:13:20") == 1_700_000_000.0
    assert epoch_or_iso("2023-11-15T00:13:20+02:00") == 1_700_000_000.0
    # RFC 5322 "-0000": UTC, zone unknown; email.utils gives a naive datetime for it.
    assert http_date("Tue, 14 Nov 2023 22:13:20 -0000") == 1_700_000_000.0
    assert http_date("Wed, 15 Nov 2023 00:13:20 +0200") == 1_700_000_000.0
    assert retry_after("Tue, 14 Nov 2023 22:13:30 -0000", 1_700_000_000.0) == 10.0


def test_retry_after_zero_and_a_past_date_mean_now() -> None:
    now = 1_700_000_000.0
    assert retry_after("0", now) == 0.0
    assert retry_after("Tue, 14 Nov 2023 22:13:10 GMT", now) == 0.0
    assert http_date(None) is None and http_date("   ") is None
