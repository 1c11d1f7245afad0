"""Reference server, OAuth 2.0: password and refresh_token grants, client auth, RFC 8628."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp

from tests.conftest_server import me, oauth, post, serve

CLIENT = "tokenjournal-demo"
CONFIDENTIAL = (("cli", None), ("backend", "s3cret"))


def _basic(client_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


async def _password(s: aiohttp.ClientSession, **extra: str) -> Any:
    form = {
        "grant_type": "password",
        "username": "demo@example.com",
        "password": "demo",
        "client_id": CLIENT,
        **extra,
    }
    answer = await oauth(s, form)
    assert answer.status == 200, answer.body
    return answer.body


async def _refresh(s: aiohttp.ClientSession, token: str, **extra: str) -> Any:
    return await oauth(
        s, {"grant_type": "refresh_token", "refresh_token": token, "client_id": CLIENT, **extra}
    )


async def test_password_grant_issues_bearer_pair_usable_on_api() -> None:
    async with serve() as (server, s):
        body = await _password(s, scope="read write")
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == 900
        assert body["scope"] == "read write"
        assert body["refresh_token"]
        assert (await me(s, body["access_token"])).status == 200
        assert server.stats()["signins"] == 1


async def test_password_grant_wrong_password_is_invalid_grant() -> None:
    async with serve() as (_, s):
        answer = await oauth(
            s,
            {
                "grant_type": "password",
                "username": "demo@example.com",
                "password": "x",
                "client_id": CLIENT,
            },
        )
        assert answer.status == 400
        assert answer.body["error"] == "invalid_grant"


async def test_refresh_grant_rotates_and_same_style_replay_returns_same_pair() -> None:
    async with serve() as (server, s):
        first = await _password(s)
        rotated = await _refresh(s, first["refresh_token"])
        assert rotated.status == 200
        assert rotated.body["refresh_token"] != first["refresh_token"]
        await server.advance(120)
        replay = await _refresh(s, first["refresh_token"])
        assert replay.status == 200
        assert replay.body == rotated.body  # same pair, same (overstated) expires_in
        stats = server.stats()
        assert (stats["rotations"], stats["grace_replays"]) == (1, 1)


async def test_new_style_replay_mints_a_fresh_pair_that_becomes_current() -> None:
    async with serve(oauth_replay="new") as (server, s):
        first = await _password(s)
        rotated = (await _refresh(s, first["refresh_token"])).body
        replay = await _refresh(s, first["refresh_token"])
        assert replay.status == 200
        earlier = (rotated["refresh_token"], first["refresh_token"])
        assert replay.body["refresh_token"] not in earlier
        assert replay.body["access_token"] != rotated["access_token"]
        assert (await _refresh(s, replay.body["refresh_token"])).status == 200
        stats = server.stats()
        assert (stats["rotations"], stats["grace_replays"]) == (2, 1)


async def test_rotation_failures_are_invalid_grant() -> None:
    async with serve() as (server, s):
        unknown = await _refresh(s, "never-issued")
        assert (unknown.status, unknown.body["error"]) == (400, "invalid_grant")
        first = await _password(s)
        rotated = (await _refresh(s, first["refresh_token"])).body
        await server.advance(301)
        reused = await _refresh(s, first["refresh_token"])
        assert (reused.status, reused.body["error"]) == (400, "invalid_grant")
        assert "token_expired" in reused.body["error_description"]
        revoked = await _refresh(s, rotated["refresh_token"])
        assert revoked.body["error"] == "invalid_grant"
        stats = server.stats()
        assert (stats["reuse_detections"], stats["family_revocations"]) == (1, 1)


async def test_mana_tokens_are_not_oauth_grants() -> None:
    async with serve() as (_, s):
        mana = await post(
            s,
            "/auth/signin",
            {"email": "demo@example.com", "password": "demo", "deviceInfo": {"deviceId": "d"}},
        )
        answer = await _refresh(s, mana.body["refreshToken"])
        assert answer.body["error"] == "invalid_grant"


async def test_scope_may_shrink_but_not_grow() -> None:
    async with serve() as (_, s):
        first = await _password(s, scope="read write")
        grown = await _refresh(s, first["refresh_token"], scope="read admin")
        assert (grown.status, grown.body["error"]) == (400, "invalid_scope")
        assert (await _refresh(s, first["refresh_token"], scope="read")).status == 200


async def test_confidential_client_basic_and_body_auth() -> None:
    async with serve(clients=CONFIDENTIAL) as (_, s):
        form = {"grant_type": "password", "username": "demo@example.com", "password": "demo"}
        ok_basic = await oauth(s, form, headers=_basic("backend", "s3cret"))
        assert ok_basic.status == 200
        ok_body = await oauth(s, {**form, "client_id": "backend", "client_secret": "s3cret"})
        assert ok_body.status == 200
        bad_basic = await oauth(s, form, headers=_basic("backend", "wrong"))
        assert (bad_basic.status, bad_basic.body["error"]) == (401, "invalid_client")
        assert bad_basic.headers["WWW-Authenticate"].startswith("Basic")
        bad_body = await oauth(s, {**form, "client_id": "backend", "client_secret": "wrong"})
        assert (bad_body.status, bad_body.body["error"]) == (401, "invalid_client")
        no_secret = await oauth(s, {**form, "client_id": "backend"})
        assert no_secret.status == 401
        unknown = await oauth(s, {**form, "client_id": "stranger"})
        assert (unknown.status, unknown.body["error"]) == (401, "invalid_client")
        garbage = await oauth(s, form, headers={"Authorization": "Basic !!!"})
        assert (garbage.status, garbage.body["error"]) == (401, "invalid_client")
        both = await oauth(
            s, {**form, "client_secret": "s3cret"}, headers=_basic("backend", "s3cret")
        )
        assert (both.status, both.body["error"]) == (400, "invalid_request")
        # A refresh token only works for the client it was issued to.
        other = await oauth(
            s,
            {
                "grant_type": "refresh_token",
                "client_id": "cli",
                "refresh_token": ok_body.body["refresh_token"],
            },
        )
        assert other.body["error"] == "invalid_grant"


async def test_unsupported_grant_and_missing_parameters() -> None:
    async with serve() as (_, s):
        answer = await oauth(s, {"grant_type": "client_credentials", "client_id": CLIENT})
        assert (answer.status, answer.body["error"]) == (400, "unsupported_grant_type")
        missing = await oauth(s, {"grant_type": "refresh_token", "client_id": CLIENT})
        assert (missing.status, missing.body["error"]) == (400, "invalid_request")
        no_grant = await oauth(s, {"client_id": CLIENT})
        assert (no_grant.status, no_grant.body["error"]) == (400, "invalid_request")
        as_json = await post(s, "/oauth/token", {"grant_type": "password"})
        assert (as_json.status, as_json.body["error"]) == (400, "invalid_request")


# ----------------------------------------------------------------------------- RFC 8628


async def _authorize(s: aiohttp.ClientSession) -> Any:
    answer = await post(
        s, "/oauth/device_authorization", data={"client_id": CLIENT, "scope": "sync"}
    )
    assert answer.status == 200, answer.body
    return answer.body


async def _poll(s: aiohttp.ClientSession, device_code: str) -> Any:
    return await oauth(
        s,
        {
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": device_code,
            "client_id": CLIENT,
        },
    )


async def test_device_authorization_answer_shape() -> None:
    async with serve() as (server, s):
        body = await _authorize(s)
        assert set(body) == {
            "device_code",
            "user_code",
            "verification_uri",
            "verification_uri_complete",
            "expires_in",
            "interval",
        }
        assert (body["expires_in"], body["interval"]) == (600, 5)
        code = body["user_code"]
        assert len(code) == 9 and code[4] == "-" and code.replace("-", "").isalpha()
        assert body["verification_uri"].startswith(server.url)
        assert body["verification_uri_complete"].endswith(code)
        assert server.stats()["device_authorizations"] == 1


async def test_device_flow_pending_slow_down_approve_consumed() -> None:
    async with serve() as (server, s):
        auth = await _authorize(s)
        pending = await _poll(s, auth["device_code"])
        assert (pending.status, pending.body["error"]) == (400, "authorization_pending")
        too_soon = await _poll(s, auth["device_code"])
        assert (too_soon.status, too_soon.body["error"]) == (400, "slow_down")
        await server.advance(6)  # the interval is now 10 s: 6 s is still too soon
        assert (await _poll(s, auth["device_code"])).body["error"] == "slow_down"
        await server.advance(16)
        assert (await _poll(s, auth["device_code"])).body["error"] == "authorization_pending"
        approve = await post(
            s, "/_test/device", {"user_code": auth["user_code"].lower(), "action": "approve"}
        )
        assert (approve.status, approve.body) == (200, {"status": "approved"})
        tokens = await _poll(s, auth["device_code"])
        assert tokens.status == 200
        assert tokens.body["scope"] == "sync"
        assert (await me(s, tokens.body["access_token"])).body["email"] == "demo@example.com"
        consumed = await _poll(s, auth["device_code"])
        assert consumed.body["error"] == "invalid_grant"
        assert (await _refresh(s, tokens.body["refresh_token"])).status == 200


async def test_device_flow_deny_gives_access_denied() -> None:
    async with serve() as (server, s):
        auth = await _authorize(s)
        server.device_action(auth["user_code"], "deny")
        denied = await _poll(s, auth["device_code"])
        assert (denied.status, denied.body["error"]) == (400, "access_denied")
        again = await post(
            s, "/_test/device", {"user_code": auth["user_code"], "action": "approve"}
        )
        assert again.status == 409


async def test_device_flow_expired_token_after_expires_in() -> None:
    async with serve() as (server, s):
        auth = await _authorize(s)
        await server.advance(600)
        expired = await _poll(s, auth["device_code"])
        assert (expired.status, expired.body["error"]) == (400, "expired_token")
        late = await post(s, "/_test/device", {"user_code": auth["user_code"], "action": "approve"})
        assert late.status == 400


async def test_device_test_endpoint_rejects_bad_input() -> None:
    async with serve() as (_, s):
        unknown = await post(s, "/_test/device", {"user_code": "BCDF-GHJK", "action": "approve"})
        assert unknown.status == 404
        auth = await _authorize(s)
        bad_action = await post(
            s, "/_test/device", {"user_code": auth["user_code"], "action": "maybe"}
        )
        assert bad_action.status == 400
        bad_user = await post(
            s,
            "/_test/device",
            {"user_code": auth["user_code"], "action": "approve", "email": "x@y.z"},
        )
        assert bad_user.status == 400
        unknown_code = await _poll(s, "never-issued")
        assert unknown_code.body["error"] == "invalid_grant"
