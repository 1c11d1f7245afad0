"""`tokenjournal conformance`: passes against the reference server in every mode, fails
against servers without a grace window."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tokenjournal.cli import main
from tokenjournal.server import ReferenceServer, ServerConfig

REQUIRED = {"signin", "rotation", "replay", "concurrent", "two_generations", "after_window"}


async def conformance(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run the command as a user would (its own event loop, in a thread: ours serves)."""
    code = await asyncio.to_thread(main, ["conformance", *args])
    return code, capsys.readouterr().out


def rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["key"]: c for c in report["checks"]}


@pytest.mark.parametrize(
    ("protocol", "config", "extra", "style"),
    [
        ("mana", {}, [], "same pair"),
        ("mana", {"conflict": "409"}, [], "same pair"),
        ("oauth2", {}, [], "same pair"),
        ("oauth2", {"oauth_replay": "new"}, [], "new pair"),
        (
            "oauth2",
            {"clients": (("app", "s3cret"),)},
            ["--client-id", "app", "--client-secret", "s3cret"],
            "same pair",
        ),
    ],
    ids=["mana", "mana-409", "oauth2-same", "oauth2-new", "oauth2-confidential"],
)
async def test_reference_server_passes_every_required_check(
    capsys: pytest.CaptureFixture[str],
    protocol: str,
    config: dict[str, Any],
    extra: list[str],
    style: str,
) -> None:
    async with ReferenceServer(ServerConfig(test_mode=True, **config)) as server:
        code, out = await conformance(
            capsys, server.url, "--protocol", protocol, "--test-clock", "--json", *extra
        )
        stats = server.stats()
    report = json.loads(out)
    checks = rows(report)
    assert code == 0 and report["ok"] is True, out
    assert {k for k, c in checks.items() if c["required"]} == REQUIRED
    assert all(checks[k]["outcome"] == "pass" for k in REQUIRED)
    assert report["replay_style"] == style
    assert checks["replay_style"]["detail"] == style
    # The probes really ran: both reuses were detected and revoked a family each.
    assert stats["reuse_detections"] >= 2 and stats["family_revocations"] >= 2
    assert checks["two_generations_revokes"]["detail"].startswith("yes")
    assert checks["after_window_revokes"]["detail"].startswith("yes")


async def test_table_output_and_skipped_clock_check(
    capsys: pytest.CaptureFixture[str], server: ReferenceServer
) -> None:
    """Without --test-clock the after-window row is skipped and does not count."""
    code, out = await conformance(capsys, server.url)
    assert code == 0
    assert "PASS: all 5 required checks passed" in out
    assert "grace-replay style: same pair" in out
    assert "needs --test-clock" in out
    assert server.state.clock.offset == 0  # without --test-clock the clock is left alone
    for title in (
        "sign-in works",
        "refresh rotates the refresh token",
        "replay inside the grace window gives a usable pair",
        "10 concurrent refreshes of one token keep the session",
        "a token two generations old is rejected",
    ):
        line = next(row for row in out.splitlines() if row.startswith(title))
        assert " PASS " in line, line
    assert "eyJ" not in out  # no JWT, no token: fingerprints only


async def test_rotation_in_progress_answers_count_as_success(
    capsys: pytest.CaptureFixture[str], server409: ReferenceServer
) -> None:
    """A server that answers the losers 409 rotation_in_progress keeps the session."""
    server409.set_faults([{"kind": "delay_before", "seconds": 0.05, "count": 100}])
    code, out = await conformance(capsys, server409.url, "--json")
    checks = rows(json.loads(out))
    assert code == 0, out
    concurrent = checks["concurrent"]
    assert concurrent["outcome"] == "pass"
    assert "0 rotation_in_progress" not in concurrent["detail"]
    assert "the family still refreshes" in concurrent["detail"]


@pytest.mark.parametrize("protocol", ["mana", "oauth2"])
async def test_a_server_without_grace_window_fails(
    capsys: pytest.CaptureFixture[str], protocol: str
) -> None:
    async with ReferenceServer(ServerConfig(test_mode=True, grace=0)) as server:
        code, out = await conformance(
            capsys, server.url, "--protocol", protocol, "--test-clock", "--json"
        )
    report = json.loads(out)
    checks = rows(report)
    assert code == 1 and report["ok"] is False
    assert checks["replay"]["outcome"] == "fail"
    assert checks["concurrent"]["outcome"] == "fail"
    assert report["replay_style"] == "none"
    assert checks["signin"]["outcome"] == checks["rotation"]["outcome"] == "pass"


@pytest.fixture
async def strict_rotation_server() -> AsyncIterator[str]:
    """A tiny OAuth 2.0 server that rotates with no grace at all: a used token is dead."""
    counter = itertools.count()
    live: set[str] = set()

    def issue() -> web.Response:
        n = next(counter)
        live.add(f"r{n}")
        return web.json_response(
            {
                "access_token": f"a{n}",
                "token_type": "Bearer",
                "expires_in": 900,
                "refresh_token": f"r{n}",
            }
        )

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") == "password" and form.get("password") == "demo":
            return issue()
        if form.get("grant_type") == "refresh_token" and form.get("refresh_token") in live:
            live.discard(str(form["refresh_token"]))
            return issue()
        return web.json_response({"error": "invalid_grant"}, status=400)

    app = web.Application()
    app.router.add_post("/oauth/token", token)
    async with TestServer(app, host="127.0.0.1") as srv:
        yield str(srv.make_url("")).rstrip("/")


async def test_a_strict_rotation_server_fails_with_style_none(
    capsys: pytest.CaptureFixture[str], strict_rotation_server: str
) -> None:
    code, out = await conformance(capsys, strict_rotation_server, "--protocol", "oauth2")
    assert code == 1
    assert "grace-replay style: none" in out
    assert "FAIL: 2 of 5 required checks failed" in out
    replay = next(r for r in out.splitlines() if r.startswith("replay inside"))
    assert " FAIL " in replay and "invalid_grant" in replay


async def test_an_unreachable_server_fails_sign_in(capsys: pytest.CaptureFixture[str]) -> None:
    async with ReferenceServer() as server:
        url = server.url  # closed when the block ends: nobody listens there any more
    code, out = await conformance(capsys, url, "--timeout", "2")
    assert code == 1
    line = next(r for r in out.splitlines() if r.startswith("sign-in works"))
    assert " FAIL " in line and "no answer" in line


async def test_bad_options_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code = await asyncio.to_thread(main, ["conformance", "http://127.0.0.1:9", "--client-id", "x"])
    assert code == 2 and "--protocol oauth2" in capsys.readouterr().err
    code = await asyncio.to_thread(main, ["conformance", "ftp://127.0.0.1:9"])
    assert code == 2 and "http(s)" in capsys.readouterr().err
    code = await asyncio.to_thread(
        main, ["conformance", "http://127.0.0.1:9", "--password-env", "TJ_SURELY_UNSET_VAR"]
    )
    assert code == 2 and "TJ_SURELY_UNSET_VAR" in capsys.readouterr().err


async def test_an_issuer_url_is_read_through_discovery(capsys: pytest.CaptureFixture[str]) -> None:
    """OAuth 2.0 without --token-url: the token endpoint comes from the discovery document,
    and a row says which sign-ins the server offers."""
    async with ReferenceServer(ServerConfig(test_mode=True)) as server:
        code, out = await conformance(capsys, server.url, "--protocol", "oauth2", "--json")
    checks = rows(json.loads(out))
    assert code == 0, out
    found = checks["discovery"]
    assert found["outcome"] == "info" and not found["required"]
    assert f"token endpoint {server.url}/oauth/token" in found["detail"]
    assert "browser (PKCE S256), device, password" in found["detail"]


async def test_a_discovery_document_for_another_issuer_fails_and_probes_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    hits: list[str] = []

    async def document(request: web.Request) -> web.Response:
        return web.json_response(
            {"issuer": "https://elsewhere.example", "token_endpoint": "https://elsewhere/t"}
        )

    async def token(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"error": "invalid_grant"}, status=400)

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", document)
    app.router.add_post("/oauth/token", token)
    async with TestServer(app, host="127.0.0.1") as srv:
        url = str(srv.make_url("")).rstrip("/")
        code, out = await conformance(capsys, url, "--protocol", "oauth2")
    assert code == 1 and hits == []
    line = next(r for r in out.splitlines() if r.startswith("discovery document"))
    assert " FAIL " in line and "another issuer" in line
