"""ManaProtocol, sans-IO: every row of the error table in docs/architecture.md 3.1, and
malformed answers."""

from __future__ import annotations

import json
import time

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenjournal as tj
from tokenjournal._protocols import MAX_BODY, DeviceInfo

P = tj.ManaProtocol("https://auth.example.com")
DEVICE = DeviceInfo("0b7f3c1e-5d7a-4c36-9f1e-2f7c1d9a8b01")
OLD = tj.TokenSet("old-access", "old-refresh")


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def access_jwt(lifetime: int = 900, iat: int | None = None) -> str:
    iat = int(time.time()) if iat is None else iat
    return jwt.encode({"sub": "u", "iat": iat, "exp": iat + lifetime}, "k" * 32, algorithm="HS256")


def test_build_refresh_is_the_documented_request() -> None:
    request = P.build_refresh(OLD, DEVICE)
    assert (request.method, request.url) == ("POST", "https://auth.example.com/auth/refresh")
    sent = json.loads(request.body)
    assert sent["refreshToken"] == "old-refresh"
    assert sent["deviceInfo"]["deviceId"] == DEVICE.device_id
    assert set(sent["deviceInfo"]) == {"deviceId", "deviceName", "deviceType", "userAgent"}


def test_sign_in_needs_email_and_password() -> None:
    with pytest.raises(ValueError):
        P.build_sign_in({"email": "a@b"}, DEVICE)
    sent = json.loads(P.build_sign_in({"email": "a@b", "password": "pw"}, DEVICE).body)
    assert sent["email"] == "a@b" and sent["deviceInfo"]["deviceId"] == DEVICE.device_id


def test_success_takes_expiry_from_the_jwt_lifetime_measured_at_receipt() -> None:
    # The device clock is a day off: expiry is received_at + (exp - iat), not exp itself.
    token = access_jwt(900, iat=1_000_000)
    answer = P.parse_tokens(200, {}, body(appToken=token, refreshToken="r2"), 5_000_000.0, OLD)
    assert isinstance(answer, tj.TokenSet)
    assert answer.expires_at_epoch == pytest.approx(5_000_900.0)
    assert answer.refresh_token == "r2"


def test_opaque_access_token_has_no_expiry() -> None:
    answer = P.parse_tokens(200, {}, body(appToken="opaque", refreshToken="r2"), 1.0, OLD)
    assert isinstance(answer, tj.TokenSet) and answer.expires_at is None


@pytest.mark.parametrize(
    ("status", "payload", "kind", "code"),
    [
        (
            409,
            {"statusCode": 409, "error": "rotation_in_progress"},
            "CONFLICT",
            "rotation_in_progress",
        ),
        (
            409,
            {"statusCode": 409, "message": "refresh_in_progress"},
            "CONFLICT",
            "refresh_in_progress",
        ),
        (429, {"statusCode": 429}, "RATE_LIMITED", "rate_limited"),
        (500, {}, "SERVER", "server_error"),
        (502, {}, "SERVER", "server_error"),
        (503, {"message": "down"}, "SERVER", "server_error"),
        (401, {"statusCode": 401, "error": "invalid_token"}, "PERMANENT", "invalid_token"),
        (401, {"statusCode": 401, "code": "token_expired"}, "PERMANENT", "token_expired"),
        (401, {"message": "invalid_token_state"}, "PERMANENT", "invalid_token_state"),
        (409, {"error": "token_collision"}, "PERMANENT", "token_collision"),
        (401, {"message": "Device ID has changed"}, "PERMANENT", "device_id_changed"),
        (400, {"message": ["refreshToken must be a string"]}, "REJECTED", "http_400"),
        (404, {"message": "Not Found"}, "REJECTED", "http_404"),
        (401, {"message": "Unauthorized"}, "REJECTED", "http_401"),
        (200, None, "MALFORMED", "malformed_body"),
    ],
)
def test_every_row_of_the_error_table(status: int, payload: object, kind: str, code: str) -> None:
    raw = b"not json" if payload is None else json.dumps(payload).encode()
    answer = P.parse_tokens(status, {}, raw, 0.0, OLD)
    assert isinstance(answer, tj.Failure)
    assert (answer.kind.name, answer.code) == (kind, code)


def test_conflict_waits_about_a_second_or_what_retry_after_says() -> None:
    raw = body(error="rotation_in_progress")
    assert P.parse_tokens(409, {}, raw, 0.0, OLD).retry_after == 1.0  # type: ignore[union-attr]
    hinted = P.parse_tokens(409, {"retry-after": "3"}, raw, 0.0, OLD)
    assert isinstance(hinted, tj.Failure) and hinted.retry_after == 3.0


def test_retry_after_as_http_date() -> None:
    answer = P.parse_tokens(503, {"Retry-After": "Thu, 01 Jan 1970 00:00:10 GMT"}, b"", 4.0, OLD)
    assert isinstance(answer, tj.Failure) and answer.retry_after == pytest.approx(6.0)


def test_oversized_body_is_malformed_not_parsed() -> None:
    huge = body(appToken="a", refreshToken="r", pad="x" * MAX_BODY)
    answer = P.parse_tokens(200, {}, huge, 0.0, OLD)
    assert isinstance(answer, tj.Failure) and answer.kind is tj.FailureKind.MALFORMED


def test_logout_accepts_2xx_and_a_dead_token() -> None:
    assert P.parse_sign_out(204, {}, b"") is None
    assert P.parse_sign_out(401, {}, body(error="invalid_token")) is None
    failure = P.parse_sign_out(503, {}, b"")
    assert failure is not None and failure.kind is tj.FailureKind.SERVER


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    status=st.integers(min_value=100, max_value=599),
    raw=st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries({"appToken": json_values, "refreshToken": json_values}).map(
            lambda v: json.dumps(v).encode()
        ),
    ),
)
def test_malformed_answers_never_become_tokens(status: int, raw: bytes) -> None:
    answer = P.parse_tokens(status, {}, raw, 0.0, OLD)
    if isinstance(answer, tj.TokenSet):
        data = json.loads(raw)
        assert 200 <= status < 300
        assert isinstance(data["appToken"], str) and data["appToken"]
        assert isinstance(data["refreshToken"], str) and data["refreshToken"]
    else:
        assert isinstance(answer, tj.Failure)
        if 200 <= status < 300:
            assert answer.kind is tj.FailureKind.MALFORMED


def test_an_absurd_exp_without_iat_cannot_overflow() -> None:
    """An exp outside year 0..9999 is no usable exp: the pair is kept, without expiry (the
    next 401 refreshes it), as for an opaque token. An exp in range is honoured."""
    for exp in (1e300, -1e300, -1):
        token = jwt.encode({"sub": "u", "exp": exp}, "k" * 32, algorithm="HS256")
        answer = P.parse_tokens(200, {}, body(appToken=token, refreshToken="r2"), 1000.0, OLD)
        assert isinstance(answer, tj.TokenSet) and answer.expires_at is None
    token = jwt.encode({"sub": "u", "exp": 2000}, "k" * 32, algorithm="HS256")
    answer = P.parse_tokens(200, {}, body(appToken=token, refreshToken="r2"), 1000.0, OLD)
    assert isinstance(answer, tj.TokenSet) and answer.expires_at_epoch == 2000
