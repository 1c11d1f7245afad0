"""The OAuth 2.0 Device Authorization Grant (RFC 8628), journaled so a reboot keeps the code.

A kiosk or IoT box shows a code, a person approves it on a phone, the device polls. The
pending device code is written to the journal before it is shown: a process restarted
during the wait resumes polling the same code (and shows it again) until it expires.

What cannot be recovered: a crash after the server issued the tokens but before the
journal stored them. The device code is single use, so the next poll gets
``invalid_grant`` and the person has to approve a new code. (A cancelled caller is not a
crash: the manager's store of the pair runs to its end.)
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Final, Protocol, TypeVar

from ._clock import Clock
from ._errors import ProtocolError, SignInFailed, TransientError
from ._journal import Journal
from ._protocols import DeviceCode, HttpRequest, OAuth2Protocol
from ._retry import RetryPolicy
from ._tokens import Failure, FailureKind, TokenSet

log = logging.getLogger("tokenjournal")

#: RFC 8628 3.5: on ``slow_down`` the interval grows by 5 seconds, for good.
SLOW_DOWN_STEP: Final = 5.0
#: After failed polls (network, 5xx, 429) the wait doubles, but never exceeds the interval
#: by more than this: RFC 8628 3.5 asks for backoff, and the code still has to be polled
#: before it expires.
MAX_EXTRA_WAIT: Final = 60.0
#: The shortest poll interval the flow keeps, whatever the server says.
MIN_INTERVAL: Final = 1.0

_A = TypeVar("_A")

OnCode = Callable[[DeviceCode], Awaitable[None] | None]


class Exchange(Protocol):
    """The manager's one way to call the auth server: build, send, parse, through the one
    retry loop under ``policy``; a non-retryable failure comes back, a spent budget raises."""

    def __call__(
        self,
        build: Callable[[], HttpRequest],
        parse: Callable[[int, Mapping[str, str], bytes], _A | Failure],
        *,
        policy: RetryPolicy | None = None,
        secrets: Iterable[str] = (),
        what: str = "auth call",
    ) -> Awaitable[_A | Failure]: ...


@dataclass(frozen=True, slots=True)
class DeviceIO:
    """What the flow needs of its manager, handed in: its exchange, a pause that
    ``close()`` cuts short (``False``: closed), the clock, the journal and account the code
    is kept under, and the retry policy."""

    exchange: Exchange
    pause: Callable[[float], Awaitable[bool]]
    clock: Clock
    journal: Journal
    account: str
    retry: RetryPolicy


def _encode(protocol: OAuth2Protocol, code: DeviceCode) -> str:
    # The client and endpoint go with the code: a code issued to another client is not resumed.
    return json.dumps(
        {"client_id": protocol.client_id, "token_url": protocol.token_url, "code": asdict(code)}
    )


def _decode(protocol: OAuth2Protocol, payload: str | None) -> DeviceCode | None:
    try:
        data = json.loads(payload or "")
        if data["client_id"] != protocol.client_id or data["token_url"] != protocol.token_url:
            return None
        return DeviceCode(**data["code"])
    except (ValueError, TypeError, KeyError):
        return None  # an unreadable pending code is simply not resumed


async def _authorize(io: DeviceIO, protocol: OAuth2Protocol) -> DeviceCode:
    """RFC 8628 3.1 under the retry policy: transient failures are retried."""
    request = protocol.build_device_authorization()
    parsed = await io.exchange(
        lambda: request,
        lambda status, headers, body: protocol.parse_device_authorization(
            status, headers, body, io.clock.time()
        ),
        what="device authorization",
    )
    if isinstance(parsed, DeviceCode):
        return parsed
    raise SignInFailed(parsed.code, description=parsed.description)


def _poll_policy(retry: RetryPolicy, code: DeviceCode, left: float) -> RetryPolicy:
    """Failed polls (no answer, 5xx, 429, malformed) back off as RFC 8628 3.5 asks: the
    wait doubles from twice the interval up to the interval plus ``MAX_EXTRA_WAIT``, with no
    jitter (the standard fixes the pace), and the code's remaining life (``left``
    seconds) is the budget."""
    interval = max(code.interval, MIN_INTERVAL)
    return replace(
        retry,
        max_attempts=sys.maxsize,
        max_elapsed=max(left, MIN_INTERVAL),
        base_delay=2 * interval,
        max_delay=interval + MAX_EXTRA_WAIT,
        jitter=False,
    )


async def _pending_code(io: DeviceIO, protocol: OAuth2Protocol) -> DeviceCode:
    """The journaled code if it is still alive, else a new one, journaled before it is shown."""
    record = await io.journal.load(io.account)
    if record.intent is not None and record.intent.kind == "device_code":
        code = _decode(protocol, record.intent.payload)
        if code is not None and code.expires_at > io.clock.time():
            log.info("resuming a pending device sign-in of account %s", io.account)
            return code
    code = await _authorize(io, protocol)
    await io.journal.save_device_code(io.account, _encode(protocol, code), io.clock.time())
    return code


async def _give_up(
    io: DeviceIO, code: str, message: str | None = None, description: str | None = None
) -> SignInFailed:
    await io.journal.clear_device_code(io.account)
    return SignInFailed(code, message, description=description)


async def run_device_flow(io: DeviceIO, protocol: OAuth2Protocol, on_code: OnCode) -> TokenSet:
    """Show the code through ``on_code``, poll until approved; returns the new pair.

    The caller stores the pair; storing it clears the journaled code in the same
    transaction. ``SignInFailed`` carries ``access_denied``, ``expired_token`` or the
    server's code; the journaled code is then forgotten, so the next call starts afresh.
    Closing the manager during the wait raises ``RuntimeError`` and keeps the code.
    """
    clock = io.clock
    code = await _pending_code(io, protocol)
    # The code's life runs on the monotonic clock from here on (the journal keeps the wall
    # time, all a restart has): a box without a real-time clock steps its wall clock at its
    # first NTP sync, which is when a device sign-in runs, and that must not expire a code
    # the person is approving (docs/architecture.md 1.4: lifetimes are monotonic).
    deadline = clock.monotonic() + (code.expires_at - clock.time())
    shown = on_code(code)
    if inspect.isawaitable(shown):
        await shown
    extra = 0.0  # beyond the interval: inf once the retry loop gave up before the expiry
    while True:
        # A Retry-After or slow_down is honoured, but never past the code's expiry: a
        # server asking for a day must not keep the flow asleep long after the code died.
        left = deadline - clock.monotonic()
        if not await io.pause(min(max(code.interval, extra), max(0.0, left))):
            raise RuntimeError(
                "the TokenManager was closed during the device sign-in; the code stays "
                "journaled and the next sign_in_device resumes it"
            )
        left = deadline - clock.monotonic()
        if left <= 0:
            raise await _give_up(io, "expired_token", "the device code expired unapproved")
        extra = 0.0
        try:
            answer = await io.exchange(
                functools.partial(protocol.build_device_token, code.device_code),
                lambda status, headers, body: protocol.parse_tokens(
                    status, headers, body, clock.time(), None
                ),
                policy=_poll_policy(io.retry, code, left),
                secrets=(code.device_code,),
                what="device poll",
            )
        except (TransientError, ProtocolError):
            # The next wait the retry loop was asked for (a backoff, a Retry-After) would
            # pass the code's expiry, or the manager closed: wait out the code, which ends it.
            extra = math.inf
            continue
        if isinstance(answer, TokenSet):
            return answer
        if answer.kind is FailureKind.SLOW_DOWN:
            interval = max(code.interval + SLOW_DOWN_STEP, answer.retry_after or 0.0)
            code = replace(code, interval=interval)
            # Journaled, so a restart polls at the slower pace the server asked for.
            await io.journal.save_device_code(io.account, _encode(protocol, code), clock.time())
        elif answer.kind is not FailureKind.PENDING:  # denied, expired, refused
            raise await _give_up(io, answer.code, description=answer.description)
