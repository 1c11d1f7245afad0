"""`tokenjournal demo`: the SDK's promises, shown against the reference server in seconds.

With no arguments it starts the reference server in test mode on a free 127.0.0.1 port,
keeps the journals in a temporary folder (removed at the end) and runs four steps, printing
a timeline (elapsed milliseconds per line) as it goes:

a. 1,000 concurrent ``GET /api/me`` through ``tm.client_session()`` while the server's clock
   jumps past the access token's expiry: the 401s are served by exactly one refresh.
b. A client *process* is SIGKILLed after the server rotated its refresh token but before the
   answer arrived; restarted on the same journal, it replays the old token into the grace
   window and carries on, with no new sign-in.
c. The same crash, but the client comes back after the grace window closed: the server
   answers ``token_expired`` and the client raises a clear ``SessionEnded``. No client can
   save this case; the journal records why.
d. A flaky network (two 503s, then a connection dropped after the server committed the
   rotation) costs retries, not the session.

A summary table of the server's counters and a verdict per step end the run; the exit status
is 0 only if every step behaved as expected. Tokens never appear: fingerprints only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, TextIO

import aiohttp

from .._errors import TokenJournalError
from .._events import EventKind, SessionState, TokenEvent
from .._manager import TokenManager
from .._retry import RetryPolicy
from .._tokens import fingerprint
from ..server import ReferenceServer, ServerConfig
from ._args import Formatter, Subparsers, at_least
from ._demo_client import EXIT_ENDED, EXIT_OK
from ._table import render_table
from .status import AccountStatus, read_journal

ACCESS_TTL: Final = 900.0
GRACE: Final = 300.0
REQUESTS: Final = 1000
FLAKY_REQUESTS: Final = 20
#: How long the server holds back the answer of a rotation the demo is about to "crash".
HOLD: Final = 1.0
#: Longest wait for a client process to reach a point or finish (a safety net, not a pace).
CHILD_TIMEOUT: Final = 30.0
#: A step that takes longer than this has failed; the demo always ends.
STEP_TIMEOUT: Final = 90.0
#: Per request of the demo's own API calls (aiohttp's default is five minutes).
REQUEST_TIMEOUT: Final = aiohttp.ClientTimeout(total=30.0)
DEMO_EMAIL: Final = "demo@example.com"
DEMO_PASSWORD: Final = "demo"
APP_ACCOUNT: Final = "app"
DEVICE_ACCOUNT: Final = "device"
#: Fast retries: the demo should show a flaky network being ridden out, not wait for it.
DEMO_RETRY: Final = RetryPolicy(base_delay=0.05, max_delay=0.5)
COUNTERS: Final = (
    ("signins", "sign-ins"),
    ("refresh_requests", "refresh requests"),
    ("rotations", "rotations"),
    ("grace_replays", "grace replays"),
    ("reuse_detections", "reuse detections"),
    ("family_revocations", "family revocations"),
    ("api_200", "API 200"),
    ("api_401", "API 401"),
)

Stats = dict[str, int]


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    """One line of the timeline: when (ms since the demo started), in which step, who said it."""

    ms: float
    step: str
    source: str
    text: str


@dataclass(frozen=True, slots=True)
class StepReport:
    """What one step set out to show, the figures it measured and whether it held."""

    key: str
    title: str
    ok: bool
    verdict: str
    figures: Mapping[str, Any]
    counters: Mapping[str, int]  # the server's counters, change during the step
    ms: float


@dataclass(frozen=True, slots=True)
class DemoReport:
    """The whole run. ``ok`` only if every step behaved as expected."""

    ok: bool
    server_url: str
    access_ttl: float
    grace: float
    steps: tuple[StepReport, ...]
    counters: Mapping[str, int]  # the server's counters at the end
    timeline: tuple[TimelineEntry, ...]
    ms: float
    folder: str  # the journals' folder (already removed unless kept)


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """Knobs of the demo. ``progress`` receives the timeline as it happens (None: silent)."""

    requests: int = REQUESTS
    progress: TextIO | None = None
    keep: bool = False


def delta(after: Stats, before: Stats) -> Stats:
    """Counter changes between two snapshots."""
    return {key: after.get(key, 0) - before.get(key, 0) for key in after}


class Timeline:
    """Collects the timeline and echoes each line as it arrives."""

    def __init__(self, echo: TextIO | None) -> None:
        self.started = time.monotonic()
        self.entries: list[TimelineEntry] = []
        self.step = "setup"
        self.echo = echo

    def elapsed(self) -> float:
        """Milliseconds since the demo started."""
        return (time.monotonic() - self.started) * 1000.0

    def begin(self, key: str, title: str) -> None:
        """Start a step: its header is printed at once, before anything else happens."""
        self.step = key
        self._print(f"\n[{key}] {title}")

    def add(self, source: str, text: str) -> None:
        """One timeline line."""
        entry = TimelineEntry(round(self.elapsed(), 1), self.step, source, text)
        self.entries.append(entry)
        self._print(f"{entry.ms:8.0f} ms  {source:<10}  {text}")

    def verdict(self, ok: bool, text: str) -> None:
        """The step's outcome line."""
        self._print(f"{'':8}    {'PASS' if ok else 'FAIL':<10}  {text}")

    def _print(self, text: str) -> None:
        if self.echo is not None:
            self.echo.write(text + "\n")
            self.echo.flush()


def describe_event(event: TokenEvent) -> str:
    """A TokenEvent as one readable, token-free phrase."""
    if event.kind is EventKind.STATE:
        return f"state -> {event.state.value}"
    code = f" ({event.code})" if event.code else ""
    return f"event {event.kind.value}{code}, access token {event.fingerprint}"


class _TimelineLog(logging.Handler):
    """The SDK's and the server's log records (token-free by design) into the timeline."""

    def __init__(self, timeline: Timeline) -> None:
        super().__init__(logging.INFO)
        self.timeline = timeline

    def emit(self, record: logging.LogRecord) -> None:
        source = "server" if record.name.startswith("tokenjournal.server") else "client"
        self.timeline.add(source, record.getMessage())


@contextlib.contextmanager
def _captured_logs(timeline: Timeline) -> Iterator[None]:
    logger = logging.getLogger("tokenjournal")
    handler = _TimelineLog(timeline)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the timeline shows them; do not print them twice
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TOKENJOURNAL_CRASH_AT", None)  # the demo decides when its children die
    # Works from a source checkout as well as from an installed package.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _describe_result(result: Mapping[str, Any]) -> str:
    outcome = result.get("outcome")
    if outcome == "session_ended":
        return f"SessionEnded({result.get('code')!r}) raised to the app: sign in again"
    if "api_status" in result:
        return (
            f"GET /api/me -> {result.get('api_status')} (access token {result.get('fingerprint')})"
        )
    if outcome == "ok":
        return f"refreshed (access token {result.get('fingerprint')})"
    return f"failed: {result.get('code')}: {result.get('message')}"


class Child:
    """A `tokenjournal.cli._demo_client` process whose JSON lines feed the timeline."""

    def __init__(self, proc: asyncio.subprocess.Process, timeline: Timeline) -> None:
        self.proc = proc
        self.timeline = timeline
        self.result: dict[str, Any] | None = None
        self.ready = asyncio.Event()
        self.stderr = b""
        self._readers = asyncio.gather(self._read_stdout(), self._read_stderr())

    @classmethod
    async def start(cls, timeline: Timeline, url: str, journal: Path, action: str) -> Child:
        """Start ``python -m tokenjournal.cli._demo_client ... action``."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tokenjournal.cli._demo_client",
            "--url",
            url,
            "--journal",
            str(journal),
            "--account",
            DEVICE_ACCOUNT,
            "--grace",
            str(GRACE),
            action,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_child_env(),
        )
        timeline.add("demo", f"started client process pid {proc.pid}: {action}")
        return cls(proc, timeline)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(line, dict):
                continue
            kind = line.get("type")
            source = f"pid {self.pid}"
            if kind == "event":
                code = f" ({line['code']})" if line.get("code") else ""
                if line.get("kind") == "state":
                    self.timeline.add(source, f"state -> {line.get('state')}")
                else:
                    self.timeline.add(
                        source,
                        f"event {line.get('kind')}{code}, access token {line.get('fingerprint')}",
                    )
            elif kind == "log":
                self.timeline.add(source, str(line.get("message")))
            elif kind == "ready":
                self.timeline.add(
                    source, f"journal open, refresh token {line.get('refresh_fingerprint')}"
                )
                self.ready.set()
            elif kind == "result":
                self.result = line
                self.timeline.add(source, _describe_result(line))

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = await self.proc.stderr.read()

    async def wait(self, limit: float = CHILD_TIMEOUT) -> int:
        """Wait for the process to end (killing it after ``limit`` seconds); its exit status."""
        try:
            await asyncio.wait_for(self.proc.wait(), limit)
        except TimeoutError:
            self.kill()
            await self.proc.wait()
        await self._readers
        return int(self.proc.returncode if self.proc.returncode is not None else -1)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye; the closest thing to pulling the plug."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)


async def _until(
    predicate: Callable[[], bool], limit: float, give_up: Callable[[], bool] | None = None
) -> bool:
    """Poll ``predicate`` until it holds (True), ``limit`` seconds pass or ``give_up`` holds."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline or (give_up is not None and give_up()):
            return False
        await asyncio.sleep(0.002)
    return True


class Demo:
    """One run of the demo: the server, the in-process client, the journals, the timeline."""

    def __init__(self, options: DemoOptions, folder: Path) -> None:
        self.options = options
        self.folder = folder
        self.timeline = Timeline(options.progress)
        self.server = ReferenceServer(
            ServerConfig(test_mode=True, access_ttl=ACCESS_TTL, grace=GRACE)
        )
        self.app_journal = folder / "app.db"
        self.device_journal = folder / "device.db"
        self.tm: TokenManager | None = None
        self.children: list[Child] = []

    # ------------------------------------------------------------------ helpers

    @property
    def url(self) -> str:
        """The server's base URL."""
        return self.server.url

    def stats(self) -> Stats:
        """The server's counters now."""
        return self.server.stats()

    def manager(self) -> TokenManager:
        """The in-process client (open after setup)."""
        assert self.tm is not None
        return self.tm

    def say(self, text: str, source: str = "demo") -> None:
        """A line from the demo itself."""
        self.timeline.add(source, text)

    async def spawn(self, action: str) -> Child:
        """Start a client process on the device journal."""
        child = await Child.start(self.timeline, self.url, self.device_journal, action)
        self.children.append(child)
        return child

    async def device_status(self) -> AccountStatus | None:
        """The device account as the journal holds it (read-only, like `tokenjournal status`)."""
        status = await read_journal(self.device_journal)
        return next((a for a in status.accounts if a.account == DEVICE_ACCOUNT), None)

    async def run_step(
        self, key: str, title: str, body: Callable[[], Awaitable[tuple[bool, str, dict[str, Any]]]]
    ) -> StepReport:
        """Run one step: header first, then the body; the counters' change is recorded."""
        self.timeline.begin(key, title)
        started = time.monotonic()
        before = self.stats()
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                ok, verdict, figures = await body()
        except Exception as exc:  # a step that breaks is a failed step, the others still run
            ok, verdict, figures = False, f"the step broke: {type(exc).__name__}: {exc}", {}
        self.timeline.verdict(ok, verdict)
        return StepReport(
            key,
            title,
            ok,
            verdict,
            figures,
            delta(self.stats(), before),
            round((time.monotonic() - started) * 1000.0, 1),
        )

    # ------------------------------------------------------------------ setup

    async def setup(self) -> None:
        """Sign in the in-process client and the device journal the client processes share."""
        self.timeline.begin("setup", "reference server, two sign-ins")
        self.say(
            f"reference server on {self.url} (test mode; access tokens live "
            f"{ACCESS_TTL:g} s, grace window {GRACE:g} s)"
        )
        self.say(f"journals in {self.folder}")
        device = TokenManager(
            self.url,
            self.device_journal,
            account=DEVICE_ACCOUNT,
            grace_period=GRACE,
            retry=DEMO_RETRY,
        )
        async with device:
            await device.sign_in(email=DEMO_EMAIL, password=DEMO_PASSWORD)
            assert device.tokens is not None
            self.say(
                f"device journal signed in (refresh token "
                f"{fingerprint(device.tokens.refresh_token)}); client processes use it"
            )
        tm = TokenManager(
            self.url, self.app_journal, account=APP_ACCOUNT, grace_period=GRACE, retry=DEMO_RETRY
        )
        tm.subscribe(lambda event: self.timeline.add("client", describe_event(event)))
        await tm.open()
        self.tm = tm
        await tm.sign_in(email=DEMO_EMAIL, password=DEMO_PASSWORD)

    # ------------------------------------------------------------------ step a

    async def concurrent_expiry(self) -> tuple[bool, str, dict[str, Any]]:
        """1,000 concurrent requests across an expiry, served by exactly one refresh."""
        tm = self.manager()
        n = self.options.requests
        expire_after = max(1, n // 4)
        before = self.stats()
        sent_before = tm.refresh_requests
        assert tm.tokens is not None
        old = fingerprint(tm.tokens.access_token)
        answered = 0

        async def one(http: aiohttp.ClientSession) -> int:
            nonlocal answered
            async with http.get(f"{self.url}/api/me") as response:
                await response.read()
                status = int(response.status)
            answered += 1
            if answered == expire_after:
                await self.server.advance(ACCESS_TTL + 1)
                self.say(
                    f"{answered} of {n} answered; the server clock jumps "
                    f"{ACCESS_TTL + 1:g} s: access token {old} has expired",
                    "server",
                )
            return status

        self.say(
            f"{n} x GET /api/me at once through tm.client_session() "
            f"(access token {old}, still fresh by the client's clock)"
        )
        async with tm.client_session(timeout=REQUEST_TIMEOUT) as http:
            results = await asyncio.gather(*(one(http) for _ in range(n)), return_exceptions=True)
        ok = sum(1 for r in results if r == 200)
        d = delta(self.stats(), before)
        sent = tm.refresh_requests - sent_before
        self.say(
            f"{ok} of {n} answered 200; {d['api_401']} met a 401 first and were replayed "
            f"once with the new token"
        )
        figures = {
            "requests": n,
            "ok": ok,
            "crossed_expiry": d["api_401"],
            "refresh_requests": d["refresh_requests"],
            "rotations": d["rotations"],
            "client_refresh_requests": sent,
        }
        passed = ok == n and d["refresh_requests"] == 1 and d["rotations"] == 1 and sent == 1
        verdict = (
            f"{ok}/{n} answered 200; {d['refresh_requests']} refresh request and "
            f"{d['rotations']} rotation served the {d['api_401']} that crossed the expiry"
        )
        return passed, verdict, figures

    # ------------------------------------------------------------------ steps b and c

    async def crash_mid_refresh(self) -> tuple[bool, dict[str, Any]]:
        """Start a client process that refreshes; SIGKILL it once the server has rotated.

        The server holds the answer back (a ``delay_after`` fault) so the kill lands after the
        rotation committed and before the answer arrived: the worst moment for a client.
        """
        self.server.set_faults([{"kind": "delay_after", "seconds": HOLD}])
        self.say(
            f"fault scripted: the server commits the next rotation, then holds the "
            f"answer back {HOLD:g} s",
            "server",
        )
        before = self.stats()
        child = await self.spawn("refresh")
        rotated = await _until(
            lambda: self.stats()["rotations"] > before["rotations"],
            CHILD_TIMEOUT,
            give_up=lambda: child.proc.returncode is not None,
        )
        answered = child.result is not None
        child.kill()
        await child.wait()
        self.server.set_faults([])
        if rotated:
            self.say(
                f"SIGKILL pid {child.pid}: the server has rotated its refresh token, "
                f"the answer never arrived"
            )
        else:
            self.say(
                f"pid {child.pid} never reached the server's rotation "
                f"(exit {child.proc.returncode}): {child.stderr.decode(errors='replace')}"
            )
        status = await self.device_status()
        intent = status.intent if status is not None else None
        if intent is not None:
            self.say(
                f"{intent.kind} intent pending for refresh token "
                f"{intent.refresh_fingerprint}, started {intent.age * 1000:.0f} ms ago",
                "journal",
            )
        return rotated and not answered and intent is not None, {
            "killed_after_rotation": rotated,
            "answer_arrived": answered,
            "intent_pending": intent is not None,
        }

    async def crash_recovered(self) -> tuple[bool, str, dict[str, Any]]:
        """Step b: killed mid-refresh, restarted inside the grace window, recovered."""
        crashed, figures = await self.crash_mid_refresh()
        mid = self.stats()
        self.say("restarting the client on the same journal (no sign-in)")
        child = await self.spawn("recover")
        code = await child.wait()
        d = delta(self.stats(), mid)
        result = child.result or {}
        figures |= {
            "child_exit": code,
            "api_status": result.get("api_status"),
            "recovery_signins": d["signins"],
            "grace_replays": d["grace_replays"],
            "family_revocations": d["family_revocations"],
        }
        passed = (
            crashed
            and code == EXIT_OK
            and result.get("api_status") == 200
            and d["signins"] == 0
            and d["grace_replays"] == 1
            and d["family_revocations"] == 0
        )
        verdict = (
            f"recovered through the grace window: {d['grace_replays']} grace replay, "
            f"{d['signins']} sign-ins, GET /api/me -> {result.get('api_status')}"
        )
        return passed, verdict, figures

    async def crash_too_late(self) -> tuple[bool, str, dict[str, Any]]:
        """Step c: the same crash, restarted after the grace window closed."""
        crashed, figures = await self.crash_mid_refresh()
        await self.server.advance(GRACE + 1)
        self.say(
            f"the server clock jumps {GRACE + 1:g} s: the killed refresh's grace window has closed",
            "server",
        )
        mid = self.stats()
        self.say("restarting the client on the same journal (no sign-in)")
        child = await self.spawn("recover")
        code = await child.wait()
        d = delta(self.stats(), mid)
        result = child.result or {}
        status = await self.device_status()
        if status is not None:
            self.say(
                f"account {status.account}: {status.state}, code {status.ended_code}", "journal"
            )
        ended_code = result.get("code") if result.get("outcome") == "session_ended" else None
        figures |= {
            "child_exit": code,
            "code": ended_code,
            "journal_state": status.state if status else None,
            "journal_code": status.ended_code if status else None,
            "recovery_signins": d["signins"],
            "reuse_detections": d["reuse_detections"],
            "family_revocations": d["family_revocations"],
        }
        passed = (
            crashed
            and code == EXIT_ENDED
            and ended_code == "token_expired"
            and status is not None
            and status.state == "ended"
            and status.ended_code == "token_expired"
            and d["signins"] == 0
        )
        verdict = (
            f"SessionEnded({ended_code!r}) raised to the app and recorded in the journal: "
            f"nothing can save a token replayed after the window"
        )
        return passed, verdict, figures

    # ------------------------------------------------------------------ step d

    async def flaky_network(self) -> tuple[bool, str, dict[str, Any]]:
        """Step d: 503, 503, then a dropped answer after the rotation committed."""
        tm = self.manager()
        before = self.stats()
        self.server.set_faults(
            [
                {"kind": "status", "status": 503, "count": 2},
                {"kind": "drop_after_commit"},
            ]
        )
        await self.server.advance(ACCESS_TTL + 1)
        self.say(
            "faults scripted for the next refresh calls: 503, 503, then drop the "
            "connection after committing the rotation",
            "server",
        )
        self.say(
            f"the server clock jumps {ACCESS_TTL + 1:g} s: the access token has expired", "server"
        )
        n = FLAKY_REQUESTS

        async def one(http: aiohttp.ClientSession) -> int:
            async with http.get(f"{self.url}/api/me") as response:
                await response.read()
                return int(response.status)

        self.say(f"{n} x GET /api/me at once")
        async with tm.client_session(timeout=REQUEST_TIMEOUT) as http:
            results = await asyncio.gather(*(one(http) for _ in range(n)), return_exceptions=True)
        self.server.set_faults([])
        ok = sum(1 for r in results if r == 200)
        errors = sorted({type(r).__name__ for r in results if isinstance(r, BaseException)})
        d = delta(self.stats(), before)
        self.say(f"{ok} of {n} answered 200" + (f"; errors: {', '.join(errors)}" if errors else ""))
        figures = {
            "requests": n,
            "ok": ok,
            "refresh_requests": d["refresh_requests"],
            "faults_injected": d["faults_injected"],
            "rotations": d["rotations"],
            "grace_replays": d["grace_replays"],
            "signins": d["signins"],
            "family_revocations": d["family_revocations"],
            "state": tm.state.value,
            "session_lost": tm.state is not SessionState.VALID,
        }
        passed = (
            ok == n
            and tm.state is SessionState.VALID
            and d["faults_injected"] == 3
            and d["rotations"] == 1
            and d["grace_replays"] == 1
            and d["signins"] == 0
            and d["family_revocations"] == 0
        )
        verdict = (
            f"{ok}/{n} answered 200 after {d['refresh_requests']} refresh requests "
            f"({d['faults_injected']} faults, {d['grace_replays']} grace replay); session kept"
        )
        return passed, verdict, figures

    # ------------------------------------------------------------------ run

    async def run(self) -> DemoReport:
        """Every step, in order; the report."""
        steps: list[StepReport] = []
        async with self.server:
            try:
                with _captured_logs(self.timeline):
                    await self.setup()
                    plan: tuple[tuple[str, str, Callable[[], Awaitable[Any]]], ...] = (
                        (
                            "a",
                            f"{self.options.requests:,} concurrent requests across an "
                            f"access-token expiry",
                            self.concurrent_expiry,
                        ),
                        (
                            "b",
                            "a client killed mid-refresh, recovered through the grace window",
                            self.crash_recovered,
                        ),
                        (
                            "c",
                            "the same crash, restarted after the grace window closed",
                            self.crash_too_late,
                        ),
                        ("d", "a flaky network: 503, 503, dropped answer", self.flaky_network),
                    )
                    for key, title, body in plan:
                        steps.append(await self.run_step(key, title, body))
            finally:
                for child in self.children:
                    child.kill()
                    await child.wait()
                if self.tm is not None:
                    await self.tm.close()
            counters = self.stats()
        return DemoReport(
            ok=len(steps) == 4 and all(s.ok for s in steps),
            server_url=self.url,
            access_ttl=ACCESS_TTL,
            grace=GRACE,
            steps=tuple(steps),
            counters=counters,
            timeline=tuple(self.timeline.entries),
            ms=round(self.timeline.elapsed(), 1),
            folder=str(self.folder),
        )


async def run_demo(options: DemoOptions | None = None) -> DemoReport:
    """Run the demo in a temporary folder (removed afterwards unless ``keep``)."""
    options = options or DemoOptions()
    folder = Path(tempfile.mkdtemp(prefix="tokenjournal-demo-"))
    try:
        return await Demo(options, folder).run()
    finally:
        if not options.keep:
            shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- output


def render_summary(report: DemoReport) -> str:
    """The counters per step (and in total, as the server reports them) and the verdicts."""
    headers = ("step", *(label for _, label in COUNTERS), "verdict")
    rows: list[tuple[object, ...]] = [
        (s.key, *(s.counters.get(k, 0) for k, _ in COUNTERS), "PASS" if s.ok else "FAIL")
        for s in report.steps
    ]
    rows.append(("total", *(report.counters.get(k, 0) for k, _ in COUNTERS), ""))
    table = render_table(headers, rows, right=tuple(range(1, len(COUNTERS) + 1)))
    lines = ["", "server counters (change per step; total since the server started)", table, ""]
    lines += [f"[{s.key}] {'PASS' if s.ok else 'FAIL'}  {s.verdict}" for s in report.steps]
    lines.append("")
    lines.append(
        f"demo passed in {report.ms / 1000:.1f} s: every step behaved as expected"
        if report.ok
        else "demo FAILED: at least one step did not behave as expected"
    )
    return "\n".join(lines)


def as_json(report: DemoReport) -> dict[str, Any]:
    """The machine-readable report."""
    data = asdict(report)
    data["schema"] = "tokenjournal.demo/1"
    return data


def main(
    *,
    json_output: bool = False,
    quiet: bool = False,
    requests: int = REQUESTS,
    keep: bool = False,
    out: TextIO | None = None,
) -> int:
    """The `demo` command: 0 only if every step behaved as expected."""
    out = out or sys.stdout
    progress: TextIO | None = None
    if not quiet:
        progress = sys.stderr if json_output else out
    if progress is not None:
        progress.write(
            "tokenjournal demo: a crash-safe token client against the reference server\n"
        )
    try:
        report = asyncio.run(run_demo(DemoOptions(requests=requests, progress=progress, keep=keep)))
    except (TokenJournalError, OSError) as exc:  # the setup itself failed: nothing to show
        print(f"tokenjournal demo: could not start: {exc}", file=sys.stderr)
        return 1
    if json_output:
        out.write(json.dumps(as_json(report), indent=2) + "\n")
    else:
        out.write(render_summary(report) + "\n")
    if keep:
        journal = Path(report.folder) / "device.db"
        print(
            f"journals kept in {report.folder}; try: tokenjournal status --journal {journal}",
            file=sys.stderr,
        )
    return 0 if report.ok else 1


DESCRIPTION: Final = """\
Start the reference server in test mode on a free 127.0.0.1 port and show, as a timeline
with timings, four things the SDK promises:

  a. 1,000 concurrent requests cross an access-token expiry: exactly one refresh serves them
  b. a client process SIGKILLed after the server rotated its token (before the answer came)
     restarts on the same journal and recovers through the grace window, no new sign-in
  c. the same crash, restarted after the grace window closed: a clear SessionEnded
     ("token_expired"), the one case no client can save
  d. a flaky network (two 503s, then an answer lost after the server committed) costs no
     session

It ends with a table of the server's counters and a verdict per step. Journals live in a
temporary folder that is removed at the end. Exit status 0 only if every step behaved."""

EPILOG: Final = """\
examples:
  tokenjournal demo                 the timeline and the summary
  tokenjournal demo --quiet         the summary only
  tokenjournal demo --json | jq .steps[].ok
                                    a machine-readable report (progress goes to stderr)"""


def register(sub: Subparsers) -> None:
    """Add ``demo`` and its options to the command line."""
    parser = sub.add_parser(
        "demo",
        help="watch the SDK survive expiry storms, crashes and a flaky network (start here)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a machine-readable report on stdout (progress on stderr)",
    )
    parser.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no timeline, only the summary (or only the JSON report)",
    )
    parser.add_argument(
        "--requests",
        type=at_least(200),
        default=REQUESTS,
        metavar="N",
        help=f"concurrent requests in step a (default {REQUESTS}, at least 200)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary journal folder (its path is printed)",
    )
    parser.set_defaults(handler=command)


def command(ns: argparse.Namespace) -> int:
    """``tokenjournal demo`` as parsed by :func:`register`."""
    return main(json_output=ns.json, quiet=ns.quiet, requests=ns.requests, keep=ns.keep)


__all__ = [
    "DemoOptions",
    "DemoReport",
    "StepReport",
    "TimelineEntry",
    "command",
    "main",
    "register",
    "run_demo",
]
