"""Browser sign-in (RFC 8252 loopback redirect, RFC 7636 PKCE) against the reference server.

The "browser" here is aiohttp: it opens the URL ``sign_in_browser`` produced, reads the
login and consent form, submits it, and follows the redirect to the SDK's loopback
listener. tests/test_browser_chromium.py does the same with a real Chromium.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import math
import re
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import aiohttp
import pytest
from aioresponses import aioresponses

import tokenjournal as tj
from tokenjournal.server import ReferenceServer, ServerConfig
from tokenjournal.testing import FakeClock

from .conftest import modules_loaded

CLIENT = "tokenjournal-demo"
HIDDEN = re.compile(r'<input type="hidden" name="(\w+)" value="([^"]*)">')


class Browser:
    """Opens the authorization URL and answers the form like a person would."""

    def __init__(
        self,
        action: str = "allow",
        password: str = "demo",
        tamper: Callable[[dict[str, list[str]]], None] | None = None,
    ) -> None:
        self.action = action
        self.password = password
        self.tamper = tamper
        self.urls: list[str] = []
        self.final_page = ""
        self.redirect = ""

    async def __call__(self, url: str) -> bool:
        self.urls.append(url)
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as page:
                assert page.status == 200, await page.text()
                form = {k: html.unescape(v) for k, v in HIDDEN.findall(await page.text())}
            form.update(email="demo@example.com", password=self.password, action=self.action)
            action_url = urlunsplit(urlsplit(url)._replace(query=""))
            async with http.post(action_url, data=form, allow_redirects=False) as answer:
                assert answer.status == 302, await answer.text()
                location = answer.headers["Location"]
            if self.tamper is not None:
                parts = urlsplit(location)
                query = parse_qs(parts.query)
                self.tamper(query)
                location = urlunsplit(parts._replace(query=urlencode(query, doseq=True)))
            self.redirect = location
            async with http.get(location) as done:
                self.final_page = await done.text()
        return True


@asynccontextmanager
async def signed_in_setup(
    journal: Path | tj.Journal, **manager: Any
) -> AsyncIterator[tuple[ReferenceServer, tj.TokenManager]]:
    async with ReferenceServer(ServerConfig(test_mode=True)) as server:
        protocol = await tj.OAuth2Protocol.discover(
            server.url, client_id=CLIENT, scope="openid offline_access"
        )
        async with tj.TokenManager(protocol.token_url, journal, protocol=protocol, **manager) as tm:
            yield server, tm


def port_is_closed(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as sock:
        return sock.connect_ex((parts.hostname or "", parts.port or 0)) != 0


def redirect_uri_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["redirect_uri"][0]


def test_import_tokenjournal_leaves_the_listeners_server_side_unloaded() -> None:
    """aiohttp's server side (about 2 MiB of memory) is loaded by the first browser sign-in,
    not by ``import tokenjournal``: an IoT box that never opens a browser never pays it."""
    steps = ["import tokenjournal, tokenjournal._browser", "import tokenjournal._listener"]
    watch = ("aiohttp.web", "html")
    assert modules_loaded(steps, watch) == [[], ["aiohttp.web", "html"]]


async def test_a_person_who_allows_signs_the_app_in(journal_path: Path) -> None:
    browser = Browser()
    async with signed_in_setup(journal_path) as (server, tm):
        tokens = await tm.sign_in_browser(open_browser=browser)
        assert tm.state is tj.SessionState.VALID and tm.tokens == tokens
        assert tokens.id_token is not None and tokens.scope == "openid offline_access"
        assert tokens.refresh_token is not None
        assert await tm.access_token() == tokens.access_token
        assert server.stats()["signins"] == 1
    assert "Signed in" in browser.final_page and "close this tab" in browser.final_page
    query = parse_qs(urlsplit(browser.urls[0]).query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert query["response_type"] == ["code"] and query["scope"] == ["openid offline_access"]
    assert redirect_uri_of(browser.urls[0]).startswith("http://127.0.0.1:")
    assert port_is_closed(redirect_uri_of(browser.urls[0]))  # the listener is gone
    # The pair was journaled: a new manager starts signed in.
    journal = tj.SQLiteJournal(journal_path)
    await journal.open()
    try:
        assert (await journal.load("default")).tokens == tokens
    finally:
        await journal.close()


async def test_a_denial_is_sign_in_failed_access_denied_and_stores_nothing(
    journal_path: Path,
) -> None:
    browser = Browser(action="deny")
    async with signed_in_setup(journal_path) as (server, tm):
        with pytest.raises(tj.SignInFailed) as caught:
            await tm.sign_in_browser(open_browser=browser)
        assert tm.tokens is None and tm.state is tj.SessionState.SIGNED_OUT
        assert server.stats()["signins"] == 0
    assert caught.value.code == "access_denied"
    assert caught.value.description == "The user denied access"
    assert "Sign-in failed" in browser.final_page
    assert port_is_closed(redirect_uri_of(browser.urls[0]))


def forge(query: dict[str, list[str]]) -> None:
    query["state"] = ["someone-elses-state"]


async def test_a_redirect_with_another_state_is_never_believed_nor_ends_the_wait(
    journal_path: Path,
) -> None:
    """A redirect with another state (a stale tab of an earlier try, or a web page or a
    program that knows the port) used to be taken as the answer: the sign-in failed with
    state_mismatch and the person's real redirect that followed was thrown away. It is
    refused with a 400 page, its code never sent, and the wait goes on."""
    genuine = Browser()
    stray_pages: list[tuple[int, str]] = []

    async def stray_then_genuine(url: str) -> None:
        callback = redirect_uri_of(url)
        stray = {"code": "c", "state": "x"}
        async with aiohttp.ClientSession() as http, http.get(callback, params=stray) as page:
            stray_pages.append((page.status, await page.text()))
        await genuine(url)

    async with signed_in_setup(journal_path) as (server, tm):
        tokens = await tm.sign_in_browser(open_browser=stray_then_genuine)
        assert tm.tokens == tokens and server.stats()["signins"] == 1
    ((status, page),) = stray_pages
    assert status == 400 and "another sign-in" in page
    assert "Signed in" in genuine.final_page


async def test_only_redirects_of_another_sign_in_end_in_state_mismatch(
    journal_path: Path,
) -> None:
    clock = FakeClock()
    browser = Browser(tamper=forge)
    async with signed_in_setup(journal_path, clock=clock) as (server, tm):
        with pytest.raises(tj.SignInFailed) as caught:
            await tm.sign_in_browser(open_browser=browser, timeout=120)
        assert server.stats()["signins"] == 0  # the code was never sent
        assert tm.tokens is None
    assert caught.value.code == "state_mismatch"
    assert caught.value.description == (
        "within 120 s only redirects of another sign-in came back (1), none of this one"
    )
    assert 120 in clock.sleeps and "Not this sign-in" in browser.final_page


async def test_a_redirect_without_iss_from_a_server_that_always_sends_it_is_refused(
    journal_path: Path,
) -> None:
    """RFC 9207 2.4: the reference server says (authorization_response_iss_parameter_
    supported) that its redirects name it, so one without iss is a mix-up attempt that
    dropped it; it used to be believed."""

    def drop_iss(query: dict[str, list[str]]) -> None:
        del query["iss"]

    async with signed_in_setup(journal_path) as (server, tm):
        assert isinstance(tm.protocol, tj.OAuth2Protocol) and tm.protocol.iss_in_redirects
        with pytest.raises(tj.SignInFailed) as caught:
            await tm.sign_in_browser(open_browser=Browser(tamper=drop_iss))
        assert server.stats()["signins"] == 0
    assert caught.value.code == "issuer_mismatch"


async def test_a_redirects_error_reaches_the_exception_printable_and_short(
    journal_path: Path,
) -> None:
    """The redirect's error is the only server text that reaches SignInFailed by no
    exchange: a CR/LF in it forged a second log line, an escape sequence reached the
    terminal, 5,000 characters made the message."""
    code = "access_denied\r\n2026-01-01 INFO tokenjournal: signed in\x1b[2J\u202e" + "x" * 5000

    def hostile(query: dict[str, list[str]]) -> None:
        query.pop("code", None)
        query["error"] = [code]

    async with signed_in_setup(journal_path) as (_, tm):
        with pytest.raises(tj.SignInFailed) as caught:
            await tm.sign_in_browser(open_browser=Browser(tamper=hostile))
    assert len(caught.value.code) <= 64 and caught.value.code.isprintable()
    assert caught.value.code.startswith("access_denied\\x0d\\x0a2026-01-01")
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


async def test_a_redirect_naming_another_issuer_is_refused(journal_path: Path) -> None:
    def mix_up(query: dict[str, list[str]]) -> None:
        query["iss"] = ["https://attacker.example"]

    async with signed_in_setup(journal_path) as (server, tm):
        with pytest.raises(tj.SignInFailed) as caught:
            await tm.sign_in_browser(open_browser=Browser(tamper=mix_up))
        assert server.stats()["signins"] == 0
    assert caught.value.code == "issuer_mismatch"


async def test_a_code_the_server_refuses_is_sign_in_failed(journal_path: Path) -> None:
    def swap(query: dict[str, list[str]]) -> None:
        query["code"] = ["not-a-code-the-server-issued"]

    async with signed_in_setup(journal_path) as (_, tm):
        with pytest.raises(tj.SignInFailed) as caught:
            await tm.sign_in_browser(open_browser=Browser(tamper=swap))
        assert tm.tokens is None
    assert caught.value.code == "invalid_grant" and caught.value.description


async def test_nobody_coming_back_is_a_timeout_on_the_managers_clock(journal_path: Path) -> None:
    clock = FakeClock()
    opened: list[str] = []
    async with signed_in_setup(journal_path, clock=clock) as (_, tm):
        with pytest.raises(tj.SignInFailed) as caught:
            await tm.sign_in_browser(open_browser=opened.append, timeout=120)
    assert caught.value.code == "timeout" and "120 s" in (caught.value.description or "")
    assert 120 in clock.sleeps
    assert port_is_closed(redirect_uri_of(opened[0]))


async def test_a_crash_in_the_middle_leaves_the_previous_session_as_it_was(
    journal_path: Path,
) -> None:
    """The flow journals nothing until the exchange returned a pair: a caller cancelled (a
    process killed) while the person is still at the login page changes nothing."""
    opened: list[str] = []
    async with signed_in_setup(journal_path) as (_, tm):
        before = await tm.sign_in(username="demo@example.com", password="demo")
        flow = asyncio.ensure_future(tm.sign_in_browser(open_browser=opened.append))
        while not opened:
            await asyncio.sleep(0)
        flow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flow
        assert tm.tokens == before
        assert (await tm.journal.load(tm.account)).tokens == before
        assert await tm.access_token() == before.access_token
    assert port_is_closed(redirect_uri_of(opened[0]))


async def test_the_code_exchange_goes_through_the_retry_loop(journal_path: Path) -> None:
    """A 503 on the exchange is retried like any sign-in (the one retry loop)."""
    clock = FakeClock()
    async with ReferenceServer(ServerConfig(test_mode=True)) as server:
        protocol = tj.OAuth2Protocol(
            "https://auth.example.com/token",
            client_id=CLIENT,
            authorization_url=server.url + "/oauth/authorize",
            issuer=server.url,
        )
        with aioresponses(passthrough=["http://127.0.0.1"]) as mock:
            mock.post("https://auth.example.com/token", status=503)
            mock.post(
                "https://auth.example.com/token",
                payload={"access_token": "acc", "token_type": "Bearer", "refresh_token": "ref"},
            )
            async with tj.TokenManager(
                "https://auth.example.com", journal_path, protocol=protocol, clock=clock
            ) as tm:
                tokens = await tm.sign_in_browser(open_browser=Browser())
        assert tokens.access_token == "acc"
        sent = [call for key, calls in mock.requests.items() for call in calls]
        assert len(sent) == 2
        body = sent[1].kwargs["data"].decode()
        assert "grant_type=authorization_code" in body and "code_verifier=" in body


async def test_prompt_is_passed_on_and_prompt_none_is_answered_login_required(
    journal_path: Path,
) -> None:
    seen: list[str] = []

    async def follow(url: str) -> None:
        seen.append(url)
        async with aiohttp.ClientSession() as http, http.get(url) as page:
            await page.read()

    async with signed_in_setup(journal_path) as (_, tm):
        with pytest.raises(tj.SignInFailed) as caught:
            await tm.sign_in_browser(open_browser=follow, prompt="none")
    assert parse_qs(urlsplit(seen[0]).query)["prompt"] == ["none"]
    assert caught.value.code == "login_required"


async def test_a_browser_that_cannot_open_logs_the_url_to_open_by_hand(
    journal_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    async with signed_in_setup(journal_path, clock=clock) as (_, tm):
        with pytest.raises(tj.SignInFailed):
            await tm.sign_in_browser(open_browser=lambda url: False, timeout=1)
    assert "open this URL to sign in" in caplog.text and "/oauth/authorize?" in caplog.text


async def test_browser_sign_in_needs_an_oauth_protocol_with_an_authorization_url(
    journal_path: Path,
) -> None:
    async with ReferenceServer(ServerConfig(test_mode=True)) as server:
        async with tj.TokenManager(server.url, journal_path) as tm:
            with pytest.raises(TypeError):
                await tm.sign_in_browser(open_browser=lambda url: True)
        protocol = tj.OAuth2Protocol(server.url + "/oauth/token", client_id=CLIENT)
        async with tj.TokenManager(server.url, tj.MemoryJournal(), protocol=protocol) as tm:
            with pytest.raises(ValueError, match="authorization_url"):
                await tm.sign_in_browser(open_browser=lambda url: True)


async def test_a_plain_opener_that_blocks_runs_beside_the_listener(journal_path: Path) -> None:
    """webbrowser.open waits for a console browser (lynx, w3m) to exit; called on the event
    loop, it kept the listener from answering the redirect it waited for: the browser hung
    and so did the sign-in, past its timeout."""
    answered: list[int] = []

    def console_browser(url: str) -> bool:  # blocks until the listener answers it
        stray = redirect_uri_of(url) + "?state=x"
        try:
            urllib.request.urlopen(stray, timeout=10)
        except urllib.error.HTTPError as refused:
            answered.append(refused.code)
        return True

    clock = FakeClock()
    async with signed_in_setup(journal_path, clock=clock) as (_, tm):
        with pytest.raises(tj.SignInFailed) as caught:
            await tm.sign_in_browser(open_browser=console_browser, timeout=120)
    assert answered == [400] and caught.value.code == "state_mismatch"


async def test_close_and_the_timeout_end_an_opener_that_never_returns(journal_path: Path) -> None:
    """A webview or a desktop portal that never returns held the flow and its port past the
    timeout, and past close(): the opener was awaited before the wait began."""
    called = asyncio.Event()
    urls: list[str] = []

    async def stuck(url: str) -> None:
        urls.append(url)
        called.set()
        await asyncio.Event().wait()

    async with signed_in_setup(journal_path) as (_, tm):
        with pytest.raises(tj.SignInFailed) as caught:
            await tm.sign_in_browser(open_browser=stuck, timeout=0.05)
        assert caught.value.description == "the browser opener did not return within 0.05 s"
        assert port_is_closed(redirect_uri_of(urls[0]))
        called.clear()
        flow = asyncio.ensure_future(tm.sign_in_browser(open_browser=stuck))
        await asyncio.wait_for(called.wait(), 10)
        await asyncio.wait_for(tm.close(), 10)
        with pytest.raises(RuntimeError, match="closed during the browser sign-in"):
            await asyncio.wait_for(flow, 10)
    assert port_is_closed(redirect_uri_of(urls[1]))


async def test_a_cancel_while_the_listener_starts_leaves_no_port_bound(journal_path: Path) -> None:
    """aiohttp's site serves before its start returns: a cancel landing there lost the
    server with its port bound for the life of the process, so a sign-in on a fixed port
    (a redirect URI registered with its port) failed with EADDRINUSE from then on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with signed_in_setup(journal_path) as (_, tm):
        for steps in range(12):  # a cancel after each step of the listener's start
            flow = asyncio.ensure_future(
                tm.sign_in_browser(open_browser=lambda url: True, port=port)
            )
            for _ in range(steps):
                await asyncio.sleep(0)
            flow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flow
            assert port_is_closed(f"http://127.0.0.1:{port}/callback"), steps
        tokens = await tm.sign_in_browser(open_browser=Browser(), port=port)
        assert tm.tokens == tokens


async def test_a_plain_http_login_page_on_another_host_is_refused(journal_path: Path) -> None:
    """The person types a password on the authorization page: http to another host was
    accepted there, where the manager refused it for every URL it sends a secret to."""
    remote = tj.OAuth2Protocol(
        "https://auth.example.com/token",
        client_id=CLIENT,
        authorization_url="http://auth.example.com/authorize",
    )
    with pytest.raises(ValueError, match=r"refusing plain HTTP to auth\.example\.com"):
        tj.TokenManager("https://auth.example.com", journal_path, protocol=remote)
    tj.TokenManager(
        "https://auth.example.com", journal_path, protocol=remote, allow_insecure_http=True
    )


@pytest.mark.parametrize("timeout", [0, -1, math.nan, math.inf])
async def test_a_timeout_that_is_no_finite_positive_number_is_refused(
    journal_path: Path, timeout: float
) -> None:
    async with signed_in_setup(journal_path) as (_, tm):
        with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
            await tm.sign_in_browser(open_browser=lambda url: True, timeout=timeout)
