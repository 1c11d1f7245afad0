"""The demo's client process: a real OS process the demo can SIGKILL mid-refresh.

    python -m tokenjournal.cli._demo_client --url URL --journal PATH refresh
    python -m tokenjournal.cli._demo_client --url URL --journal PATH recover

``refresh`` forces one refresh (the demo kills the process while the server holds the
answer back). ``recover`` opens the same journal, lets the manager replay the interrupted
refresh, then calls ``GET /api/me``. Everything the process has to say goes to stdout as
JSON lines (``ready``, ``event``, ``log``, ``result``) with fingerprints only, never a token.
Exit status: 0 when the session works, 3 when the server ended it, 1 on any other failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any, Final

from .._errors import SessionEnded, TokenJournalError
from .._events import EventKind, TokenEvent
from .._manager import TokenManager
from .._retry import RetryPolicy
from .._tokens import fingerprint

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_ENDED: Final = 3
#: Longest wait for the recovery's outcome; far beyond what the demo needs.
RECOVERY_TIMEOUT: Final = 30.0
_SETTLED: Final = frozenset(
    {EventKind.REFRESHED, EventKind.ADOPTED, EventKind.ENDED, EventKind.REFRESH_FAILED}
)


def say(line_type: str, **fields: Any) -> None:
    """One JSON line to the demo (flushed: the demo may kill us the next instant)."""
    sys.stdout.write(json.dumps({"type": line_type, **fields}) + "\n")
    sys.stdout.flush()


class _JsonLines(logging.Handler):
    """Forward the SDK's log records (token-free by design) to the demo."""

    def emit(self, record: logging.LogRecord) -> None:
        say("log", level=record.levelname, message=record.getMessage())


async def _run(ns: argparse.Namespace) -> int:
    tm = TokenManager(
        ns.url,
        ns.journal,
        account=ns.account,
        grace_period=ns.grace,
        retry=RetryPolicy(base_delay=0.05, max_delay=0.5),
    )
    recovering = asyncio.Event()
    settled = asyncio.Event()

    def on_event(event: TokenEvent) -> None:
        say(
            "event",
            kind=event.kind.value,
            state=event.state.value,
            fingerprint=event.fingerprint,
            code=event.code,
        )
        if event.kind is EventKind.RECOVERING:
            recovering.set()
        if event.kind in _SETTLED:
            settled.set()

    tm.subscribe(on_event)  # before open(): the recovery starts inside it
    async with tm:
        say(
            "ready",
            pid=os.getpid(),
            refresh_fingerprint=fingerprint(tm.tokens.refresh_token if tm.tokens else None),
        )
        if ns.action == "refresh":
            tokens = await tm.refresh()
            say("result", outcome="ok", fingerprint=fingerprint(tokens.access_token))
            return EXIT_OK
        if recovering.is_set():
            await asyncio.wait_for(settled.wait(), RECOVERY_TIMEOUT)
        try:
            async with tm.client_session() as http, http.get(f"{ns.url}/api/me") as response:
                await response.read()
                status = response.status
        except SessionEnded as exc:
            say("result", outcome="session_ended", code=exc.code, message=str(exc))
            return EXIT_ENDED
        fp = fingerprint(tm.tokens.access_token if tm.tokens else None)
        say(
            "result",
            outcome="ok" if status == 200 else "api_error",
            api_status=status,
            fingerprint=fp,
            recovered=recovering.is_set(),
        )
        return EXIT_OK if status == 200 else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """Run one client action; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m tokenjournal.cli._demo_client")
    parser.add_argument("--url", required=True, help="the reference server's base URL")
    parser.add_argument("--journal", required=True, help="the journal file to use")
    parser.add_argument("--account", default="device")
    parser.add_argument("--grace", type=float, default=300.0)
    parser.add_argument("action", choices=("refresh", "recover"))
    ns = parser.parse_args(argv)
    logger = logging.getLogger("tokenjournal")
    logger.addHandler(_JsonLines())
    logger.setLevel(logging.INFO)
    try:
        return asyncio.run(_run(ns))
    except TokenJournalError as exc:
        say("result", outcome="error", code=exc.code, message=str(exc))
        return EXIT_FAILED
    except TimeoutError:
        say("result", outcome="error", code="timeout", message="the recovery did not settle")
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
