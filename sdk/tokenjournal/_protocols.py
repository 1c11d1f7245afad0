"""Sans-IO wire protocols: build requests, parse answers. No sockets, no clock reads.

A protocol turns a :class:`TokenSet` into an :class:`HttpRequest` and an answer (status,
headers, body, receipt time) into a new :class:`TokenSet` or a :class:`Failure` that says
what kind of failure it is. The manager does all I/O and decides what to do with the kind.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, Protocol, runtime_checkable
from urllib.parse import quote, urlencode, urlsplit

from ._clock import Clock
from ._numbers import MAX_SECONDS, epoch_seconds, http_date, positive_seconds, retry_after
from ._tokens import Failure, FailureKind, TokenSet, fingerprint, to_datetime

#: Answers larger than this are refused unread: a token answer is a few KiB at most.
MAX_BODY: Final = 1024 * 1024
#: How long to wait after a ``rotation_in_progress`` that came without ``Retry-After``.
CONFLICT_WAIT: Final = 1.0
#: The longest access-token lifetime the SDK believes: ten years.
MAX_LIFETIME: Final = MAX_SECONDS
#: A server's error description is cut to this many characters before it goes anywhere.
MAX_DESCRIPTION: Final = 1024

_JSON: Final = (("Content-Type", "application/json"), ("Accept", "application/json"))
_FORM: Final = (
    ("Content-Type", "application/x-www-form-urlencoded"),
    ("Accept", "application/json"),
)


#: Header values a repr never shows: they carry a bearer or client credentials.
_SECRET_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "cookie"})


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A request to send, as plain data. Its ``repr`` shows no secret: the body (refresh
    token, password, client secret) appears as its length and fingerprint, credential
    headers as fingerprints."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = field(repr=False)

    def __repr__(self) -> str:
        headers = ", ".join(
            f"{name}: {fingerprint(value) if name.lower() in _SECRET_HEADERS else value!r}"
            for name, value in self.headers
        )
        body = f"<{len(self.body)} bytes {fingerprint(self.body.decode('utf-8', 'replace'))}>"
        return f"HttpRequest({self.method} {self.url}, headers=[{headers}], body={body})"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """Who is asking: Mana binds refresh tokens to ``device_id`` (a UUID4 kept in the journal)."""

    device_id: str
    device_name: str = "tokenjournal"
    device_type: str = "python"
    user_agent: str = "tokenjournal"

    def as_json(self) -> dict[str, str]:
        """The ``deviceInfo`` object of the Mana protocol."""
        return {
            "deviceId": self.device_id,
            "deviceName": self.device_name,
            "deviceType": self.device_type,
            "userAgent": self.user_agent,
        }


@dataclass(frozen=True, slots=True)
class DeviceCode:
    """An RFC 8628 device authorization, as the person is shown it and the device polls it."""

    device_code: str = field(repr=False)  # polling it yields tokens: a secret
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_at: float
    interval: float


Answer = TokenSet | Failure


@runtime_checkable
class AuthProtocol(Protocol):
    """A pluggable, pure wire protocol. ``received_at`` is epoch seconds at receipt."""

    #: The origin whose endpoints this protocol calls (the default allowed origin).
    @property
    def auth_url(self) -> str:
        """The auth server's base URL."""
        ...

    def build_sign_in(self, credentials: Mapping[str, str], device: DeviceInfo) -> HttpRequest:
        """The sign-in request for ``credentials``."""
        ...

    def build_refresh(self, tokens: TokenSet, device: DeviceInfo) -> HttpRequest:
        """The refresh request that spends ``tokens.refresh_token``."""
        ...

    def build_sign_out(self, tokens: TokenSet, device: DeviceInfo) -> HttpRequest | None:
        """The logout request, or ``None`` when the protocol has none."""
        ...

    def parse_tokens(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        received_at: float,
        previous: TokenSet | None,
    ) -> Answer:
        """Parse a sign-in or refresh answer."""
        ...

    def parse_sign_out(
        self, status: int, headers: Mapping[str, str], body: bytes
    ) -> Failure | None:
        """``None`` when the logout was accepted, else the failure."""
        ...


# --------------------------------------------------------------------------- shared helpers


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or ``None``."""
    return retry_after(_header(headers, "Retry-After"), now)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, val in headers.items():
        if key.lower() == lowered:
            return val
    return None


def _load_json_object(body: bytes) -> dict[str, Any] | None:
    if len(body) > MAX_BODY:
        return None
    return _json_object(body)


def _json_object(text: bytes | str) -> dict[str, Any] | None:
    """A JSON object, or ``None`` for anything else; never raises.

    ``NaN`` and the infinities (which Python's parser accepts) are left to the number
    readers to refuse; a body nested thousands deep makes ``json`` raise ``RecursionError``,
    which is a malformed answer like any other, not a crash.
    """
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return data if isinstance(data, dict) else None


def _nonempty_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) and value else None


def _visible_ascii(text: str) -> bool:
    """RFC 6749's VSCHAR (``%x20-7E``): what a token may be made of."""
    return text.isascii() and text.isprintable()


def _http_url(value: object) -> bool:
    """An absolute http(s) URL with a host (``https://`` alone names no server)."""
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def _web_address(text: str) -> bool:
    """An absolute http(s) URL of printable ASCII, with no space: one a person may be shown."""
    return _visible_ascii(text) and " " not in text and _http_url(text)


def _description(data: Mapping[str, Any] | None, key: str) -> str | None:
    """The server's human-readable text under ``key`` (a string, or a list of strings as
    NestJS sends), cut to :data:`MAX_DESCRIPTION`; ``None`` when there is none."""
    value = data.get(key) if data is not None else None
    if isinstance(value, list):
        value = "; ".join(v for v in value if isinstance(v, str))
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()[:MAX_DESCRIPTION]


def _shared_failure(
    code: str | None, status: int, headers: Mapping[str, str], now: float
) -> Failure | None:
    """What every protocol reads alike, in this order: a rotation in progress (wait the
    server's ``Retry-After``, else ~1 s, and retry the same token), then 429 and 5xx
    (transient whatever the body says: invariant 5)."""
    retry_after = parse_retry_after(headers, now)
    if code in MANA_CONFLICT:
        wait = CONFLICT_WAIT if retry_after is None else retry_after
        return Failure(FailureKind.CONFLICT, code, status, code, wait)
    if status == 429:
        return Failure(
            FailureKind.RATE_LIMITED, "rate_limited", status, "rate limited", retry_after
        )
    if status >= 500:
        message = f"server error {status}"
        return Failure(FailureKind.SERVER, "server_error", status, message, retry_after)
    return None


def _rejected(code: str | None, status: int) -> Failure:
    """Any other 4xx: our request was wrong. No retry; tokens kept."""
    return Failure(
        FailureKind.REJECTED, code or f"http_{status}", status, f"unexpected status {status}"
    )


def _logout_failure(status: int, classify: Callable[[], Failure]) -> Failure | None:
    """A logout is done on any 2xx, and a dead token is as good as logged out."""
    if 200 <= status < 300:
        return None
    failure = classify()
    return None if failure.kind is FailureKind.PERMANENT else failure


def jwt_lifetime(token: str) -> tuple[float | None, float | None]:
    """The ``(exp, iat)`` claims of a JWT, decoded without verification, or ``(None, None)``.

    The claims are used for timing only; the SDK never trusts them for anything else, so it
    reads the payload segment itself instead of importing PyJWT: PyJWT loads
    ``cryptography`` when it is installed, about 8 MiB of RSS on a device for a base64 and
    a JSON decode. (The reference server signs and verifies with PyJWT.)
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None, None
    segment = parts[1]
    try:
        payload = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (ValueError, binascii.Error):
        return None, None
    claims = _json_object(payload)
    if claims is None:
        return None, None
    # An exp of NaN, Infinity, a 400-digit integer, a boolean or a string is read as no
    # exp at all, exactly like an opaque token: the server has already rotated, so the
    # pair is kept and the next 401 refreshes it (see parse_tokens).
    return epoch_seconds(claims.get("exp")), epoch_seconds(claims.get("iat"))


def server_date(headers: Mapping[str, str]) -> float | None:
    """The answer's ``Date`` header (the server's clock at answering), epoch seconds."""
    return http_date(_header(headers, "Date"))


def jwt_server_lifetime(token: str, headers: Mapping[str, str], received_at: float) -> float | None:
    """How long a JWT has left to live, measured on the server's clock, not the device's.

    ``exp`` against the answer's ``Date`` (the server's clock when it answered: right for a
    grace replay too, whose pair was minted a while ago); else ``exp - iat``; only without
    either, ``exp`` against the device clock. An IoT box that booted in 1970 or runs a day
    ahead thus still reads a 15-minute token as 15 minutes.

    A token already dead by the server's clock gets ``0.0`` (expires on receipt: refreshed
    once the pair's staleness floor has passed); one that only looks dead against the
    device clock gets ``None`` (unknown: used until the server answers 401).
    """
    exp, iat = jwt_lifetime(token)
    if exp is None:
        return None
    served = server_date(headers)
    if served is not None:
        return max(0.0, exp - served)
    if iat is not None and exp > iat:
        return exp - iat
    left = exp - received_at
    return left if left > 0 else None


def expiry_from_lifetime(received_at: float, lifetime: float | None) -> datetime | None:
    """Expiry measured from receipt: immune to a device clock that is off (IoT boxes often are)."""
    if lifetime is None or lifetime < 0:
        return None
    # A server's "never expires" (expires_in: 1e11) must not overflow datetime; past the cap
    # the 401 rule refreshes anyway.
    return to_datetime(received_at + min(lifetime, MAX_LIFETIME))


# --------------------------------------------------------------------------- Mana

#: Codes that mean the refresh token is dead (docs/architecture.md 3.1).
MANA_PERMANENT: Final = frozenset(
    {"invalid_token", "token_expired", "invalid_token_state", "token_collision"}
)
MANA_CONFLICT: Final = frozenset({"rotation_in_progress", "refresh_in_progress"})
DEVICE_CHANGED: Final = "device_id_changed"


def mana_error_code(data: Mapping[str, Any] | None) -> str | None:
    """The machine code of a NestJS error: it may sit in ``error``, ``code`` or ``message``."""
    if data is None:
        return None
    known = MANA_PERMANENT | MANA_CONFLICT
    texts: list[str] = []
    for key in ("code", "error", "message"):
        value = data.get(key)
        if isinstance(value, list):  # NestJS validation errors put a list in `message`
            texts.extend(v for v in value if isinstance(v, str))
        elif isinstance(value, str):
            texts.append(value)
    for text in texts:
        if text.strip().lower() in known:
            return text.strip().lower()
    for text in texts:
        if "device id has changed" in text.lower():
            return DEVICE_CHANGED
    for text in texts:
        lowered = text.lower()
        for code in sorted(known):
            if code in lowered:
                return code
    return None


@dataclass(frozen=True, slots=True)
class ManaProtocol:
    """The Mana protocol (docs/architecture.md 3.1): JSON bodies, JWT access tokens, device
    binding."""

    auth_url: str

    def _url(self, path: str) -> str:
        return self.auth_url.rstrip("/") + path

    @staticmethod
    def _json(url: str, payload: Mapping[str, Any]) -> HttpRequest:
        return HttpRequest("POST", url, _JSON, json.dumps(payload).encode())

    def build_sign_in(self, credentials: Mapping[str, str], device: DeviceInfo) -> HttpRequest:
        """``POST /auth/signin {email, password, deviceInfo}``."""
        email, password = credentials.get("email"), credentials.get("password")
        if not isinstance(email, str) or not email or not isinstance(password, str):
            raise ValueError("Mana sign-in needs email= and password= (strings)")
        payload = {"email": email, "password": password, "deviceInfo": device.as_json()}
        return self._json(self._url("/auth/signin"), payload)

    def build_refresh(self, tokens: TokenSet, device: DeviceInfo) -> HttpRequest:
        """``POST /auth/refresh {refreshToken, deviceInfo}``."""
        if tokens.refresh_token is None:
            raise ValueError("no refresh token to refresh with")
        payload = {"refreshToken": tokens.refresh_token, "deviceInfo": device.as_json()}
        return self._json(self._url("/auth/refresh"), payload)

    def build_sign_out(self, tokens: TokenSet, device: DeviceInfo) -> HttpRequest | None:
        """``POST /auth/logout {refreshToken}``."""
        if tokens.refresh_token is None:
            return None
        return self._json(self._url("/auth/logout"), {"refreshToken": tokens.refresh_token})

    def parse_tokens(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        received_at: float,
        previous: TokenSet | None,
    ) -> Answer:
        """Parse a sign-in or refresh answer (docs/architecture.md 3.1, the error table)."""
        if 200 <= status < 300:
            data = _load_json_object(body)
            if data is None:
                return Failure(
                    FailureKind.MALFORMED, "malformed_body", status, "body is not a JSON object"
                )
            access, refresh = _nonempty_str(data, "appToken"), _nonempty_str(data, "refreshToken")
            if access is None or refresh is None:
                return Failure(
                    FailureKind.MALFORMED,
                    "malformed_body",
                    status,
                    "appToken and refreshToken must be non-empty strings",
                )
            # Measured on the server's clock (see jwt_server_lifetime), never storming.
            lifetime = jwt_server_lifetime(access, headers, received_at)
            expires_at = expiry_from_lifetime(received_at, lifetime)
            return TokenSet(access, refresh, expires_at, to_datetime(received_at))
        return self._classify_error(status, headers, body, received_at)

    def _classify_error(
        self, status: int, headers: Mapping[str, str], body: bytes, now: float
    ) -> Failure:
        data = _load_json_object(body)
        failure = self._classify(data, status, headers, now)
        return replace(failure, description=_description(data, "message"))

    @staticmethod
    def _classify(
        data: Mapping[str, Any] | None, status: int, headers: Mapping[str, str], now: float
    ) -> Failure:
        code = mana_error_code(data)
        shared = _shared_failure(code, status, headers, now)
        if shared is not None:
            return shared
        if code is not None and (code in MANA_PERMANENT or code == DEVICE_CHANGED):
            return Failure(FailureKind.PERMANENT, code, status, code)
        # A code the table does not know (``invalid_credentials`` at sign-in) is still named.
        raw = data.get("code") if data is not None else None
        return _rejected(code or (raw if isinstance(raw, str) and raw else None), status)

    def parse_sign_out(
        self, status: int, headers: Mapping[str, str], body: bytes
    ) -> Failure | None:
        """Logout is done on any 2xx; a dead token is as good as logged out."""
        return _logout_failure(status, lambda: self._classify_error(status, headers, body, 0.0))


# --------------------------------------------------------------------------- OAuth 2.0

#: Error codes that mean "try again later" rather than "your request is wrong" (RFC 6749 5.2).
OAUTH_TRANSIENT: Final = frozenset({"temporarily_unavailable", "server_error"})
#: Error codes that end a session or a device sign-in, whatever 4xx status carries them.
OAUTH_PERMANENT: Final = frozenset({"invalid_grant", "access_denied", "expired_token"})
DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
CLIENT_AUTH_METHODS: Final = ("basic", "body", "none")
#: Form fields the protocol owns; ``extra_params`` may not set them.
RESERVED_PARAMS: Final = frozenset(
    {"grant_type", "client_id", "client_secret", "scope", "username", "password"}
    | {"refresh_token", "device_code", "token", "token_type_hint"}
    | {"response_type", "redirect_uri", "state", "code", "code_verifier", "prompt"}
    | {"code_challenge", "code_challenge_method"}
)
#: RFC 8628 3.2: the polling interval when the server names none.
DEVICE_INTERVAL: Final = 5.0
#: Both are whole seconds in the RFCs; anything shorter is a server bug, not an instruction.
MIN_INTERVAL: Final = 1.0
#: A polling interval longer than an hour is a server bug too; it is capped, not obeyed.
MAX_INTERVAL: Final = 3600.0
MIN_LIFETIME: Final = 1.0


# --------------------------------------------------------------------------- discovery

#: A kept discovery document younger than this is used without asking the server (a day).
DISCOVERY_MAX_AGE: Final = 86400.0
#: How long one discovery request may take before the next well-known URL (or the kept
#: document) is tried.
DISCOVERY_TIMEOUT: Final = 10.0
OIDC_WELL_KNOWN: Final = "/.well-known/openid-configuration"
RFC8414_WELL_KNOWN: Final = "/.well-known/oauth-authorization-server"
_ENDPOINTS: Final = (
    "token_endpoint",
    "authorization_endpoint",
    "device_authorization_endpoint",
    "revocation_endpoint",
)


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    """What discovery learnt of an authorization server (RFC 8414 section 2, OIDC Discovery
    section 3): its issuer, its endpoints, what it supports. ``document`` is the JSON text
    as served, which the journal keeps."""

    issuer: str
    token_endpoint: str
    authorization_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None
    grant_types_supported: tuple[str, ...] = ()
    code_challenge_methods_supported: tuple[str, ...] = ()
    document: str = field(default="{}", repr=False, compare=False)
    #: RFC 9207's ``authorization_response_iss_parameter_supported``: every redirect of
    #: this server names it in ``iss``.
    iss_in_redirects: bool = False


def metadata_urls(issuer: str) -> tuple[str, ...]:
    """The well-known URLs of ``issuer``, in the order they are tried.

    OpenID Connect appends its path to the issuer (Keycloak's realm issuers included);
    RFC 8414 section 3.1 inserts its path between the host and the issuer's path. For an
    issuer without a path the two differ only in their last segment.
    """
    base = issuer.rstrip("/")
    scheme, sep, rest = base.partition("://")
    host, slash, path = rest.partition("/")
    urls = [base + OIDC_WELL_KNOWN, f"{scheme}{sep}{host}{RFC8414_WELL_KNOWN}{slash}{path}"]
    return tuple(dict.fromkeys(urls))


def _same_issuer(a: str, b: str) -> bool:
    # RFC 8414 3.3 wants them identical; Auth0's issuer ends in "/" and people type it
    # without, so a trailing slash is the one difference forgiven.
    return a.rstrip("/") == b.rstrip("/")


def parse_metadata(
    status: int, headers: Mapping[str, str], body: bytes, issuer: str
) -> ServerMetadata | Failure:
    """A discovery answer, read and checked: a 2xx JSON object whose ``issuer`` is
    ``issuer``, with an http(s) ``token_endpoint``; every other endpoint, when present, an
    http(s) URL. A missing document (404) is ``REJECTED`` (the next well-known URL may
    have it); an issuer that differs is ``REJECTED`` as ``issuer_mismatch``."""
    if not 200 <= status < 300:
        shared = _shared_failure(None, status, headers, 0.0)
        return shared or _rejected(None, status)
    data = _load_json_object(body)
    if data is None:
        return Failure(FailureKind.MALFORMED, "malformed_body", status, "not a JSON object")
    named = data.get("issuer")
    if not isinstance(named, str) or not _same_issuer(named, issuer):
        return Failure(
            FailureKind.REJECTED,
            "issuer_mismatch",
            status,
            "the discovery document names another issuer",
        )
    urls: dict[str, str | None] = {}
    for name in _ENDPOINTS:
        value = data.get(name)
        if value is not None and not _http_url(value):
            return Failure(
                FailureKind.MALFORMED, "malformed_body", status, f"{name} is not an http(s) URL"
            )
        urls[name] = value
    token = urls.pop("token_endpoint")
    if token is None:
        return Failure(FailureKind.MALFORMED, "malformed_body", status, "no token_endpoint")
    return ServerMetadata(
        issuer,
        token,
        urls["authorization_endpoint"],
        urls["device_authorization_endpoint"],
        urls["revocation_endpoint"],
        _strings(data.get("grant_types_supported")),
        _strings(data.get("code_challenge_methods_supported")),
        body.decode("utf-8"),
        data.get("authorization_response_iss_parameter_supported") is True,
    )


def _strings(value: object) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


#: Reads (or recalls) an issuer's metadata. The I/O lives a layer up, in
#: ``tokenjournal._discovery``, which installs itself here when ``tokenjournal`` is imported:
#: this module stays sans-IO and imports nothing that sends.
MetadataSource = Callable[..., Awaitable[ServerMetadata]]
_metadata_source: MetadataSource | None = None


def install_metadata_source(source: MetadataSource) -> None:
    """Called once by ``tokenjournal._discovery``: the I/O behind ``OAuth2Protocol.discover``."""
    global _metadata_source
    _metadata_source = source


# --------------------------------------------------------------------------- browser sign-in

PKCE_METHOD: Final = "S256"


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 4.2, S256: ``BASE64URL(SHA256(ASCII(verifier)))`` without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def oauth_error_code(data: Mapping[str, Any] | None) -> str | None:
    """The RFC 6749 5.2 ``error`` code, trimmed and lower-cased, or ``None``."""
    code = data.get("error") if data is not None else None
    if not isinstance(code, str) or not code.strip():
        return None
    return code.strip().lower()


def basic_credentials(client_id: str, client_secret: str) -> str:
    """The ``Authorization`` value for HTTP Basic client authentication (RFC 6749 2.3.1).

    Both parts are form-urlencoded before they are joined, so a ``:`` or a non-ASCII
    character in either survives. A space becomes ``%20`` rather than ``+``: form decoders
    read both, and a server that only percent-decodes still reads ``%20`` right.
    """
    raw = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}"
    return "Basic " + base64.b64encode(raw.encode("ascii")).decode("ascii")


@dataclass(frozen=True, slots=True)
class OAuth2Protocol:
    """OAuth 2.0 (RFC 6749; RFC 8628 for devices) for Keycloak, Auth0, Okta, Hydra, ...

    ``client_auth`` is ``"basic"`` (HTTP Basic, the RFC's default for confidential
    clients), ``"body"`` (``client_id`` and ``client_secret`` in the form) or ``"none"``
    (a public client: ``client_id`` in the form, no secret). Without a ``client_secret``
    the client is public whatever ``client_auth`` says.

    ``scope`` is requested at sign-in (password grant, device authorization). A refresh
    sends no ``scope``: RFC 6749 section 6 reads an omitted scope as "what was granted",
    which is always allowed, while repeating the requested scope fails with
    ``invalid_scope`` on a server that granted less.

    ``revocation_url`` (RFC 7009), when given, is told about a sign-out.

    ``extra_params`` go with the sign-in requests (password grant, device authorization,
    browser sign-in), for servers that want more than the RFC: Auth0's ``audience``, for one.

    ``authorization_url`` is where the browser sign-in sends the person (RFC 6749 4.1, with
    PKCE); ``issuer`` is the server's issuer identifier, checked against the ``iss`` of a
    browser redirect (RFC 9207) when the server sends one; with ``iss_in_redirects`` (the
    server says it always sends one) a redirect without ``iss`` is refused too, or an
    attacker's mix-up would only have to leave it out. :meth:`discover` fills every URL, and
    ``iss_in_redirects``, from the server's metadata.
    """

    token_url: str
    client_id: str
    client_secret: str | None = None
    scope: str | None = None
    client_auth: str = "basic"
    device_authorization_url: str | None = None
    revocation_url: str | None = None
    extra_params: Mapping[str, str] | None = field(default=None, compare=False)
    authorization_url: str | None = None
    issuer: str | None = None
    iss_in_redirects: bool = False

    @classmethod
    async def discover(
        cls,
        issuer: str,
        *,
        journal: str | os.PathLike[str] | Any = None,
        max_age: float = DISCOVERY_MAX_AGE,
        request_timeout: float = DISCOVERY_TIMEOUT,
        allow_insecure_http: bool = False,
        clock: Clock | None = None,
        **options: Any,
    ) -> OAuth2Protocol:
        """A protocol for the server whose issuer identifier is ``issuer``, its endpoints read
        from ``/.well-known/openid-configuration`` (OpenID Connect Discovery), else RFC 8414's
        ``/.well-known/oauth-authorization-server``.

        The document must name ``issuer`` as its issuer (a trailing ``/`` aside), or this
        raises :class:`~tokenjournal.ProtocolError`: a document that speaks for another
        server must not choose where tokens go. ``options`` are the constructor's
        (``client_id``, ``client_secret``, ``client_auth``, ``scope``, ``extra_params``, or a
        URL to use instead of the document's).

        With ``journal`` (a path or a journal) the document is kept there: one younger than
        ``max_age`` seconds is used without asking the server, an older one is read again,
        and when the issuer gives no usable document (no network, 5xx, a captive portal's
        page) the kept one is used whatever its age, so a device that boots offline still
        starts; one that names another issuer is never replaced by the kept one. Without a kept
        document an unreachable issuer is a :class:`~tokenjournal.NetworkError`. Discovery
        runs only here, at start-up, never on the token path. Each well-known URL gets one
        request of at most ``request_timeout`` seconds; ``clock`` (wall time) dates the kept
        document. Plain HTTP to an issuer that is not this machine needs
        ``allow_insecure_http``.
        """
        if _metadata_source is None:  # pragma: no cover - installed by `import tokenjournal`
            raise RuntimeError("tokenjournal._discovery is not loaded")
        metadata = await _metadata_source(
            issuer,
            journal=journal,
            max_age=max_age,
            request_timeout=request_timeout,
            allow_insecure_http=allow_insecure_http,
            clock=clock,
        )
        fields: dict[str, Any] = {
            "token_url": metadata.token_endpoint,
            "device_authorization_url": metadata.device_authorization_endpoint,
            "revocation_url": metadata.revocation_endpoint,
            "authorization_url": metadata.authorization_endpoint,
            "issuer": metadata.issuer,
            "iss_in_redirects": metadata.iss_in_redirects,
        }
        fields.update(options)
        return cls(**fields)

    def __post_init__(self) -> None:
        for name in (
            "token_url",
            "device_authorization_url",
            "revocation_url",
            "authorization_url",
        ):
            url = getattr(self, name)
            if url is not None and not _http_url(url):
                raise ValueError(f"OAuth2Protocol.{name} must be an http(s) URL")
        if not isinstance(self.client_id, str) or not self.client_id:
            raise ValueError("OAuth2Protocol.client_id must be a non-empty string")
        if self.client_auth not in CLIENT_AUTH_METHODS:
            raise ValueError("client_auth must be 'basic', 'body' or 'none'")
        if self.client_secret is not None and not isinstance(self.client_secret, str):
            raise TypeError("client_secret must be a string or None")
        if self.client_auth == "none" and self.client_secret:
            raise ValueError(
                "client_auth='none' never sends the client_secret; "
                "use client_auth='basic' or 'body' for a confidential client"
            )
        if self.client_secret is None and self.client_auth != "none":
            object.__setattr__(self, "client_auth", "none")
        extra = dict(self.extra_params or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise TypeError("extra_params must map strings to strings")
        clash = set(extra) & RESERVED_PARAMS
        if clash:
            raise ValueError(f"extra_params cannot set {sorted(clash)}: the protocol sets them")
        object.__setattr__(self, "extra_params", MappingProxyType(extra))

    def __repr__(self) -> str:
        return (
            f"OAuth2Protocol(token_url={self.token_url!r}, client_id={self.client_id!r}, "
            f"client_auth={self.client_auth!r})"
        )

    @property
    def auth_url(self) -> str:
        """The token endpoint's URL; its origin is the default allowed origin."""
        return self.token_url

    def _form(self, url: str, fields: dict[str, str]) -> HttpRequest:
        headers = list(_FORM)
        if self.client_auth == "basic":
            assert self.client_secret is not None  # __post_init__ made it "none" otherwise
            headers.append(("Authorization", basic_credentials(self.client_id, self.client_secret)))
        else:
            fields["client_id"] = self.client_id
            if self.client_auth == "body" and self.client_secret is not None:
                fields["client_secret"] = self.client_secret
        return HttpRequest("POST", url, tuple(headers), urlencode(fields).encode("ascii"))

    def _with_scope(self, fields: dict[str, str]) -> dict[str, str]:
        """A sign-in request's fields: the requested scope and the extra parameters."""
        fields.update(self.extra_params or {})
        if self.scope:
            fields["scope"] = self.scope
        return fields

    def build_sign_in(self, credentials: Mapping[str, str], device: DeviceInfo) -> HttpRequest:
        """The password grant (RFC 6749 4.3), for servers that still allow it."""
        username = credentials.get("username") or credentials.get("email")
        password = credentials.get("password")
        if not isinstance(username, str) or not username or not isinstance(password, str):
            raise ValueError("the password grant needs username= and password= (strings)")
        fields = {"grant_type": "password", "username": username, "password": password}
        return self._form(self.token_url, self._with_scope(fields))

    def build_refresh(self, tokens: TokenSet, device: DeviceInfo) -> HttpRequest:
        """``grant_type=refresh_token`` (RFC 6749 6), without ``scope`` (see the class doc)."""
        if tokens.refresh_token is None:
            raise ValueError("no refresh token to refresh with")
        fields = {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token}
        return self._form(self.token_url, fields)

    def build_sign_out(self, tokens: TokenSet, device: DeviceInfo) -> HttpRequest | None:
        """RFC 7009 revocation of the refresh token, where a revocation URL is configured."""
        if self.revocation_url is None or tokens.refresh_token is None:
            return None
        fields = {"token": tokens.refresh_token, "token_type_hint": "refresh_token"}
        return self._form(self.revocation_url, fields)

    def build_device_authorization(self) -> HttpRequest:
        """RFC 8628 3.1: ask for a device code."""
        if self.device_authorization_url is None:
            raise ValueError("OAuth2Protocol needs device_authorization_url for the device flow")
        return self._form(self.device_authorization_url, self._with_scope({}))

    def parse_device_authorization(
        self, status: int, headers: Mapping[str, str], body: bytes, received_at: float
    ) -> DeviceCode | Failure:
        """RFC 8628 3.2. ``expires_in`` and ``interval`` are measured from ``received_at``."""
        if not 200 <= status < 300:
            return self._classify_error(status, headers, body, received_at)
        data = _load_json_object(body)
        if data is None:
            return Failure(
                FailureKind.MALFORMED, "malformed_body", status, "body is not a JSON object"
            )
        device_code = _nonempty_str(data, "device_code")
        user_code = _nonempty_str(data, "user_code")
        # Google names it verification_url; the RFC says verification_uri.
        uri = _nonempty_str(data, "verification_uri") or _nonempty_str(data, "verification_url")
        expires_in = positive_seconds(data.get("expires_in"))
        if device_code is None or user_code is None or uri is None or expires_in is None:
            return Failure(
                FailureKind.MALFORMED,
                "malformed_body",
                status,
                "device_code, user_code, verification_uri and expires_in are required",
            )
        complete = _nonempty_str(data, "verification_uri_complete")
        # The app shows these to a person, often on a terminal: an escape sequence in them
        # would clear a kiosk's screen or hide part of the address. RFC 8628 6.1 codes are
        # ASCII letters and digits; a URI is printable ASCII (RFC 3986).
        if not _visible_ascii(user_code) or not all(
            _web_address(u) for u in (uri, complete) if u is not None
        ):
            return Failure(
                FailureKind.MALFORMED,
                "malformed_body",
                status,
                "user_code must be printable ASCII and verification_uri an http(s) URL",
            )
        return DeviceCode(
            device_code,
            user_code,
            uri,
            complete,
            received_at + expires_in,
            max(
                MIN_INTERVAL,
                positive_seconds(data.get("interval"), MAX_INTERVAL) or DEVICE_INTERVAL,
            ),
        )

    def build_device_token(self, device_code: str) -> HttpRequest:
        """RFC 8628 3.4: poll the token endpoint."""
        fields = {"grant_type": DEVICE_GRANT, "device_code": device_code}
        return self._form(self.token_url, fields)

    def build_authorization_url(
        self, redirect_uri: str, state: str, code_challenge: str, prompt: str | None = None
    ) -> str:
        """RFC 6749 4.1.1 with RFC 7636 4.3: the URL the browser opens. ``prompt`` is OpenID
        Connect's (``login``, ``consent``, ``select_account``, ``none``)."""
        if self.authorization_url is None:
            raise ValueError("OAuth2Protocol needs authorization_url for the browser sign-in")
        fields = self._with_scope(
            {
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": redirect_uri,
                "state": state,
                "code_challenge": code_challenge,
                "code_challenge_method": PKCE_METHOD,
            }
        )
        if prompt:
            fields["prompt"] = prompt
        joiner = "&" if "?" in self.authorization_url else "?"
        return self.authorization_url + joiner + urlencode(fields)

    def parse_redirect(self, query: Mapping[str, str], state: str) -> str | Failure:
        """The authorization code of a browser redirect (RFC 6749 4.1.2), or why not.

        ``state`` is checked first, in constant time: a redirect that does not carry ours
        is someone else's (CSRF) and nothing else in it is believed (``state_mismatch``).
        An ``iss`` that is not our issuer, or none from a server that always sends it, is a
        mix-up attack (RFC 9207, ``issuer_mismatch``). An ``error`` (``access_denied``,
        ...) is PERMANENT with the server's ``error_description``.
        """
        got = query.get("state", "")
        if not hmac.compare_digest(got.encode("utf-8", "replace"), state.encode("utf-8")):
            return Failure(
                FailureKind.REJECTED, "state_mismatch", 400, "the redirect's state is not ours"
            )
        iss = query.get("iss")
        if iss is None and self.iss_in_redirects:
            return Failure(
                FailureKind.REJECTED,
                "issuer_mismatch",
                400,
                "the redirect names no issuer, though the server always names it",
            )
        if iss is not None and self.issuer is not None and not _same_issuer(iss, self.issuer):
            return Failure(
                FailureKind.REJECTED, "issuer_mismatch", 400, "the redirect names another issuer"
            )
        error = oauth_error_code(query)
        if error is not None:
            return Failure(
                FailureKind.PERMANENT,
                error,
                400,
                error,
                description=_description(query, "error_description"),
            )
        code = query.get("code")
        if not code:
            return Failure(FailureKind.MALFORMED, "no_code", 400, "the redirect has no code")
        return code

    def build_code_exchange(self, code: str, redirect_uri: str, code_verifier: str) -> HttpRequest:
        """RFC 6749 4.1.3 with RFC 7636 4.5: trade the code and the verifier for tokens."""
        fields = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        return self._form(self.token_url, fields)

    def parse_tokens(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        received_at: float,
        previous: TokenSet | None,
    ) -> Answer:
        """RFC 6749 5.1/5.2.

        A 2xx that carries a usable ``access_token`` is never thrown away for a bad
        optional field, because the server has already rotated: an unusable
        ``expires_in`` falls back to the JWT's own lifetime (else no expiry, so the next
        401 refreshes); an absent or empty ``refresh_token`` keeps the previous one; an
        absent ``scope`` keeps the previous (or the requested) one. ``token_type`` is
        compared case-insensitively; anything but Bearer is refused, because the
        middleware can only send Bearer (RFC 6749 7.1).
        """
        if not 200 <= status < 300:
            return self._classify_error(status, headers, body, received_at)
        data = _load_json_object(body)
        if data is None:
            return Failure(
                FailureKind.MALFORMED, "malformed_body", status, "body is not a JSON object"
            )
        if "access_token" not in data and oauth_error_code(data) is not None:
            # GitHub answers device polls with 200 {"error": "authorization_pending"}.
            return self._classify_error(status, headers, body, received_at)
        access = _nonempty_str(data, "access_token")
        token_type = data.get("token_type")
        refresh_raw = data.get("refresh_token")
        if (
            access is None
            or not isinstance(token_type, str | None)
            or not isinstance(refresh_raw, str | None)
        ):
            return Failure(
                FailureKind.MALFORMED,
                "malformed_body",
                status,
                "access_token, token_type or refresh_token has the wrong type",
            )
        if token_type is not None and token_type.strip().lower() != "bearer":
            return Failure(
                FailureKind.REJECTED,
                "unsupported_token_type",
                status,
                f"token_type {token_type.strip()[:32]!r} is not Bearer",
            )
        refresh = refresh_raw or (previous.refresh_token if previous is not None else None)
        lifetime = positive_seconds(data.get("expires_in"))
        if lifetime is not None and lifetime < MIN_LIFETIME:
            lifetime = None  # "expires in a microsecond" would mean a refresh on every call
        if lifetime is None:
            lifetime = jwt_server_lifetime(access, headers, received_at)
        scope = data.get("scope")
        if not isinstance(scope, str) or not scope.strip():
            scope = previous.scope if previous is not None else self.scope
        # OpenID Connect: a refresh may bring a new ID token or none (keep the old one). An
        # unusable one (not a printable-ASCII string: a JWT always is) is ignored the same way.
        id_token = data.get("id_token")
        if not (isinstance(id_token, str) and id_token and _visible_ascii(id_token)):
            id_token = previous.id_token if previous is not None else None
        return TokenSet(
            access,
            refresh,
            expiry_from_lifetime(received_at, lifetime),
            to_datetime(received_at),
            "Bearer",
            scope,
            id_token,
        )

    def _classify_error(
        self, status: int, headers: Mapping[str, str], body: bytes, now: float
    ) -> Failure:
        """RFC 6749 5.2 and RFC 8628 3.5 codes, under the SDK's rules.

        429 and 5xx are transient whatever the body says (invariant 5); ``invalid_grant``,
        ``access_denied`` and ``expired_token`` are permanent in any other status (servers
        use 400, 401 and 403); an unknown code in a 4xx means our request was wrong.
        """
        data = _load_json_object(body)
        failure = self._classify(data, status, headers, now)
        return replace(failure, description=_description(data, "error_description"))

    @staticmethod
    def _classify(
        data: Mapping[str, Any] | None, status: int, headers: Mapping[str, str], now: float
    ) -> Failure:
        code = oauth_error_code(data)
        # rotation_in_progress is the reference server's concurrent-rotation answer here too.
        shared = _shared_failure(code, status, headers, now)
        if shared is not None:
            return shared
        if code in OAUTH_PERMANENT:
            return Failure(FailureKind.PERMANENT, code, status, code)
        if code == "authorization_pending":
            return Failure(FailureKind.PENDING, code, status, code)
        if code == "slow_down":
            # GitHub sends the new interval along; RFC 8628 servers leave it to the client.
            new_interval = positive_seconds(data.get("interval"), MAX_INTERVAL) if data else None
            return Failure(FailureKind.SLOW_DOWN, code, status, code, new_interval)
        if code in OAUTH_TRANSIENT:
            return Failure(FailureKind.SERVER, code, status, code, parse_retry_after(headers, now))
        return _rejected(code, status)

    def parse_sign_out(
        self, status: int, headers: Mapping[str, str], body: bytes
    ) -> Failure | None:
        """RFC 7009: 200 means revoked (an unknown or dead token counts as revoked)."""
        return _logout_failure(status, lambda: self._classify_error(status, headers, body, 0.0))
