"""ManaProtocol, sans-IO: every row of the error table in docs/architecture.md 3.1, and
malformed answers."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenjournal as tj
from tokenjournal._protocols import (
    MAX_BODY,
    MAX_LIFETIME,
    DeviceInfo,
    expiry_from_lifetime,
    jwt_lifetime,
    jwt_server_lifetime,
)
from tokenjournal._tokens import to_datetime

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


def unsigned_jwt(claims: dict[str, object]) -> str:
    """A JWT-shaped token whose payload is exactly ``claims`` (the SDK never verifies it)."""
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJIUzI1NiJ9.{payload}.c2ln"


NOW = 1_700_000_000.0


def mana_answer(access: str, headers: dict[str, str] | None = None) -> tj.TokenSet | tj.Failure:
    raw = body(appToken=access, refreshToken="new-refresh")
    return P.parse_tokens(200, headers or {}, raw, NOW, OLD)


def test_a_code_inside_a_longer_message_is_still_that_code() -> None:
    for text in ("Refresh failed: token_expired for user 7", "REFRESH FAILED: TOKEN_EXPIRED"):
        failure = P.parse_tokens(401, {}, body(statusCode=401, message=text), NOW, OLD)
        assert isinstance(failure, tj.Failure)
        assert (failure.kind, failure.code) == (tj.FailureKind.PERMANENT, "token_expired")
    raw = body(statusCode=409, error="Conflict: rotation_in_progress, retry")
    failure = P.parse_tokens(409, {}, raw, NOW, OLD)
    assert isinstance(failure, tj.Failure) and failure.kind is tj.FailureKind.CONFLICT


def test_a_jwt_without_iat_lives_until_its_exp_on_the_device_clock() -> None:
    tokens = mana_answer(unsigned_jwt({"exp": NOW + 900}))
    assert isinstance(tokens, tj.TokenSet)
    assert tokens.expires_at_epoch == NOW + 900
    assert tokens.received_at is not None and tokens.received_at.timestamp() == NOW
    assert tokens.lifetime == 900.0  # what bounds the refresh margin


@pytest.mark.parametrize(
    "claims", [{"iat": NOW}, {"exp": "soon", "iat": NOW}, {"exp": None}, {"exp": [NOW + 900]}]
)
def test_a_jwt_without_a_numeric_exp_has_no_expiry(claims: dict[str, object]) -> None:
    tokens = mana_answer(unsigned_jwt(claims))
    assert isinstance(tokens, tj.TokenSet) and tokens.expires_at is None
    assert tokens.received_at is not None and tokens.received_at.timestamp() == NOW


def test_exp_is_read_against_the_answers_date_then_iat_then_the_device_clock() -> None:
    token = unsigned_jwt({"exp": NOW + 900, "iat": NOW - 100})
    served = {"Date": "Tue, 14 Nov 2023 22:13:20 GMT"}  # NOW on the server's clock
    assert jwt_server_lifetime(token, served, NOW - 5000) == 900.0
    assert jwt_server_lifetime(token, {"date": served["Date"]}, NOW - 5000) == 900.0
    assert jwt_server_lifetime(token, {}, NOW + 5000) == 1000.0  # exp - iat
    dead = unsigned_jwt({"exp": NOW - 1, "iat": NOW - 901})
    assert jwt_server_lifetime(dead, served, NOW) == 0.0  # dead on the server's clock
    no_iat = unsigned_jwt({"exp": NOW + 900})
    assert jwt_server_lifetime(no_iat, {}, NOW + 899.5) == 0.5
    assert jwt_server_lifetime(no_iat, {}, NOW + 900) is None  # looks dead only here
    backwards = unsigned_jwt({"exp": NOW + 900, "iat": NOW + 900})
    assert jwt_server_lifetime(backwards, {}, NOW) == 900.0  # iat not before exp: ignored


@pytest.mark.parametrize("token", ["a.b", "a.b.c.d", "h.!!!.s", "h.bm90IGpzb24.s", "h.WzFd.s"])
def test_what_is_not_a_jwt_has_no_claims(token: str) -> None:
    assert jwt_lifetime(token) == (None, None)


def test_expiry_is_measured_from_receipt_and_capped() -> None:
    assert expiry_from_lifetime(NOW, None) is None and expiry_from_lifetime(NOW, -1.0) is None
    assert expiry_from_lifetime(NOW, 0.0) == to_datetime(NOW)
    assert expiry_from_lifetime(NOW, 60.0) == to_datetime(NOW + 60)
    assert expiry_from_lifetime(NOW, 1e12) == to_datetime(NOW + MAX_LIFETIME)


def test_a_3xx_is_neither_tokens_nor_a_logout() -> None:
    good = body(appToken=access_jwt(), refreshToken="new-refresh")
    assert isinstance(P.parse_tokens(299, {}, good, NOW, OLD), tj.TokenSet)
    failure = P.parse_tokens(300, {}, good, NOW, OLD)
    assert isinstance(failure, tj.Failure) and failure.kind is tj.FailureKind.REJECTED
    assert failure.code == "http_300" and failure.message == "unexpected status 300"
    assert P.parse_sign_out(299, {}, b"") is None
    out = P.parse_sign_out(300, {}, b"")
    assert out is not None and out.kind is tj.FailureKind.REJECTED


def test_an_unknown_code_is_named_in_the_rejection() -> None:
    failure = P.parse_tokens(401, {}, body(code="invalid_credentials"), NOW, OLD)
    assert isinstance(failure, tj.Failure) and failure.code == "invalid_credentials"
    assert failure.kind is tj.FailureKind.REJECTED and failure.status == 401
    for odd in (body(code=""), body(code=7), b"not json"):
        failure = P.parse_tokens(400, {}, odd, NOW, OLD)
        assert isinstance(failure, tj.Failure) and failure.code == "http_400"


def test_sign_in_and_sign_out_requests() -> None:
    sign_in = P.build_sign_in({"email": "a@b.c", "password": ""}, DEVICE)
    assert sign_in.url == "https://auth.example.com/auth/signin"
    assert dict(sign_in.headers)["Content-Type"] == "application/json"
    sent = json.loads(sign_in.body)
    assert (sent["email"], sent["password"]) == ("a@b.c", "")
    assert sent["deviceInfo"]["deviceId"] == DEVICE.device_id
    with pytest.raises(ValueError):
        P.build_sign_in({"email": "a@b.c"}, DEVICE)
    out = P.build_sign_out(OLD, DEVICE)
    assert out is not None and out.url == "https://auth.example.com/auth/logout"
    assert json.loads(out.body) == {"refreshToken": "old-refresh"}
    assert P.build_sign_out(tj.TokenSet("a", None), DEVICE) is None
    with pytest.raises(ValueError):
        P.build_refresh(tj.TokenSet("a", None), DEVICE)
    slash = tj.ManaProtocol("https://auth.example.com/")
    assert slash.build_refresh(OLD, DEVICE).url == "https://auth.example.com/auth/refresh"


def test_a_request_repr_hides_the_body_and_credential_headers() -> None:
    request = tj.HttpRequest(
        "POST", "https://x.test/t", (("Authorization", "Basic c2VjcmV0"), ("Accept", "a/b")), b"s"
    )
    text = repr(request)
    assert "c2VjcmV0" not in text and tj.fingerprint("Basic c2VjcmV0") in text
    assert "Accept: 'a/b'" in text and f"<1 bytes {tj.fingerprint('s')}>" in text
    assert text.startswith("HttpRequest(POST https://x.test/t, headers=[") and str(request) == text
