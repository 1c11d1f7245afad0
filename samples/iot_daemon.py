"""IoT sync daemon: sign in once, then push sensor readings forever without losing the session.

What it shows:
- Sign in once, with credentials from TJ_EMAIL/TJ_PASSWORD or a TOML config file; every
  later start resumes from the journal, even after SIGKILL or a power cut (a refresh cut
  short is replayed into the server's grace window on the next start, by the SDK).
- Push through ``tm.client_session()``: the bearer is attached, a 401 refreshes once.
- SIGTERM/SIGINT: stop taking readings, give the in-flight push a moment, then leave
  ``async with tm``, which lets an in-flight refresh commit or leaves it journaled.
- Log state transitions with token fingerprints, never tokens.
- While offline: keep the session and the unsent readings, back off exponentially (full
  jitter), and send the backlog oldest first once the network is back.

Run it:
    python samples/iot_daemon.py                      # self-started reference server, demo account
    python samples/iot_daemon.py --iterations 5 --interval 1
    TJ_EMAIL=me@example.com TJ_PASSWORD=... python samples/iot_daemon.py --auth-url https://auth.example
    python samples/iot_daemon.py --smoke              # self-checking scenario, exit 0 if it behaved

A config file (``--config daemon.toml``, keep it 0600) may set ``auth_url``, ``email``,
``password``, ``push_url`` and ``interval``; the command line and environment win over it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import tomllib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

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

log = logging.getLogger("iot_daemon")

#: After SIGTERM, how long the push in flight may take before it is cancelled (systemd's
#: default stop timeout is 90 s; the SDK's own retries could take longer than that).
STOP_GRACE: Final = 2.0
#: Unsent readings kept while offline; the oldest are dropped past this.
BACKLOG: Final = 10_000
#: Exit codes a supervisor can act on.
EXIT_SESSION_ENDED: Final = 3

Reading = dict[str, Any]
Hook = Callable[[int], Awaitable[None]]


class PushRefused(Exception):
    """The endpoint answered with an error status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the endpoint answered {status}")
        self.status = status

    @property
    def transient(self) -> bool:
        """5xx and 429 may pass; other refusals will not (the reading is dropped)."""
        return self.status >= 500 or self.status == 429


@dataclass
class Counters:
    """What the daemon did (reported when it stops)."""

    taken: int = 0
    pushed: int = 0
    dropped: int = 0
    offline_spells: int = 0
    events: list[tj.TokenEvent] = field(default_factory=list)


class Daemon:
    """Takes a reading every ``interval`` seconds and pushes the backlog, oldest first."""

    def __init__(
        self,
        tm: tj.TokenManager,
        push_url: str,
        method: str,
        interval: float,
        max_backoff: float,
    ) -> None:
        self.tm = tm
        self.push_url = push_url
        self.method = method
        self.interval = interval
        # The SDK's own curve (exponential, full jitter, from `backoff`) paces the offline
        # retries; only its delays are used here, not its attempt limits.
        self.offline = tj.RetryPolicy(base_delay=interval, max_delay=max(interval, max_backoff))
        self.backlog: deque[Reading] = deque(maxlen=BACKLOG)
        self.counters = Counters()
        self.stop = asyncio.Event()
        self.stopped_by: str | None = None

    def request_stop(self, why: str) -> None:
        """Stop after the push in flight (signal handlers call this)."""
        if not self.stop.is_set():
            log.info("%s received: stopping", why)
            self.stopped_by = why
            self.stop.set()

    def take_reading(self, seq: int) -> Reading:
        """A stand-in sensor."""
        self.counters.taken += 1
        return {"seq": seq, "sensor": "thermo-1", "celsius": round(random.gauss(21.0, 0.5), 2)}

    async def run(self, iterations: int | None, before: Hook | None = None) -> int:
        """Loop until stopped (or ``iterations`` readings); returns the exit code."""
        failures = 0
        seq = 0
        async with self.tm.client_session() as http:
            while not self.stop.is_set() and (iterations is None or seq < iterations):
                seq += 1
                if before is not None:
                    await before(seq)
                if len(self.backlog) == self.backlog.maxlen:
                    self.counters.dropped += 1  # the deque drops the oldest on append
                self.backlog.append(self.take_reading(seq))
                task = asyncio.ensure_future(self.flush(http))
                await self._finish_or_cancel(task)
                if task.cancelled():
                    break
                try:
                    task.result()
                except (tj.SessionEnded, tj.NotSignedIn) as exc:
                    log.error(
                        "the session is over (%s): restart the daemon to sign in again", exc.code
                    )
                    return EXIT_SESSION_ENDED
                except (
                    tj.TokenJournalError,
                    aiohttp.ClientError,
                    TimeoutError,
                    PushRefused,
                ) as exc:
                    failures += 1
                    if failures == 1:
                        self.counters.offline_spells += 1
                    delay = self.offline.backoff_delay(failures)
                    log.warning(
                        "offline (%s); %d reading(s) kept; next try in %.2fs",
                        _describe(exc),
                        len(self.backlog),
                        delay,
                    )
                else:
                    if failures:
                        log.info("back online after %d failed tries", failures)
                    failures, delay = 0, self.interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
        return 0

    async def flush(self, http: aiohttp.ClientSession) -> None:
        """Push the backlog oldest first; a reading leaves it only once the server took it."""
        while self.backlog:
            reading = self.backlog[0]
            try:
                await self.push(http, reading)
            except PushRefused as exc:
                if exc.transient:
                    raise
                log.error("reading %s refused for good (%s); dropped", reading["seq"], exc)
                self.counters.dropped += 1
            else:
                self.counters.pushed += 1
                log.info("pushed reading %s", reading["seq"])
            self.backlog.popleft()

    async def push(self, http: aiohttp.ClientSession, reading: Reading) -> None:
        """One reading: POST as JSON, or GET with query parameters (the reference server's
        protected endpoint is ``GET /api/me``, which stands in for an ingest endpoint)."""
        if self.method == "POST":
            request = http.post(self.push_url, json=reading)
        else:
            request = http.get(self.push_url, params={k: str(v) for k, v in reading.items()})
        async with request as response:
            if response.status >= 400:
                raise PushRefused(response.status)

    async def _finish_or_cancel(self, task: asyncio.Future[None]) -> None:
        stopper: asyncio.Future[Any] = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                await asyncio.wait({task}, timeout=STOP_GRACE)
            if not task.done():
                # Safe: the SDK shields its shared refresh from callers' cancellation, and
                # closing the manager lets that refresh commit or leaves it journaled.
                log.info("the push in flight is cancelled; its readings are not sent")
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        finally:
            stopper.cancel()


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) else type(exc).__name__


def log_event(event: tj.TokenEvent) -> None:
    """State transitions and session events, with fingerprints only (never a token)."""
    fp, code = event.fingerprint, event.code
    if event.kind is tj.EventKind.STATE:
        log.info("session state -> %s (token %s)", event.state.value, fp)
    elif event.kind is tj.EventKind.RECOVERING:
        log.info("session recovering: replaying a refresh cut short by a crash (token %s)", fp)
    elif event.kind is tj.EventKind.REFRESH_FAILED:
        log.info("session refresh failed (%s); tokens kept, will try again", code)
    elif event.kind is tj.EventKind.ENDED:
        log.warning("session ended by the server (%s)", code)
    else:
        log.info("session %s (token %s)", event.kind.value, fp)


def load_config(args: argparse.Namespace) -> None:
    """Fill unset options from the TOML file; command line and environment win."""
    path: Path | None = args.config
    if path is None:
        return
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by others; it holds a password: chmod 600 it", path)
    with path.open("rb") as f:
        data = tomllib.load(f)
    for key in ("auth_url", "email", "password", "push_url", "interval"):
        if getattr(args, key, None) is None and key in data:
            setattr(args, key, data[key])


async def sign_in_once(tm: tj.TokenManager, be: Backend) -> bool:
    """Resume the journal's session, or sign in when there is none; False if that fails."""
    if tm.tokens is not None:
        fp = tj.fingerprint(tm.tokens.access_token)
        log.info("resuming the session from %s (token %s)", be.journal, fp)
        return True
    if tm.ended_code is not None:
        log.info("the last session ended (%s); signing in again", tm.ended_code)
    if not be.email or not be.password:
        log.error("no session and no credentials: set TJ_EMAIL and TJ_PASSWORD, or --config")
        return False
    try:
        await tm.sign_in(email=be.email, password=be.password)
    except tj.SignInFailed as exc:
        log.error("sign-in refused (%s): check TJ_EMAIL/TJ_PASSWORD", exc.code)
        return False
    return True


async def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose or args.smoke)
    load_config(args)
    async with backend(args, "iot_daemon") as be:
        push_url = args.push_url or f"{be.url}/api/me"
        tm = tj.TokenManager(
            be.url,
            be.journal,
            account=args.account,
            allowed_origins=[be.url, push_url],
            clock=be.clock(),
            retry=SMOKE_RETRY if args.smoke else None,
            device_type="iot",
            user_agent="tokenjournal-iot-sample",
        )
        tm.subscribe(log_event)  # before opening: recovery emits its event on open
        daemon = Daemon(tm, push_url, args.push_method, args.interval or 5.0, args.max_backoff)
        tm.subscribe(daemon.counters.events.append)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop, sig.name)
        async with tm:
            if not await sign_in_once(tm, be):
                return EXIT_SESSION_ENDED
            if args.smoke:
                return await smoke(daemon, be, args.iterations or 6)
            code = await daemon.run(args.iterations)
        c = daemon.counters
        log.info(
            "stopped%s: %d reading(s) taken, %d pushed, %d unsent, %d dropped; session %s",
            f" by {daemon.stopped_by}" if daemon.stopped_by else "",
            c.taken,
            c.pushed,
            len(daemon.backlog),
            c.dropped,
            tm.state.value,
        )
        return code


async def smoke(daemon: Daemon, be: Backend, iterations: int) -> int:
    """Readings across an access-token expiry, a 503 outage and a dropped connection."""
    server = be.reference()
    ttl = server.config.access_ttl
    tm = daemon.tm
    seen: set[str] = set()

    def remember(_: object = None) -> None:  # every token this run held, to look for leaks
        if tm.tokens is not None:
            seen.add(tm.tokens.access_token)
            seen.add(tm.tokens.refresh_token or tm.tokens.access_token)

    remember()
    tm.subscribe(remember)
    records = _capture_logs()

    async def before(seq: int) -> None:
        if seq == 2:
            print("smoke: the access token expires", flush=True)
            await server.advance(ttl + 1)
        elif seq == 3:
            print(
                "smoke: the token expires again while the server fails (503 x3, then a "
                "connection dropped after the rotation)",
                flush=True,
            )
            await server.advance(ttl + 1)
            server.set_faults(
                [{"kind": "status", "status": 503, "count": 3}, {"kind": "drop_after_commit"}]
            )

    code = await daemon.run(iterations, before)
    c = daemon.counters
    check(code == 0, f"the daemon ran {iterations} iterations without the session ending")
    check(c.pushed + len(daemon.backlog) == iterations, "no reading lost while offline")
    # After an outage the SDK paces its next try (a fleet must not come back in one wave):
    # the daemon's next turns push what it kept. Here, a few quick turns instead of waiting.
    async with tm.client_session() as http:
        for _ in range(100):
            if not daemon.backlog:
                break
            try:
                await daemon.flush(http)
            except (tj.TransientError, aiohttp.ClientError, TimeoutError, PushRefused):
                await asyncio.sleep(0.05)
    stats = server.stats()
    check(
        c.pushed == iterations and not daemon.backlog,
        f"all {iterations} readings were pushed, the one taken while offline included",
    )
    check(c.offline_spells == 1, "the 503 outage was one offline spell, retried with backoff")
    check(
        stats["grace_replays"] == 1, "the dropped rotation was recovered by a grace-window replay"
    )
    check(
        stats["family_revocations"] == 0 and tm.ended_code is None,
        "the server never revoked the session",
    )
    check(tm.state is tj.SessionState.VALID, "the session is valid at the end")
    kinds = [e.kind for e in c.events]
    check(
        tj.EventKind.ENDED not in kinds and kinds.count(tj.EventKind.REFRESHED) == 2,
        "two refreshes committed, no session end",
    )
    leaked = [r for r in records if any(t in r for t in seen)]
    check(not leaked and len(records) > 0, f"no token in {len(records)} log records")
    print(
        f"SMOKE OK: {c.pushed} readings pushed, {c.offline_spells} offline spell, "
        f"{stats['rotations']} rotations, {stats['grace_replays']} grace replay, session kept",
        flush=True,
    )
    return 0


def _capture_logs() -> list[str]:
    """Every formatted log record from now on (to check that none holds a token)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    logging.getLogger().addHandler(Keep())
    return records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    add_common_arguments(parser)
    parser.add_argument("--config", type=Path, help="TOML file with auth_url, email, password, ...")
    parser.add_argument("--push-url", help="protected endpoint (default: AUTH_URL/api/me)")
    parser.add_argument("--push-method", choices=("GET", "POST"), default="GET")
    parser.add_argument("--interval", type=float, help="seconds between readings (default 5)")
    parser.add_argument(
        "--max-backoff",
        type=float,
        default=300.0,
        help="longest wait between tries while offline (default 300 s)",
    )
    parser.add_argument("--iterations", type=int, help="stop after N readings (default: never)")
    args = parser.parse_args(argv)
    if args.smoke and args.interval is None:
        args.interval = 0.01
    if args.interval is not None and args.interval <= 0:
        parser.error("--interval must be positive")
    return args


if __name__ == "__main__":
    run(main(parse_args()))
