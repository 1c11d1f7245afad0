"""Bad server answers, drawn by hypothesis, through the TokenManager.

Status codes, headers and bodies of every kind (truncated JSON, wrong types, nasty token
strings, error codes in odd places, absurd ``Retry-After`` values) are fed to sign-in,
refresh and logout, one to four answers in a row (an exhausted list is a refused
connection). Whatever comes:

* a token is stored only if an answer carried it, well-formed (2xx, a JSON object, the
  token fields as non-empty printable-ASCII strings, RFC 6749 A.12/A.17);
* nothing but a ``TokenJournalError`` leaves the manager;
* on anything transient (429, 5xx, no answer) the pair and the intent are kept;
* the session ends only on a permanent code the server really sent.

The answers come from ``aioresponses`` (with the conftest shim), which replaces the
manager's HTTP calls; the clock is a ``FakeClock``, so retries cost no time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jwt
import pytest
from aioresponses import aioresponses
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tokenjournal as tj
from tokenjournal.testing import FakeClock

AUTH = "http://127.0.0.1:9"
NOW = datetime.now(UTC).replace(microsecond=0)
OLD = tj.TokenSet("old-access", "old-refresh", NOW + timedelta(hours=1), NOW)
RETRY = tj.RetryPolicy(max_attempts=3, max_elapsed=600.0, base_delay=0.01, attempt_timeout=5.0)
#: More examples for a deeper hunt: BAD_ANSWERS_EXAMPLES=5000 pytest tests/test_bad_answers.py
SETTINGS = settings(
    max_examples=int(os.environ.get("BAD_ANSWERS_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Answer:
    """One drawn HTTP answer."""

    status: int
    headers: dict[str, str]
    body: bytes
    content_type: str

    def __repr__(self) -> str:  # hostile bodies run to 200 kB: show their head and size
        body = self.body if len(self.body) <= 200 else self.body[:200] + b"..."
        return (
            f"Answer({self.status}, {self.headers!r}, {body!r} ({len(self.body)} bytes), "
            f"{self.content_type!r})"
        )


# ------------------------------------------------------------------------------ strategies


def _jwt(iat: int, life: int) -> str:
    return jwt.encode({"iat": iat, "exp": iat + life}, "k" * 32, algorithm="HS256")


PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
GOOD_TOKEN = st.text(alphabet=PRINTABLE, min_size=1, max_size=30) | st.builds(
    _jwt, st.integers(0, 2**33), st.integers(-(10**6), 10**6)
)
NASTY_TOKEN = st.sampled_from(
    ["", " ", "a\nb", "a\r\nX-Evil: 1", "nul\x00", "\ud800", "caf\u00e9", "\t", "\x7f"]
) | st.text(max_size=6)
CODES = st.sampled_from(
    [
        "invalid_token",
        "token_expired",
        "invalid_token_state",
        "token_collision",
        "rotation_in_progress",
        "refresh_in_progress",
        "Device ID has changed",
        "invalid_grant",
        "temporarily_unavailable",
        "server_error",
        "slow_down",
        "authorization_pending",
        "access_denied",
        "expired_token",
        "Unauthorized",
    ]
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
VALUE = JSON | GOOD_TOKEN | NASTY_TOKEN | CODES | st.lists(CODES, max_size=2)
MANA_KEYS = [
    "appToken",
    "refreshToken",
    "deviceId",
    "code",
    "error",
    "message",
    "statusCode",
    "grace_period_used",
    "grace_expires_at",
]
OAUTH_KEYS = [
    "access_token",
    "refresh_token",
    "expires_in",
    "token_type",
    "scope",
    "error",
    "error_description",
    "interval",
]
STATUS = st.sampled_from(
    [
        200,
        201,
        202,
        204,
        299,
        300,
        301,
        302,
        304,
        307,
        400,
        401,
        403,
        404,
        405,
        408,
        409,
        410,
        413,
        418,
        422,
        429,
        451,
        499,
        500,
        501,
        502,
        503,
        504,
        599,
    ]
)
RETRY_AFTER = st.sampled_from(
    [
        "0",
        "1",
        "2.5",
        "-1",
        "1e309",
        "inf",
        "nan",
        "abc",
        "",
        "99999999999999999999",
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "Fri, 31 Dec 9999 23:59:59 GMT",
    ]
)
HEADERS = st.dictionaries(
    st.sampled_from(["Retry-After", "WWW-Authenticate", "X-Anything"]),
    RETRY_AFTER
    | st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20),
    max_size=2,
)
CONTENT_TYPE = st.sampled_from(["application/json", "text/html", "text/plain", ""])


def _dump(data: object) -> bytes:
    return json.dumps(data).encode()


def raw_jwt(claims: str) -> str:
    """A JWT whose payload is ``claims`` verbatim (PyJWT would refuse to write NaN)."""
    segment = base64.urlsafe_b64encode(claims.encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJIUzI1NiJ9.{segment}.c2ln"


def pair_body(claims: str) -> bytes:
    """A Mana success whose access token carries ``claims``."""
    return json.dumps({"appToken": raw_jwt(claims), "refreshToken": "r"}).encode()


#: Numbers no float holds, and literals Python's json accepts but JSON does not.
HOSTILE_NUMBER = st.sampled_from(
    ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 400, "-" + "9" * 400, "true", '"1"']
)
#: A JWT whose exp/iat is one of those.
HOSTILE_JWT = st.builds(
    lambda exp, iat: raw_jwt(f'{{"exp": {exp}, "iat": {iat}}}'),
    HOSTILE_NUMBER,
    HOSTILE_NUMBER | st.just("1000"),
) | HOSTILE_NUMBER.map(lambda exp: raw_jwt(f'{{"exp": {exp}}}'))


def _nest(depth: int, kind: str) -> bytes:
    return (kind[0] * depth + kind[1] * depth).encode()


#: Bodies that make parsers raise instead of answer: nesting deeper than the recursion
#: limit, NaN/Infinity literals and huge integers where numbers go, long strings, and
#: well-formed pairs whose JWT carries an unusable exp.
HOSTILE_BODY = st.one_of(
    # Drawn bodies stay under hypothesis's 30 kB repr limit; 2,000 deep is past Python's
    # recursion limit already, and the 100,000-deep case is an explicit example below.
    st.builds(_nest, st.sampled_from([2_000, 5_000]), st.sampled_from(["[]", "{}"])).map(
        lambda b: b.replace(b"{{", b'{"a":{') if b.startswith(b"{") else b
    ),
    st.sampled_from([b'{"appToken": [', b'{"access_token": {']).map(lambda p: p + b"[" * 5_000),
    st.builds(
        lambda key, number: f'{{"{key}": {number}}}'.encode(),
        st.sampled_from(MANA_KEYS + OAUTH_KEYS),
        HOSTILE_NUMBER,
    ),
    st.builds(
        lambda key, access, number: (
            f'{{"{key}": "{access}", "refreshToken": "r2", "refresh_token": "r2", '
            f'"token_type": "Bearer", "expires_in": {number}, "interval": {number}, '
            f'"grace_expires_at": {number}}}'
        ).encode(),
        st.sampled_from(["appToken", "access_token"]),
        HOSTILE_JWT,
        HOSTILE_NUMBER,
    ),
    st.integers(1_000, 12_000).map(lambda n: b'{"error": "' + b"x" * n + b'"}'),
)


def bodies(keys: list[str], good: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    """Every shape of body: drawn objects, good ones, truncated ones, non-objects, bytes."""
    objects = st.dictionaries(st.sampled_from(keys), VALUE, max_size=len(keys))
    whole = st.one_of(objects, good).map(_dump)
    return st.one_of(
        whole,
        whole.flatmap(lambda b: st.integers(0, max(0, len(b) - 1)).map(lambda k: b[:k])),
        JSON.map(_dump),
        st.binary(max_size=40),
        st.sampled_from([b"", b"null", b'{"appToken": NaN}', b"\xff\xfe{}"]),
        HOSTILE_BODY,
    )


MANA_GOOD = st.fixed_dictionaries(
    {"appToken": GOOD_TOKEN, "refreshToken": GOOD_TOKEN, "deviceId": st.just("d")}
)
OAUTH_GOOD = st.fixed_dictionaries(
    {"access_token": GOOD_TOKEN, "token_type": st.just("Bearer")},
    optional={"refresh_token": GOOD_TOKEN, "expires_in": st.integers(1, 10**6)},
)


def answers(
    keys: list[str], good: st.SearchStrategy[dict[str, Any]]
) -> st.SearchStrategy[list[Answer]]:
    """One to four answers in a row."""
    one = st.builds(Answer, STATUS, HEADERS, bodies(keys, good), CONTENT_TYPE)
    return st.lists(one, min_size=1, max_size=4)


TRANSIENT = st.lists(
    st.builds(
        Answer,
        st.sampled_from([429, 500, 502, 503, 504, 599]),
        HEADERS,
        bodies(MANA_KEYS, MANA_GOOD),
        CONTENT_TYPE,
    ),
    min_size=0,
    max_size=4,
)


# ------------------------------------------------------------------------------ oracle


def _object(answer: Answer) -> dict[str, Any] | None:
    try:
        data = json.loads(answer.body)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _token_ok(value: object) -> bool:
    return isinstance(value, str) and bool(value) and value.isascii() and value.isprintable()


def mana_pairs(sent: list[Answer]) -> set[tuple[str, str]]:
    """The (access, refresh) pairs a well-formed Mana success among ``sent`` carried."""
    pairs = set()
    for answer in sent:
        data = _object(answer)
        if 200 <= answer.status < 300 and data is not None:
            access, refresh = data.get("appToken"), data.get("refreshToken")
            if _token_ok(access) and _token_ok(refresh):
                assert isinstance(access, str) and isinstance(refresh, str)
                pairs.add((access, refresh))
    return pairs


def oauth_pairs(sent: list[Answer], previous: tj.TokenSet) -> set[tuple[str, str | None]]:
    """The pairs a 2xx OAuth answer among ``sent`` could carry (a missing refresh_token keeps
    the previous one)."""
    pairs: set[tuple[str, str | None]] = set()
    for answer in sent:
        data = _object(answer)
        if 200 <= answer.status < 300 and data is not None and _token_ok(data.get("access_token")):
            refresh = data.get("refresh_token")
            if refresh is None or refresh == "":
                refresh = previous.refresh_token
            if _token_ok(refresh):
                pairs.add((str(data["access_token"]), str(refresh)))
    return pairs


def said(sent: list[Answer], code: str) -> bool:
    """Whether a non-2xx answer carried ``code`` (or the device-changed message)."""
    needle = "device id has changed" if code == "device_id_changed" else code
    return any(
        not 200 <= a.status < 300 and needle in a.body.decode("utf-8", "replace").lower()
        for a in sent
    )


# ------------------------------------------------------------------------------ harness


def _register(mock: aioresponses, url: str, sent: list[Answer]) -> None:
    for answer in sent:
        mock.post(
            url,
            status=answer.status,
            body=answer.body,
            headers=answer.headers,
            content_type=answer.content_type,
        )


async def _manager(
    journal: tj.Journal, protocol: tj.AuthProtocol | None = None, tokens: tj.TokenSet | None = OLD
) -> tj.TokenManager:
    tm = tj.TokenManager(AUTH, journal=journal, protocol=protocol, clock=FakeClock(), retry=RETRY)
    await tm.open()
    if tokens is not None:
        await tm.set_tokens(tokens)
    return tm


async def refresh_case(
    sent: list[Answer], journal: tj.Journal, protocol: tj.AuthProtocol | None = None
) -> tuple[tj.TokenSet | BaseException, tj.TokenSet | None, str | None, tj.TokenManager]:
    """Refresh against ``sent``; returns (outcome, journal pair, journal end code, and the
    manager's state as the refresh left it, as ``.state``)."""
    url = protocol.auth_url if protocol is not None else f"{AUTH}/auth/refresh"
    with aioresponses() as mock:
        tm = await _manager(journal, protocol)
        _register(mock, url, sent)
        try:
            outcome: tj.TokenSet | BaseException = await tm.refresh()
        except tj.TokenJournalError as exc:
            outcome = exc
        finally:
            # The journal and the state as the refresh left them: the grace rescue may try
            # again in the background (and hear the next scripted answer) before close().
            record = await journal.load("default")
            seen = SimpleNamespace(state=tm.state)
            await tm.close()
    return outcome, record.tokens, record.ended_code, seen  # type: ignore[return-value]


def check_refresh(
    sent: list[Answer],
    outcome: tj.TokenSet | BaseException,
    stored: tj.TokenSet | None,
    ended: str | None,
    tm: tj.TokenManager,
    good: set[Any],
) -> None:
    """The refresh oracle (see the module doc)."""
    if isinstance(outcome, tj.TokenSet):
        assert (outcome.access_token, outcome.refresh_token) in good, "stored a malformed pair"
        assert stored == outcome
    elif isinstance(outcome, tj.SessionEnded):
        assert said(sent, outcome.code), f"ended with {outcome.code!r} the server never sent"
        assert stored is None and ended == outcome.code
        assert tm.state is tj.SessionState.ENDED
    else:
        assert stored == OLD, "a failed refresh changed or dropped the pair"
        assert tm.state is tj.SessionState.VALID


# ------------------------------------------------------------------------------ refresh


@SETTINGS
@given(sent=answers(MANA_KEYS, MANA_GOOD))
@example(sent=[Answer(200, {}, b'{"appToken": "\\ud800", "refreshToken": "r"}', "")])
@example(sent=[Answer(200, {}, b'{"appToken": "a\\r\\nX: 1", "refreshToken": "r"}', "")])
@example(sent=[Answer(200, {}, b'{"appToken": "a", "refreshToken": "r\\u0000"}', "")])
@example(sent=[Answer(401, {}, b'{"message": ["Device ID has changed"]}', "")])
@example(sent=[Answer(503, {"Retry-After": "1e309"}, b"", "")])
def test_mana_refresh_stores_only_well_formed_pairs(sent: list[Answer]) -> None:
    outcome, stored, ended, tm = asyncio.run(refresh_case(sent, tj.MemoryJournal()))
    check_refresh(sent, outcome, stored, ended, tm, mana_pairs(sent))


@settings(SETTINGS, max_examples=max(10, SETTINGS.max_examples // 4))
@given(sent=answers(MANA_KEYS, MANA_GOOD))
@example(sent=[Answer(200, {}, b'{"appToken": "\\udfff", "refreshToken": "r"}', "")])
def test_mana_refresh_on_a_sqlite_journal(sent: list[Answer], tmp_path_factory: Any) -> None:
    """The same on disk: a token the file cannot hold must not get that far either."""
    path = Path(tmp_path_factory.mktemp("j")) / "tokens.db"
    outcome, stored, ended, tm = asyncio.run(refresh_case(sent, tj.SQLiteJournal(path)))
    check_refresh(sent, outcome, stored, ended, tm, mana_pairs(sent))


@SETTINGS
@given(sent=TRANSIENT)
def test_transient_answers_keep_the_pair_and_the_intent(sent: list[Answer]) -> None:
    """Invariant 5: 429, 5xx and silence never log out, whatever the body says."""

    async def run() -> tuple[BaseException | tj.TokenSet, Any]:
        journal = tj.MemoryJournal()
        outcome, _, _, _ = await refresh_case(sent, journal)
        return outcome, await journal.load("default")

    outcome, record = asyncio.run(run())
    assert isinstance(outcome, tj.TransientError)
    assert record.tokens == OLD
    assert record.intent is not None and record.intent.kind == "refresh"


@SETTINGS
@given(sent=answers(OAUTH_KEYS, OAUTH_GOOD))
@example(sent=[Answer(200, {}, b'{"access_token": "a", "refresh_token": "\\n"}', "")])
@example(sent=[Answer(400, {}, b'{"error": "invalid_grant"}', "")])
def test_oauth_refresh_stores_only_well_formed_pairs(sent: list[Answer]) -> None:
    protocol = tj.OAuth2Protocol(f"{AUTH}/oauth/token", "client")
    outcome, stored, ended, tm = asyncio.run(refresh_case(sent, tj.MemoryJournal(), protocol))
    check_refresh(sent, outcome, stored, ended, tm, oauth_pairs(sent, OLD))


# ------------------------------------------------------------------------------ sign-in


@SETTINGS
@given(sent=answers(MANA_KEYS, MANA_GOOD), signed_in=st.booleans())
def test_sign_in_stores_only_well_formed_pairs(sent: list[Answer], signed_in: bool) -> None:
    async def run() -> tuple[tj.TokenSet | BaseException, tj.TokenSet | None]:
        journal = tj.MemoryJournal()
        with aioresponses() as mock:
            tm = await _manager(journal, tokens=OLD if signed_in else None)
            _register(mock, f"{AUTH}/auth/signin", sent)
            try:
                outcome: tj.TokenSet | BaseException = await tm.sign_in(
                    email="demo@example.com", password="demo"
                )
            except tj.TokenJournalError as exc:
                outcome = exc
            finally:
                await tm.close()
        return outcome, (await journal.load("default")).tokens

    outcome, stored = asyncio.run(run())
    if isinstance(outcome, tj.TokenSet):
        assert (outcome.access_token, outcome.refresh_token) in mana_pairs(sent)
        assert stored == outcome
    else:
        assert not isinstance(outcome, tj.SessionEnded), "a failed sign-in ended a session"
        assert stored == (OLD if signed_in else None), "a failed sign-in touched the journal"


# ------------------------------------------------------------------------------ logout


@SETTINGS
@given(sent=answers(MANA_KEYS, MANA_GOOD))
def test_sign_out_always_finishes_locally(sent: list[Answer]) -> None:
    """The user asked to sign out: whatever the server answers, the account is signed out,
    and nothing but a TokenJournalError could come out."""

    async def run() -> tuple[tj.SessionState, Any]:
        journal = tj.MemoryJournal()
        with aioresponses() as mock:
            tm = await _manager(journal)
            _register(mock, f"{AUTH}/auth/logout", sent[:1])
            try:
                await tm.sign_out()
            finally:
                await tm.close()
        return tm.state, await journal.load("default")

    state, record = asyncio.run(run())
    assert state is tj.SessionState.SIGNED_OUT
    assert record.tokens is None and record.intent is None


# ------------------------------------------------------------------------------ regressions


@pytest.mark.parametrize(
    "token", ["\ud800", "a\r\nX-Injected: 1", "nul\x00", "caf\u00e9", "tab\there"]
)
async def test_unusable_tokens_are_malformed_answers(token: str, tmp_path: Path) -> None:
    """Regression: a lone surrogate escaped the manager as UnicodeEncodeError (from the
    SQLite journal), and CR/LF, NUL or non-ASCII tokens were stored, to break every later
    request. Now such an answer is malformed: retried like a transient, tokens kept."""
    body = json.dumps({"appToken": token, "refreshToken": "fine"}).encode()
    sent = [Answer(200, {}, body, "application/json")]
    outcome, stored, _, _ = await refresh_case(sent, tj.SQLiteJournal(tmp_path / "t.db"))
    assert isinstance(outcome, tj.TransientError | tj.ProtocolError)
    assert stored == OLD


# ------------------------------------------------------------------------------ pure parsers

PROTOCOLS = (
    tj.ManaProtocol(AUTH),
    tj.OAuth2Protocol(f"{AUTH}/oauth/token", "client", device_authorization_url=f"{AUTH}/d"),
)


@settings(SETTINGS, max_examples=max(50, SETTINGS.max_examples * 2))
@given(
    status=STATUS,
    headers=HEADERS,
    body=HOSTILE_BODY | bodies(MANA_KEYS + OAUTH_KEYS, MANA_GOOD | OAUTH_GOOD),
)
@example(status=200, headers={}, body=b"[" * 100_000 + b"]" * 100_000)
@example(status=400, headers={}, body=b'{"error": ' + b"[" * 100_000)
@example(status=200, headers={}, body=pair_body('{"exp": NaN}'))
@example(status=200, headers={}, body=pair_body('{"exp": ' + "9" * 400 + "}"))
@example(status=200, headers={}, body=pair_body('{"exp": 1e999, "iat": 1}'))
def test_parsers_never_raise_on_hostile_bodies(
    status: int, headers: dict[str, str], body: bytes
) -> None:
    """Regression: a 100,000-deep body raised RecursionError out of the parsers, and a JWT
    exp of NaN or a 400-digit integer raised ValueError/OverflowError. Every parse now
    answers a TokenSet or a Failure, and every number in it is finite."""
    for protocol in PROTOCOLS:
        for previous in (OLD, None):
            result = protocol.parse_tokens(status, headers, body, 1_700_000_000.0, previous)
            assert isinstance(result, tj.TokenSet | tj.Failure)
            if isinstance(result, tj.TokenSet) and result.expires_at is not None:
                assert math.isfinite(result.expires_at.timestamp())
            if isinstance(result, tj.Failure) and result.retry_after is not None:
                assert math.isfinite(result.retry_after) and result.retry_after >= 0
            out = protocol.parse_sign_out(status, headers, body)
            assert out is None or isinstance(out, tj.Failure)
    oauth = PROTOCOLS[1]
    assert isinstance(oauth, tj.OAuth2Protocol)
    code = oauth.parse_device_authorization(status, headers, body, 1_700_000_000.0)
    assert isinstance(code, tj.DeviceCode | tj.Failure)
    if isinstance(code, tj.DeviceCode):
        assert math.isfinite(code.expires_at) and 1.0 <= code.interval <= 3600.0


@pytest.mark.parametrize(
    "exp",
    ["NaN", "Infinity", "-Infinity", "9" * 400, "-" + "9" * 400, "true", '"2000000000"'],
    ids=["nan", "inf", "-inf", "400-digits", "-400-digits", "bool", "string"],
)
def test_an_unusable_jwt_exp_means_no_expiry_like_an_opaque_token(exp: str) -> None:
    """Regression: exp NaN gave ValueError, a 400-digit exp OverflowError, out of
    ManaProtocol.parse_tokens. The server has already rotated, so the pair is kept, with no
    expiry (the next 401 refreshes it), exactly as for an opaque access token."""
    for claims in (f'{{"exp": {exp}}}', f'{{"exp": {exp}, "iat": 1000}}'):
        body = json.dumps({"appToken": raw_jwt(claims), "refreshToken": "r2"}).encode()
        result = tj.ManaProtocol(AUTH).parse_tokens(200, {}, body, 1_700_000_000.0, OLD)
        assert isinstance(result, tj.TokenSet)
        assert result.expires_at is None and result.refresh_token == "r2"
