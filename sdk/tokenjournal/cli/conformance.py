"""`tokenjournal conformance`: does a server keep the promises this SDK relies on?

It probes any Mana or OAuth 2.0 server over raw HTTP (aiohttp; the SDK's sans-IO protocols
only build the requests and parse the answers) and reports, per behaviour, pass or fail:

* sign-in works, and a refresh rotates the refresh token;
* the old token replayed inside the grace window returns a usable pair (the same pair, as
  the seed backend and django-oauth-toolkit do, or a new one, as Auth0 and Okta do);
* concurrent refreshes of one token all succeed or say ``rotation_in_progress``, and never
  end the session;
* a token two generations old is rejected (and whether that revokes the family);
* with ``--test-clock`` (a server exposing ``POST /_test/clock``), reuse after the window is
  rejected with ``token_expired`` / ``invalid_grant``.

For OAuth 2.0 without ``--token-url`` the URL is read as an issuer first: its discovery
document (OpenID Connect, else RFC 8414) names the token endpoint, and a row says what the
server offers (browser, device and password sign-in). A document that names another issuer
fails; a server without one is probed at ``URL/oauth/token``.

Each probe signs in afresh, so one probe's revocation cannot spoil the next. Tokens are never
printed; the table shows fingerprints and error codes only. The server is not trusted: every
piece of its text is escaped, cut short and scrubbed of every token the run sent or received
before it is printed, every body is read through the capped reader, and every number goes
through the one number parser.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final, Literal, TextIO

import aiohttp
from yarl import URL

from .._discovery import read_metadata
from .._errors import NetworkError, ProtocolError
from .._numbers import epoch_or_iso, epoch_seconds
from .._protocols import (
    AuthProtocol,
    DeviceInfo,
    HttpRequest,
    ManaProtocol,
    OAuth2Protocol,
    ServerMetadata,
    _load_json_object,
)
from .._terminal import printable
from .._tokens import Failure, FailureKind, TokenSet, fingerprint
from .._transport import NetworkFailure, Raw, send
from ._args import EXIT_USAGE, PROG, Formatter, Subparsers, at_least, finite_positive
from ._table import render_table

Protocol = Literal["mana", "oauth2"]
Outcome = Literal["pass", "fail", "skip", "info"]

#: The reference server's demo account and public OAuth client (the defaults of the command).
DEMO_EMAIL: Final = "demo@example.com"
DEMO_PASSWORD: Final = "demo"
DEMO_CLIENT_ID: Final = "tokenjournal-demo"
#: The grace window assumed for ``--test-clock`` when neither ``--grace`` nor the server says.
DEFAULT_GRACE: Final = 300.0
#: Codes that say "reused after the window" in each protocol.
AFTER_WINDOW_CODES: Final = frozenset({"token_expired", "invalid_grant"})


@dataclass(frozen=True, slots=True)
class ConformanceOptions:
    """What to probe and how to sign in. ``token_url`` defaults to ``{url}/oauth/token``."""

    url: str
    protocol: Protocol = "mana"
    username: str = DEMO_EMAIL
    password: str = field(default=DEMO_PASSWORD, repr=False)
    client_id: str = DEMO_CLIENT_ID
    client_secret: str | None = field(default=None, repr=False)
    token_url: str | None = None
    test_clock: bool = False
    grace: float | None = None
    concurrency: int = 10
    timeout: float = 15.0

    def __post_init__(self) -> None:
        url = URL(self.url)
        _refuse_userinfo(url, "the server URL")  # first: the messages below quote the URL
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"the server URL must be http(s)://host[:port], got {self.url!r}")
        if self.token_url is not None:
            _refuse_userinfo(URL(self.token_url), "--token-url")
        if self.protocol not in ("mana", "oauth2"):
            raise ValueError("protocol must be 'mana' or 'oauth2'")
        if self.concurrency < 2:
            raise ValueError("concurrency must be at least 2")
        if not 0 < self.timeout < math.inf:
            raise ValueError("timeout must be a positive finite number")
        if self.grace is not None and not 0 <= self.grace < math.inf:
            raise ValueError("grace must be a finite number >= 0")


def _refuse_userinfo(url: URL, what: str) -> None:
    """Refuse ``user:password@`` in a URL: the report would print it, and a password on a
    command line is readable by every user of the machine (``ps``) and kept in shell history.
    The message never repeats it."""
    if url.raw_user is not None or url.raw_password is not None:
        raise ValueError(
            f"{what} holds a user name or password (user:password@host), which the report "
            "would print; use --email/--username and --password-env VAR instead (a password "
            "on a command line is visible to every user in ps, and kept in shell history)"
        )


@dataclass(frozen=True, slots=True)
class Check:
    """One row of the table. Only ``required`` rows decide the exit status."""

    key: str
    title: str
    required: bool
    outcome: Outcome
    detail: str

    @property
    def passed(self) -> bool:
        """Whether this row counts as passed."""
        return self.outcome == "pass"


@dataclass(frozen=True, slots=True)
class ConformanceReport:
    """All rows, and the grace-replay style the server showed."""

    url: str
    protocol: Protocol
    replay_style: str  # "same pair", "new pair" or "none"
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        """Every required row passed."""
        return all(c.passed for c in self.checks if c.required)


@dataclass(frozen=True, slots=True)
class Reply:
    """One exchange: a pair, a classified failure, or no answer at all (``error``)."""

    answer: TokenSet | Failure | None
    error: str | None = None
    grace_expires_at: float | None = None

    @property
    def pair(self) -> TokenSet | None:
        """The pair, if the server sent one."""
        return self.answer if isinstance(self.answer, TokenSet) else None

    @property
    def failure(self) -> Failure | None:
        """The failure, if the server answered with one."""
        return self.answer if isinstance(self.answer, Failure) else None

    @property
    def permanent(self) -> bool:
        """The server said the token is dead."""
        failure = self.failure
        return failure is not None and failure.kind is FailureKind.PERMANENT

    def describe(self) -> str:
        """A short, token-free description."""
        if self.error is not None:
            return f"no answer ({self.error})"
        if isinstance(self.answer, Failure):
            return f"{self.answer.code} ({self.answer.status})"
        if isinstance(self.answer, TokenSet):
            return f"a pair (refresh token {fingerprint(self.answer.refresh_token)})"
        return "nothing"


class Probe:
    """The HTTP side: send protocol-built requests, parse answers with the same protocol."""

    def __init__(self, options: ConformanceOptions, http: aiohttp.ClientSession) -> None:
        self.options = options
        self.http = http
        base = options.url.rstrip("/")
        self.origin = str(URL(options.url).origin())
        self.protocol: AuthProtocol
        if options.protocol == "mana":
            self.protocol = ManaProtocol(base)
            self.credentials = {"email": options.username, "password": options.password}
        else:
            self.protocol = OAuth2Protocol(
                options.token_url or f"{base}/oauth/token",
                options.client_id,
                options.client_secret,
            )
            self.credentials = {"username": options.username, "password": options.password}
        self.device = DeviceInfo(
            str(uuid.uuid4()), "tokenjournal-conformance", "cli", "tokenjournal-conformance"
        )
        #: Every token sent or received, and the credentials: never printed, whatever the
        #: server echoes back in an error code.
        self.secrets: set[str] = {options.password}
        if options.client_secret:
            self.secrets.add(options.client_secret)

    def _remember(self, tokens: TokenSet | None) -> None:
        if tokens is not None:
            self.secrets.add(tokens.access_token)
            if tokens.refresh_token is not None:
                self.secrets.add(tokens.refresh_token)

    async def _send(self, request: HttpRequest) -> Raw:
        return await send(self.http, request, self.options.timeout)

    async def _exchange(self, request: HttpRequest, previous: TokenSet | None) -> Reply:
        self._remember(previous)
        try:
            status, headers, body = await self._send(request)
        except NetworkFailure as exc:
            return Reply(None, str(exc))
        except ValueError as exc:
            return Reply(None, type(exc).__name__)
        answer = self.protocol.parse_tokens(status, headers, body, time.time(), previous)
        grace_at = None
        if isinstance(answer, TokenSet):
            self._remember(answer)
            data = _load_json_object(body)
            if data is not None:  # ISO 8601 or a number, in seconds or milliseconds
                grace_at = epoch_or_iso(data.get("grace_expires_at"))
        return Reply(answer, grace_expires_at=grace_at)

    async def sign_in(self) -> Reply:
        """Sign in with the configured credentials."""
        request = self.protocol.build_sign_in(self.credentials, self.device)
        return await self._exchange(request, None)

    async def refresh(self, tokens: TokenSet) -> Reply:
        """Spend ``tokens.refresh_token`` once."""
        return await self._exchange(self.protocol.build_refresh(tokens, self.device), tokens)

    async def clock(self, advance: float | None = None) -> tuple[float | None, str | None]:
        """Read (GET) or advance (POST) the server's test clock: ``(now, error)``."""
        url = f"{self.origin}/_test/clock"
        accept = (("Accept", "application/json"),)
        if advance is None:
            request = HttpRequest("GET", url, accept, b"")
        else:
            body = json.dumps({"advance": advance}).encode()
            request = HttpRequest(
                "POST", url, (*accept, ("Content-Type", "application/json")), body
            )
        try:  # the capped reader: an endless body is cut at MAX_BODY, not buffered whole
            status, _, raw = await self._send(request)
        except NetworkFailure as exc:
            return None, f"/_test/clock failed ({exc})"
        except ValueError as exc:
            return None, f"/_test/clock failed ({type(exc).__name__})"
        if status != 200:
            return None, f"{request.method} /_test/clock answered {status}"
        data = _load_json_object(raw)
        now = epoch_seconds(data.get("now")) if data is not None else None
        if now is None:
            return None, f"{request.method} /_test/clock answered no usable 'now'"
        return now, None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _row(key: str, title: str, required: bool, ok: bool, detail: str) -> Check:
    return Check(key, title, required, "pass" if ok else "fail", detail)


class _Run:
    """One conformance run: the probes in order, each on its own fresh sign-in."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.options = probe.options
        self.checks: list[Check] = []
        self.replay_style = "none"
        self.grace_bound: float | None = None  # from a Mana replay's grace_expires_at

    def add(self, check: Check) -> None:
        self.checks.append(check)

    async def fresh_pair(self, key: str) -> TokenSet | None:
        reply = await self.probe.sign_in()
        if reply.pair is None:
            self.add(_row(key, "sign-in for this probe", True, False, reply.describe()))
        return reply.pair

    async def rotation_and_replay(self) -> bool:
        reply = await self.probe.sign_in()
        self.add(_row("signin", "sign-in works", True, reply.pair is not None, reply.describe()))
        p0 = reply.pair
        if p0 is None:
            return False
        # The server's time just before the rotation: with a Mana replay's grace_expires_at
        # it bounds the grace window from above, so --test-clock can step past it.
        server_now, _ = await self.probe.clock() if self.options.test_clock else (None, None)
        r1 = await self.probe.refresh(p0)
        p1 = r1.pair
        if p1 is None:
            self.add(
                _row(
                    "rotation",
                    "refresh rotates the refresh token",
                    True,
                    False,
                    f"refresh answered {r1.describe()}",
                )
            )
            return True
        rotated = p1.refresh_token != p0.refresh_token
        self.add(
            _row(
                "rotation",
                "refresh rotates the refresh token",
                True,
                rotated,
                f"{fingerprint(p0.refresh_token)} -> {fingerprint(p1.refresh_token)}"
                if rotated
                else "the answer kept the same refresh token (no rotation, so no grace window)",
            )
        )
        replay = await self.probe.refresh(p0)
        pr = replay.pair
        if pr is None:
            self.add(
                _row(
                    "replay",
                    "replay inside the grace window gives a usable pair",
                    True,
                    False,
                    f"the old token, replayed at once, got {replay.describe()}",
                )
            )
        else:
            same = pr.refresh_token == p1.refresh_token
            self.replay_style = "same pair" if same else "new pair"
            used = await self.probe.refresh(pr)
            self.add(
                _row(
                    "replay",
                    "replay inside the grace window gives a usable pair",
                    True,
                    used.pair is not None,
                    f"{self.replay_style}; it then refreshed"
                    if used.pair is not None
                    else f"{self.replay_style}, but refreshing it got {used.describe()}",
                )
            )
            if replay.grace_expires_at is not None and server_now is not None:
                self.grace_bound = replay.grace_expires_at - server_now
        self.add(Check("replay_style", "grace-replay style", False, "info", self.replay_style))
        return True

    async def concurrent(self) -> None:
        n = self.options.concurrency
        title = f"{n} concurrent refreshes of one token keep the session"
        p0 = await self.fresh_pair("concurrent")
        if p0 is None:
            return
        replies = await asyncio.gather(*(self.probe.refresh(p0) for _ in range(n)))
        pairs = [r.pair for r in replies if r.pair is not None]
        conflicts = [
            r for r in replies if r.failure is not None and r.failure.kind is FailureKind.CONFLICT
        ]
        bad = [
            r
            for r in replies
            if r.pair is None and (r.failure is None or r.failure.kind is not FailureKind.CONFLICT)
        ]
        distinct = len({p.refresh_token for p in pairs})
        detail = (
            f"{_count(len(pairs), 'pair')} ({distinct} distinct), "
            f"{len(conflicts)} rotation_in_progress"
        )
        if bad:
            codes = sorted({r.describe() for r in bad})
            self.add(
                _row(
                    "concurrent",
                    title,
                    True,
                    False,
                    f"{detail}, {len(bad)} failed: {', '.join(codes)}",
                )
            )
            return
        # The family must still work: the token replays once more and its answer refreshes.
        again = await self.probe.refresh(p0)
        after = await self.probe.refresh(again.pair) if again.pair is not None else again
        alive = again.pair is not None and after.pair is not None
        self.add(
            _row(
                "concurrent",
                title,
                True,
                alive and bool(pairs),
                f"{detail}; the family still refreshes"
                if alive
                else f"{detail}; afterwards the family is dead: {after.describe()}",
            )
        )

    async def two_generations(self) -> None:
        title = "a token two generations old is rejected"
        q0 = await self.fresh_pair("two_generations")
        if q0 is None:
            return
        r1 = await self.probe.refresh(q0)
        r2 = await self.probe.refresh(r1.pair) if r1.pair is not None else r1
        if r2.pair is None:
            self.add(
                _row(
                    "two_generations",
                    title,
                    True,
                    False,
                    f"could not rotate twice: {r2.describe()}",
                )
            )
            return
        old = await self.probe.refresh(q0)
        if old.pair is not None:
            detail = "accepted: the server handed out a pair for it"
        elif old.permanent:
            detail = f"rejected: {old.describe()}"
        else:
            detail = f"not rejected as dead: {old.describe()}"
        self.add(_row("two_generations", title, True, old.permanent, detail))
        if old.permanent:
            newest = await self.probe.refresh(r2.pair)
            self.add(
                Check(
                    "two_generations_revokes",
                    "that reuse revokes the whole family",
                    False,
                    "info",
                    f"yes: the newest token got {newest.describe()}"
                    if newest.pair is None
                    else "no: the newest token still refreshes",
                )
            )

    async def after_window(self) -> None:
        title = "reuse after the grace window is rejected"
        if not self.options.test_clock:
            self.add(
                Check(
                    "after_window",
                    title,
                    False,
                    "skip",
                    "needs --test-clock (a server with POST /_test/clock)",
                )
            )
            return
        w0 = await self.fresh_pair("after_window")
        if w0 is None:
            return
        w1 = await self.probe.refresh(w0)
        if w1.pair is None:
            self.add(_row("after_window", title, True, False, f"could not rotate: {w1.describe()}"))
            return
        if self.options.grace is not None:
            grace, source = self.options.grace, "--grace"
        elif self.grace_bound is not None:
            grace, source = max(0.0, round(self.grace_bound, 1)), "from grace_expires_at"
        else:
            grace, source = DEFAULT_GRACE, "assumed"
        advance = grace + 1.0
        _, error = await self.probe.clock(advance)
        if error is not None:
            self.add(_row("after_window", title, True, False, error))
            return
        old = await self.probe.refresh(w0)
        code = old.failure.code if old.failure is not None else None
        ok = old.permanent and code in AFTER_WINDOW_CODES
        self.add(
            _row(
                "after_window",
                title,
                True,
                ok,
                f"clock +{advance:g} s (grace {grace:g} s, {source}): {old.describe()}",
            )
        )
        if old.permanent:
            newest = await self.probe.refresh(w1.pair)
            self.add(
                Check(
                    "after_window_revokes",
                    "that reuse revokes the whole family",
                    False,
                    "info",
                    f"yes: the newest token got {newest.describe()}"
                    if newest.pair is None
                    else "no: the newest token still refreshes",
                )
            )


async def run_conformance(options: ConformanceOptions) -> ConformanceReport:
    """Run every probe against ``options.url`` and return the report (no printing).

    Every detail is made printable at the end, when every token of the run is known: a
    server may echo in an error code a token it hands out only later.
    """
    found: Check | None = None
    if options.protocol == "oauth2" and options.token_url is None:
        options, found = await _discover(options)
    async with aiohttp.ClientSession() as http:
        probe = Probe(options, http)
        run = _Run(probe)
        if found is not None:
            run.add(found)
        # A document that speaks for another server: nothing of it is probed.
        refused = found is not None and found.required and not found.passed
        if not refused and await run.rotation_and_replay():
            await run.concurrent()
            await run.two_generations()
            await run.after_window()  # last: it moves the server's clock
    checks = tuple(
        replace(c, detail=printable(c.detail, limit=DETAIL_LIMIT, secrets=probe.secrets))
        for c in run.checks
    )
    return ConformanceReport(options.url, options.protocol, run.replay_style, checks)


async def _discover(options: ConformanceOptions) -> tuple[ConformanceOptions, Check]:
    """Read ``options.url`` as an issuer: the token endpoint, and a row on what it offers."""
    title = "discovery document"
    try:
        metadata = await read_metadata(
            options.url, max_age=0.0, request_timeout=options.timeout, allow_insecure_http=True
        )
    except ProtocolError as exc:
        if "issuer_mismatch" in str(exc):
            detail = "the document names another issuer; nothing of it is used"
            return options, Check("discovery", title, True, "fail", detail)
        detail = f"none usable ({exc}); probing URL/oauth/token"
        return options, Check("discovery", title, False, "info", detail)
    except (NetworkError, ValueError) as exc:
        return options, Check("discovery", title, False, "info", f"none ({exc})")
    return replace(options, token_url=metadata.token_endpoint), Check(
        "discovery", title, False, "info", _offers(metadata)
    )


def _offers(metadata: ServerMetadata) -> str:
    """Which sign-ins the document says the server allows."""
    grants = set(metadata.grant_types_supported)
    browser = metadata.authorization_endpoint is not None and (
        not grants or "authorization_code" in grants
    )
    pkce = "S256" in metadata.code_challenge_methods_supported
    device = metadata.device_authorization_endpoint is not None
    offers = [
        f"browser{' (PKCE S256)' if pkce else ' (no S256 listed)'}" if browser else None,
        "device" if device else None,
        "password" if "password" in grants else None,
    ]
    said = ", ".join(o for o in offers if o) or "no sign-in listed"
    revocation = "yes" if metadata.revocation_endpoint else "no"
    return f"token endpoint {metadata.token_endpoint}; sign-in: {said}; revocation: {revocation}"


_MARK: Final = {"pass": "PASS", "fail": "FAIL", "skip": "skip", "info": "note"}
#: The longest detail cell: several server codes may share one.
DETAIL_LIMIT: Final = 200


def render_text(report: ConformanceReport) -> str:
    """The pass/fail table and the verdict."""
    rows = [
        (
            printable(c.title),
            "required" if c.required else "info",
            _MARK[c.outcome],
            printable(c.detail, limit=DETAIL_LIMIT),
        )
        for c in report.checks
    ]
    required = [c for c in report.checks if c.required]
    failed = [c for c in required if not c.passed]
    verdict = (
        f"PASS: all {len(required)} required checks passed"
        if not failed
        else f"FAIL: {len(failed)} of {len(required)} required checks failed"
    )
    return "\n".join(
        [
            f"tokenjournal conformance  {printable(report.url)}  ({report.protocol})",
            "",
            render_table(("check", "kind", "result", "detail"), rows),
            "",
            f"grace-replay style: {report.replay_style}",
            verdict,
        ]
    )


def as_json(report: ConformanceReport) -> dict[str, Any]:
    """The machine-readable report."""
    data = asdict(report)
    data["ok"] = report.ok
    return data


def main(
    options: ConformanceOptions, *, json_output: bool = False, out: TextIO | None = None
) -> int:
    """The `conformance` command: print the table; 0 only if every required row passed."""
    out = out or sys.stdout
    try:
        report = asyncio.run(run_conformance(options))
    except Exception as exc:  # a server found a path nobody foresaw: one line, no traceback
        print(
            f"tokenjournal conformance: the run failed ({type(exc).__name__}); "
            f"no verdict for {printable(options.url)}",
            file=sys.stderr,
        )
        return 1
    if json_output:
        out.write(json.dumps(as_json(report), indent=2) + "\n")
    else:
        out.write(render_text(report) + "\n")
    return 0 if report.ok else 1


DESCRIPTION: Final = """\
Probe an auth server for the behaviours the SDK relies on and print a pass/fail table:

  required     sign-in works; a refresh rotates the refresh token; the old token
               replayed inside the grace window returns a usable pair; N concurrent
               refreshes of one token all succeed or answer rotation_in_progress and
               never end the session; a token two generations old is rejected; with
               --test-clock, reuse after the window is rejected with token_expired
               (Mana) or invalid_grant (OAuth 2.0)
  informative  the grace-replay style (same pair / new pair / none); whether a reuse
               revokes the whole token family

Each probe signs in afresh. The defaults fit the reference server's demo account. With
--test-clock the server's clock is moved forward (POST /_test/clock), so use it only on a
test server. Exit status 0 only if every required check passes."""

EPILOG: Final = """\
examples:
  tokenjournal conformance http://127.0.0.1:8787 --test-clock
  tokenjournal conformance http://127.0.0.1:8787 --protocol oauth2 --test-clock
  tokenjournal conformance https://sso.example.com/realms/acme --protocol oauth2 \\
      --client-id myapp --username me --password-env MY_PASSWORD   # endpoints by discovery
  tokenjournal conformance https://auth.example.com --email me@example.com \\
      --password-env MY_PASSWORD
  tokenjournal conformance https://idp.example.com --protocol oauth2 \\
      --token-url https://idp.example.com/realms/x/protocol/openid-connect/token \\
      --client-id myapp --client-secret-env MY_SECRET --username me --password-env MY_PASSWORD"""


def register(sub: Subparsers) -> None:
    """Add ``conformance`` and its options to the command line."""
    conf = sub.add_parser(
        "conformance",
        help="check that an auth server keeps the promises the SDK relies on",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    conf.add_argument(
        "url", metavar="URL", help="the server's base URL, e.g. http://127.0.0.1:8787"
    )
    conf.add_argument(
        "--protocol",
        choices=("mana", "oauth2"),
        default="mana",
        help="wire protocol (default mana)",
    )
    who = conf.add_argument_group("credentials (defaults: the reference server's demo account)")
    who.add_argument(
        "--email",
        "--username",
        dest="username",
        default=DEMO_EMAIL,
        metavar="NAME",
        help=f"Mana email or OAuth username (default {DEMO_EMAIL})",
    )
    who.add_argument(
        "--password", default=None, help="password (default demo; prefer --password-env)"
    )
    who.add_argument(
        "--password-env", metavar="VAR", help="read the password from this environment variable"
    )
    who.add_argument(
        "--client-id",
        metavar="ID",
        help=f"OAuth client id (default {DEMO_CLIENT_ID}, a public client)",
    )
    who.add_argument(
        "--client-secret",
        metavar="S",
        help="OAuth client secret, sent with HTTP Basic (prefer --client-secret-env)",
    )
    who.add_argument(
        "--client-secret-env",
        metavar="VAR",
        help="read the client secret from this environment variable",
    )
    conf.add_argument(
        "--token-url",
        metavar="URL",
        help="OAuth token endpoint (default: from URL's discovery document, else URL/oauth/token)",
    )
    conf.add_argument(
        "--test-clock",
        action="store_true",
        help="the server has POST /_test/clock: also check reuse after the "
        "window (moves the server's clock!)",
    )
    conf.add_argument(
        "--grace",
        type=float,
        metavar="SECONDS",
        help="the server's grace window, for --test-clock (default: from "
        "grace_expires_at, else 300)",
    )
    conf.add_argument(
        "--concurrency",
        type=at_least(2),
        default=10,
        metavar="N",
        help="refreshes sent at once in the concurrency check (default 10)",
    )
    conf.add_argument(
        "--timeout",
        type=finite_positive,
        default=15.0,
        metavar="SECONDS",
        help="per request (default 15)",
    )
    conf.add_argument("--json", action="store_true", help="machine-readable output")
    conf.set_defaults(handler=command)


def _secret(value: str | None, env_name: str | None, flag: str) -> str | None:
    if env_name is None:
        return value
    if env_name not in os.environ:
        raise ValueError(f"{flag}: the environment variable {env_name} is not set")
    return os.environ[env_name]


def command(ns: argparse.Namespace) -> int:
    """``tokenjournal conformance`` as parsed by :func:`register`: checked, then :func:`main`."""
    if ns.protocol == "mana" and (
        ns.client_id or ns.client_secret or ns.client_secret_env or ns.token_url
    ):
        print(
            f"{PROG} conformance: --client-id, --client-secret and --token-url need "
            f"--protocol oauth2",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        password = _secret(ns.password, ns.password_env, "--password-env")
        secret = _secret(ns.client_secret, ns.client_secret_env, "--client-secret-env")
        options = ConformanceOptions(
            url=ns.url,
            protocol=ns.protocol,
            username=ns.username,
            password=password if password is not None else DEMO_PASSWORD,
            client_id=ns.client_id or DEMO_CLIENT_ID,
            client_secret=secret,
            token_url=ns.token_url,
            test_clock=ns.test_clock,
            grace=ns.grace,
            concurrency=ns.concurrency,
            timeout=ns.timeout,
        )
    except ValueError as exc:
        print(f"{PROG} conformance: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return main(options, json_output=ns.json)
