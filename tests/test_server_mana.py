"""Reference server, Mana protocol: sign-in, the rotation rules, serialisation, /api/me."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path

import jwt

from tests.conftest_server import DEMO, DEVICE, me, post, refresh, serve, signin
from tokenjournal.server import ReferenceServer, ServerConfig


async def test_signin_returns_pair_bound_to_device() -> None:
    async with serve() as (server, s):
        body = await signin(s)
        assert set(body) == {"appToken", "refreshToken", "deviceId"}
        assert body["deviceId"] == DEVICE["deviceId"]
        claims = jwt.decode(body["appToken"], options={"verify_signature": False})
        assert {"sub", "email", "did", "iat", "exp", "jti"} <= set(claims)
        assert claims["did"] == DEVICE["deviceId"]
        assert claims["exp"] - claims["iat"] == 900
        assert server.stats()["signins"] == 1


async def test_signin_wrong_password_is_401_invalid_credentials() -> None:
    async with serve() as (server, s):
        answer = await post(s, "/auth/signin", {**DEMO, "password": "nope", "deviceInfo": DEVICE})
        assert answer.status == 401
        assert answer.body == {
            "statusCode": 401,
            "error": "Unauthorized",
            "message": "Invalid credentials",
            "code": "invalid_credentials",
        }
        assert server.stats()["signins"] == 0


async def test_configured_users_replace_the_demo_account() -> None:
    async with serve(users=(("ada@example.com", "lovelace"),)) as (_, s):
        ok = await post(
            s,
            "/auth/signin",
            {"email": "ada@example.com", "password": "lovelace", "deviceInfo": DEVICE},
        )
        assert ok.status == 200
        demo = await post(s, "/auth/signin", {**DEMO, "deviceInfo": DEVICE})
        assert demo.status == 401


async def test_active_token_rotates_once() -> None:
    async with serve() as (server, s):
        first = await signin(s)
        answer = await refresh(s, first["refreshToken"])
        assert answer.status == 200
        assert answer.body["refreshToken"] != first["refreshToken"]
        assert answer.body["appToken"] != first["appToken"]
        assert "grace_period_used" not in answer.body
        assert server.stats()["rotations"] == 1


async def test_replay_inside_grace_returns_identical_pair() -> None:
    async with serve() as (server, s):
        first = await signin(s)
        rotated = await refresh(s, first["refreshToken"])
        await server.advance(299)
        replay = await refresh(s, first["refreshToken"])
        assert replay.status == 200
        assert replay.body["appToken"] == rotated.body["appToken"]
        assert replay.body["refreshToken"] == rotated.body["refreshToken"]
        assert replay.body["grace_period_used"] is True
        expires = datetime.fromisoformat(replay.body["grace_expires_at"])
        assert expires.utcoffset() is not None and expires.utcoffset().total_seconds() == 0
        # The window is anchored on the rotation time T, not on the replay.
        assert abs(expires.timestamp() - (server.now() - 299 + 300)) < 2
        stats = server.stats()
        assert (stats["rotations"], stats["grace_replays"]) == (1, 1)


async def test_replay_after_grace_is_token_expired_and_revokes_family() -> None:
    async with serve() as (server, s):
        first = await signin(s)
        rotated = (await refresh(s, first["refreshToken"])).body
        await server.advance(300)
        late = await refresh(s, first["refreshToken"])
        assert late.status == 401
        assert late.body["code"] == "token_expired"
        # The whole family is dead: the successor and its access token too.
        successor = await refresh(s, rotated["refreshToken"])
        assert successor.status == 401
        assert successor.body["code"] == "invalid_token_state"
        assert (await me(s, rotated["appToken"])).status == 401
        stats = server.stats()
        assert stats["reuse_detections"] == 1
        assert stats["family_revocations"] == 1


async def test_two_generations_old_is_invalid_token_state_even_inside_grace() -> None:
    async with serve() as (server, s):
        first = await signin(s)
        second = (await refresh(s, first["refreshToken"])).body
        third = (await refresh(s, second["refreshToken"])).body
        answer = await refresh(s, first["refreshToken"])
        assert answer.status == 401
        assert answer.body["code"] == "invalid_token_state"
        assert (await refresh(s, third["refreshToken"])).status == 401
        stats = server.stats()
        assert (stats["reuse_detections"], stats["family_revocations"]) == (1, 1)


async def test_unknown_token_is_invalid_token() -> None:
    async with serve() as (server, s):
        answer = await refresh(s, "not-a-token-this-server-issued")
        assert answer.status == 401
        assert answer.body["code"] == "invalid_token"
        assert answer.body["statusCode"] == 401
        assert server.stats()["family_revocations"] == 0


async def test_device_mismatch_is_401_without_revocation() -> None:
    async with serve() as (server, s):
        first = await signin(s)
        other = {**DEVICE, "deviceId": "another-device"}
        answer = await refresh(s, first["refreshToken"], device=other)
        assert answer.status == 401
        assert answer.body["message"] == "Device ID has changed"
        assert answer.body["code"] == "device_mismatch"
        assert (await refresh(s, first["refreshToken"])).status == 200
        assert server.stats()["family_revocations"] == 0


async def test_refresh_token_past_refresh_ttl_is_token_expired() -> None:
    async with serve(refresh_ttl=3600.0) as (server, s):
        first = await signin(s)
        await server.advance(3600)
        answer = await refresh(s, first["refreshToken"])
        assert answer.status == 401
        assert answer.body["code"] == "token_expired"


async def test_logout_revokes_family_and_unknown_logout_is_204() -> None:
    async with serve() as (server, s):
        first = await signin(s)
        logout = await post(s, "/auth/logout", {"refreshToken": first["refreshToken"]})
        assert logout.status == 204
        assert (await post(s, "/auth/logout", {"refreshToken": "unknown"})).status == 204
        answer = await refresh(s, first["refreshToken"])
        assert answer.status == 401
        assert answer.body["code"] == "invalid_token_state"
        assert (await me(s, first["appToken"])).status == 401
        assert server.stats()["logouts"] == 2


async def test_validate_reports_user_or_invalid() -> None:
    async with serve() as (server, s):
        first = await signin(s)
        ok = await post(s, "/auth/validate", {"appToken": first["appToken"]})
        assert ok.status == 200
        assert ok.body["valid"] is True
        assert ok.body["user"]["email"] == "demo@example.com"
        await server.advance(901)
        bad = await post(s, "/auth/validate", {"appToken": first["appToken"]})
        assert bad.body == {"valid": False, "user": None}


async def test_fifty_concurrent_refreshes_share_one_rotation() -> None:
    async with serve() as (server, s):
        first = await signin(s)
        # A short delay keeps the first rotation "in progress" while the others queue up.
        server.set_faults([{"kind": "delay_before", "seconds": 0.05}])
        answers = await asyncio.gather(*(refresh(s, first["refreshToken"]) for _ in range(50)))
        assert {a.status for a in answers} == {200}
        assert len({(a.body["appToken"], a.body["refreshToken"]) for a in answers}) == 1
        stats = server.stats()
        assert stats["rotations"] == 1
        assert stats["grace_replays"] == 49
        assert stats["refresh_requests"] == 50


async def test_conflict_409_mode_losers_get_rotation_in_progress() -> None:
    async with serve(conflict="409") as (server, s):
        first = await signin(s)
        server.set_faults([{"kind": "delay_before", "seconds": 0.2}])
        winner = asyncio.create_task(refresh(s, first["refreshToken"]))
        # Fire the others only once the winner's rotation is in progress (robust under load).
        while server.stats()["refresh_requests"] == 0:
            await asyncio.sleep(0.005)
        losers = await asyncio.gather(*(refresh(s, first["refreshToken"]) for _ in range(4)))
        winners = [await winner]
        assert winners[0].status == 200
        assert [a.status for a in losers] == [409] * 4
        for loser in losers:
            assert loser.headers["Retry-After"] == "1"
            assert loser.body == {
                "statusCode": 409,
                "error": "Conflict",
                "message": "rotation_in_progress",
                "code": "rotation_in_progress",
            }
        # A loser that retries the same token gets the winner's pair (grace replay).
        retry = await refresh(s, first["refreshToken"])
        assert retry.body["refreshToken"] == winners[0].body["refreshToken"]
        assert server.stats()["rotations"] == 1


async def test_api_me_200_then_401_after_access_ttl() -> None:
    async with serve() as (server, s):
        first = await signin(s)
        ok = await me(s, first["appToken"])
        assert ok.status == 200
        assert ok.body["email"] == "demo@example.com"
        await server.advance(900)
        expired = await me(s, first["appToken"])
        assert expired.status == 401
        assert expired.body == {"message": "JWT expired"}
        assert expired.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        stats = server.stats()
        assert (stats["api_200"], stats["api_401"]) == (1, 1)


async def test_api_me_rejects_missing_and_forged_tokens() -> None:
    async with serve() as (_, s):
        first = await signin(s)
        forged = jwt.encode(
            jwt.decode(first["appToken"], options={"verify_signature": False}),
            "x" * 32,
            algorithm="HS256",
        )
        assert (await me(s, forged)).status == 401
        assert (await me(s, "garbage")).status == 401
        async with s.get("/api/me") as resp:
            assert resp.status == 401
            await resp.read()


async def test_state_survives_restart_with_a_file_db(tmp_path: Path) -> None:
    config = ServerConfig(test_mode=True, db_path=str(tmp_path / "server.db"))
    async with serve(ReferenceServer(config)) as (_, s):
        first = await signin(s)
        rotated = (await refresh(s, first["refreshToken"])).body
    assert (tmp_path / "server.db").stat().st_mode & 0o077 == 0
    async with serve(ReferenceServer(config)) as (_, s):
        # Same key (persisted), same families, same rotation state.
        assert (await me(s, rotated["appToken"])).status == 200
        replay = await refresh(s, first["refreshToken"])
        assert replay.body["refreshToken"] == rotated["refreshToken"]
        assert (await refresh(s, rotated["refreshToken"])).status == 200
