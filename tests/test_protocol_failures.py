"""What a caller gets back from the protocols, field by field.

The classification tests elsewhere check the kind of a failure; here every field of the
:class:`tokenjournal.Failure` (kind, code, status, message, wait) is pinned, since the
manager puts them into the errors and events an app shows, along with the messages of the
requests a protocol refuses to build and the odd corners of the requests it builds.
"""

from __future__ import annotations

import json
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl

import pytest

import tokenjournal as tj
from tokenjournal._protocols import MAX_INTERVAL, DeviceInfo

NOW = 1_700_000_000.0
TOKEN_URL = "https://auth.example.test/oauth/token"
DEVICE_URL = "https://auth.example.test/oauth/device_authorization"
DEVICE = DeviceInfo("0b7f3c1e-5d7a-4c36-9f1e-2f7c1d9a8b01")
OAUTH = tj.OAuth2Protocol(TOKEN_URL, "app", device_authorization_url=DEVICE_URL)
MANA = tj.ManaProtocol("https://auth.example.test")
K = tj.FailureKind


def raw(body: Any) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def http_date(epoch: float) -> str:
    return formatdate(epoch, usegmt=True)


# --------------------------------------------------------------------------- OAuth 2.0


@pytest.mark.parametrize(
    ("status", "body", "failure"),
    [
        (
            400,
            {"error": "invalid_grant"},
            tj.Failure(K.PERMANENT, "invalid_grant", 400, "invalid_grant"),
        ),
        (
            403,
            {"error": "access_denied"},
            tj.Failure(K.PERMANENT, "access_denied", 403, "access_denied"),
        ),
        (
            400,
            {"error": "authorization_pending"},
            tj.Failure(K.PENDING, "authorization_pending", 400, "authorization_pending"),
        ),
        (400, {"error": "slow_down"}, tj.Failure(K.SLOW_DOWN, "slow_down", 400, "slow_down")),
        (
            409,
            {"error": "rotation_in_progress"},
            tj.Failure(K.CONFLICT, "rotation_in_progress", 409, "rotation_in_progress", 1.0),
        ),
        (429, b"", tj.Failure(K.RATE_LIMITED, "rate_limited", 429, "rate limited")),
        (502, b"", tj.Failure(K.SERVER, "server_error", 502, "server error 502")),
        (
            400,
            {"error": "slow_down", "interval": 10},
            tj.Failure(K.SLOW_DOWN, "slow_down", 400, "slow_down", 10.0),
        ),
        (
            400,
            {"error": "temporarily_unavailable"},
            tj.Failure(K.SERVER, "temporarily_unavailable", 400, "temporarily_unavailable"),
        ),
        (
            400,
            {"error": "invalid_scope"},
            tj.Failure(K.REJECTED, "invalid_scope", 400, "unexpected status 400"),
        ),
        (
            200,
            b"not json",
            tj.Failure(K.MALFORMED, "malformed_body", 200, "body is not a JSON object"),
        ),
    ],
    ids=lambda v: v if isinstance(v, int) else None,
)
def test_oauth_failures_in_full(status: int, body: Any, failure: tj.Failure) -> None:
    assert OAUTH.parse_tokens(status, {}, raw(body), NOW, None) == failure


@pytest.mark.parametrize(
    ("body", "failure"),
    [
        (
            {"access_token": 5},
            tj.Failure(
                K.MALFORMED,
                "malformed_body",
                200,
                "access_token, token_type or refresh_token has the wrong type",
            ),
        ),
        (
            {"access_token": "a", "token_type": " " + "M" * 40 + " "},
            tj.Failure(
                K.REJECTED, "unsupported_token_type", 200, f"token_type {'M' * 32!r} is not Bearer"
            ),
        ),
    ],
    ids=["wrong-type", "not-bearer"],
)
def test_unusable_oauth_answers_in_full(body: Any, failure: tj.Failure) -> None:
    assert OAUTH.parse_tokens(200, {}, raw(body), NOW, None) == failure


def test_an_answer_with_an_access_token_is_tokens_even_with_an_error_field() -> None:
    """Only an answer *without* an access token is read as a GitHub-style 200 error."""
    answer = OAUTH.parse_tokens(200, {}, raw({"access_token": "a", "error": "x"}), NOW, None)
    assert isinstance(answer, tj.TokenSet) and answer.access_token == "a"


def test_a_200_error_waits_what_its_date_retry_after_says_from_receipt() -> None:
    failure = OAUTH.parse_tokens(
        200,
        {"Retry-After": http_date(NOW + 20)},
        raw({"error": "temporarily_unavailable"}),
        NOW,
        None,
    )
    assert failure == tj.Failure(
        K.SERVER, "temporarily_unavailable", 200, "temporarily_unavailable", 20.0
    )


def test_a_slow_down_interval_is_capped_at_an_hour() -> None:
    """A server asking to poll once a day is a bug: the device waits an hour at most."""
    failure = OAUTH.parse_tokens(400, {}, raw({"error": "slow_down", "interval": 86400}), NOW, None)
    assert isinstance(failure, tj.Failure) and failure.retry_after == MAX_INTERVAL


def test_a_transient_oauth_code_carries_the_servers_wait() -> None:
    failure = OAUTH.parse_tokens(
        400, {"Retry-After": http_date(NOW + 40)}, raw({"error": "server_error"}), NOW, None
    )
    assert failure == tj.Failure(K.SERVER, "server_error", 400, "server_error", 40.0)


@pytest.mark.parametrize(
    ("status", "body", "failure"),
    [
        (200, b"[]", tj.Failure(K.MALFORMED, "malformed_body", 200, "body is not a JSON object")),
        (
            200,
            {"device_code": "dc", "user_code": "UC"},
            tj.Failure(
                K.MALFORMED,
                "malformed_body",
                200,
                "device_code, user_code, verification_uri and expires_in are required",
            ),
        ),
        (
            400,
            {"error": "invalid_client"},
            tj.Failure(K.REJECTED, "invalid_client", 400, "unexpected status 400"),
        ),
    ],
    ids=["not-an-object", "fields-missing", "rejected"],
)
def test_device_authorization_failures_in_full(status: int, body: Any, failure: tj.Failure) -> None:
    assert OAUTH.parse_device_authorization(status, {}, raw(body), NOW) == failure


def test_a_device_authorization_busy_server_wait_is_measured_from_receipt() -> None:
    failure = OAUTH.parse_device_authorization(503, {"Retry-After": http_date(NOW + 30)}, b"", NOW)
    assert failure == tj.Failure(K.SERVER, "server_error", 503, "server error 503", 30.0)


def test_a_device_authorization_interval_is_capped_at_an_hour() -> None:
    answer = {
        "device_code": "dc",
        "user_code": "UC",
        "verification_uri": "https://auth.example.test/device",
        "expires_in": 600,
        "interval": 86400,
    }
    code = OAUTH.parse_device_authorization(200, {}, raw(answer), NOW)
    assert isinstance(code, tj.DeviceCode) and code.interval == MAX_INTERVAL


def test_a_busy_revocation_endpoint_with_a_date_retry_after_is_a_server_failure() -> None:
    """The logout answer is only logged, but reading it must not crash on a date."""
    failure = OAUTH.parse_sign_out(503, {"Retry-After": http_date(NOW)}, b"")
    assert failure is not None and (failure.kind, failure.code) == (K.SERVER, "server_error")


def test_requests_that_cannot_be_built_say_why() -> None:
    with pytest.raises(ValueError, match=r"^no refresh token to refresh with$"):
        OAUTH.build_refresh(tj.TokenSet("a", None), DEVICE)
    with pytest.raises(
        ValueError, match=r"^OAuth2Protocol needs device_authorization_url for the device flow$"
    ):
        tj.OAuth2Protocol(TOKEN_URL, "app").build_device_authorization()
    with pytest.raises(
        ValueError, match=r"^the password grant needs username= and password= \(strings\)$"
    ):
        OAUTH.build_sign_in({"username": "", "email": "", "password": "pw"}, DEVICE)


def test_a_public_client_with_an_empty_secret_sends_no_secret() -> None:
    p = tj.OAuth2Protocol(TOKEN_URL, "app", client_secret="", client_auth="none")
    request = p.build_refresh(tj.TokenSet("a", "r"), DEVICE)
    sent = dict(parse_qsl(request.body.decode(), keep_blank_values=True))
    assert sent == {"grant_type": "refresh_token", "refresh_token": "r", "client_id": "app"}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"token_url": "ftp://x"}, ValueError, "OAuth2Protocol.token_url must be an http(s) URL"),
        ({"client_id": ""}, ValueError, "OAuth2Protocol.client_id must be a non-empty string"),
        ({"client_auth": "jwt"}, ValueError, "client_auth must be 'basic', 'body' or 'none'"),
        ({"client_secret": 5}, TypeError, "client_secret must be a string or None"),
        (
            {"client_secret": "s", "client_auth": "none"},
            ValueError,
            "client_auth='none' never sends the client_secret; "
            "use client_auth='basic' or 'body' for a confidential client",
        ),
        ({"extra_params": {"audience": 5}}, TypeError, "extra_params must map strings to strings"),
    ],
    ids=["url", "client-id", "client-auth", "secret-type", "public-with-secret", "extra-type"],
)
def test_a_misconfigured_protocol_says_what_is_wrong(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    settings: dict[str, Any] = {"token_url": TOKEN_URL, "client_id": "app", **kwargs}
    with pytest.raises(error) as caught:
        tj.OAuth2Protocol(**settings)
    assert str(caught.value) == message


# --------------------------------------------------------------------------- Mana


@pytest.mark.parametrize(
    ("status", "body", "failure"),
    [
        (
            401,
            {"code": "token_expired"},
            tj.Failure(K.PERMANENT, "token_expired", 401, "token_expired"),
        ),
        (
            401,
            {"message": "Device ID has changed"},
            tj.Failure(
                K.PERMANENT,
                "device_id_changed",
                401,
                "device_id_changed",
                description="Device ID has changed",
            ),
        ),
        (
            401,
            {"code": "invalid_credentials"},
            tj.Failure(K.REJECTED, "invalid_credentials", 401, "unexpected status 401"),
        ),
        (418, b"", tj.Failure(K.REJECTED, "http_418", 418, "unexpected status 418")),
    ],
    ids=["permanent", "device-changed", "named-unknown", "no-body"],
)
def test_mana_failures_in_full(status: int, body: Any, failure: tj.Failure) -> None:
    assert MANA.parse_tokens(status, {}, raw(body), NOW, None) == failure


@pytest.mark.parametrize(
    ("body", "failure"),
    [
        (b"{", tj.Failure(K.MALFORMED, "malformed_body", 201, "body is not a JSON object")),
        (
            {"appToken": "a", "refreshToken": ""},
            tj.Failure(
                K.MALFORMED,
                "malformed_body",
                201,
                "appToken and refreshToken must be non-empty strings",
            ),
        ),
    ],
    ids=["not-json", "no-refresh-token"],
)
def test_unusable_mana_answers_in_full(body: Any, failure: tj.Failure) -> None:
    assert MANA.parse_tokens(201, {}, raw(body), NOW, None) == failure


def test_a_busy_mana_logout_with_a_date_retry_after_is_a_server_failure() -> None:
    failure = MANA.parse_sign_out(503, {"Retry-After": http_date(NOW)}, b"")
    assert failure is not None and (failure.kind, failure.code) == (K.SERVER, "server_error")


def test_mana_requests_that_cannot_be_built_say_why() -> None:
    with pytest.raises(ValueError, match=r"^no refresh token to refresh with$"):
        MANA.build_refresh(tj.TokenSet("a", None), DEVICE)
    with pytest.raises(ValueError, match=r"^Mana sign-in needs email= and password= \(strings\)$"):
        MANA.build_sign_in({"email": "", "password": "pw"}, DEVICE)


def test_only_trailing_slashes_come_off_the_mana_url() -> None:
    p = tj.ManaProtocol("https://auth.example.test/apiX//")
    assert p.build_refresh(tj.TokenSet("a", "r"), DEVICE).url == (
        "https://auth.example.test/apiX/auth/refresh"
    )


# --------------------------------------------------------------------------- requests


def test_a_request_repr_lists_each_header() -> None:
    request = tj.HttpRequest(
        "POST", TOKEN_URL, (("Accept", "x"), ("Authorization", "Bearer t")), b""
    )
    assert f"headers=[Accept: 'x', Authorization: {tj.fingerprint('Bearer t')!r}]" in repr(request)


def test_a_request_repr_survives_a_body_that_is_not_utf8() -> None:
    request = tj.HttpRequest("POST", TOKEN_URL, (), b"\xff\xfe secret")
    assert "<9 bytes " in repr(request) and "secret" not in repr(request)
