"""OAuth2Protocol, sans-IO: requests built to RFC 6749/8628, answers classified under the SDK's
rules, malformed bodies never raise. No sockets."""

from __future__ import annotations

import base64
import json
import math
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import jwt
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import tokenjournal as tj
from tokenjournal._protocols import DEVICE_GRANT, basic_credentials, positive_seconds

TOKEN_URL = "https://auth.example.test/oauth/token"
DEVICE_URL = "https://auth.example.test/oauth/device_authorization"
NOW = 1_700_000_000.0
DEVICE = tj.DeviceInfo("0b7f3c1e-5d7a-4c36-9f1e-2f7c1d9a8b01")
PREVIOUS = tj.TokenSet("old-access", "old-refresh", None, None, "Bearer", "read write")


def proto(**kw: Any) -> tj.OAuth2Protocol:
    kw.setdefault("client_id", "app")
    return tj.OAuth2Protocol(TOKEN_URL, **kw)


def form(request: tj.HttpRequest) -> dict[str, str]:
    return dict(parse_qsl(request.body.decode("ascii"), keep_blank_values=True))


def headers(request: tj.HttpRequest) -> dict[str, str]:
    return dict(request.headers)


def answer(
    p: tj.OAuth2Protocol,
    status: int,
    body: Any,
    prev: tj.TokenSet | None = PREVIOUS,
    hdrs: dict[str, str] | None = None,
) -> tj.TokenSet | tj.Failure:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return p.parse_tokens(status, hdrs or {}, raw, NOW, prev)


def server_decodes_basic(value: str) -> tuple[str, str]:
    """What an RFC 6749 2.3.1 server does with the header (the reference server does this)."""
    scheme, _, b64 = value.partition(" ")
    assert scheme == "Basic"
    user, sep, password = base64.b64decode(b64, validate=True).decode("ascii").partition(":")
    assert sep == ":"
    return unquote_plus(user), unquote_plus(password)


# ----------------------------------------------------------------------------- construction


def test_constructor_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        tj.OAuth2Protocol("ftp://x/token", client_id="app")
    with pytest.raises(ValueError):
        tj.OAuth2Protocol(TOKEN_URL, client_id="")
    with pytest.raises(ValueError):
        proto(client_auth="digest", client_secret="s")
    with pytest.raises(ValueError):
        proto(device_authorization_url="not a url")
    with pytest.raises(ValueError, match="client_auth='none'"):
        proto(client_auth="none", client_secret="s3cret")


def test_no_secret_means_public_client_whatever_client_auth_says() -> None:
    assert proto().client_auth == "none"
    assert proto(client_auth="body").client_auth == "none"
    assert proto(client_secret="s", client_auth="body").client_auth == "body"
    assert proto(client_secret="s").client_auth == "basic"


def test_reprs_hide_the_client_secret_and_the_device_code() -> None:
    p = proto(client_secret="very-secret-value")
    assert "very-secret-value" not in repr(p)
    code = tj.DeviceCode("device-code-secret", "BCDF-GHJK", "https://x/device", None, NOW, 5.0)
    assert "device-code-secret" not in repr(code)
    assert "BCDF-GHJK" in repr(code)


# ----------------------------------------------------------------------------- requests


def test_basic_auth_sends_credentials_in_the_header_only() -> None:
    request = proto(client_secret="s3cret").build_refresh(PREVIOUS, DEVICE)
    fields = form(request)
    assert "client_secret" not in fields and "client_id" not in fields
    assert server_decodes_basic(headers(request)["Authorization"]) == ("app", "s3cret")
    assert headers(request)["Content-Type"] == "application/x-www-form-urlencoded"
    assert headers(request)["Accept"] == "application/json"


def test_body_auth_and_public_client_put_the_id_in_the_form() -> None:
    body = form(proto(client_secret="s3cret", client_auth="body").build_refresh(PREVIOUS, DEVICE))
    assert (body["client_id"], body["client_secret"]) == ("app", "s3cret")
    public = proto().build_refresh(PREVIOUS, DEVICE)
    assert form(public)["client_id"] == "app"
    assert "client_secret" not in form(public)
    assert "Authorization" not in headers(public)


@settings(max_examples=200, deadline=None)
@given(client_id=st.text(min_size=1), secret=st.text())
def test_basic_credentials_round_trip_through_form_decoding(client_id: str, secret: str) -> None:
    """RFC 6749 2.3.1: form-encode, join with ':', base64. A ':' in the id, a '+' or a space,
    non-ASCII: the server reads back exactly what the client was given."""
    try:
        client_id.encode("utf-8"), secret.encode("utf-8")
    except UnicodeEncodeError:
        return  # lone surrogates cannot be sent at all
    assert server_decodes_basic(basic_credentials(client_id, secret)) == (client_id, secret)


def test_basic_credentials_known_vector() -> None:
    # A space is %20 (not '+', which a percent-only decoder would keep as '+').
    value = basic_credentials("my app", "p+ss:wörd")
    decoded = base64.b64decode(value.split()[1]).decode()
    assert decoded == "my%20app:p%2Bss%3Aw%C3%B6rd"


def test_refresh_never_sends_scope_sign_in_and_device_do() -> None:
    p = proto(scope="openid offline_access", device_authorization_url=DEVICE_URL)
    refresh = form(p.build_refresh(PREVIOUS, DEVICE))
    assert refresh == {
        "grant_type": "refresh_token",
        "refresh_token": "old-refresh",
        "client_id": "app",
    }
    password = form(p.build_sign_in({"username": "u", "password": "pw"}, DEVICE))
    assert password["scope"] == "openid offline_access"
    assert password["grant_type"] == "password"
    assert form(p.build_device_authorization())["scope"] == "openid offline_access"


def test_device_requests() -> None:
    p = proto(device_authorization_url=DEVICE_URL)
    assert p.build_device_authorization().url == DEVICE_URL
    poll = p.build_device_token("dc-1")
    assert poll.url == TOKEN_URL
    assert form(poll) == {"grant_type": DEVICE_GRANT, "device_code": "dc-1", "client_id": "app"}
    with pytest.raises(ValueError, match="device_authorization_url"):
        proto().build_device_authorization()


def test_sign_in_needs_username_and_password() -> None:
    with pytest.raises(ValueError):
        proto().build_sign_in({"password": "x"}, DEVICE)
    # `email=` is accepted as the username, so Mana-style calls keep working.
    request = proto().build_sign_in({"email": "e@x", "password": "p"}, DEVICE)
    assert form(request)["username"] == "e@x"


def test_sign_out_revokes_only_with_a_revocation_url() -> None:
    assert proto().build_sign_out(PREVIOUS, DEVICE) is None
    p = proto(revocation_url="https://auth.example.test/oauth/revoke")
    request = p.build_sign_out(PREVIOUS, DEVICE)
    assert request is not None
    assert form(request)["token_type_hint"] == "refresh_token"
    assert p.parse_sign_out(200, {}, b"") is None
    assert p.parse_sign_out(400, {}, b'{"error":"invalid_grant"}') is None  # dead = revoked
    failure = p.parse_sign_out(503, {}, b"")
    assert failure is not None and failure.kind is tj.FailureKind.SERVER


# ----------------------------------------------------------------------------- success answers


def test_a_full_answer() -> None:
    tokens = answer(
        proto(),
        200,
        {
            "access_token": "a2",
            "token_type": "Bearer",
            "expires_in": 900,
            "refresh_token": "r2",
            "scope": "read",
        },
    )
    assert isinstance(tokens, tj.TokenSet)
    assert (tokens.access_token, tokens.refresh_token, tokens.scope) == ("a2", "r2", "read")
    assert tokens.expires_at_epoch == NOW + 900
    assert tokens.received_at is not None and tokens.received_at.timestamp() == NOW


@pytest.mark.parametrize("refresh", [None, "", "absent"])
def test_missing_refresh_token_keeps_the_previous_one(refresh: str | None) -> None:
    body: dict[str, Any] = {"access_token": "a2", "token_type": "Bearer", "expires_in": 60}
    if refresh != "absent":
        body["refresh_token"] = refresh
    tokens = answer(proto(), 200, body)
    assert isinstance(tokens, tj.TokenSet) and tokens.refresh_token == "old-refresh"
    assert tokens.scope == "read write"  # no scope in the answer: the granted one stays


@pytest.mark.parametrize("token_type", ["bearer", "BEARER", " Bearer ", None])
def test_token_type_is_case_insensitive_and_defaults_to_bearer(token_type: str | None) -> None:
    body: dict[str, Any] = {"access_token": "a2", "expires_in": 60}
    if token_type is not None:
        body["token_type"] = token_type
    tokens = answer(proto(), 200, body)
    assert isinstance(tokens, tj.TokenSet) and tokens.token_type == "Bearer"


@pytest.mark.parametrize("token_type", ["DPoP", "mac", "N_A"])
def test_a_token_type_the_middleware_cannot_send_is_refused(token_type: str) -> None:
    failure = answer(proto(), 200, {"access_token": "a2", "token_type": token_type})
    assert isinstance(failure, tj.Failure)
    assert (failure.kind, failure.code) == (tj.FailureKind.REJECTED, "unsupported_token_type")


@pytest.mark.parametrize(
    ("raw", "lifetime"),
    [
        (900, 900.0),
        (900.5, 900.5),
        ("900", 900.0),
        (" 60 ", 60.0),
        ("1e3", 1000.0),
    ],
)
def test_expires_in_numbers_and_numeric_strings(raw: object, lifetime: float) -> None:
    tokens = answer(proto(), 200, {"access_token": "a2", "token_type": "Bearer", "expires_in": raw})
    assert isinstance(tokens, tj.TokenSet) and tokens.expires_at_epoch == NOW + lifetime


@pytest.mark.parametrize(
    "raw", [0, -5, "soon", True, None, "nan", "inf", [], {}, "1e999", 0.5, 5e-125]
)
def test_unusable_expires_in_is_ignored_not_fatal(raw: object) -> None:
    """The server has rotated already: a bad optional field must not throw the pair away."""
    tokens = answer(
        proto(),
        200,
        {
            "access_token": "opaque",
            "token_type": "Bearer",
            "expires_in": raw,
            "refresh_token": "r2",
        },
    )
    assert isinstance(tokens, tj.TokenSet)
    assert tokens.expires_at is None and tokens.refresh_token == "r2"


@pytest.mark.parametrize("raw", [1e11, 251702300800.0, "1e300"])
def test_a_lifetime_of_forever_is_capped_not_an_overflow(raw: object) -> None:
    """Regression (core fix in expiry_from_lifetime, found by the fuzz test below): a huge
    expires_in overflowed datetime and parse_tokens raised ValueError."""
    tokens = answer(proto(), 200, {"access_token": "a", "token_type": "Bearer", "expires_in": raw})
    assert isinstance(tokens, tj.TokenSet)
    assert tokens.expires_at_epoch == NOW + 10 * 365 * 86400


def test_without_expires_in_a_jwt_access_token_gives_its_own_lifetime() -> None:
    access = jwt.encode({"iat": 100, "exp": 400, "sub": "u"}, "k" * 32, algorithm="HS256")
    tokens = answer(proto(), 200, {"access_token": access, "token_type": "Bearer"})
    # exp - iat measured from receipt: the device clock may be off, the lifetime is not.
    assert isinstance(tokens, tj.TokenSet) and tokens.expires_at_epoch == NOW + 300


def test_sign_in_answer_without_scope_records_the_requested_scope() -> None:
    tokens = answer(
        proto(scope="sync"), 200, {"access_token": "a", "token_type": "Bearer"}, prev=None
    )
    assert isinstance(tokens, tj.TokenSet) and tokens.scope == "sync"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'"str"',
        b"null",
        {"token_type": "Bearer"},
        {"access_token": ""},
        {"access_token": 5},
        {"access_token": "a", "token_type": 5},
        {"access_token": "a", "refresh_token": 7},
    ],
)
def test_2xx_that_does_not_parse_is_malformed(body: Any) -> None:
    failure = answer(proto(), 200, body)
    assert isinstance(failure, tj.Failure) and failure.kind is tj.FailureKind.MALFORMED


def test_oversized_body_is_refused_unread() -> None:
    body = b'{"access_token": "' + b"a" * (1024 * 1024) + b'"}'
    failure = answer(proto(), 200, body)
    assert isinstance(failure, tj.Failure) and failure.kind is tj.FailureKind.MALFORMED


# ----------------------------------------------------------------------------- error answers


@pytest.mark.parametrize("status", [400, 401, 403])
@pytest.mark.parametrize("code", ["invalid_grant", "INVALID_GRANT", " invalid_grant "])
def test_invalid_grant_is_permanent_in_400_401_403(status: int, code: str) -> None:
    failure = answer(proto(), status, {"error": code, "error_description": "Token is not active"})
    assert isinstance(failure, tj.Failure)
    assert (failure.kind, failure.code, failure.status) == (
        tj.FailureKind.PERMANENT,
        "invalid_grant",
        status,
    )


@settings(max_examples=200, deadline=None)
@given(
    status=st.integers(500, 599),
    error=st.sampled_from(["invalid_grant", "access_denied", "server_error", "whatever", None]),
)
def test_5xx_is_transient_whatever_the_body_says(status: int, error: str | None) -> None:
    """Invariant 5: a 5xx never ends a session, even one whose body says invalid_grant."""
    failure = answer(proto(), status, {"error": error} if error else b"<html>Bad gateway</html>")
    assert isinstance(failure, tj.Failure) and failure.kind is tj.FailureKind.SERVER


def test_429_is_rate_limited_with_retry_after() -> None:
    failure = answer(proto(), 429, {"error": "invalid_grant"}, hdrs={"retry-after": "7"})
    assert isinstance(failure, tj.Failure)
    assert (failure.kind, failure.retry_after) == (tj.FailureKind.RATE_LIMITED, 7.0)


@pytest.mark.parametrize("value", ["inf", "nan", "1e999", "-inf"])
def test_a_non_finite_retry_after_is_no_hint(value: str) -> None:
    """Regression (core fix in parse_retry_after): "inf" parsed as a float would make the
    device flow sleep forever."""
    failure = answer(proto(), 503, b"", hdrs={"Retry-After": value})
    assert isinstance(failure, tj.Failure) and failure.retry_after is None


def test_temporarily_unavailable_in_a_400_is_transient() -> None:
    failure = answer(proto(), 400, {"error": "temporarily_unavailable"}, hdrs={"Retry-After": "3"})
    assert isinstance(failure, tj.Failure)
    assert (failure.kind, failure.retry_after) == (tj.FailureKind.SERVER, 3.0)


def test_rotation_in_progress_is_a_conflict() -> None:
    failure = answer(proto(), 409, {"error": "rotation_in_progress"})
    assert isinstance(failure, tj.Failure)
    assert (failure.kind, failure.retry_after) == (tj.FailureKind.CONFLICT, 1.0)


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (401, {"error": "invalid_client"}, "invalid_client"),
        (400, {"error": "invalid_scope"}, "invalid_scope"),
        (400, {"error": "unauthorized_client"}, "unauthorized_client"),
        (404, b"Not Found", "http_404"),
        (401, b"", "http_401"),
    ],
)
def test_other_4xx_is_rejected_and_keeps_the_session(status: int, body: Any, code: str) -> None:
    failure = answer(proto(), status, body)
    assert isinstance(failure, tj.Failure)
    assert (failure.kind, failure.code) == (tj.FailureKind.REJECTED, code)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("authorization_pending", tj.FailureKind.PENDING),
        ("slow_down", tj.FailureKind.SLOW_DOWN),
        ("access_denied", tj.FailureKind.PERMANENT),
        ("expired_token", tj.FailureKind.PERMANENT),
    ],
)
@pytest.mark.parametrize("status", [400, 200])  # GitHub answers device polls with 200 + error
def test_device_poll_codes(code: str, kind: tj.FailureKind, status: int) -> None:
    failure = answer(proto(), status, {"error": code}, prev=None)
    assert isinstance(failure, tj.Failure) and (failure.kind, failure.code) == (kind, code)


def test_slow_down_carries_a_new_interval_when_the_server_names_one() -> None:
    failure = answer(proto(), 200, {"error": "slow_down", "interval": 10}, prev=None)
    assert isinstance(failure, tj.Failure) and failure.retry_after == 10.0
    plain = answer(proto(), 400, {"error": "slow_down"}, prev=None)
    assert isinstance(plain, tj.Failure) and plain.retry_after is None


# ----------------------------------------------------------------------------- device authorization


def test_device_authorization_answer() -> None:
    p = proto(device_authorization_url=DEVICE_URL)
    body = {
        "device_code": "dc",
        "user_code": "BCDF-GHJK",
        "verification_uri": "https://x/device",
        "verification_uri_complete": "https://x/device?user_code=BCDF-GHJK",
        "expires_in": "600",
        "interval": 7,
    }
    code = p.parse_device_authorization(200, {}, json.dumps(body).encode(), NOW)
    assert isinstance(code, tj.DeviceCode)
    assert (code.device_code, code.user_code, code.expires_at, code.interval) == (
        "dc",
        "BCDF-GHJK",
        NOW + 600,
        7.0,
    )
    assert code.verification_uri_complete == "https://x/device?user_code=BCDF-GHJK"


def test_device_authorization_defaults_and_google_spelling() -> None:
    body = {
        "device_code": "dc",
        "user_code": "U",
        "verification_url": "https://g/device",
        "expires_in": 1800,
    }
    code = proto().parse_device_authorization(200, {}, json.dumps(body).encode(), NOW)
    assert isinstance(code, tj.DeviceCode)
    assert (code.verification_uri, code.interval, code.verification_uri_complete) == (
        "https://g/device",
        5.0,
        None,
    )


DEVICE_ANSWER: dict[str, object] = {
    "device_code": "dc",
    "user_code": "U",
    "verification_uri": "https://x",
    "expires_in": 600,
}


@pytest.mark.parametrize("missing", ["device_code", "user_code", "verification_uri", "expires_in"])
def test_device_authorization_without_a_required_field_is_malformed(missing: str) -> None:
    body = dict(DEVICE_ANSWER)
    del body[missing]
    failure = proto().parse_device_authorization(200, {}, json.dumps(body).encode(), NOW)
    assert isinstance(failure, tj.Failure) and failure.kind is tj.FailureKind.MALFORMED


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("user_code", "\x1b[2J\x1b[HBCDF-GHJK\x1b]0;title\x07"),
        ("user_code", "BCDF\u202eKJHG"),  # a right-to-left override reorders what is shown
        ("verification_uri", "https://x/device\x1b[8m"),
        ("verification_uri", "javascript:alert(1)"),
        ("verification_uri", "https://x/a b"),
        ("verification_uri", "/device"),
        ("verification_uri_complete", "https://x/\x1b]8;;https://evil/\x07"),
    ],
)
def test_device_authorization_that_a_terminal_could_not_show_safely_is_malformed(
    field: str, value: str
) -> None:
    """The app shows user_code and the URIs to a person, often on a terminal: a hostile
    server could clear a kiosk's screen, retitle it or hide part of the address."""
    body = {**DEVICE_ANSWER, "user_code": "BCDF-GHJK", "verification_uri": "https://x/device"}
    good = proto().parse_device_authorization(200, {}, json.dumps(body).encode(), NOW)
    assert isinstance(good, tj.DeviceCode)
    body[field] = value
    failure = proto().parse_device_authorization(200, {}, json.dumps(body).encode(), NOW)
    assert failure == tj.Failure(
        tj.FailureKind.MALFORMED,
        "malformed_body",
        200,
        "user_code must be printable ASCII and verification_uri an http(s) URL",
    )


def test_device_authorization_errors() -> None:
    p = proto()
    bad = p.parse_device_authorization(401, {}, b'{"error":"invalid_client"}', NOW)
    assert isinstance(bad, tj.Failure) and bad.kind is tj.FailureKind.REJECTED
    down = p.parse_device_authorization(503, {}, b"", NOW)
    assert isinstance(down, tj.Failure) and down.kind is tj.FailureKind.SERVER


# ----------------------------------------------------------------------------- fuzz

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    [
        "access_token",
        "refresh_token",
        "token_type",
        "expires_in",
        "scope",
        "error",
        "error_description",
        "interval",
        "device_code",
        "user_code",
        "verification_uri",
        "verification_uri_complete",
    ]
)
SECRETISH = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=12, max_size=24)


@settings(max_examples=400, deadline=None)
@given(
    status=st.integers(100, 599),
    body=st.binary(max_size=300),
    hdrs=st.dictionaries(
        st.sampled_from(["Retry-After", "retry-after", "X"]), st.text(max_size=30), max_size=2
    ),
)
def test_arbitrary_bytes_never_raise(status: int, body: bytes, hdrs: dict[str, str]) -> None:
    p = proto(device_authorization_url=DEVICE_URL)
    result = p.parse_tokens(status, hdrs, body, NOW, PREVIOUS)
    assert isinstance(result, tj.TokenSet | tj.Failure)
    assert isinstance(
        p.parse_device_authorization(status, hdrs, body, NOW), tj.DeviceCode | tj.Failure
    )
    if isinstance(result, tj.Failure) and result.retry_after is not None:
        assert result.retry_after >= 0 and math.isfinite(result.retry_after)


@settings(max_examples=250, deadline=None)
@given(
    status=st.integers(100, 599),
    data=st.dictionaries(FIELDS, JSON, max_size=8),
    access=SECRETISH,
    refresh=SECRETISH,
)
def test_malformed_objects_never_raise_and_never_echo_a_token(
    status: int, data: dict[str, Any], access: str, refresh: str
) -> None:
    """Hypothesis-built token answers: the result is a TokenSet or a Failure whose message
    holds no token, and a 2xx success is only ever a Bearer pair with a positive lifetime."""
    others = json.dumps(
        {k: v for k, v in data.items() if k not in ("access_token", "refresh_token")}
    )
    assume(access not in others and refresh not in others)  # an echoed field is no leak
    data = {**data}
    if "access_token" in data:
        data["access_token"] = access
    if "refresh_token" in data:
        data["refresh_token"] = refresh
    result = proto().parse_tokens(status, {}, json.dumps(data).encode(), NOW, PREVIOUS)
    if isinstance(result, tj.Failure):
        assert access not in result.message and refresh not in result.message
        assert access not in result.code and refresh not in result.code
        if status >= 500 or status == 429:
            assert result.kind in (tj.FailureKind.SERVER, tj.FailureKind.RATE_LIMITED)
    else:
        assert 200 <= status < 300
        assert result.access_token == access and result.token_type == "Bearer"
        assert result.refresh_token in (refresh, "old-refresh")
        if result.expires_at_epoch is not None:
            assert result.expires_at_epoch > NOW
        assert access not in repr(result) and refresh not in repr(result)


@settings(max_examples=200, deadline=None)
@given(value=JSON | st.text(max_size=12))
def test_positive_seconds_is_total(value: Any) -> None:
    seconds = positive_seconds(value)
    assert seconds is None or (seconds > 0 and math.isfinite(seconds))


def test_extra_params_go_with_sign_in_requests_only() -> None:
    p = tj.OAuth2Protocol(
        TOKEN_URL,
        client_id="app",
        scope="offline_access",
        device_authorization_url=DEVICE_URL,
        extra_params={"audience": "https://api.example.test"},
    )
    for request in (
        p.build_device_authorization(),
        p.build_sign_in({"username": "u", "password": "pw"}, DEVICE),
    ):
        assert form(request)["audience"] == "https://api.example.test"
        assert form(request)["scope"] == "offline_access"
    assert "audience" not in form(p.build_refresh(PREVIOUS, DEVICE))
    assert "audience" not in form(p.build_device_token("dc"))
    hash(p)  # still a usable, frozen value


def test_extra_params_cannot_override_the_protocol() -> None:
    with pytest.raises(ValueError, match="grant_type"):
        proto(extra_params={"grant_type": "client_credentials"})
    with pytest.raises(TypeError):
        proto(extra_params={"audience": 5})


# ----------------------------------------------------------------------------- pinned details


def unsigned_jwt(claims: dict[str, object]) -> str:
    """A JWT-shaped token whose payload is exactly ``claims``."""
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJIUzI1NiJ9.{payload}.c2ln"


def test_revocation_sends_the_refresh_token_as_rfc_7009_says() -> None:
    p = proto(client_secret="s3cret", revocation_url="https://auth.example.test/oauth/revoke")
    request = p.build_sign_out(PREVIOUS, DEVICE)
    assert request is not None and request.url == "https://auth.example.test/oauth/revoke"
    assert form(request) == {"token": "old-refresh", "token_type_hint": "refresh_token"}
    assert headers(request)["Content-Type"] == "application/x-www-form-urlencoded"


def test_the_password_grant_refuses_a_missing_password() -> None:
    with pytest.raises(ValueError, match="password"):
        proto().build_sign_in({"username": "u"}, DEVICE)
    sent = form(proto().build_sign_in({"email": "e@x.test", "password": ""}, DEVICE))
    assert (sent["grant_type"], sent["username"], sent["password"]) == ("password", "e@x.test", "")


def test_basic_credentials_escape_every_reserved_character() -> None:
    value = basic_credentials("a/b:c d", "p/q:r")
    assert base64.b64decode(value.removeprefix("Basic ")) == b"a%2Fb%3Ac%20d:p%2Fq%3Ar"


def test_a_3xx_is_neither_tokens_nor_a_revocation_nor_a_device_code() -> None:
    good = {"access_token": "a", "token_type": "Bearer", "expires_in": 60}
    assert isinstance(answer(proto(), 299, good), tj.TokenSet)
    failure = answer(proto(), 300, good)
    assert isinstance(failure, tj.Failure) and failure.kind is tj.FailureKind.REJECTED
    assert proto().parse_sign_out(299, {}, b"") is None
    out = proto().parse_sign_out(300, {}, b"")
    assert out is not None and out.kind is tj.FailureKind.REJECTED
    dead = proto().parse_sign_out(400, {}, b'{"error": "invalid_grant"}')
    assert dead is None  # a dead token is as good as revoked
    code = {"device_code": "d", "user_code": "U", "verification_uri": "https://v", "expires_in": 9}
    raw = json.dumps(code).encode()
    assert isinstance(proto().parse_device_authorization(299, {}, raw, NOW), tj.DeviceCode)
    moved = proto().parse_device_authorization(300, {}, raw, NOW)
    assert isinstance(moved, tj.Failure) and moved.kind is tj.FailureKind.REJECTED


def test_a_device_authorization_that_is_not_json_is_malformed() -> None:
    failure = proto().parse_device_authorization(200, {}, b"<html>", NOW)
    assert isinstance(failure, tj.Failure)
    assert (failure.kind, failure.code, failure.status) == (
        tj.FailureKind.MALFORMED,
        "malformed_body",
        200,
    )


def test_without_expires_in_a_jwt_with_exp_but_no_iat_lives_until_exp() -> None:
    access = unsigned_jwt({"exp": NOW + 600})
    tokens = answer(proto(), 200, {"access_token": access, "token_type": "Bearer"})
    assert isinstance(tokens, tj.TokenSet) and tokens.expires_at_epoch == NOW + 600
    assert tokens.received_at is not None and tokens.received_at.timestamp() == NOW
    assert tokens.lifetime == 600.0
    opaque = answer(proto(), 200, {"access_token": "opaque", "expires_in": "never"})
    assert isinstance(opaque, tj.TokenSet) and opaque.expires_at is None


def test_an_expires_in_under_a_second_is_no_expiry_and_one_second_is_kept() -> None:
    short = answer(proto(), 200, {"access_token": "a", "expires_in": 0.5})
    assert isinstance(short, tj.TokenSet) and short.expires_at is None
    one = answer(proto(), 200, {"access_token": "a", "expires_in": 1})
    assert isinstance(one, tj.TokenSet) and one.expires_at_epoch == NOW + 1


def test_a_date_form_retry_after_on_an_oauth_error_is_seconds_from_receipt() -> None:
    hdrs = {"retry-after": "Tue, 14 Nov 2023 22:13:50 GMT"}  # NOW + 30 s
    failure = answer(proto(), 503, b"", hdrs=hdrs)
    assert isinstance(failure, tj.Failure) and failure.retry_after == 30.0
    failure = answer(proto(), 400, {"error": "temporarily_unavailable"}, hdrs=hdrs)
    assert isinstance(failure, tj.Failure) and failure.kind is tj.FailureKind.SERVER
    assert failure.retry_after == 30.0
    failure = answer(proto(), 429, b"", hdrs={"Retry-After": "0"})
    assert isinstance(failure, tj.Failure) and failure.retry_after == 0.0


def test_scope_falls_back_to_the_previous_then_the_requested_one() -> None:
    p = proto(scope="openid")
    assert answer(p, 200, {"access_token": "a", "scope": "x"}).scope == "x"  # type: ignore[union-attr]
    assert answer(p, 200, {"access_token": "a", "scope": " "}).scope == "read write"  # type: ignore[union-attr]
    assert answer(p, 200, {"access_token": "a"}, prev=None).scope == "openid"  # type: ignore[union-attr]
