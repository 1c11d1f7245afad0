"""The outbox's items and answers (docs/architecture.md section 8): what ``enqueue`` accepts
and stores (exact errors, the frozen body and headers), which answers settle an item, which
are retried and which are dead letters, and what a full outbox says.

Most of it is pure (``build_item``, ``classify``, ``dead_reason``); the rest goes through a
manager opened on the reference server on loopback. No sleeps: waits poll with a bound.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

import tokenjournal as tj
from tokenjournal._outbox import (
    NO_BEARER,
    OutboxItem,
    _NoAnswer,
    build_item,
    classify,
    dead_reason,
)
from tokenjournal._tokens import Failure, FailureKind
from tokenjournal.server import ReferenceServer
from tokenjournal.testing import FakeClock

from .conftest import manager as signed_in_manager

DEMO = {"email": "demo@example.com", "password": "demo"}
NOW = 1_700_000_000.0
URL_MESSAGE = "url must be an absolute http(s) URL"


#: Most tests here need no session: the item is checked before anything is sent.
manager = functools.partial(signed_in_manager, sign_in=False)


def item(method: str = "POST", url: str = "http://127.0.0.1:9/api", **kw: Any) -> OutboxItem:
    return build_item(method, url, now=NOW, **kw)


# --------------------------------------------------------------------------- build_item


def test_methods_are_upper_cased_and_anything_else_is_refused_by_name() -> None:
    assert item("post").method == "POST"
    assert item("Delete").method == "DELETE"
    message = "method must be one of ['DELETE', 'GET', 'PATCH', 'POST', 'PUT']"
    for bad in ("HEAD", "", "OPTIONS", None, b"POST", 1):
        with pytest.raises(ValueError) as raised:
            item(bad)  # type: ignore[arg-type]
        assert str(raised.value) == message


@pytest.mark.parametrize(
    "url",
    [
        "/api/readings",  # relative: no scheme, no host
        "api/readings",
        "http:///api/readings",  # http but no host
        "https://",
        "ftp://127.0.0.1/api",  # a host but not http(s)
        "ws://127.0.0.1/api",
        "",
    ],
)
def test_only_an_absolute_http_url_with_a_host_is_accepted(url: str) -> None:
    with pytest.raises(ValueError) as raised:
        item(url=url)
    assert str(raised.value) == URL_MESSAGE


def test_a_url_that_is_not_a_string_is_refused_with_the_same_message() -> None:
    from yarl import URL

    for bad in (None, 42, URL("http://127.0.0.1/api")):
        with pytest.raises(ValueError) as raised:
            item(url=bad)  # type: ignore[arg-type]
        assert str(raised.value) == URL_MESSAGE


def test_the_url_is_kept_as_given_for_http_and_https() -> None:
    assert item(url="http://127.0.0.1:8080/a?b=1").url == "http://127.0.0.1:8080/a?b=1"
    assert item(url="https://api.example.com/x").url == "https://api.example.com/x"


@pytest.mark.parametrize(
    "url", ["http://u:p@127.0.0.1/api", "http://u@127.0.0.1/api", "http://:p@127.0.0.1/api"]
)
def test_a_user_or_a_password_in_the_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError) as raised:
        item(url=url)
    assert str(raised.value) == ("url must not carry credentials: the bearer is added at delivery")


def test_json_and_data_together_are_refused() -> None:
    with pytest.raises(ValueError) as raised:
        item(json={}, data=b"")
    assert str(raised.value) == "pass json or data, not both"


@pytest.mark.parametrize("headers", [{1: "x"}, {"X-Count": 1}, {b"X-A": b"b"}])
def test_headers_must_map_str_to_str(headers: Any) -> None:
    with pytest.raises(TypeError) as raised:
        item(headers=headers)
    assert str(raised.value) == "headers must map str to str"


@pytest.mark.parametrize("name", ["Authorization", "cookie", "PROXY-AUTHORIZATION"])
def test_credential_headers_are_refused_with_the_reason(name: str) -> None:
    with pytest.raises(ValueError) as raised:
        item(headers={name: "Bearer x"})
    assert str(raised.value) == (
        f"the {name} header is not stored in an outbox item (no token is ever journaled "
        "with a call): the manager's middleware adds the bearer at delivery"
    )


def test_the_idempotency_key_is_the_outboxs_own() -> None:
    for name in ("Idempotency-Key", "idempotency-key"):
        with pytest.raises(ValueError) as raised:
            item(headers={name: "mine"})
        assert str(raised.value) == "the outbox sets Idempotency-Key itself (the item's id)"


def test_json_is_compact_and_typed_unless_the_caller_typed_it() -> None:
    made = item(json={"uid": "a", "v": [1, 2.5]}, headers={"X-Trace": "t"})
    assert made.body == b'{"uid":"a","v":[1,2.5]}'
    assert made.headers == (("X-Trace", "t"), ("Content-Type", "application/json"))
    assert item(json=[]).headers == (("Content-Type", "application/json"),)
    assert item(json=0).body == b"0"  # a falsy document is still a body
    own = item(json={"op": "add"}, headers={"content-type": "application/merge-patch+json"})
    assert own.headers == (("content-type", "application/merge-patch+json"),)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_json_that_is_not_json_is_refused(value: float) -> None:
    # Python writes NaN and Infinity by default; no server's JSON parser has to read them.
    with pytest.raises(ValueError, match="Out of range float"):
        item(json={"v": value})


def test_data_is_stored_as_bytes_and_no_body_is_empty() -> None:
    assert item(data="héllo").body == "héllo".encode()
    assert item(data=b"\x00\x01").body == b"\x00\x01"
    assert item(data=bytearray(b"ab")).body == b"ab"  # type: ignore[arg-type]
    assert item(data=memoryview(b"cd")).body == b"cd"  # type: ignore[arg-type]
    empty = item()
    assert (empty.body, empty.headers) == (b"", ())
    assert item(data="").body == b""


@pytest.mark.parametrize("data", [1, {"a": 1}, ["x"]])
def test_other_data_is_refused(data: Any) -> None:
    with pytest.raises(TypeError) as raised:
        item(data=data)
    assert str(raised.value) == "data must be bytes or str"


def test_each_item_gets_a_new_uuid4_key_and_the_time_given() -> None:
    first, second = item(), item()
    assert first.id != second.id
    assert len(first.id) == 32 and int(first.id, 16) >= 0
    assert first.id[12] == "4"  # a version 4 UUID
    assert (first.created_at, first.seq, first.attempts) == (NOW, 0, 0)


def test_an_items_size_counts_body_url_and_headers_and_its_repr_hides_the_body() -> None:
    made = item(url="http://h.example/p", data=b"SECRET-BODY", headers={"X-A": "bc", "X-D": ""})
    assert made.size == len(b"SECRET-BODY") + len("http://h.example/p") + 5 + 3
    assert repr(made) == (
        f"OutboxItem(id={made.id!r}, method=POST, url='http://h.example/p', body=11 bytes)"
    )
    assert "SECRET" not in repr(made)


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_a_2xx_settles_the_item(status: int) -> None:
    assert classify(status, {"Retry-After": "5"}, NOW) is None


@pytest.mark.parametrize("status", [100, 199, 300, 301, 304, 400, 403, 404, 410, 422, 430, 499])
def test_any_other_non_retryable_status_is_a_dead_letter(status: int) -> None:
    failure = classify(status, {"Retry-After": "5"}, NOW)
    assert failure == Failure(FailureKind.REJECTED, f"http_{status}", status, dead_reason(status))
    assert failure.retry_after is None and not failure.retryable


def test_429_is_rate_limited_and_reads_retry_after() -> None:
    assert classify(429, {"Retry-After": "7"}, NOW) == Failure(
        FailureKind.RATE_LIMITED, "rate_limited", 429, "", 7.0
    )
    assert classify(429, {}, NOW) == Failure(
        FailureKind.RATE_LIMITED, "rate_limited", 429, "", None
    )


@pytest.mark.parametrize("status", [500, 501, 502, 503, 504, 599])
def test_5xx_is_a_server_failure_and_reads_retry_after(status: int) -> None:
    assert classify(status, {"retry-after": "12"}, NOW) == Failure(
        FailureKind.SERVER, "server_error", status, "", 12.0
    )
    assert classify(status, {}, NOW) == Failure(FailureKind.SERVER, "server_error", status)


@pytest.mark.parametrize("status", [401, 408, 409, 425])
def test_401_408_409_425_are_retried_and_read_retry_after(status: int) -> None:
    assert classify(status, {"Retry-After": "3"}, NOW) == Failure(
        FailureKind.CONFLICT, f"http_{status}", status, "", 3.0
    )
    assert classify(status, {}, NOW) == Failure(FailureKind.CONFLICT, f"http_{status}", status)


@pytest.mark.parametrize("headers", [{}, {"Retry-After": "3"}])
def test_a_401_to_a_request_without_the_bearer_is_a_dead_letter_that_says_why(
    headers: dict[str, str],
) -> None:
    """No bearer went out (the URL's origin is not allowed), so no refresh can help."""
    assert classify(401, headers, NOW, bearer_sent=False) == Failure(
        FailureKind.REJECTED, "http_401", 401, NO_BEARER
    )
    assert classify(401, {}, NOW, bearer_sent=True) == Failure(
        FailureKind.CONFLICT, "http_401", 401
    )
    for status in (200, 403, 408, 503):  # only a 401 depends on the bearer
        assert classify(status, {}, NOW, bearer_sent=False) == classify(status, {}, NOW)


def test_a_retry_after_date_is_read_against_the_time_given() -> None:
    date = formatdate(NOW + 30, usegmt=True)
    for status, kind in ((429, FailureKind.RATE_LIMITED), (503, FailureKind.SERVER)):
        failure = classify(status, {"Retry-After": date}, NOW)
        assert failure is not None
        assert (failure.kind, failure.retry_after) == (kind, 30.0)
    later = classify(409, {"Retry-After": date}, NOW + 10)
    assert later is not None and later.retry_after == 20.0


def test_dead_reasons_carry_the_status_and_its_phrase_only() -> None:
    assert dead_reason(404) == "HTTP 404 Not Found"
    assert dead_reason(410) == "HTTP 410 Gone"
    assert dead_reason(599) == "HTTP 599 unknown status"
    assert dead_reason(0) == "HTTP 0 unknown status"
    assert NO_BEARER.startswith("HTTP 401 Unauthorized")


def test_no_answer_names_the_error_class() -> None:
    exc = _NoAnswer("ClientConnectorError")
    assert exc.detail == "ClientConnectorError"
    assert str(exc) == "ClientConnectorError"  # what a traceback shows


async def test_an_unreachable_server_is_retried_and_the_log_names_the_error(
    server: ReferenceServer, journal_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tokenjournal")
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with manager(server, journal_path, sign_in=True) as tm:
        outbox = tm.outbox("readings")
        await outbox.enqueue("POST", f"http://127.0.0.1:{port}/api", json={"uid": "a"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        wanted = "outbox readings failed (ClientConnectorError); try 2 again"
        while not any(r.getMessage().startswith(wanted) for r in caplog.records):
            assert loop.time() < deadline, "no retry was logged"
            await asyncio.sleep(0.01)
        assert (await outbox.stats()).pending == 1  # kept for the next try


# --------------------------------------------------------------------------- the outbox


async def test_a_full_outbox_says_which_limit_it_reached(
    server: ReferenceServer, journal_path: Path
) -> None:
    url = server.url + "/api/readings"
    async with manager(server, journal_path) as tm:
        two, three = 2 * len(url) + 2, 3 * len(url) + 3  # each item is the URL and one byte
        cases = [
            ({"max_items": 2}, "max_items=2", 2),
            ({"max_bytes": three}, f"max_bytes={three}", 3),
            ({"max_items": 2, "max_bytes": 10_000}, "max_items=2, max_bytes=10000", 2),
            ({"max_items": 50, "max_bytes": two}, f"max_items=50, max_bytes={two}", 2),
        ]
        for number, (limits, text, fits) in enumerate(cases):
            outbox = tm.outbox(f"o{number}", **limits)
            for _ in range(fits):
                await outbox.enqueue("POST", url, data=b"x")
            with pytest.raises(tj.OutboxFull) as raised:
                await outbox.enqueue("POST", url, data=b"x")
            assert str(raised.value) == f"outbox 'o{number}' is full ({text})"
            assert (await outbox.stats()).pending == fits


async def test_max_bytes_bounds_one_item_exactly(
    server: ReferenceServer, journal_path: Path
) -> None:
    url = server.url + "/api/readings"
    async with manager(server, journal_path) as tm:
        outbox = tm.outbox("small", max_bytes=len(url) + 100)
        with pytest.raises(tj.OutboxFull) as raised:
            await outbox.enqueue("POST", url, data=b"x" * 101)
        assert str(raised.value) == "outbox 'small': one item is larger than max_bytes"
        await outbox.enqueue("POST", url, data=b"x" * 100)  # exactly max_bytes fits
        assert (await outbox.stats()).pending == 1


async def test_drop_oldest_logs_and_emits_the_outboxs_name(
    server: ReferenceServer, journal_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tokenjournal")
    events: list[tj.TokenEvent] = []
    url = server.url + "/api/readings"
    async with manager(server, journal_path) as tm:
        tm.subscribe(events.append)
        lossy = tm.outbox("lossy", max_items=2, when_full="drop_oldest")
        for n in range(3):
            await lossy.enqueue("POST", url, json={"uid": n})
        bytes_bound = tm.outbox("bytes", max_bytes=3 * len(url) + 3, when_full="drop_oldest")
        for _ in range(3):
            await bytes_bound.enqueue("POST", url, data=b"x")
        await bytes_bound.enqueue("POST", url, data=b"x" * (len(url) + 2))
    dropped = [e.code for e in events if e.kind is tj.EventKind.OUTBOX_DROPPED]
    assert dropped == ["lossy", "bytes"]
    assert [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()] == [
        "outbox lossy full: dropped the 1 oldest item(s)",
        "outbox bytes full: dropped the 2 oldest item(s)",
    ]


async def test_stats_measure_the_oldest_age_on_the_managers_clock(
    server: ReferenceServer, journal_path: Path
) -> None:
    clock = FakeClock(start=NOW)
    async with manager(server, journal_path, clock=clock) as tm:
        outbox = tm.outbox("readings")
        assert (await outbox.stats()).oldest_age is None
        await outbox.enqueue("POST", server.url + "/api/readings", data=b"a")
        clock.advance(7.5)
        await outbox.enqueue("POST", server.url + "/api/readings", data=b"b")
        stats = await outbox.stats()
        assert (stats.account, stats.name, stats.pending) == (tm.account, "readings", 2)
        assert stats.oldest_age == 7.5


async def test_repr_names_the_outbox_its_order_and_whether_it_is_paused(
    server: ReferenceServer, journal_path: Path
) -> None:
    async with manager(server, journal_path) as tm:  # nobody signed in
        outbox = tm.outbox("readings")
        assert repr(tm.outbox("loose", ordered=False)) == (
            "Outbox('loose', ordered=False, paused=False)"
        )
        assert not outbox.paused
        assert repr(outbox) == "Outbox('readings', ordered=True, paused=False)"
        await outbox.enqueue("POST", server.url + "/api/readings", data=b"a")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not outbox.paused:  # the first try finds no session
            assert loop.time() < deadline, "the outbox never paused"
            await asyncio.sleep(0.01)
        assert repr(outbox) == "Outbox('readings', ordered=True, paused=True)"


async def test_an_outbox_of_a_closed_manager_says_how_to_open_it(
    server: ReferenceServer, journal_path: Path
) -> None:
    async with manager(server, journal_path) as tm:
        outbox = tm.outbox("readings")
    expected = "the TokenManager is not open: use `async with tm:` or `await tm.open()`"
    with pytest.raises(RuntimeError) as raised:
        await outbox.enqueue("POST", server.url + "/api/readings", data=b"a")
    assert str(raised.value) == expected
    with pytest.raises(RuntimeError) as raised:
        await outbox.drain()
    assert str(raised.value) == expected


async def test_an_ordered_outbox_has_one_item_in_flight_whatever_concurrency_says(
    server: ReferenceServer, journal_path: Path
) -> None:
    async with manager(server, journal_path) as tm:
        ordered = tm.outbox("ordered", ordered=True, concurrency=5)
        loose = tm.outbox("loose", ordered=False, concurrency=5)
        assert (ordered.concurrency, loose.concurrency) == (1, 5)
        assert tm.outbox("ordered", ordered=True, concurrency=3) is ordered  # not an option
