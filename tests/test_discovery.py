"""Discovery (RFC 8414, OpenID Connect Discovery): endpoints from an issuer URL, checked,
kept in the journal, used when the issuer cannot be reached; error descriptions."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aioresponses import aioresponses

import tokenjournal as tj
from tokenjournal._protocols import metadata_urls, parse_metadata
from tokenjournal.server import ReferenceServer, ServerConfig
from tokenjournal.testing import FakeClock

CLIENT = "tokenjournal-demo"


@asynccontextmanager
async def serving(**config: Any) -> AsyncIterator[ReferenceServer]:
    async with ReferenceServer(ServerConfig(test_mode=True, **config)) as server:
        yield server


@asynccontextmanager
async def document_server(document: dict[str, Any]) -> AsyncIterator[str]:
    """A server that serves ``document`` (as it is at each request) at every path, with
    ``"{origin}"`` filled in."""

    async def handler(request: web.Request) -> web.Response:
        body = json.dumps(document).replace("{origin}", str(request.url.origin()))
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def unreachable_issuer() -> str:
    """An http://127.0.0.1 URL whose port nothing listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


# --------------------------------------------------------------------------- pure parts


def test_well_known_urls_for_an_issuer_with_and_without_a_path() -> None:
    assert metadata_urls("https://sso.example.com/realms/acme") == (
        "https://sso.example.com/realms/acme/.well-known/openid-configuration",
        "https://sso.example.com/.well-known/oauth-authorization-server/realms/acme",
    )
    assert metadata_urls("https://auth.example.com/") == (
        "https://auth.example.com/.well-known/openid-configuration",
        "https://auth.example.com/.well-known/oauth-authorization-server",
    )


def test_a_document_for_another_issuer_is_refused() -> None:
    body = json.dumps({"issuer": "https://evil.example", "token_endpoint": "https://evil/t"})
    failure = parse_metadata(200, {}, body.encode(), "https://sso.example.com")
    assert isinstance(failure, tj.Failure) and failure.code == "issuer_mismatch"


def test_a_trailing_slash_is_the_one_issuer_difference_forgiven() -> None:
    body = json.dumps({"issuer": "https://t.auth0.com/", "token_endpoint": "https://t.auth0.com/t"})
    metadata = parse_metadata(200, {}, body.encode(), "https://t.auth0.com")
    assert isinstance(metadata, tj.ServerMetadata)
    assert metadata.token_endpoint == "https://t.auth0.com/t"


@pytest.mark.parametrize(
    "document",
    [
        {"issuer": "https://a"},  # no token endpoint
        {"issuer": "https://a", "token_endpoint": "javascript:alert(1)"},
        {"issuer": "https://a", "token_endpoint": "https://a/t", "revocation_endpoint": 7},
        ["not", "an", "object"],
    ],
)
def test_a_document_without_usable_endpoints_is_malformed(document: object) -> None:
    failure = parse_metadata(200, {}, json.dumps(document).encode(), "https://a")
    assert isinstance(failure, tj.Failure) and failure.kind is tj.FailureKind.MALFORMED


# --------------------------------------------------------------------------- against servers


async def test_discover_fills_every_endpoint_from_the_reference_server() -> None:
    async with serving() as server:
        protocol = await tj.OAuth2Protocol.discover(
            server.url, client_id=CLIENT, scope="openid offline_access"
        )
    assert protocol.token_url == f"{server.url}/oauth/token"
    assert protocol.device_authorization_url == f"{server.url}/oauth/device_authorization"
    assert protocol.authorization_url == f"{server.url}/oauth/authorize"
    assert protocol.revocation_url == f"{server.url}/oauth/revoke"
    assert protocol.issuer == server.url
    assert protocol.client_id == CLIENT and protocol.scope == "openid offline_access"
    assert protocol.client_auth == "none"  # no secret given: a public client


async def test_options_override_what_the_document_says() -> None:
    async with serving() as server:
        protocol = await tj.OAuth2Protocol.discover(
            server.url, client_id=CLIENT, revocation_url=None
        )
    assert protocol.revocation_url is None


async def test_the_rfc8414_document_is_read_when_openid_configuration_is_missing() -> None:
    document = {"issuer": "{origin}/tenant", "token_endpoint": "{origin}/tenant/token"}
    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        if request.path.endswith("/openid-configuration"):
            return web.Response(status=404)
        body = json.dumps(document).replace("{origin}", str(request.url.origin()))
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        protocol = await tj.OAuth2Protocol.discover(origin + "/tenant", client_id="c")
    finally:
        await runner.cleanup()
    assert protocol.token_url == origin + "/tenant/token"
    assert hits == [
        "/tenant/.well-known/openid-configuration",
        "/.well-known/oauth-authorization-server/tenant",
    ]


async def test_an_issuer_mismatch_is_a_protocol_error_even_with_a_kept_document() -> None:
    """A document that now speaks for another issuer is an attack or a misconfiguration,
    not an outage: the kept document is not used to paper over it."""
    document: dict[str, Any] = {"issuer": "{origin}", "token_endpoint": "{origin}/token"}
    journal = tj.MemoryJournal()
    clock = FakeClock()
    async with document_server(document) as origin:
        await tj.OAuth2Protocol.discover(origin, client_id="c", journal=journal, clock=clock)
        clock.advance(2 * 86400)  # stale: read again
        document["issuer"] = "https://elsewhere.example"
        with pytest.raises(tj.ProtocolError, match="issuer_mismatch"):
            await tj.OAuth2Protocol.discover(origin, client_id="c", journal=journal, clock=clock)


async def test_the_document_is_kept_and_used_when_the_issuer_is_unreachable(
    journal_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving() as server:
        first = await tj.OAuth2Protocol.discover(server.url, client_id=CLIENT, journal=journal_path)
        issuer = server.url
    # The server is gone (a device that boots offline): the kept document still starts it,
    # even once it is older than max_age.
    clock = FakeClock()
    clock.advance(10 * 86400)
    with caplog.at_level(logging.WARNING, logger="tokenjournal"):
        again = await tj.OAuth2Protocol.discover(
            issuer, client_id=CLIENT, journal=journal_path, clock=clock, request_timeout=2
        )
    assert again == first
    assert "using the kept document" in caplog.text


async def test_without_a_kept_document_an_unreachable_issuer_is_a_network_error() -> None:
    with pytest.raises(tj.NetworkError):
        await tj.OAuth2Protocol.discover(unreachable_issuer(), client_id="c", request_timeout=2)


async def test_a_fresh_kept_document_asks_nothing_and_a_stale_one_is_read_again() -> None:
    journal = tj.MemoryJournal()
    clock = FakeClock()
    hits: list[str] = []
    document = {"issuer": "{origin}", "token_endpoint": "{origin}/token"}

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        body = json.dumps(document).replace("{origin}", str(request.url.origin()))
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        for _ in range(3):
            await tj.OAuth2Protocol.discover(
                origin, client_id="c", journal=journal, clock=clock, max_age=3600
            )
        assert len(hits) == 1  # read once, then recalled
        clock.advance(3601)
        await tj.OAuth2Protocol.discover(
            origin, client_id="c", journal=journal, clock=clock, max_age=3600
        )
        assert len(hits) == 2  # stale: read again
    finally:
        await runner.cleanup()


async def test_a_journal_a_manager_uses_stays_open(journal_path: Path) -> None:
    async with serving() as server:
        journal = tj.SQLiteJournal(journal_path)
        async with tj.TokenManager(server.url, journal, protocol=None) as tm:
            await tj.OAuth2Protocol.discover(server.url, client_id=CLIENT, journal=journal)
            assert journal.is_open
            await tm.sign_in(email="demo@example.com", password="demo")  # still usable
        assert not journal.is_open


async def test_plain_http_discovery_of_a_remote_issuer_is_refused() -> None:
    with pytest.raises(ValueError, match="plain HTTP"):
        await tj.OAuth2Protocol.discover("http://sso.example.com", client_id="c")


@pytest.mark.parametrize("issuer", ["https://sso.example.com/?tenant=1", "https://a/#x"])
async def test_an_issuer_with_a_query_or_a_fragment_is_refused(issuer: str) -> None:
    """RFC 8414 2: an issuer has neither; the well-known URLs were built inside the query
    (https://host/?tenant=1/.well-known/openid-configuration)."""
    with pytest.raises(ValueError, match="no query or fragment"):
        await tj.OAuth2Protocol.discover(issuer, client_id="c")


async def test_discovery_tells_the_protocol_that_redirects_name_the_issuer() -> None:
    async with serving() as server:
        protocol = await tj.OAuth2Protocol.discover(server.url, client_id="tokenjournal-demo")
    assert protocol.iss_in_redirects is True


async def test_a_discovered_protocol_signs_in_and_refreshes(journal_path: Path) -> None:
    async with serving() as server:
        protocol = await tj.OAuth2Protocol.discover(server.url, client_id=CLIENT)
        async with tj.TokenManager(protocol.token_url, journal_path, protocol=protocol) as tm:
            await tm.sign_in(username="demo@example.com", password="demo")
            await tm.refresh()
            await tm.sign_out()
        assert server.stats()["logouts"] == 1  # told through the discovered revocation URL


# --------------------------------------------------------------------------- descriptions


async def test_sign_in_failed_carries_the_servers_description(journal_path: Path) -> None:
    async with serving() as server:
        protocol = await tj.OAuth2Protocol.discover(server.url, client_id=CLIENT)
        async with tj.TokenManager(protocol.token_url, journal_path, protocol=protocol) as tm:
            with pytest.raises(tj.SignInFailed) as caught:
                await tm.sign_in(username="demo@example.com", password="wrong")
    assert caught.value.code == "invalid_grant"
    assert caught.value.description == "invalid username or password"
    assert "invalid username or password" in str(caught.value)


async def test_a_description_is_cut_made_printable_and_never_quotes_a_token() -> None:
    secret = "PASSWORD-that-must-not-leak"
    description = f"\x1b]0;owned\x07 you sent {secret} " + "x" * 5000
    with aioresponses() as mock:
        mock.post(
            "https://auth.example.com/token",
            status=400,
            payload={"error": "invalid_grant", "error_description": description},
        )
        protocol = tj.OAuth2Protocol("https://auth.example.com/token", client_id="c")
        async with tj.TokenManager(
            "https://auth.example.com", tj.MemoryJournal(), protocol=protocol
        ) as tm:
            with pytest.raises(tj.SignInFailed) as caught:
                await tm.sign_in(username="u", password=secret)
    said = caught.value.description
    assert said is not None and len(said) <= tj._errors.DESCRIPTION_LIMIT
    assert "\x1b" not in said and "\x07" not in said and "\\x1b" in said
    assert secret not in said and secret not in str(caught.value)


async def test_session_ended_and_protocol_error_carry_the_description() -> None:
    from datetime import UTC, datetime, timedelta

    old = tj.TokenSet("a" * 20, "r" * 20, datetime.now(UTC) - timedelta(seconds=1))
    protocol = tj.OAuth2Protocol("https://auth.example.com/token", client_id="c")
    for status, payload, error in (
        (400, {"error": "invalid_grant", "error_description": "Token is revoked"}, "ended"),
        (400, {"error": "invalid_scope", "error_description": "Scope not allowed"}, "protocol"),
    ):
        with aioresponses() as mock:
            mock.post("https://auth.example.com/token", status=status, payload=payload)
            async with tj.TokenManager(
                "https://auth.example.com", tj.MemoryJournal(), protocol=protocol
            ) as tm:
                await tm.set_tokens(old)
                expected = tj.SessionEnded if error == "ended" else tj.ProtocolError
                with pytest.raises(expected) as caught:
                    await tm.refresh()
        assert caught.value.description == payload["error_description"]


async def test_a_5xx_a_404_or_a_portal_page_uses_the_kept_document() -> None:
    """An outage (5xx), a document gone missing (404) or a captive portal's page (200 HTML)
    all mean "cannot be reached" for a device that has a kept document: it still starts.
    Without one, the same answers are errors."""
    answer: dict[str, Any] = {"status": 200, "html": False}
    document = {"issuer": "{origin}", "token_endpoint": "{origin}/token"}

    async def handler(request: web.Request) -> web.Response:
        if answer["html"]:
            return web.Response(text="<html>Hotel Wi-Fi: log in</html>", content_type="text/html")
        if answer["status"] != 200:
            return web.Response(status=answer["status"])
        body = json.dumps(document).replace("{origin}", str(request.url.origin()))
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    journal, clock = tj.MemoryJournal(), FakeClock()
    try:
        first = await tj.OAuth2Protocol.discover(
            origin, client_id="c", journal=journal, clock=clock
        )
        clock.advance(2 * 86400)  # stale: every call below asks the server again
        for status, html in ((503, False), (404, False), (200, True)):
            answer.update(status=status, html=html)
            kept = await tj.OAuth2Protocol.discover(
                origin, client_id="c", journal=journal, clock=clock
            )
            assert kept == first, (status, html)
        answer.update(status=503, html=False)
        with pytest.raises(tj.NetworkError):
            await tj.OAuth2Protocol.discover(origin, client_id="c")
        answer.update(status=404)
        with pytest.raises(tj.ProtocolError):
            await tj.OAuth2Protocol.discover(origin, client_id="c")
    finally:
        await runner.cleanup()
