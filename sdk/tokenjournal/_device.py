"""The OAuth 2.0 Device Authorization Grant (RFC 8628), journaled so a reboot keeps the code.

A kiosk or IoT box shows a code, a person approves it on a phone, the device polls. The
pending device code is written to the journal before it is shown: a process restarted
during the wait resumes polling the same code (and shows it again) until it expires.

What cannot be recovered: a crash after the server issued the tokens but before the
journal stored them. The device code is single use, so the next poll gets
``invalid_grant`` and the person has to approve a new code.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import Final

from ._clock import Clock
from ._errors import CODE_LIMIT, DESCRIPTION_LIMIT, SignInFailed
from ._journal import Journal
from ._protocols import DeviceCode, Failure, FailureKind, HttpRequest, OAuth2Protocol
from ._retry import RetryPolicy, attempts, is_retryable
from ._terminal import printable
from ._tokens import TokenSet
from ._transport import NetworkFailure, Raw

log = logging.getLogger("tokenjournal")

#: RFC 8628 3.5: on ``slow_down`` the interval grows by 5 seconds, for good.
SLOW_DOWN_STEP: Final = 5.0
#: After failed polls (network, 5xx, 429) the wait doubles, but never exceeds the interval
#: by more than this: RFC 8628 3.5 asks for backoff, and the code still has to be polled
#: before it expires.
MAX_EXTRA_WAIT: Final = 60.0

OnCode = Callable[[DeviceCode], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class DeviceIO:
    """What the flow needs of its manager, handed in: one exchange (no answer is a
    :class:`NetworkFailure`), a pause that ``close()`` cuts short (``False``: closed), the
    clock, the journal and account the code is kept under, and the retry policy."""

    send: Callable[[HttpRequest], Awaitable[Raw]]
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


def _refusal(failure: Failure, secrets: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """The server's code and description made printable, short and free of the device code:
    the flow parses its answers itself, past the manager's scrub (invariant 8)."""
    code = printable(failure.code, limit=CODE_LIMIT, secrets=secrets)
    said = failure.description
    if said is not None:
        said = printable(said, limit=DESCRIPTION_LIMIT, secrets=secrets)
    return code, said


async def _authorize(io: DeviceIO, protocol: OAuth2Protocol) -> DeviceCode:
    """RFC 8628 3.1 under the retry policy: transient failures are retried."""
    request = protocol.build_device_authorization()
    loop = attempts(io.retry, io.clock.monotonic, io.pause, what="device authorization")
    async for attempt in loop:
        try:
            status, headers, body = await io.send(request)
        except NetworkFailure as exc:
            attempt.failed(None, str(exc))
            continue
        parsed = protocol.parse_device_authorization(status, headers, body, io.clock.time())
        if isinstance(parsed, DeviceCode):
            return parsed
        if not is_retryable(parsed):
            code, said = _refusal(parsed)
            raise SignInFailed(code, description=said)
        attempt.failed(parsed, parsed.code)
    raise AssertionError("the retry loop ends by raising")  # pragma: no cover


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
    shown = on_code(code)
    if inspect.isawaitable(shown):
        await shown
    failures = 0  # consecutive polls that got no usable answer
    extra = 0.0  # what a Retry-After asked for beyond the interval
    while True:
        backoff = min(code.interval * 2**failures, code.interval + MAX_EXTRA_WAIT)
        # A Retry-After or slow_down is honoured, but never past the code's expiry: a
        # server asking for a day must not keep the flow asleep long after the code died.
        left = code.expires_at - clock.time()
        if not await io.pause(min(max(backoff, extra), max(0.0, left))):
            raise RuntimeError(
                "the TokenManager was closed during the device sign-in; the code stays "
                "journaled and the next sign_in_device resumes it"
            )
        if clock.time() >= code.expires_at:
            raise await _give_up(io, "expired_token", "the device code expired unapproved")
        poll = protocol.build_device_token(code.device_code)
        try:
            status, headers, body = await io.send(poll)
        except NetworkFailure as exc:  # keep polling the same code until it expires
            log.info("device poll failed (%s); polling on", exc)
            failures, extra = failures + 1, 0.0
            continue
        answer = protocol.parse_tokens(status, headers, body, clock.time(), None)
        if isinstance(answer, TokenSet):
            return answer
        if answer.kind is FailureKind.PENDING:
            failures, extra = 0, 0.0
        elif answer.kind is FailureKind.SLOW_DOWN:
            interval = max(code.interval + SLOW_DOWN_STEP, answer.retry_after or 0.0)
            code = replace(code, interval=interval)
            failures, extra = 0, 0.0
            # Journaled, so a restart polls at the slower pace the server asked for.
            await io.journal.save_device_code(io.account, _encode(protocol, code), clock.time())
        elif answer.kind in (FailureKind.PERMANENT, FailureKind.REJECTED):
            refused, said = _refusal(answer, (code.device_code,))
            raise await _give_up(io, refused, description=said)
        else:  # 5xx, 429, malformed: back off, as RFC 8628 3.5 asks
            failures, extra = failures + 1, answer.retry_after or 0.0
            log.info("device poll failed (%s); polling on", answer.code)
