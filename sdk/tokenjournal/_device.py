"""The OAuth 2.0 Device Authorization Grant (RFC 8628), journaled so a reboot keeps the code.

A kiosk or IoT box shows a code, a person approves it on a phone, the device polls. The
pending device code is written to the journal before it is shown: a process restarted
during the wait resumes polling the same code (and shows it again) until it expires.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Final

from ._errors import ProtocolError, SignInFailed
from ._protocols import DeviceCode, Failure, FailureKind, OAuth2Protocol
from ._tokens import TokenSet

from ._manager import _NetworkFailure

if TYPE_CHECKING:
    from ._manager import TokenManager

log = logging.getLogger("tokenjournal")

#: RFC 8628 3.5: on ``slow_down`` the interval grows by 5 seconds.
SLOW_DOWN_STEP: Final = 5.0


def _decode(payload: str | None) -> DeviceCode | None:
    try:
        return DeviceCode(**json.loads(payload or ""))
    except (ValueError, TypeError):
        return None  # an unreadable pending code is simply not resumed


async def _pending_code(manager: TokenManager, protocol: OAuth2Protocol) -> DeviceCode:
    now = manager._clock.time()
    record = await manager.journal.load(manager.account)
    if record.intent is not None and record.intent.kind == "device_code":
        code = _decode(record.intent.payload)
        if code is not None and code.expires_at > now:
            log.info("resuming a pending device sign-in of account %s", manager.account)
            return code
    status, headers, body = await manager._send(protocol.build_device_authorization())
    parsed = protocol.parse_device_authorization(status, headers, body, manager._clock.time())
    if isinstance(parsed, Failure):
        if parsed.kind in (FailureKind.PERMANENT, FailureKind.REJECTED):
            raise SignInFailed(parsed.code)
        raise ProtocolError(f"device authorization failed: {parsed.code} ({parsed.status})")
    await manager.journal.save_device_code(
        manager.account, json.dumps(asdict(parsed)), manager._clock.time()
    )
    return parsed


async def run_device_flow(
    manager: TokenManager,
    protocol: OAuth2Protocol,
    on_code: Callable[[DeviceCode], Awaitable[None] | None],
) -> TokenSet:
    """Show the code through ``on_code``, poll until approved; returns the new pair."""
    code = await _pending_code(manager, protocol)
    shown = on_code(code)
    if inspect.isawaitable(shown):
        await shown
    attempt = 0
    while True:
        await manager._clock.sleep(code.interval)
        if manager._clock.time() >= code.expires_at:
            await manager.journal.clear_device_code(manager.account)
            raise SignInFailed("expired_token", "the device code expired before it was approved")
        try:
            status, headers, body = await manager._send(protocol.build_device_token(code.device_code))
        except _NetworkFailure as exc:  # keep polling the same code until it expires
            log.info("device poll failed (%s); polling on", exc)
            continue
        answer = protocol.parse_tokens(status, headers, body, manager._clock.time(), None)
        if isinstance(answer, TokenSet):
            return answer  # storing it clears the journaled device code in the same transaction
        if answer.kind is FailureKind.PENDING:
            continue
        if answer.kind is FailureKind.SLOW_DOWN:
            code = replace(code, interval=code.interval + SLOW_DOWN_STEP)
            continue
        if answer.kind in (FailureKind.PERMANENT, FailureKind.REJECTED):
            await manager.journal.clear_device_code(manager.account)
            raise SignInFailed(answer.code)
        attempt += 1  # 5xx, 429, malformed: wait a poll interval more, as RFC 8628 asks
        code = replace(code, interval=code.interval + min(attempt, 5))
