"""Numbers a server sends, read in one place: finite, in a sane range, or ``None``.

A server (or whatever sits between it and us) can send ``NaN``, ``Infinity``, a 400-digit
integer, a boolean or a string where a number belongs. Python turns the first ones into
floats that poison every comparison, and the 400-digit integer into an ``OverflowError``
the moment it meets a float or a ``datetime``. Every number read from the network goes
through these functions, which never raise: the caller gets a finite float within the
stated bounds, or ``None`` (absent or unusable; the caller decides whether that is
malformed or merely unknown). Pure: no I/O, no clock reads.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

#: The latest instant the SDK represents: the end of year 9999, the last one ``datetime``
#: holds (a day short of it, so any time zone still fits).
MAX_EPOCH: Final = 253402214400.0
#: The longest span of seconds the SDK believes (a lifetime, a wait, an interval): ten years.
MAX_SECONDS: Final = 10 * 365 * 86400.0
#: Numeric strings longer than this are not numbers, they are attacks on the parser.
MAX_NUMBER_TEXT: Final = 64


def finite(value: object, *, strings: bool = False) -> float | None:
    """``value`` as a finite float, or ``None``.

    Accepts ``int`` and ``float`` (never ``bool``, which is an ``int`` to Python but not a
    number to JSON), and with ``strings`` a short numeric string. NaN, the infinities and
    integers too large for a float are ``None``.
    """
    if isinstance(value, bool):
        return None
    if strings and isinstance(value, str):
        text = value.strip()
        if not text or len(text) > MAX_NUMBER_TEXT:
            return None
        try:
            value = float(text)
        except ValueError:
            return None
    if isinstance(value, int):
        try:
            value = float(value)
        except OverflowError:  # a 400-digit integer
            return None
    if not isinstance(value, float) or not math.isfinite(value):
        return None
    return value


def bounded(value: object, low: float, high: float, *, strings: bool = False) -> float | None:
    """``value`` as a finite float with ``low <= value <= high``, or ``None``."""
    number = finite(value, strings=strings)
    if number is None or not low <= number <= high:
        return None
    return number


def positive_seconds(value: object, maximum: float = MAX_SECONDS) -> float | None:
    """A positive, finite number of seconds, capped at ``maximum``, or ``None``.

    Accepts numbers and numeric strings (some servers send ``"expires_in": "3600"``);
    booleans, zero, negatives, NaN and infinities are ``None``: unusable, not fatal. A
    value past ``maximum`` (a server's "never expires") is capped rather than refused.
    """
    number = finite(value, strings=True)
    if number is None or number <= 0:
        return None
    return min(number, maximum)


def epoch_seconds(value: object) -> float | None:
    """A point in time as epoch seconds within ``[0, MAX_EPOCH]`` (a JWT ``exp`` or
    ``iat``, a test clock's ``now``), or ``None``. Strings are not accepted: RFC 7519
    NumericDate is a JSON number."""
    return bounded(value, 0.0, MAX_EPOCH)


def epoch_or_iso(value: object) -> float | None:
    """A timestamp a server may send as a number (seconds, or milliseconds when past
    1e11) or as ISO 8601 text (``grace_expires_at``), as epoch seconds in range, or
    ``None``."""
    if isinstance(value, str):
        text = value.strip()
        if not text or len(text) > MAX_NUMBER_TEXT:
            return None
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        try:
            return bounded(when.timestamp(), 0.0, MAX_EPOCH)
        except (OverflowError, ValueError):  # year 1 in a far-west zone
            return None
    number = finite(value)
    if number is None:
        return None
    if number > 1e11:  # JavaScript's Date.now(): milliseconds
        number /= 1000.0
    return bounded(number, 0.0, MAX_EPOCH)


def retry_after(raw: str | None, now: float) -> float | None:
    """A ``Retry-After`` value (delta-seconds or an HTTP date) as seconds from ``now``,
    within ``[0, MAX_SECONDS]``, or ``None`` when absent or unreadable. "inf" and "nan"
    parse as floats in Python; a wait of forever is no hint at all."""
    if raw is None:
        return None
    text = raw.strip()
    if not text or len(text) > MAX_NUMBER_TEXT:
        return None
    seconds = finite(text, strings=True)
    if seconds is None:
        when = http_date(text)
        if when is None:
            return None
        seconds = when - now
    return min(max(0.0, seconds), MAX_SECONDS)


def http_date(raw: str | None) -> float | None:
    """An HTTP date (a ``Date`` header, a date-form ``Retry-After``) as epoch seconds, or
    ``None`` when absent or unreadable. Any date ``datetime`` holds is finite; the caller
    bounds the span it derives."""
    text = (raw or "").strip()
    if not text or len(text) > MAX_NUMBER_TEXT:
        return None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return finite(when.timestamp())
    except (OverflowError, ValueError):  # year 1 in a far-west zone
        return None
