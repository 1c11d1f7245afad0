"""Routes of the reference server: Mana, OAuth 2.0 (RFC 6749, RFC 8628; browser sign-in with
PKCE, RFC 7636; revocation, RFC 7009; discovery, RFC 8414 and OpenID Connect), API, test hooks."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import html
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Final, Literal, NoReturn
from urllib.parse import parse_qsl, unquote_plus, urlencode

from aiohttp import hdrs, web

from ._clock import ServerClock
from ._codes import (
    CODE_TTL,
    AuthorizationCode,
    CodeStore,
    challenge_ok,
    loopback_redirect,
    pkce_matches,
)
from ._config import ServerConfig
from ._faults import Fault, FaultScript
from ._stats import Stats
from ._store import RefreshResult, TokenStore
from ._tokens import FamilyKind, IssuedPair, TokenMinter, fingerprint, token_hash, user_id_for

log = logging.getLogger("tokenjournal.server")

DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 section 6.1: no vowels (no words), no easily confused characters.
_USER_CODE_ALPHABET: Final = "BCDFGHJKLMNPQRSTVWXZ"
_MAX_STRING: Final = 4096
_MAX_FORM_FIELDS: Final = 64

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ------------------------------------------------------------------------------ state


class _LockEntry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class RotationLocks:
    """One `asyncio.Lock` per presented refresh token, created on demand, dropped when idle."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[str, _LockEntry] = {}

    def busy(self, key: str) -> bool:
        """Whether a rotation of `key` is in progress right now."""
        entry = self._entries.get(key)
        return entry is not None and entry.lock.locked()

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Hold the lock for `key`; callers queue in arrival order."""
        entry = self._entries.setdefault(key, _LockEntry())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._entries[key]


@dataclass(slots=True)
class ServerState:
    """Everything the routes share; one per application."""

    config: ServerConfig
    clock: ServerClock = field(default_factory=ServerClock)
    stats: Stats = field(default_factory=Stats)
    faults: FaultScript = field(default_factory=FaultScript)
    locks: RotationLocks = field(default_factory=RotationLocks)
    codes: CodeStore = field(default_factory=CodeStore)
    _store: TokenStore | None = None
    _minter: TokenMinter | None = None
    users: dict[str, tuple[str, str]] = field(default_factory=dict)
    clients: dict[str, str | None] = field(default_factory=dict)
    #: POST /api/readings: the first answer per (user, Idempotency-Key), the readings
    #: applied (in order), and the `uid`s seen, to count one reading applied twice.
    answers: dict[tuple[str, str], tuple[int, dict[str, Any]]] = field(default_factory=dict)
    readings: list[dict[str, Any]] = field(default_factory=list)
    uids: set[str] = field(default_factory=set)
    #: Scripted faults for the API (`/_test/api_faults`), apart from the refresh's.
    api_faults: FaultScript = field(default_factory=FaultScript)

    def __post_init__(self) -> None:
        self.users = {email.lower(): (email, pw) for email, pw in self.config.effective_users}
        self.clients = dict(self.config.clients)

    @property
    def store(self) -> TokenStore:
        """The open token store (only while the application is running)."""
        if self._store is None:
            raise RuntimeError("the reference server is not running")
        return self._store

    @property
    def minter(self) -> TokenMinter:
        """The token minter (only while the application is running)."""
        if self._minter is None:
            raise RuntimeError("the reference server is not running")
        return self._minter

    def open(self) -> None:
        """Open the store and settle the signing key."""
        store = TokenStore(self.config.db_path)
        if self.config.jwt_secret is not None:
            secret = self.config.jwt_secret
        elif self.config.db_path != ":memory:":
            # Persist the key with the tokens so a restart keeps issued access tokens valid.
            secret = store.jwt_secret(lambda: secrets.token_urlsafe(48))
        else:
            secret = secrets.token_urlsafe(48)
        self._store = store
        self._minter = TokenMinter(secret, self.config.access_ttl)

    def close(self) -> None:
        """Close the store."""
        if self._store is not None:
            self._store.close()
            self._store = None
            self._minter = None

    def check_password(self, email: str, password: str) -> tuple[str, str] | None:
        """`(user_id, email)` when the credentials match an account, else None."""
        entry = self.users.get(email.lower())
        # Compare even for unknown users so the answer time does not reveal which emails exist.
        expected = entry[1] if entry is not None else secrets.token_hex(16)
        ok = hmac.compare_digest(expected.encode(), password.encode())
        if entry is None or not ok:
            return None
        return user_id_for(entry[0]), entry[0]

    def device_action(self, user_code: str, action: str, email: str | None = None) -> str:
        """Approve or deny a device authorization. Returns the store's outcome string.

        Raises `ValueError` for an unknown action or account.
        """
        if action not in ("approve", "deny"):
            raise ValueError("action must be 'approve' or 'deny'")
        if email is None:
            if not self.users:
                raise ValueError("no account to approve for")
            email = next(iter(self.users.values()))[0]
        entry = self.users.get(email.lower())
        if entry is None:
            raise ValueError("unknown account")
        return self.store.device_action(
            normalize_user_code(user_code),
            approve=action == "approve",
            user_id=user_id_for(entry[0]),
            email=entry[0],
            now=self.clock.now(),
        )


STATE: Final = web.AppKey("tokenjournal_server_state", ServerState)


def normalize_user_code(code: str) -> str:
    """Upper-case, drop separators, re-insert the dash: users type codes sloppily."""
    letters = "".join(ch for ch in code.upper() if ch.isalnum())
    return f"{letters[:4]}-{letters[4:]}" if len(letters) == 8 else letters


# ------------------------------------------------------------------------------ input


class BadRequest(Exception):
    """The request body or a field is malformed; answered with 400 before any store access."""


class OAuthError(Exception):
    """An RFC 6749 section 5.2 error answer."""

    def __init__(
        self,
        error: str,
        description: str,
        status: int = 400,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.headers = headers or {}


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


async def read_body(request: web.Request) -> bytes:
    """The whole body, or 408: a body trickled in a byte a minute must not hold a connection
    (and a handler) forever. Oversize bodies raise 413 from aiohttp."""
    try:
        async with asyncio.timeout(request.app[STATE].config.read_timeout):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout() from None


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or `BadRequest`. Oversize bodies raise 413 from aiohttp."""
    raw = await read_body(request)
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def _clean(name: str, value: str) -> str:
    if not value or len(value) > _MAX_STRING:
        raise BadRequest(f"{name} must be a non-empty string of at most {_MAX_STRING} chars")
    try:
        # Lone surrogates (legal in JSON escapes) cannot be stored in SQLite as text.
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{name} is not valid Unicode") from None
    return value


def req_str(data: dict[str, Any], name: str) -> str:
    """A required, non-empty string field."""
    value = data.get(name)
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    return _clean(name, value)


def device_id_of(data: dict[str, Any]) -> str:
    """Validate `deviceInfo` and return its `deviceId`."""
    info = data.get("deviceInfo")
    if not isinstance(info, dict):
        raise BadRequest("deviceInfo must be an object")
    for optional in ("deviceName", "deviceType", "userAgent"):
        value = info.get(optional)
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"deviceInfo.{optional} must be a string")
    return req_str(info, "deviceId")


async def read_form(request: web.Request) -> dict[str, str]:
    """An `application/x-www-form-urlencoded` body as a dict (RFC 6749 section 3.2)."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise OAuthError(
            "invalid_request", "Content-Type must be application/x-www-form-urlencoded"
        )
    raw = await read_body(request)
    try:
        pairs = parse_qsl(
            raw.decode("ascii"),
            keep_blank_values=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=_MAX_FORM_FIELDS,
        )
    except ValueError:  # includes UnicodeDecodeError
        raise OAuthError("invalid_request", "malformed form body") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            raise OAuthError("invalid_request", f"parameter {key!r} repeated")
        if value:  # RFC 6749 section 3.1: an empty parameter counts as omitted
            if len(value) > _MAX_STRING:
                raise OAuthError("invalid_request", f"parameter {key!r} too long")
            form[key] = value
    return form


def form_str(form: dict[str, str], name: str) -> str:
    """A required form parameter."""
    value = form.get(name)
    if value is None:
        raise OAuthError("invalid_request", f"missing parameter {name!r}")
    return value


# ------------------------------------------------------------------------------ output


def _code_for(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return f"http_{status}"


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def mana_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """A NestJS-shaped error: `{statusCode, error, message, code}`."""
    return web.json_response(
        {"statusCode": status, "error": _phrase(status), "message": message, "code": code},
        status=status,
        headers=headers,
    )


def oauth_error(exc: OAuthError) -> web.Response:
    """An RFC 6749 error answer."""
    return web.json_response(
        {"error": exc.error, "error_description": exc.description},
        status=exc.status,
        headers=exc.headers,
    )


def _iso(epoch: float) -> str:
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _is_oauth(request: web.Request) -> bool:
    return request.path.startswith("/oauth/")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into a JSON body in the dialect of the route; forbid caching."""
    try:
        response = await handler(request)
    except BadRequest as exc:
        if _is_oauth(request):
            response = oauth_error(OAuthError("invalid_request", str(exc)))
        else:
            response = mana_error(400, "invalid_request", str(exc))
    except OAuthError as exc:
        response = oauth_error(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        if _is_oauth(request):
            error = "invalid_request" if exc.status in (400, 413) else _code_for(exc.status)
            response = oauth_error(OAuthError(error, exc.reason, exc.status, headers))
        else:
            response = mana_error(exc.status, _code_for(exc.status), exc.reason, headers)
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        response = mana_error(500, "internal_error", "Internal Server Error")
    if not response.prepared:
        response.headers.setdefault("Cache-Control", "no-store")
    return response


# ------------------------------------------------------------------------------ refresh


class Dialect:
    """How one protocol phrases the outcomes of the shared refresh machinery."""

    kind: FamilyKind = "mana"

    def success(self, result: RefreshResult) -> dict[str, Any]:  # pragma: no cover
        """The 200 body for a rotation or a replay."""
        raise NotImplementedError

    def failure(self, result: RefreshResult) -> web.Response:  # pragma: no cover
        """The answer for a rotation-rule failure."""
        raise NotImplementedError

    def status_fault(self, status: int) -> web.Response:  # pragma: no cover
        """The answer for an injected status fault."""
        raise NotImplementedError

    def conflict(self) -> web.Response:  # pragma: no cover
        """The 409 answer while another rotation of the same token is in progress."""
        raise NotImplementedError


_MANA_MESSAGES: Final = {
    "invalid_token": "Invalid refresh token",
    "token_expired": "Refresh token expired",
    "invalid_token_state": "Invalid token state",
    "device_mismatch": "Device ID has changed",
}


class ManaDialect(Dialect):
    """Mana (`/auth/refresh`) answers."""

    kind: FamilyKind = "mana"

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    def success(self, result: RefreshResult) -> dict[str, Any]:
        """`{appToken, refreshToken, deviceId}` plus the grace fields on a replay."""
        assert result.pair is not None
        body: dict[str, Any] = {
            "appToken": result.pair.access_token,
            "refreshToken": result.pair.refresh_token,
            "deviceId": self.device_id,
        }
        if result.outcome == "replayed" and result.grace_expires_at is not None:
            body["grace_period_used"] = True
            body["grace_expires_at"] = _iso(result.grace_expires_at)
        return body

    def failure(self, result: RefreshResult) -> web.Response:
        """401 with the machine code in `code`."""
        code = result.error or "invalid_token"
        return mana_error(401, code, _MANA_MESSAGES[code])

    def status_fault(self, status: int) -> web.Response:
        """`{statusCode, error, message, code}` for the injected status."""
        return mana_error(status, _code_for(status), _phrase(status))

    def conflict(self) -> web.Response:
        """409 `rotation_in_progress` with `Retry-After: 1`."""
        return mana_error(409, "rotation_in_progress", "rotation_in_progress", {"Retry-After": "1"})


def oauth_body(pair: IssuedPair) -> dict[str, Any]:
    """RFC 6749 section 5.1 success body."""
    body: dict[str, Any] = {
        "access_token": pair.access_token,
        "token_type": "Bearer",
        "expires_in": _number(pair.expires_in),
        "refresh_token": pair.refresh_token,
    }
    if pair.scope:
        body["scope"] = pair.scope
    if pair.id_token:
        body["id_token"] = pair.id_token
    return body


def issuer_of(request: web.Request) -> str:
    """The server's issuer identifier: its origin as the client reached it."""
    return str(request.url.origin())


class OAuthDialect(Dialect):
    """OAuth 2.0 refresh_token grant answers."""

    kind: FamilyKind = "oauth"

    def success(self, result: RefreshResult) -> dict[str, Any]:
        """Same body for rotations and replays (a replay repeats the original expires_in)."""
        assert result.pair is not None
        return oauth_body(result.pair)

    def failure(self, result: RefreshResult) -> web.Response:
        """Every rotation-rule failure is `invalid_grant`; the description names the rule."""
        return oauth_error(OAuthError("invalid_grant", result.error or "invalid_token"))

    def status_fault(self, status: int) -> web.Response:
        """A plausible RFC 6749 error for an injected status."""
        if status in (429, 503):
            error = "temporarily_unavailable"
        elif status >= 500:
            error = "server_error"
        else:
            error = "invalid_request"
        return oauth_error(OAuthError(error, "injected fault", status))

    def conflict(self) -> web.Response:
        """409 `rotation_in_progress` with `Retry-After: 1`."""
        return oauth_error(
            OAuthError("rotation_in_progress", "rotation_in_progress", 409, {"Retry-After": "1"})
        )


def _drop(request: web.Request) -> web.Response:
    # Aborting the transport makes aiohttp's own write of the response fail with a
    # ConnectionError, which it treats as a premature client disconnect (no log, no 500):
    # the client sees the socket close with no status line at all.
    transport = request.transport
    if transport is not None:
        transport.abort()
    return web.Response(status=200)


async def refresh_flow(
    request: web.Request,
    state: ServerState,
    token: str,
    dialect: Dialect,
    *,
    device_id: str | None,
    client_id: str | None,
    replay: Literal["same", "new"],
    issuer: str | None = None,
) -> web.StreamResponse:
    """The shared refresh: faults, per-token serialisation, the store, the answer. With
    ``issuer`` a rotation brings a new ID token when the scope holds ``openid``."""
    state.stats.incr("refresh_requests")
    fault: Fault | None = state.faults.take()
    if fault is not None:
        state.stats.incr("faults_injected")
        log.info("fault %s injected on refresh of %s", fault.kind, fingerprint(token))
        if fault.kind == "status":
            response = dialect.status_fault(fault.status)
            if fault.retry_after is not None:
                response.headers["Retry-After"] = str(fault.retry_after)
            return response
        if fault.kind == "rotation_in_progress":
            return dialect.conflict()

    key = token_hash(token)
    if state.config.conflict == "409" and state.locks.busy(key):
        return dialect.conflict()
    async with state.locks.hold(key):
        if fault is not None and fault.kind == "delay_before":
            await asyncio.sleep(fault.seconds)
        # One synchronous store call: nothing else runs in the loop until it returns.
        result = state.store.refresh(
            token,
            now=state.clock.now(),
            kind=dialect.kind,
            device_id=device_id,
            client_id=client_id,
            replay=replay,
            grace=state.config.grace,
            refresh_ttl=state.config.refresh_ttl,
            mint=functools.partial(state.minter.mint, issuer=issuer),
        )
        if result.outcome == "rotated":
            state.stats.incr("rotations")
        elif result.outcome == "replayed":
            state.stats.incr("grace_replays")
        elif result.revoked:
            state.stats.incr("reuse_detections")
            state.stats.incr("family_revocations")
        log.info(
            "refresh %s: %s%s",
            fingerprint(token),
            result.outcome,
            f" ({result.error})" if result.error else "",
        )
        if fault is not None and fault.kind == "delay_after":
            await asyncio.sleep(fault.seconds)

    if result.outcome == "error":
        return dialect.failure(result)
    body = dialect.success(result)
    if fault is not None:
        if fault.kind == "drop_after_commit":
            return _drop(request)
        if fault.kind == "truncated":
            raw = json.dumps(body).encode()
            return web.Response(body=raw[: len(raw) // 2], content_type="application/json")
        if fault.kind == "invalid_json":
            return web.Response(text="not json", content_type="application/json")
    return web.json_response(body)


# ------------------------------------------------------------------------------ Mana


async def mana_signin(request: web.Request) -> web.StreamResponse:
    """`POST /auth/signin`."""
    state = request.app[STATE]
    data = await read_json(request)
    email = req_str(data, "email")
    password = req_str(data, "password")
    device_id = device_id_of(data)
    user = state.check_password(email, password)
    if user is None:
        return mana_error(401, "invalid_credentials", "Invalid credentials")
    _, pair = state.store.create_family(
        kind="mana",
        user_id=user[0],
        email=user[1],
        device_id=device_id,
        client_id=None,
        scope=None,
        now=state.clock.now(),
        refresh_ttl=state.config.refresh_ttl,
        mint=state.minter.mint,
    )
    state.stats.incr("signins")
    log.info("signin: new family, refresh token %s", fingerprint(pair.refresh_token))
    return web.json_response(
        {"appToken": pair.access_token, "refreshToken": pair.refresh_token, "deviceId": device_id}
    )


async def mana_refresh(request: web.Request) -> web.StreamResponse:
    """`POST /auth/refresh`."""
    state = request.app[STATE]
    data = await read_json(request)
    token = req_str(data, "refreshToken")
    device_id = device_id_of(data)
    return await refresh_flow(
        request,
        state,
        token,
        ManaDialect(device_id),
        device_id=device_id,
        client_id=None,
        replay="same",
    )


async def mana_logout(request: web.Request) -> web.StreamResponse:
    """`POST /auth/logout`: revoke the family; 204 even for an unknown token."""
    state = request.app[STATE]
    data = await read_json(request)
    token = req_str(data, "refreshToken")
    state.store.revoke_by_token(token, state.clock.now(), "logout")
    state.stats.incr("logouts")
    return web.Response(status=204)


async def mana_validate(request: web.Request) -> web.StreamResponse:
    """`POST /auth/validate`."""
    state = request.app[STATE]
    data = await read_json(request)
    token = req_str(data, "appToken")
    claims = state.minter.verify(token, state.clock.now())
    if claims is None or not state.store.family_active(claims.family_id):
        return web.json_response({"valid": False, "user": None})
    return web.json_response({"valid": True, "user": {"id": claims.user_id, "email": claims.email}})


# ------------------------------------------------------------------------------ OAuth


def authenticate_client(request: web.Request, form: dict[str, str]) -> str:
    """The authenticated client id (RFC 6749 section 2.3), or `OAuthError(invalid_client)`.

    Basic or body credentials; a public client needs only its id; a request with no client
    identification at all is taken as the first configured public client, if there is one.
    """
    challenge = {"WWW-Authenticate": 'Basic realm="tokenjournal"'}
    header = request.headers.get("Authorization", "")
    client_id: str | None = None
    secret: str | None = None
    if header[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
            raw_id, sep, raw_secret = decoded.partition(":")
            if not sep:
                raise ValueError("no colon")
            # RFC 6749 section 2.3.1: both parts are form-urlencoded before Basic encoding.
            client_id = unquote_plus(raw_id, errors="strict")
            secret = unquote_plus(raw_secret, errors="strict")
        except (ValueError, binascii.Error):
            raise OAuthError(
                "invalid_client", "malformed Basic credentials", 401, challenge
            ) from None
        if "client_secret" in form:
            raise OAuthError("invalid_request", "more than one client authentication method")
        if form.get("client_id", client_id) != client_id:
            raise OAuthError("invalid_request", "client_id differs from the Basic credentials")
    elif "client_id" in form:
        client_id = form["client_id"]
        secret = form.get("client_secret")
    else:
        public = [cid for cid, sec in request.app[STATE].clients.items() if sec is None]
        if not public:
            raise OAuthError("invalid_client", "client authentication required", 401, challenge)
        return public[0]
    clients = request.app[STATE].clients
    if client_id not in clients:
        raise OAuthError("invalid_client", "unknown client", 401, challenge)
    expected = clients[client_id]
    if expected is not None and (
        secret is None or not hmac.compare_digest(expected.encode(), secret.encode())
    ):
        raise OAuthError("invalid_client", "client authentication failed", 401, challenge)
    return client_id


def _check_scope(requested: str | None, granted: str | None) -> None:
    if requested is None:
        return
    if not set(requested.split()) <= set((granted or "").split()):
        raise OAuthError("invalid_scope", "scope exceeds the originally granted scope")


async def oauth_token(request: web.Request) -> web.StreamResponse:
    """`POST /oauth/token`: password, refresh_token, device_code and authorization_code
    grants. A scope with `openid` brings an ID token."""
    state = request.app[STATE]
    form = await read_form(request)
    grant_type = form_str(form, "grant_type")
    client_id = authenticate_client(request, form)
    now = state.clock.now()
    issuer = issuer_of(request)
    mint = functools.partial(state.minter.mint, issuer=issuer)
    if grant_type == "authorization_code":
        return code_grant(state, form, client_id, now, issuer)
    if grant_type == "password":
        username = form_str(form, "username")
        password = form_str(form, "password")
        user = state.check_password(username, password)
        if user is None:
            raise OAuthError("invalid_grant", "invalid username or password")
        _, pair = state.store.create_family(
            kind="oauth",
            user_id=user[0],
            email=user[1],
            device_id=None,
            client_id=client_id,
            scope=form.get("scope"),
            now=now,
            refresh_ttl=state.config.refresh_ttl,
            mint=mint,
        )
        state.stats.incr("signins")
        return web.json_response(oauth_body(pair))
    if grant_type == "refresh_token":
        token = form_str(form, "refresh_token")
        family = state.store.family_of(token)
        if family is not None and family.kind == "oauth" and family.client_id == client_id:
            _check_scope(form.get("scope"), family.scope)
        return await refresh_flow(
            request,
            state,
            token,
            OAuthDialect(),
            device_id=None,
            client_id=client_id,
            replay=state.config.oauth_replay,
            issuer=issuer,
        )
    if grant_type == DEVICE_GRANT:
        device_code = form_str(form, "device_code")
        poll = state.store.poll_device(
            device_code,
            client_id=client_id,
            now=now,
            refresh_ttl=state.config.refresh_ttl,
            mint=mint,
        )
        if poll.outcome == "issued":
            assert poll.pair is not None
            state.stats.incr("signins")
            return web.json_response(oauth_body(poll.pair))
        raise OAuthError(poll.outcome, poll.outcome.replace("_", " "))
    raise OAuthError("unsupported_grant_type", f"grant_type {grant_type!r} is not supported")


def _new_user_code(state: ServerState) -> str:
    while True:
        letters = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(8))
        code = f"{letters[:4]}-{letters[4:]}"
        if not state.store.user_code_exists(code):
            return code


async def oauth_device_authorization(request: web.Request) -> web.StreamResponse:
    """`POST /oauth/device_authorization` (RFC 8628 section 3.1)."""
    state = request.app[STATE]
    form = await read_form(request)
    client_id = authenticate_client(request, form)
    device_code = secrets.token_urlsafe(32)
    user_code = _new_user_code(state)
    config = state.config
    state.store.create_device_code(
        device_code=device_code,
        user_code=user_code,
        client_id=client_id,
        scope=form.get("scope"),
        now=state.clock.now(),
        expires_in=config.device_expires_in,
        interval=config.device_interval,
    )
    state.stats.incr("device_authorizations")
    uri = f"{request.url.origin()}/device"
    return web.json_response(
        {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": uri,
            "verification_uri_complete": f"{uri}?user_code={user_code}",
            "expires_in": _number(config.device_expires_in),
            "interval": config.device_interval,
        }
    )


def code_grant(
    state: ServerState, form: dict[str, str], client_id: str, now: float, issuer: str
) -> web.StreamResponse:
    """The `authorization_code` grant (RFC 6749 4.1.3) with PKCE (RFC 7636 4.6).

    The code is spent by this request whatever its outcome; it must have been issued to this
    client for this redirect URI, and the verifier must hash to its challenge. Every
    mismatch is the same `invalid_grant`, so a guesser learns nothing.
    """
    code = form_str(form, "code")
    redirect_uri = form_str(form, "redirect_uri")
    verifier = form_str(form, "code_verifier")
    grant = state.codes.take(code, now)
    if (
        grant is None
        or grant.client_id != client_id
        or grant.redirect_uri != redirect_uri
        or not pkce_matches(verifier, grant.code_challenge)
    ):
        raise OAuthError("invalid_grant", "the code is unknown, used, expired or not yours")
    _, pair = state.store.create_family(
        kind="oauth",
        user_id=grant.user_id,
        email=grant.email,
        device_id=None,
        client_id=client_id,
        scope=grant.scope,
        now=now,
        refresh_ttl=state.config.refresh_ttl,
        mint=functools.partial(state.minter.mint, issuer=issuer),
    )
    state.stats.incr("signins")
    return web.json_response(oauth_body(pair))


async def oauth_revoke(request: web.Request) -> web.StreamResponse:
    """`POST /oauth/revoke` (RFC 7009): revoke the family of a refresh or access token.

    200 with an empty body whatever the token (2.2: an unknown or dead token is as good as
    revoked); only a failed client authentication or a missing `token` is an error.
    """
    state = request.app[STATE]
    form = await read_form(request)
    authenticate_client(request, form)
    token = form_str(form, "token")
    now = state.clock.now()
    if not state.store.revoke_by_token(token, now, "revoked"):
        claims = state.minter.verify(token, now)
        if claims is not None:
            state.store.revoke_family(claims.family_id, now, "revoked")
    state.stats.incr("logouts")
    return web.Response(status=200)


def metadata_document(request: web.Request) -> dict[str, Any]:
    """RFC 8414 section 2 / OpenID Connect Discovery section 3, for this server."""
    issuer = issuer_of(request)
    auth_methods = ["client_secret_basic", "client_secret_post", "none"]
    return {
        "issuer": issuer,
        "authorization_endpoint": f"{issuer}/oauth/authorize",
        "token_endpoint": f"{issuer}/oauth/token",
        "device_authorization_endpoint": f"{issuer}/oauth/device_authorization",
        "revocation_endpoint": f"{issuer}/oauth/revoke",
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": [
            "authorization_code",
            "refresh_token",
            "password",
            DEVICE_GRANT,
        ],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": auth_methods,
        "revocation_endpoint_auth_methods_supported": auth_methods,
        "scopes_supported": ["openid", "email", "offline_access"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["HS256"],
        "authorization_response_iss_parameter_supported": True,
    }


async def well_known(request: web.Request) -> web.StreamResponse:
    """`GET /.well-known/openid-configuration` and `/.well-known/oauth-authorization-server`."""
    response = web.json_response(metadata_document(request))
    response.headers["Cache-Control"] = "max-age=3600"
    return response


# ------------------------------------------------------------------------------ browser pages

_STYLE: Final = """<style>body{font-family:sans-serif;max-width:28em;margin:3em auto}
input{display:block;margin:.3em 0 1em;width:100%;font-size:1.1em}
button{font-size:1.1em;margin-right:.5em}</style>"""

_AUTHORIZE_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in to {client}</title>
{style}</head>
<body><h1>Sign in</h1>
<p><strong>{client}</strong> asks to use your account{scope}.</p>{message}
<form method="post" action="/oauth/authorize">
{hidden}
<label>Email<input id="email" name="email" type="email" value="{email}" required></label>
<label>Password<input id="password" name="password" type="password" autofocus></label>
<button id="allow" name="action" value="allow">Allow</button>
<button id="deny" name="action" value="deny" formnovalidate>Deny</button>
</form></body></html>
"""

_ERROR_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign-in error</title>
{style}</head><body><h1>Sign-in error</h1><p id="error">{message}</p></body></html>
"""

#: The request parameters the consent form carries back to the POST.
_AUTHORIZE_FIELDS: Final = ("client_id", "redirect_uri", "state", "code_challenge", "scope")


def _html(body: str, status: int = 200) -> web.Response:
    response = web.Response(text=body, content_type="text/html", status=status)
    # A login page must not be framed by another site (clickjacking) nor run foreign script.
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"
    )
    return response


def _error_page(message: str, status: int = 400) -> web.Response:
    return _html(_ERROR_PAGE.format(style=_STYLE, message=html.escape(message)), status)


def _redirect(redirect_uri: str, params: dict[str, str]) -> web.Response:
    joiner = "&" if "?" in redirect_uri else "?"
    response = web.Response(status=302)
    response.headers["Location"] = redirect_uri + joiner + urlencode(params)
    return response


def _authorize_page(
    state: ServerState, fields: dict[str, str], message: str = "", status: int = 200
) -> web.Response:
    hidden = "\n".join(
        f'<input type="hidden" name="{name}" value="{html.escape(fields[name])}">'
        for name in _AUTHORIZE_FIELDS
        if name in fields
    )
    scope = fields.get("scope")
    email = next(iter(state.users.values()))[0] if state.config.test_mode and state.users else ""
    body = _AUTHORIZE_PAGE.format(
        style=_STYLE,
        client=html.escape(fields["client_id"]),
        scope=f" (scope: {html.escape(scope)})" if scope else "",
        message=f'<p id="message"><strong>{html.escape(message)}</strong></p>' if message else "",
        hidden=hidden,
        email=html.escape(email),
    )
    return _html(body, status)


def _authorize_fields(
    state: ServerState, params: dict[str, str], issuer: str
) -> tuple[dict[str, str], web.Response | None]:
    """The request's fields, or the answer that ends it: an error page when the client or
    the redirect URI cannot be trusted (RFC 6749 4.1.2.1: never redirect then), else a
    redirect carrying the error. Every redirect names ``issuer`` (RFC 9207 2: error
    responses too, as the metadata promises)."""
    fields = {
        k: params[k]
        for k in (*_AUTHORIZE_FIELDS, "response_type", "code_challenge_method", "prompt")
        if params.get(k)
    }
    client_id = fields.get("client_id")
    if client_id is None or client_id not in state.clients:
        return fields, _error_page("Unknown client.")
    redirect_uri = fields.get("redirect_uri")
    if redirect_uri is None or not loopback_redirect(redirect_uri):
        return fields, _error_page("The redirect URI must be http to a loopback address.")
    echo = {"state": fields["state"]} if "state" in fields else {}
    echo["iss"] = issuer
    if params.get("response_type", "code") != "code":
        error = {"error": "unsupported_response_type", **echo}
        return fields, _redirect(redirect_uri, error)
    challenge = fields.get("code_challenge", "")
    if params.get("code_challenge_method", "S256") != "S256" or not challenge_ok(challenge):
        error = {
            "error": "invalid_request",
            "error_description": "PKCE with S256 is required",
            **echo,
        }
        return fields, _redirect(redirect_uri, error)
    return fields, None


async def authorize_page(request: web.Request) -> web.StreamResponse:
    """`GET /oauth/authorize` (RFC 6749 4.1.1): the login and consent page."""
    state = request.app[STATE]
    fields, ended = _authorize_fields(state, dict(request.query), issuer_of(request))
    if ended is not None:
        return ended
    if fields.get("prompt") == "none":  # no login session here: ask the app to prompt
        echo = {"state": fields["state"]} if "state" in fields else {}
        echo["iss"] = issuer_of(request)
        return _redirect(fields["redirect_uri"], {"error": "login_required", **echo})
    return _authorize_page(state, fields)


async def authorize_decision(request: web.Request) -> web.StreamResponse:
    """`POST /oauth/authorize` (form): the person signs in and allows, or denies."""
    state = request.app[STATE]
    form = await request.post()
    params = {k: v for k, v in form.items() if isinstance(v, str)}
    fields, ended = _authorize_fields(state, params, issuer_of(request))
    if ended is not None:
        return ended
    redirect_uri = fields["redirect_uri"]
    echo = {"state": fields["state"]} if "state" in fields else {}
    issuer = {"iss": issuer_of(request)}
    if params.get("action") == "deny":
        denied = {"error": "access_denied", "error_description": "The user denied access"}
        return _redirect(redirect_uri, {**denied, **echo, **issuer})
    if params.get("action") != "allow":
        return _authorize_page(state, fields, "Choose Allow or Deny.", 400)
    account = state.check_password(params.get("email", ""), params.get("password", ""))
    if account is None:
        return _authorize_page(state, fields, "Wrong email or password.", 401)
    now = state.clock.now()
    grant = AuthorizationCode(
        client_id=fields["client_id"],
        redirect_uri=redirect_uri,
        code_challenge=fields["code_challenge"],
        scope=fields.get("scope"),
        user_id=account[0],
        email=account[1],
        expires_at=now + CODE_TTL,
    )
    code = state.codes.issue(grant, now)
    return _redirect(redirect_uri, {"code": code, **echo, **issuer})


# ------------------------------------------------------------------------------ device page

_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in a device</title>
<style>body{{font-family:sans-serif;max-width:28em;margin:3em auto}}
input{{display:block;margin:.3em 0 1em;width:100%;font-size:1.1em}}</style></head>
<body><h1>Sign in a device</h1>{message}
<form method="post" action="/device">
<label>Code shown on the device<input id="user_code" name="user_code" value="{user_code}"
 autocomplete="off" required></label>
<label>Email<input id="email" name="email" type="email" value="demo@example.com" required></label>
<label>Password<input id="password" name="password" type="password" required></label>
<button id="approve" name="action" value="approve">Approve</button>
<button id="deny" name="action" value="deny">Deny</button>
</form></body></html>
"""

_DEVICE_MESSAGES: Final = {
    "approved": "The device is signed in. You can close this page.",
    "denied": "The device was refused.",
    "unknown": "No device is waiting for that code.",
    "expired": "That code has expired: start again on the device.",
    "not_pending": "That code was already used.",
}


def _device_page(user_code: str, message: str = "", status: int = 200) -> web.Response:
    shown = f"<p><strong>{html.escape(message)}</strong></p>" if message else ""
    body = _PAGE.format(message=shown, user_code=html.escape(user_code[:32]))
    return web.Response(text=body, content_type="text/html", status=status)


async def device_page(request: web.Request) -> web.StreamResponse:
    """`GET /device[?user_code=...]`: the RFC 8628 verification page a person opens."""
    return _device_page(request.query.get("user_code", ""))


async def device_decision(request: web.Request) -> web.StreamResponse:
    """`POST /device` (form): the person approves or denies with the account's password."""
    state = request.app[STATE]
    form = await request.post()
    fields = {k: form.get(k) for k in ("user_code", "email", "password", "action")}
    if not all(isinstance(v, str) for v in fields.values()):
        return _device_page("", "Fill in every field.", 400)
    user_code, email, password, action = (str(fields[k]) for k in fields)
    if action not in ("approve", "deny"):
        return _device_page(user_code, "Choose Approve or Deny.", 400)
    account = state.check_password(email, password)
    if account is None:
        return _device_page(user_code, "Wrong email or password.", 401)
    outcome = state.device_action(user_code, action, account[1])
    status = _DEVICE_STATUS.get(outcome, 200)
    return _device_page(user_code, _DEVICE_MESSAGES.get(outcome, outcome), status)


# ------------------------------------------------------------------------------ API


async def api_me(request: web.Request) -> web.StreamResponse:
    """`GET /api/me`: a protected resource that accepts Mana and OAuth access tokens."""
    state = request.app[STATE]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    claims = None
    if scheme.lower() == "bearer" and token.strip():
        claims = state.minter.verify(token.strip(), state.clock.now())
    if claims is None or not state.store.family_active(claims.family_id):
        state.stats.incr("api_401")
        return web.json_response(
            {"message": "JWT expired"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    state.stats.incr("api_200")
    return web.json_response({"id": claims.user_id, "email": claims.email})


def _bearer_claims(request: web.Request) -> Any:
    state = request.app[STATE]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    claims = None
    if scheme.lower() == "bearer" and token.strip():
        claims = state.minter.verify(token.strip(), state.clock.now())
    if claims is None or not state.store.family_active(claims.family_id):
        return None
    return claims


def _unauthorized(state: ServerState) -> web.Response:
    state.stats.incr("api_401")
    return web.json_response(
        {"message": "JWT expired"},
        status=401,
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


#: An Idempotency-Key is a short printable token (the SDK sends a UUID4 in hex).
_MAX_KEY: Final = 255


async def api_readings(request: web.Request) -> web.StreamResponse:
    """`POST /api/readings {..., "uid"?}`: apply one reading, honouring `Idempotency-Key`.

    The same key (per user) gets the first answer again and is not applied again
    (draft-ietf-httpapi-idempotency-key-header); a body that is not a JSON object is a 400;
    `GET` lists what was applied. Faults from `/_test/api_faults` apply to the POST:
    `status` answers without applying, `drop_after_commit` applies and drops the answer,
    `delay_before` waits first.
    """
    state = request.app[STATE]
    claims = _bearer_claims(request)
    if claims is None:
        return _unauthorized(state)
    state.stats.incr("api_200")
    if request.method == "GET":
        mine = [r for r in state.readings if r["user"] == claims.user_id]
        return web.json_response({"count": len(mine), "readings": [r["body"] for r in mine]})
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= _MAX_KEY and key.isascii() and key.isprintable()):
        raise BadRequest("Idempotency-Key must be 1-255 printable ASCII characters")
    data = await read_json(request)  # a 400 for anything but a JSON object
    fault = state.api_faults.take()
    if fault is not None:
        state.stats.incr("faults_injected")
        if fault.kind == "delay_before":
            await asyncio.sleep(fault.seconds)
        elif fault.kind == "status":
            if fault.status < 500 and fault.status not in (401, 408, 409, 425, 429):
                state.stats.incr("items_refused")
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after else None
            return mana_error(fault.status, _code_for(fault.status), "fault", headers)
    if key is not None and (claims.user_id, key) in state.answers:
        state.stats.incr("keys_seen_twice")
        status, answer = state.answers[(claims.user_id, key)]
        return web.json_response(answer, status=status, headers={"Idempotent-Replayed": "true"})
    uid = data.get("uid")
    if isinstance(uid, str):
        if uid in state.uids:
            state.stats.incr("items_applied_twice")
        state.uids.add(uid)
    state.readings.append({"user": claims.user_id, "key": key, "body": data})
    state.stats.incr("items_applied")
    answer = {"applied": len(state.readings), "key": key}
    if key is not None:
        state.answers[(claims.user_id, key)] = (201, answer)
    if fault is not None and fault.kind == "drop_after_commit":
        return _drop(request)
    return web.json_response(answer, status=201)


async def hook_api_faults(request: web.Request) -> web.StreamResponse:
    """`POST /_test/api_faults {"faults": [...]}` scripts the API's faults; DELETE clears."""
    state = request.app[STATE]
    if request.method == "DELETE":
        state.api_faults.clear()
    else:
        data = await read_json(request)
        specs = data.get("faults")
        if not isinstance(specs, list):
            raise BadRequest("faults must be a list")
        try:
            state.api_faults.replace(specs)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    return web.json_response({"pending": state.api_faults.pending()})


# ------------------------------------------------------------------------------ test mode


async def hook_clock(request: web.Request) -> web.StreamResponse:
    """`POST /_test/clock {"advance": seconds}` -> `{now}`; GET reads it."""
    state = request.app[STATE]
    if request.method == "POST":
        data = await read_json(request)
        seconds = data.get("advance")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise BadRequest("advance must be a number")
        if not math.isfinite(seconds) or seconds < 0:
            raise BadRequest("advance must be a finite number >= 0")
        try:
            state.clock.advance(seconds)
        except ValueError as exc:  # past year 9999: every expiry would overflow
            raise BadRequest(str(exc)) from None
    return web.json_response({"now": state.clock.now(), "offset": state.clock.offset})


async def hook_faults(request: web.Request) -> web.StreamResponse:
    """`POST /_test/faults {"faults": [...]}` replaces the script; DELETE clears it."""
    state = request.app[STATE]
    if request.method == "DELETE":
        state.faults.clear()
    else:
        data = await read_json(request)
        specs = data.get("faults")
        if not isinstance(specs, list):
            raise BadRequest("faults must be a list")
        try:
            state.faults.replace(specs)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    return web.json_response({"pending": state.faults.pending()})


async def hook_stats(request: web.Request) -> web.StreamResponse:
    """`GET /_test/stats`."""
    return web.json_response(request.app[STATE].stats.snapshot())


async def hook_stats_reset(request: web.Request) -> web.StreamResponse:
    """`POST /_test/stats/reset`."""
    state = request.app[STATE]
    state.stats.reset()
    return web.json_response(state.stats.snapshot())


_DEVICE_STATUS: Final = {"unknown": 404, "expired": 400, "not_pending": 409}


async def hook_device(request: web.Request) -> web.StreamResponse:
    """`POST /_test/device {"user_code", "action": "approve"|"deny", "email"?}`."""
    state = request.app[STATE]
    data = await read_json(request)
    user_code = req_str(data, "user_code")
    action = req_str(data, "action")
    email = data.get("email")
    if email is not None:
        email = req_str(data, "email")
    try:
        outcome = state.device_action(user_code, action, email)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if outcome in _DEVICE_STATUS:
        return mana_error(_DEVICE_STATUS[outcome], outcome, f"device code {outcome}")
    return web.json_response({"status": outcome})


# ------------------------------------------------------------------------------ app


def create_app(config: ServerConfig | None = None) -> web.Application:
    """Build the aiohttp application for `config` (the store opens when the app starts).

    The `/_test/*` routes exist only when `config.test_mode` is true.
    """
    config = config or ServerConfig()
    state = ServerState(config)
    app = web.Application(client_max_size=config.max_body, middlewares=[error_middleware])
    app[STATE] = state

    async def date_from_our_clock(request: web.Request, response: web.StreamResponse) -> None:
        # The Date header is the server's clock, the one its tokens' exp is minted on: a
        # client measures a token's life as exp - Date (a test clock moved on included).
        response.headers[hdrs.DATE] = formatdate(state.clock.now(), usegmt=True)

    app.on_response_prepare.append(date_from_our_clock)

    async def store_ctx(_: web.Application) -> AsyncIterator[None]:
        state.open()
        try:
            yield
        finally:
            state.close()

    app.cleanup_ctx.append(store_ctx)
    app.router.add_post("/auth/signin", mana_signin)
    app.router.add_post("/auth/refresh", mana_refresh)
    app.router.add_post("/auth/logout", mana_logout)
    app.router.add_post("/auth/validate", mana_validate)
    app.router.add_post("/oauth/token", oauth_token)
    app.router.add_post("/oauth/device_authorization", oauth_device_authorization)
    app.router.add_post("/oauth/revoke", oauth_revoke)
    app.router.add_get("/oauth/authorize", authorize_page)
    app.router.add_post("/oauth/authorize", authorize_decision)
    app.router.add_get("/.well-known/openid-configuration", well_known)
    app.router.add_get("/.well-known/oauth-authorization-server", well_known)
    app.router.add_get("/api/me", api_me)
    app.router.add_post("/api/readings", api_readings)
    app.router.add_get("/api/readings", api_readings)
    app.router.add_get("/device", device_page)
    app.router.add_post("/device", device_decision)
    if config.test_mode:
        app.router.add_route("GET", "/_test/clock", hook_clock)
        app.router.add_route("POST", "/_test/clock", hook_clock)
        app.router.add_route("POST", "/_test/faults", hook_faults)
        app.router.add_route("DELETE", "/_test/faults", hook_faults)
        app.router.add_route("POST", "/_test/api_faults", hook_api_faults)
        app.router.add_route("DELETE", "/_test/api_faults", hook_api_faults)
        app.router.add_get("/_test/stats", hook_stats)
        app.router.add_post("/_test/stats/reset", hook_stats_reset)
        app.router.add_post("/_test/device", hook_device)
    return app
