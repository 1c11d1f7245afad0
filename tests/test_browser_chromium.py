"""A real browser against the reference server's pages: headless Chromium (Selenium) opens
the URL ``sign_in_browser`` produced, signs in and consents (or denies), and the SDK ends
signed in (or with ``SignInFailed("access_denied")``); the same browser approves a device
code on the verification page. Every page is saved as a screenshot (tests/harness/chromium.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import tokenjournal as tj
from tests.harness.chromium import Chromium
from tokenjournal.server import ReferenceServer, ServerConfig
from tokenjournal.testing import FakeClock

CLIENT = "tokenjournal-demo"


@pytest.fixture
def chromium(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Chromium]:
    browser = Chromium(tmp_path / "profile", request.node.name)
    try:
        yield browser
    finally:
        browser.close()


@asynccontextmanager
async def manager(
    journal: Path, clock: tj.Clock | None = None
) -> AsyncIterator[tuple[ReferenceServer, tj.TokenManager]]:
    async with ReferenceServer(ServerConfig(test_mode=True)) as server:
        protocol = await tj.OAuth2Protocol.discover(
            server.url, client_id=CLIENT, scope="openid offline_access"
        )
        async with tj.TokenManager(
            protocol.token_url, journal, protocol=protocol, clock=clock
        ) as tm:
            yield server, tm


async def test_chromium_signs_in_and_consents(chromium: Chromium, journal_path: Path) -> None:
    def person(url: str) -> None:
        chromium.open(url)
        chromium.wait_for_text("asks to use your account")
        chromium.shot("login-and-consent")
        chromium.fill("password", "demo")
        chromium.click("#allow")
        chromium.wait_for_text("You can close this tab")
        chromium.shot("signed-in")

    async def open_browser(url: str) -> None:
        await asyncio.to_thread(person, url)

    async with manager(journal_path) as (server, tm):
        tokens = await tm.sign_in_browser(open_browser=open_browser, timeout=60)
        assert tm.state is tj.SessionState.VALID and tokens.id_token is not None
        assert server.stats()["signins"] == 1
        assert await tm.access_token() == tokens.access_token
    assert chromium.url.startswith("http://127.0.0.1:")  # it ended on our loopback page
    assert all(shot.stat().st_size > 0 for shot in chromium.shots)


async def test_chromium_wrong_password_then_right_one(
    chromium: Chromium, journal_path: Path
) -> None:
    def person(url: str) -> None:
        chromium.open(url)
        chromium.fill("password", "not-the-password")
        chromium.click("#allow")
        chromium.wait_for_text("Wrong email or password")
        chromium.shot("wrong-password")
        chromium.fill("password", "demo")
        chromium.click("#allow")
        chromium.wait_for_text("You can close this tab")

    async def open_browser(url: str) -> None:
        await asyncio.to_thread(person, url)

    async with manager(journal_path) as (_, tm):
        await tm.sign_in_browser(open_browser=open_browser, timeout=60)
        assert tm.state is tj.SessionState.VALID


async def test_chromium_denial_is_access_denied(chromium: Chromium, journal_path: Path) -> None:
    def person(url: str) -> None:
        chromium.open(url)
        chromium.wait_for_text("asks to use your account")
        chromium.click("#deny")
        chromium.wait_for_text("Sign-in failed")
        chromium.shot("denied")

    async def open_browser(url: str) -> None:
        await asyncio.to_thread(person, url)

    async with manager(journal_path) as (server, tm):
        with pytest.raises(tj.SignInFailed) as caught:
            await tm.sign_in_browser(open_browser=open_browser, timeout=60)
        assert tm.tokens is None and server.stats()["signins"] == 0
    assert caught.value.code == "access_denied"
    assert caught.value.description == "The user denied access"


async def test_chromium_approves_a_device_on_the_verification_page(
    chromium: Chromium, journal_path: Path
) -> None:
    def person(url: str) -> None:
        chromium.open(url)
        chromium.wait_for_text("Sign in a device")
        chromium.shot("device-page")
        chromium.fill("password", "demo")
        chromium.click("button[value=approve]")
        chromium.wait_for_text("The device is signed in")
        chromium.shot("device-approved")

    async def on_code(code: tj.DeviceCode) -> None:
        # The person approves before the device polls: with the fake clock the first poll
        # after the interval gets the tokens, no real waiting.
        assert code.verification_uri_complete is not None
        await asyncio.to_thread(person, code.verification_uri_complete)

    async with manager(journal_path, clock=FakeClock()) as (_, tm):
        tokens = await tm.sign_in_device(on_code)
        assert tm.state is tj.SessionState.VALID and tokens.refresh_token is not None
