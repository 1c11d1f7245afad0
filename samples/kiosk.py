"""Kiosk client on an unreliable network: ONLINE / OFFLINE / SESSION ENDED on one status line.

What it shows:
- A status line the staff can read at a glance: ONLINE when the session can be renewed,
  OFFLINE when the auth server cannot be reached, SESSION ENDED when the server ended it.
- While OFFLINE the kiosk keeps serving with the last valid access token for as long as it
  lasts (the SDK never drops tokens for a transient failure), and says how long that is.
- It resumes by itself on reconnect: every request tries again, the SDK paces the retries.
- When the session has ended it tells the operator exactly what to do, and (on a terminal)
  asks for the kiosk account's credentials right there.
- Every visit is logged to the back office through the durable outbox
  (``tm.outbox("visits")``): queued in the journal at once, delivered when the network
  allows, each once. The status line shows how many are still queued.

The status comes from ``tm.subscribe`` (refresh failed / refreshed / ended) and from the
requests the kiosk makes (a network error, or any answer at all).

Run it:
    python samples/kiosk.py                        # self-started reference server, demo account
    python samples/kiosk.py --access-ttl 30        # watch it refresh every ~15 s
    TJ_EMAIL=kiosk-12@example.com TJ_PASSWORD=... python samples/kiosk.py --auth-url https://auth.example
    python samples/kiosk.py --smoke                # fault-injection scenario, exit 0 if it behaved
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import getpass
import logging
import shlex
import sys
from collections.abc import Callable
from typing import Final, TextIO

import aiohttp
from _common import (
    SMOKE_RETRY,
    Backend,
    add_common_arguments,
    backend,
    check,
    run,
    setup_logging,
)

import tokenjournal as tj

#: Seconds between two customer requests in the demo loop.
INTERVAL: Final = 2.0
#: A customer should not wait long for a token: give up after ~10 s and show OFFLINE (the
#: SDK's default budget is a minute, right for a daemon, too long for a person at a screen).
KIOSK_RETRY: Final = tj.RetryPolicy(max_attempts=3, max_elapsed=10.0, max_delay=4.0)
EXIT_SESSION_ENDED: Final = 3
#: How long a smoke step may take before it counts as hung (not a performance bound).
SMOKE_WAIT: Final = 15.0


class Status(enum.Enum):
    """What the status line says."""

    ONLINE = "ONLINE"
    OFFLINE = "OFFLINE"
    ENDED = "SESSION ENDED"


class Kiosk:
    """Serves customers (``GET /api/me`` stands in for the kiosk's content) and keeps the
    status line. ``on_status`` is called on every change of status."""

    def __init__(
        self,
        tm: tj.TokenManager,
        api_url: str,
        clock: tj.Clock,
        out: TextIO = sys.stdout,
        on_status: Callable[[Status], None] | None = None,
        visits_url: str | None = None,
    ) -> None:
        self.tm = tm
        self.api_url = api_url
        self.visits_url = visits_url
        # Unordered: a visit log has no order to keep, and several uploads may share a trip.
        self.outbox = tm.outbox("visits", ordered=False, max_items=1000, when_full="drop_oldest")
        self.queued = 0  # visits not yet delivered (the outbox's depth, for the status line)
        self.clock = clock
        self.out = out
        self.on_status = on_status
        self.status = Status.ONLINE if tm.tokens is not None else Status.ENDED
        self.served = 0
        self._refresh_failing = False  # the last refresh failed (transiently)
        self.renewals = 0  # refreshes seen (ours or another process's): "watch it refresh"
        self._unreachable = False  # the last request got no answer at all
        self._line = ""
        tm.subscribe(self._on_event)

    # -------------------------------------------------------------- the status

    def _on_event(self, event: tj.TokenEvent) -> None:
        if event.kind is tj.EventKind.REFRESH_FAILED:
            self._refresh_failing = True
        elif event.kind in (
            tj.EventKind.REFRESHED,
            tj.EventKind.ADOPTED,
            tj.EventKind.SIGNED_IN,
        ):
            self._refresh_failing = False
            if event.kind is not tj.EventKind.SIGNED_IN:
                self.renewals += 1
        self._update()

    def _update(self) -> None:
        if self.tm.state in (tj.SessionState.ENDED, tj.SessionState.SIGNED_OUT):
            status = Status.ENDED
        elif self._refresh_failing or self._unreachable:
            status = Status.OFFLINE
        else:
            status = Status.ONLINE
        if status is not self.status:
            self.status = status
            if self.on_status is not None:
                self.on_status(status)
        self.show()

    def valid_for(self) -> float:
        """Seconds the current access token still lasts (0 when expired or unknown)."""
        tokens = self.tm.tokens
        exp = tokens.expires_at_epoch if tokens is not None else None
        return max(0.0, exp - self.clock.time()) if exp is not None else 0.0

    def status_line(self) -> str:
        """``[ONLINE] served 12``, ``[OFFLINE] serving with the current pass for 4m10s``..."""
        if self.status is Status.ENDED:
            return f"[{self.status.value}] not serving: an operator must sign in again"
        if self.status is Status.OFFLINE:
            left = self.valid_for()
            detail = (
                f"serving with the current pass for {_duration(left)} more"
                if left > 0
                else "cannot serve until the network is back"
            )
            return (
                f"[{self.status.value}] {detail}; reconnecting by itself · served {self.served}"
                f" · {self.queued} visit(s) queued"
            )
        tokens = self.tm.tokens
        pass_ = tj.fingerprint(tokens.access_token) if tokens is not None else "-"
        return (
            f"[{self.status.value}] served {self.served} · pass {pass_} "
            f"valid {_duration(self.valid_for())} · renewed {self.renewals}x"
            f" · {self.queued} visit(s) queued"
        )

    def show(self) -> None:
        """Redraw the status line in place on a terminal; elsewhere print it when it changes."""
        line = self.status_line()
        if self.out.isatty():
            self.out.write("\r\x1b[2K" + line)
        elif line != self._line:
            self.out.write(line + "\n")
        self.out.flush()
        self._line = line

    # -------------------------------------------------------------- serving

    async def serve_once(self, http: aiohttp.ClientSession) -> bool:
        """Serve one customer; returns whether it worked."""
        try:
            async with http.get(self.api_url) as response:
                self._unreachable = False
                ok = response.status == 200
                if ok:
                    await response.json()
        except tj.SessionEnded:
            ok = False
        except (tj.TransientError, tj.ProtocolError, aiohttp.ClientError, TimeoutError):
            # No fresh token and no server: the session is kept; try again next time.
            self._unreachable = True
            ok = False
        if ok:
            self.served += 1
        if self.visits_url is not None:
            # Durable when enqueue returns; delivered in the background, once.
            await self.outbox.enqueue("POST", self.visits_url, json={"served": ok})
        await self.count_queued()
        return ok

    async def count_queued(self) -> int:
        """Read the outbox's depth and redraw the status line."""
        self.queued = (await self.outbox.stats()).pending
        self._update()
        return self.queued

    def operator_message(self, be: Backend, prompt: bool) -> str:
        """Exactly what to do after the server ended the session."""
        code = self.tm.ended_code or "signed out"
        command = f"python samples/kiosk.py --state-dir {shlex.quote(str(be.state_dir))}"
        if be.server is None:
            command += f" --auth-url {shlex.quote(be.url)}"
        restart = f"TJ_EMAIL={shlex.quote(be.email)} TJ_PASSWORD=... {command}"
        steps = (
            ["  2. Type it at the prompt below, or restart the kiosk with it:", f"       {restart}"]
            if prompt
            else ["  2. Restart the kiosk with it:", f"       {restart}"]
        )
        return "\n".join(
            [
                "",
                f"SESSION ENDED: the auth server ended this kiosk's session ({code}).",
                "Customers cannot be served until an operator signs the kiosk in again:",
                f"  1. Get the password of the kiosk account {be.email}.",
                *steps,
                "Nothing else needs resetting: the journal already records why the session ended.",
                "",
            ]
        )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


async def sign_in(tm: tj.TokenManager, email: str, password: str = "") -> bool:
    """Sign the kiosk in; with no password, ask for it on the terminal (in a thread, so the
    event loop keeps running). False when that did not work."""
    if not password and sys.stdin.isatty() and email:
        password = await asyncio.to_thread(getpass.getpass, f"password for {email}: ")
    if not email or not password:
        print("no credentials: set TJ_EMAIL and TJ_PASSWORD", flush=True)
        return False
    try:
        await tm.sign_in(email=email, password=password)
    except tj.SignInFailed as exc:
        print(f"sign-in refused ({exc.code}): check the email and password", flush=True)
        return False
    except tj.TransientError:
        print("the auth server cannot be reached; try again in a minute", flush=True)
        return False
    return True


async def run_kiosk(kiosk: Kiosk, be: Backend, interval: float) -> int:
    """Serve every ``interval`` seconds; when the session ends, wait for an operator."""
    async with kiosk.tm.client_session() as http:
        while True:
            await kiosk.serve_once(http)
            if kiosk.status is Status.ENDED:
                print(kiosk.operator_message(be, prompt=sys.stdin.isatty()), flush=True)
                while not await sign_in(kiosk.tm, be.email):
                    if not sys.stdin.isatty():
                        return EXIT_SESSION_ENDED  # a supervisor shows it; restart to sign in
                continue
            await asyncio.sleep(interval)


async def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    if not args.verbose:  # the status line says it all; SDK warnings would break it up
        logging.getLogger("tokenjournal").setLevel(logging.ERROR)
    async with backend(args, "kiosk") as be:
        clock = be.clock()
        api_url = f"{be.url}/api/me"
        visits_url = f"{be.url}/api/readings"  # the reference server's ingest endpoint
        async with tj.TokenManager(
            be.url,
            be.journal,
            account=args.account,
            allowed_origins=[be.url, api_url],
            clock=clock,
            retry=SMOKE_RETRY if args.smoke else KIOSK_RETRY,
            device_type="kiosk",
            user_agent="tokenjournal-kiosk-sample",
        ) as tm:
            if tm.tokens is None and not await sign_in(tm, be.email, be.password):
                return EXIT_SESSION_ENDED
            statuses: list[Status] = []
            kiosk = Kiosk(tm, api_url, clock, on_status=statuses.append, visits_url=visits_url)
            kiosk.show()
            if args.smoke:
                return await smoke(kiosk, be, statuses)
            return await run_kiosk(kiosk, be, args.interval)


async def smoke(kiosk: Kiosk, be: Backend, statuses: list[Status]) -> int:
    """ONLINE -> OFFLINE (503s) -> ONLINE (reconnect through a dropped rotation) -> ENDED."""
    server = be.reference()
    ttl = server.config.access_ttl
    tm = kiosk.tm
    async with tm.client_session() as http:
        check(await kiosk.serve_once(http) and kiosk.status is Status.ONLINE, "ONLINE at start")

        print("smoke: the auth server fails (503) as the token nears expiry", flush=True)
        server.set_faults([{"kind": "status", "status": 503, "count": 1000}])
        await server.advance(ttl - 30)  # inside the refresh margin, still valid for 30 s
        failed = asyncio.Event()
        tm.subscribe(lambda e: failed.set() if e.kind is tj.EventKind.REFRESH_FAILED else None)
        check(await kiosk.serve_once(http), "a customer is served while the refresh fails")
        async with asyncio.timeout(SMOKE_WAIT):  # the refresh runs behind the customer's back
            await failed.wait()
        check(kiosk.status is Status.OFFLINE, "OFFLINE once the background refresh failed")
        check(
            await kiosk.serve_once(http) and kiosk.valid_for() > 0,
            f"OFFLINE and still serving with the last valid token ({kiosk.status_line()})",
        )

        print("smoke: the token expires while the server is still down", flush=True)
        await server.advance(31)
        check(
            not await kiosk.serve_once(http) and kiosk.status is Status.OFFLINE,
            f"OFFLINE and not serving once the token expired ({kiosk.status_line()})",
        )
        check(tm.tokens is not None, "the session is kept through the outage")

        check(
            kiosk.queued >= 1,
            f"the visits made while offline wait in the outbox ({kiosk.status_line()})",
        )

        print("smoke: the network is back (the first rotation's answer is lost)", flush=True)
        server.set_faults([{"kind": "drop_after_commit"}])
        # The SDK paces its next try after an outage (up to ten times the policy's longest
        # delay): the kiosk reconnects by itself within that, as its status line says.
        for _ in range(100):
            if await kiosk.serve_once(http):
                break
            await asyncio.sleep(0.1)
        check(kiosk.status is Status.ONLINE, "ONLINE again on reconnect, serving")
        await kiosk.outbox.drain(timeout=SMOKE_WAIT)
        check(
            await kiosk.count_queued() == 0 and server.stats()["items_applied_twice"] == 0,
            f"every queued visit was delivered once ({kiosk.status_line()})",
        )
        check(
            server.stats()["grace_replays"] == 1,
            "the lost answer was recovered in the grace window",
        )

        print("smoke: the kiosk stays off past the refresh token's lifetime", flush=True)
        await server.advance(server.config.refresh_ttl + 1)
        check(
            not await kiosk.serve_once(http) and kiosk.status is Status.ENDED,
            "SESSION ENDED when the server refuses the refresh token",
        )
    message = kiosk.operator_message(be, prompt=False)
    print(message, flush=True)
    check(
        tm.ended_code == "token_expired" and "token_expired" in message,
        "the operator message says why",
    )
    expected = [Status.OFFLINE, Status.ONLINE, Status.ENDED]
    check(
        statuses == expected,
        "status sequence ONLINE -> OFFLINE -> ONLINE -> SESSION ENDED "
        f"(saw {' -> '.join(s.value for s in [Status.ONLINE, *statuses])})",
    )
    print("SMOKE OK: ONLINE -> OFFLINE -> ONLINE -> SESSION ENDED", flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    add_common_arguments(parser)
    parser.add_argument(
        "--interval",
        type=float,
        default=INTERVAL,
        help=f"seconds between customers (default {INTERVAL})",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(main(parse_args()))
