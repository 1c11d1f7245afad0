"""Reference server, test mode: scripted faults, the clock and stats endpoints."""

from __future__ import annotations

import json
import time

import aiohttp
import pytest

from tests.conftest_server import get, oauth, post, refresh, serve, signin


async def _faults(s: aiohttp.ClientSession, *faults: dict[str, object]) -> None:
    answer = await post(s, "/_test/faults", {"faults": list(faults)})
    assert answer.status == 200, answer.body


async def test_status_fault_answers_without_touching_store() -> None:
    async with serve() as (server, s):
        first = await signin(s)
        await _faults(s, {"kind": "status", "status": 503, "retry_after": 2, "count": 2})
        for _ in range(2):
            answer = await refresh(s, first["refreshToken"])
            assert answer.status == 503
            assert answer.headers["Retry-After"] == "2"
            assert answer.body["statusCode"] == 503
        assert server.stats()["rotations"] == 0
        assert (await refresh(s, first["refreshToken"])).status == 200
        stats = server.stats()
        assert (stats["faults_injected"], stats["rotations"]) == (2, 1)


async def test_status_fault_on_oauth_grant() -> None:
    async with serve() as (server, s):
        tokens = (
            await oauth(
                s,
                {
                    "grant_type": "password",
                    "username": "demo@example.com",
                    "password": "demo",
                    "client_id": "tokenjournal-demo",
                },
            )
        ).body
        server.set_faults([{"kind": "status", "status": 429}])
        answer = await oauth(
            s,
            {
                "grant_type": "refresh_token",
                "client_id": "tokenjournal-demo",
                "refresh_token": tokens["refresh_token"],
            },
        )
        assert answer.status == 429
        assert answer.body["error"] == "temporarily_unavailable"


async def test_rotation_in_progress_fault_is_409_and_store_untouched() -> None:
    async with serve() as (server, s):
        first = await signin(s)
        await _faults(s, {"kind": "rotation_in_progress"})
        answer = await refresh(s, first["refreshToken"])
        assert answer.status == 409
        assert answer.headers["Retry-After"] == "1"
        assert answer.body["code"] == "rotation_in_progress"
        assert server.stats()["rotations"] == 0


async def test_delay_faults_delay_the_answer() -> None:
    async with serve() as (server, s):
        first = await signin(s)
        await _faults(
            s, {"kind": "delay_before", "seconds": 0.1}, {"kind": "delay_after", "seconds": 0.1}
        )
        for token in (first["refreshToken"],):
            started = time.monotonic()
            first_answer = await refresh(s, token)
            assert first_answer.status == 200
            assert time.monotonic() - started >= 0.1
            started = time.monotonic()
            second = await refresh(s, token)
            assert time.monotonic() - started >= 0.1
            assert second.body["refreshToken"] == first_answer.body["refreshToken"]
        assert server.stats()["faults_injected"] == 2


async def test_drop_after_commit_disconnects_but_rotation_is_committed() -> None:
    async with serve() as (server, s):
        first = await signin(s)
        await _faults(s, {"kind": "drop_after_commit"})
        with pytest.raises(aiohttp.ClientConnectionError):
            await refresh(s, first["refreshToken"])
        assert server.stats()["rotations"] == 1
        # The client never saw the pair; replaying the old token inside grace recovers it.
        replay = await refresh(s, first["refreshToken"])
        assert replay.status == 200
        assert replay.body["grace_period_used"] is True
        assert (await refresh(s, replay.body["refreshToken"])).status == 200


async def test_truncated_fault_commits_and_cuts_json_in_half() -> None:
    async with serve() as (server, s):
        first = await signin(s)
        await _faults(s, {"kind": "truncated"})
        answer = await refresh(s, first["refreshToken"])
        assert answer.status == 200
        assert isinstance(answer.body, bytes)
        with pytest.raises(ValueError):
            json.loads(answer.body)
        replay = await refresh(s, first["refreshToken"])
        assert json.dumps(replay.body).startswith(answer.body.decode()[:10])
        assert server.stats()["rotations"] == 1


async def test_invalid_json_fault_commits_and_answers_not_json() -> None:
    async with serve() as (server, s):
        first = await signin(s)
        await _faults(s, {"kind": "invalid_json"})
        answer = await refresh(s, first["refreshToken"])
        assert (answer.status, answer.body) == (200, b"not json")
        assert server.stats()["rotations"] == 1
        assert (await refresh(s, first["refreshToken"])).body["grace_period_used"] is True


async def test_faults_apply_in_order_and_delete_clears() -> None:
    async with serve() as (server, s):
        first = await signin(s)
        await _faults(s, {"kind": "status", "status": 500}, {"kind": "rotation_in_progress"})
        assert (await refresh(s, first["refreshToken"])).status == 500
        async with s.delete("/_test/faults") as resp:
            assert resp.status == 200
            assert (await resp.json())["pending"] == 0
        assert (await refresh(s, first["refreshToken"])).status == 200
        assert server.stats()["faults_injected"] == 1


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "nope"},
        {"kind": "status"},
        {"kind": "status", "status": 200},
        {"kind": "delay_before", "seconds": "1"},
        {"kind": "delay_after", "seconds": -1},
        {"kind": "truncated", "count": 0},
        {"kind": "truncated", "extra": 1},
        "status",
    ],
)
async def test_malformed_fault_script_is_rejected_whole(fault: object) -> None:
    async with serve() as (server, s):
        answer = await post(
            s, "/_test/faults", {"faults": [{"kind": "rotation_in_progress"}, fault]}
        )
        assert answer.status == 400
        assert answer.body["code"] == "invalid_request"
        assert server.state.faults.pending() == 0


async def test_clock_endpoint_advances_server_time() -> None:
    async with serve() as (server, s):
        before = server.now()
        answer = await post(s, "/_test/clock", {"advance": 3600})
        assert answer.status == 200
        assert answer.body["now"] >= before + 3600
        assert (await post(s, "/_test/clock", {"advance": -1})).status == 400
        assert (await post(s, "/_test/clock", {"advance": True})).status == 400


async def test_stats_endpoint_and_reset() -> None:
    async with serve() as (_, s):
        await signin(s)
        stats = (await get(s, "/_test/stats")).body
        assert set(stats) == {
            "signins",
            "refresh_requests",
            "rotations",
            "grace_replays",
            "reuse_detections",
            "family_revocations",
            "api_200",
            "api_401",
            "faults_injected",
            "logouts",
            "device_authorizations",
            "items_applied",
            "keys_seen_twice",
            "items_applied_twice",
            "items_refused",
        }
        assert stats["signins"] == 1
        reset = await post(s, "/_test/stats/reset")
        assert reset.status == 200
        assert set((await get(s, "/_test/stats")).body.values()) == {0}
