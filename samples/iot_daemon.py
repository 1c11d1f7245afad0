"""IoT sync daemon: sign in once, then push sensor readings forever without losing the session.

What it shows:
- Sign in once, with credentials from TJ_EMAIL/TJ_PASSWORD or a TOML config file; every
  later start resumes from the journal, even after SIGKILL or a power cut (a refresh cut
  short is replayed into the server's grace window on the next start, by the SDK).
- Queue every reading in the durable outbox (``tm.outbox("readings")``): it is in the
  journal before ``enqueue`` returns, so a SIGKILL or a power cut loses none, and it is
  delivered in the background through the manager's middleware (the bearer attached, a 401
  refreshes once), oldest first, with one ``Idempotency-Key`` for life: a retry after a lost
  answer is not applied twice. A restart delivers what the last run left.
- SIGTERM/SIGINT: stop taking readings, give the upload in flight a moment, then leave
  ``async with tm``: what is not delivered stays queued for the next start.
- Log state transitions with token fingerprints, never tokens (and never a reading's body).
- While offline: keep the session and the queued readings (the oldest dropped past 10,000,
  counted), back off exponentially up to ``--max-backoff``, deliver once the network is back.

Run it:
    python samples/iot_daemon.py                      # self-started reference server, demo account
    python samples/iot_daemon.py --iterations 5 --interval 1
    TJ_EMAIL=me@example.com TJ_PASSWORD=... python samples/iot_daemon.py --auth-url https://auth.example
    python samples/iot_daemon.py --smoke              # self-checking scenario, exit 0 if it behaved
                                                      # (it SIGKILLs a daemon mid-upload too)

A config file (``--config daemon.toml``, keep it 0600) may set ``auth_url``, ``email``,
``password``, ``push_url`` and ``interval``; the command line and environment win over it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import secrets
import signal
import sys
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from _common import (
    SMOKE_RETRY,
    Backend,
    SmokeFailed,
    add_common_arguments,
    backend,
    check,
    run,
    setup_logging,
)

import tokenjournal as tj

log = logging.getLogger("iot_daemon")

#: After SIGTERM, how long the upload in flight may take; what is left stays in the journal
#: for the next start (systemd's default stop timeout is 90 s).
STOP_GRACE: Final = 2.0
#: Unsent readings kept while offline; the oldest are dropped past this (and counted).
BACKLOG: Final = 10_000
#: Exit codes a supervisor can act on.
EXIT_SESSION_ENDED: Final = 3

Reading = dict[str, Any]
Hook = Callable[[int], Awaitable[None]]


@dataclass
class Counters:
    """What the daemon did (reported when it stops)."""

    taken: int = 0
    events: list[tj.TokenEvent] = field(default_factory=list)


class Daemon:
    """Takes a reading every ``interval`` seconds and queues it in the durable outbox.

    The outbox (``tm.outbox("readings")``) does the rest: each reading is in the journal
    before ``enqueue`` returns, so a SIGKILL or a power cut loses none; it is delivered in
    the background, oldest first, through the manager's middleware, retried with backoff
    while offline, with the same ``Idempotency-Key`` on every try, so a retry after a lost
    answer is not applied twice. A restart delivers what an earlier run left.
    """

    def __init__(
        self,
        tm: tj.TokenManager,
        push_url: str,
        interval: float,
        max_backoff: float,
    ) -> None:
        self.tm = tm
        self.push_url = push_url
        self.interval = interval
        self.outbox = tm.outbox(
            "readings", max_items=BACKLOG, when_full="drop_oldest", max_backoff=max_backoff
        )
        self.run_id = secrets.token_hex(4)  # readings of this start: uid RUN-SEQ
        self.counters = Counters()
        self.stop = asyncio.Event()
        self.stopped_by: str | None = None
        self.exit_code = 0
        self._delivered = -1

    def request_stop(self, why: str, code: int = 0) -> None:
        """Stop taking readings (signal handlers call this)."""
        if not self.stop.is_set():
            log.info("%s received: stopping", why)
            self.stopped_by = why
            self.exit_code = code
            self.stop.set()

    def on_event(self, event: tj.TokenEvent) -> None:
        """A session the server ended cannot deliver: stop (the readings stay queued)."""
        if event.kind is tj.EventKind.ENDED:
            self.request_stop("session end", EXIT_SESSION_ENDED)
        elif event.kind is tj.EventKind.OUTBOX_DROPPED:
            log.warning("the outbox is full (%d readings): the oldest was dropped", BACKLOG)

    def take_reading(self, seq: int) -> Reading:
        """A stand-in sensor."""
        self.counters.taken += 1
        return {
            "uid": f"{self.run_id}-{seq}",
            "seq": seq,
            "sensor": "thermo-1",
            "celsius": round(random.gauss(21.0, 0.5), 2),
        }

    async def run(self, iterations: int | None, before: Hook | None = None) -> int:
        """Loop until stopped (or ``iterations`` readings, then deliver them); returns the
        exit code."""
        seq = 0
        while not self.stop.is_set() and (iterations is None or seq < iterations):
            seq += 1
            if before is not None:
                await before(seq)
            reading = self.take_reading(seq)
            item = await self.outbox.enqueue("POST", self.push_url, json=reading)
            log.info("queued reading %s (%s)", reading["uid"], item)  # durable from here
            await self.report()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.interval)
        if iterations is not None and not self.stop.is_set():
            await self.deliver_all()
        else:
            # Give the upload in flight a moment; whatever is left stays in the journal.
            with contextlib.suppress(TimeoutError):
                await self.outbox.drain(timeout=STOP_GRACE)
        await self.report()
        return self.exit_code

    async def deliver_all(self) -> None:
        """Wait until the outbox is empty (or a stop), logging progress."""
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await self.outbox.drain(timeout=max(self.interval, 0.5))
                return
            await self.report()

    async def report(self) -> tj.OutboxStats:
        """Log the outbox's figures when the count of delivered readings moved."""
        stats = await self.outbox.stats()
        if stats.delivered != self._delivered:
            self._delivered = stats.delivered
            log.info(
                "outbox: %d delivered, %d pending, %d dead",
                stats.delivered,
                stats.pending,
                stats.dead,
            )
        return stats


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
        push_url = args.push_url or f"{be.url}/api/readings"
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
        daemon = Daemon(tm, push_url, args.interval or 5.0, args.max_backoff)
        tm.subscribe(daemon.counters.events.append)
        tm.subscribe(daemon.on_event)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop, sig.name)
        async with tm:
            if not await sign_in_once(tm, be):
                return EXIT_SESSION_ENDED
            if args.smoke:
                return await smoke(daemon, be, args.iterations or 6)
            code = await daemon.run(args.iterations)
            stats = await daemon.report()
        log.info(
            "stopped%s: %d reading(s) taken, %d delivered, %d unsent, %d dropped; session %s",
            f" by {daemon.stopped_by}" if daemon.stopped_by else "",
            daemon.counters.taken,
            stats.delivered,
            stats.pending,
            stats.dropped,
            tm.state.value,
        )
        return code


async def smoke(daemon: Daemon, be: Backend, iterations: int) -> int:
    """Readings across an access-token expiry, a 503 outage, a dropped rotation and a lost
    answer; then a daemon process SIGKILLed mid-upload and restarted: every reading once."""
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
                "connection dropped after the rotation); the next upload's answer is lost",
                flush=True,
            )
            await server.advance(ttl + 1)
            server.set_faults(
                [{"kind": "status", "status": 503, "count": 3}, {"kind": "drop_after_commit"}]
            )
            server.set_api_faults([{"kind": "drop_after_commit"}])

    code = await daemon.run(iterations, before)
    stats = server.stats()
    outbox = await daemon.outbox.stats()
    check(code == 0, f"the daemon ran {iterations} iterations without the session ending")
    check(
        outbox.delivered == iterations and outbox.pending == 0,
        f"all {iterations} readings were delivered, those queued while offline included",
    )
    check(
        stats["keys_seen_twice"] >= 1 and stats["items_applied"] == iterations,
        "the upload whose answer was lost was retried with its key and applied once",
    )
    check(
        stats["grace_replays"] == 1, "the dropped rotation was recovered by a grace-window replay"
    )
    check(
        stats["family_revocations"] == 0 and tm.ended_code is None,
        "the server never revoked the session",
    )
    check(tm.state is tj.SessionState.VALID, "the session is valid at the end")
    kinds = [e.kind for e in daemon.counters.events]
    check(
        tj.EventKind.ENDED not in kinds and kinds.count(tj.EventKind.REFRESHED) == 2,
        "two refreshes committed, no session end",
    )
    leaked = [r for r in records if any(t in r for t in seen)]
    check(not leaked and len(records) > 0, f"no token in {len(records)} log records")
    killed = await smoke_kill(be, server)
    print(
        f"SMOKE OK: {outbox.delivered} readings delivered, {stats['grace_replays']} grace "
        f"replay, session kept; {killed} readings of a SIGKILLed daemon arrived once",
        flush=True,
    )
    return 0


async def smoke_kill(be: Backend, server: Any) -> int:
    """A daemon process (on this server, its own journal) is SIGKILLed while an upload is
    in flight; a second start delivers the rest. Every reading it queued arrives once."""
    state = be.state_dir / "killed"
    base = server.stats()["items_applied"]
    # The server holds each upload a while, so the kill lands mid-upload.
    server.set_api_faults([{"kind": "delay_before", "seconds": 0.2, "count": 3}])
    argv = [sys.executable, __file__, "--auth-url", be.url, "--state-dir", str(state)]
    argv += ["--interval", "0.02", "-v"]
    env = {**os.environ, "TJ_EMAIL": be.email, "TJ_PASSWORD": be.password}
    first = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    queued: list[str] = []
    assert first.stderr is not None
    while len(queued) < 5 or server.stats()["faults_injected"] < 1:
        line = (await asyncio.wait_for(first.stderr.readline(), 30)).decode()
        if not line:
            raise SmokeFailed("the daemon process exited before it queued 5 readings")
        if "queued reading" in line:
            queued.append(line.split("queued reading ")[1].split()[0])
    first.kill()
    await first.wait()
    print(f"smoke: daemon SIGKILLed mid-upload with {len(queued)} readings queued", flush=True)
    second = await asyncio.create_subprocess_exec(
        *argv, "--iterations", "1", env=env, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    check(await asyncio.wait_for(second.wait(), 60) == 0, "the restarted daemon delivered")
    applied = [r["body"]["uid"] for r in server.readings()]
    check(set(queued) <= set(applied), "every reading the killed daemon queued arrived")
    check(
        len(applied) == len(set(applied)) and server.stats()["items_applied_twice"] == 0,
        f"each arrived once ({server.stats()['items_applied'] - base} applied)",
    )
    return len(queued)


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
    parser.add_argument(
        "--push-url", help="ingest endpoint, POSTed JSON (default: AUTH_URL/api/readings)"
    )
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
