"""The reference server's browser sign-in side: discovery documents, the authorization
endpoint's checks, the authorization_code grant with PKCE, ID tokens, RFC 7009 revocation."""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import jwt
import pytest

from tokenjournal.server import ReferenceServer, ServerConfig

CLIENT = "tokenjournal-demo"
REDIRECT = "http://127.0.0.1:5555/callback"
HIDDEN = re.compile(r'<input type="hidden" name="(\w+)" value="([^"]*)">')


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def params(challenge: str, **over: str) -> dict[str, str]:
    base = {
        "response_type": "code",
        "client_id": CLIENT,
        "redirect_uri": REDIRECT,
        "state": "st-1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "scope": "openid offline_access",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v}


async def consent(
    s: aiohttp.ClientSession, url: str, query: dict[str, str], **form: str
) -> aiohttp.ClientResponse:
    async with s.get(url + "/oauth/authorize", params=query) as page:
        assert page.status == 200
        fields = {k: html.unescape(v) for k, v in HIDDEN.findall(await page.text())}
    fields.update({"email": "demo@example.com", "password": "demo", "action": "allow", **form})
    return await s.post(url + "/oauth/authorize", data=fields, allow_redirects=False)


async def code_for(s: aiohttp.ClientSession, url: str, challenge: str) -> str:
    answer = await consent(s, url, params(challenge))
    assert answer.status == 302
    query = parse_qs(urlsplit(answer.headers["Location"]).query)
    assert query["state"] == ["st-1"] and query["iss"] == [url]
    return query["code"][0]


async def exchange(s: aiohttp.ClientSession, url: str, **form: str) -> tuple[int, Any]:
    data = {"grant_type": "authorization_code", "client_id": CLIENT, "redirect_uri": REDIRECT}
    data.update(form)
    async with s.post(url + "/oauth/token", data=data) as answer:
        return answer.status, await answer.json()


async def test_both_discovery_documents_describe_this_server() -> None:
    async with (
        ReferenceServer(ServerConfig(test_mode=True)) as server,
        aiohttp.ClientSession() as s,
    ):
        for path in (
            "/.well-known/openid-configuration",
            "/.well-known/oauth-authorization-server",
        ):
            async with s.get(server.url + path) as answer:
                assert answer.status == 200
                doc = await answer.json()
            assert doc["issuer"] == server.url
            assert doc["authorization_endpoint"] == server.url + "/oauth/authorize"
            assert doc["revocation_endpoint"] == server.url + "/oauth/revoke"
            assert doc["code_challenge_methods_supported"] == ["S256"]


async def test_the_code_grant_checks_pkce_and_is_spent_by_its_first_use() -> None:
    async with (
        ReferenceServer(ServerConfig(test_mode=True)) as server,
        aiohttp.ClientSession() as s,
    ):
        verifier, challenge = pkce()
        code = await code_for(s, server.url, challenge)
        status, body = await exchange(s, server.url, code=code, code_verifier=pkce()[0])
        assert (status, body["error"]) == (400, "invalid_grant")  # wrong verifier: spent too
        status, body = await exchange(s, server.url, code=code, code_verifier=verifier)
        assert (status, body["error"]) == (400, "invalid_grant")

        code = await code_for(s, server.url, challenge)
        status, body = await exchange(
            s, server.url, code=code, code_verifier=verifier, redirect_uri=REDIRECT + "x"
        )
        assert (status, body["error"]) == (400, "invalid_grant")  # another redirect URI

        code = await code_for(s, server.url, challenge)
        status, body = await exchange(s, server.url, code=code, code_verifier=verifier)
        assert status == 200 and body["token_type"] == "Bearer" and body["refresh_token"]
        claims = jwt.decode(body["id_token"], options={"verify_signature": False})
        assert claims["iss"] == server.url and claims["aud"] == CLIENT
        assert claims["email"] == "demo@example.com"
        status, body = await exchange(s, server.url, code=code, code_verifier=verifier)
        assert (status, body["error"]) == (400, "invalid_grant")  # used once already


@pytest.mark.parametrize(
    "over",
    [
        {"client_id": "nobody"},
        {"redirect_uri": "https://evil.example/callback"},
        {"redirect_uri": "http://192.168.1.5:80/callback"},
        {"redirect_uri": ""},
    ],
)
async def test_an_untrusted_client_or_redirect_gets_an_error_page_never_a_redirect(
    over: dict[str, str],
) -> None:
    async with (
        ReferenceServer(ServerConfig(test_mode=True)) as server,
        aiohttp.ClientSession() as s,
    ):
        query = params(pkce()[1], **over)
        async with s.get(server.url + "/oauth/authorize", params=query, allow_redirects=False) as a:
            assert a.status == 400 and "Location" not in a.headers
            assert a.headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize(
    ("over", "error"),
    [
        ({"code_challenge": ""}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
    ],
)
async def test_a_bad_request_from_a_trusted_client_is_redirected_with_its_error(
    over: dict[str, str], error: str
) -> None:
    async with (
        ReferenceServer(ServerConfig(test_mode=True)) as server,
        aiohttp.ClientSession() as s,
    ):
        query = params(pkce()[1], **over)
        async with s.get(server.url + "/oauth/authorize", params=query, allow_redirects=False) as a:
            assert a.status == 302
            got = parse_qs(urlsplit(a.headers["Location"]).query)
        assert got["error"] == [error] and got["state"] == ["st-1"]


async def test_a_wrong_password_shows_the_form_again_and_issues_nothing() -> None:
    async with (
        ReferenceServer(ServerConfig(test_mode=True)) as server,
        aiohttp.ClientSession() as s,
    ):
        answer = await consent(s, server.url, params(pkce()[1]), password="nope")
        assert answer.status == 401 and "Wrong email or password" in await answer.text()


async def test_revocation_ends_the_family_and_accepts_unknown_tokens() -> None:
    async with (
        ReferenceServer(ServerConfig(test_mode=True)) as server,
        aiohttp.ClientSession() as s,
    ):
        verifier, challenge = pkce()
        code = await code_for(s, server.url, challenge)
        _, pair = await exchange(s, server.url, code=code, code_verifier=verifier)
        revoke = server.url + "/oauth/revoke"
        for token in ("unknown-token", pair["refresh_token"]):
            async with s.post(revoke, data={"token": token, "client_id": CLIENT}) as answer:
                assert answer.status == 200
        data = {"grant_type": "refresh_token", "refresh_token": pair["refresh_token"]}
        async with s.post(server.url + "/oauth/token", data={**data, "client_id": CLIENT}) as a:
            assert a.status == 400 and (await a.json())["error"] == "invalid_grant"
        async with s.get(
            server.url + "/api/me", headers={"Authorization": f"Bearer {pair['access_token']}"}
        ) as answer:
            assert answer.status == 401  # the family is dead, its access token too
