"""Phase 4: time. Wrong device clocks, clocks that jump, and idle gaps after a lost answer.

Every scenario runs in this process against one reference server whose test clock a
:class:`~tests.torture.clocks.Ticker` moves fast (virtual time; a 300 s window passes in a few
real seconds), through a :class:`~tests.torture.proxy.FaultProxy`. The client runs on a
:class:`~tests.torture.clocks.SimClock`: the same virtual time, with a wall-clock skew.

* **Clock** scenarios: the device's wall clock is skewed ±1 h or ±1 day from the start, or
  stepped by that much halfway through; the app asks ``access_token()`` every few seconds
  for several token lifetimes. Counted: expired access tokens served (the JWT ``exp`` had
  passed by the server's clock when the call began), refresh storms (server rotations beyond
  one per half token lifetime, plus one per clock step), sessions lost. The ``no iat``
  variants mint Mana JWTs with ``exp`` and no ``iat`` (a server that leaves it out), so the
  lifetime cannot be read from the token alone: the device without a real-time clock.
* **Idle** scenarios: the server rotates, the answer is lost (TCP reset after the server
  committed), the network stays down for a while (every connection reset), so the caller's
  retry budget runs out. Then the app makes *no* call. Inside the grace window the session
  must be saved by the SDK itself (one grace replay, noticed within min(10 % of the window,
  30 s) of the network's return); past the window, the app's next call must end it in
  exactly one clean ``SessionEnded("token_expired")``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jwt

import tokenjournal as tj
from tokenjournal import _manager as _manager_module
from tokenjournal._tokens import MARGIN_FRACTION
from tokenjournal.server import ReferenceServer, ServerConfig
from tokenjournal.server._tokens import ALGORITHM, IssuedPair, TokenMinter

from . import rules
from .clocks import SimClock, Ticker
from .journals import DEMO
from .proxy import FaultProxy

GRACE: Final = 300.0
ACCESS_TTL: Final = 60.0
#: The app's call interval and how long a clock scenario runs, in virtual seconds.
CALL_EVERY: Final = 5.0
RUN_FOR: Final = 240.0
#: Virtual seconds the ticker adds per real tick (5 ms): 100x real time.
DT: Final = 0.5
#: The rescue must notice a healed network within this (issue 11: 10 % of the window or
#: 30 s, whichever is smaller), plus a few ticks of slack for a loaded machine.
NOTICE: Final = min(0.1 * GRACE, 30.0)
NOTICE_SLACK: Final = 5.0
#: "Never more than a few dozen requests per window."
MAX_TRIES_PER_WINDOW: Final = 48
#: Real seconds after which a scenario counts as hung.
HANG: Final = 90.0
SECRET: Final = "tokenjournal-torture-time-phase-key-0123456789"
RETRY: Final = tj.RetryPolicy(
    max_attempts=6, max_elapsed=20.0, base_delay=0.5, max_delay=4.0, attempt_timeout=2.0
)
HOUR: Final = 3600.0
DAY: Final = 86400.0


#: PyJWT would judge exp and iat by the real clock; the server's is virtual (and ahead).
_NO_TIME_CHECKS: Final = {"verify_exp": False, "verify_iat": False, "verify_nbf": False}


class NoIatMinter(TokenMinter):
    """Mints Mana JWTs with ``exp`` and no ``iat`` (and accepts them back)."""

    def __init__(self, secret: str, access_ttl: float) -> None:
        super().__init__(secret, access_ttl)
        self.key = secret

    def mint(self, family: Any, now: float) -> IssuedPair:
        pair = super().mint(family, now)
        claims = jwt.decode(
            pair.access_token, self.key, algorithms=[ALGORITHM], options=_NO_TIME_CHECKS
        )
        claims.pop("iat", None)
        token = jwt.encode(claims, self.key, algorithm=ALGORITHM)
        return dataclasses.replace(pair, access_token=token)

    def verify(self, token: str, now: float) -> Any:
        try:
            claims = jwt.decode(token, self.key, algorithms=[ALGORITHM], options=_NO_TIME_CHECKS)
        except jwt.InvalidTokenError:
            return None
        claims.setdefault("iat", int(now))
        return super().verify(jwt.encode(claims, self.key, algorithm=ALGORITHM), now)


@dataclass
class TimeOutcome:
    """One scenario's counts (each must be zero) and what it measured."""

    name: str
    kind: str  # "clock" or "idle"
    lost_inside: int = 0
    expired_served: int = 0
    storms: int = 0
    raw: list[str] = field(default_factory=list)
    hung: int = 0
    not_clean_end: int = 0
    late_rescue: int = 0
    calls: int = 0
    rotations: int = 0
    allowed_rotations: int = 0
    grace_replays: int = 0
    rescue_seconds: float | None = None
    tries_in_window: int | None = None
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every must-be-zero count is zero."""
        return not (
            self.lost_inside
            or self.expired_served
            or self.storms
            or self.raw
            or self.hung
            or self.not_clean_end
            or self.late_rescue
        )


class Bench:
    """The phase's server, proxy and journal folder."""

    def __init__(self, server: ReferenceServer, proxy: FaultProxy, workdir: Path) -> None:
        self.server = server
        self.proxy = proxy
        self.workdir = workdir
        self._n = 0

    def journal(self, name: str) -> Path:
        """A fresh journal path."""
        self._n += 1
        return self.workdir / f"time-{self._n}-{name.replace(' ', '_')}.db"

    def delta(self, base: dict[str, int], key: str) -> int:
        """How much a server counter moved since ``base``."""
        return self.server.stats()[key] - base[key]


def _exp(token: str) -> float | None:
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) else None


async def _call(
    out: TimeOutcome, what: str, coro: Awaitable[Any], *, expect_signed_in: bool = True
) -> tuple[str, Any]:
    """Await an SDK call; count a raw exception or a lost session; (verdict, result)."""
    try:
        return "ok", await coro
    except Exception as exc:
        verdict = rules.classify(exc)
        if verdict == "raw":
            out.raw.append(f"{what}: {type(exc).__name__}: {str(exc)[:160]}")
        elif verdict in ("ended", "not_signed_in") and expect_signed_in:
            out.lost_inside += 1
            out.problems.append(f"{what}: session lost ({type(exc).__name__} {exc})")
        return verdict, exc


async def _manager(bench: Bench, name: str, clock: SimClock) -> tj.TokenManager:
    tm = tj.TokenManager(
        bench.proxy.url,
        journal=bench.journal(name),
        clock=clock,
        retry=RETRY,
        grace_period=GRACE,
    )
    await tm.open()
    await tm.sign_in(**DEMO)  # through the (passing) proxy, on the device's clock
    return tm


# ---------------------------------------------------------------------- clock scenarios


Scenario = Callable[[Bench, TimeOutcome], Awaitable[None]]


def clock_scenario(skew: float = 0.0, step: float = 0.0, *, no_iat: bool = False) -> Scenario:
    """The app calls ``access_token()`` every :data:`CALL_EVERY` s for :data:`RUN_FOR` s with
    the device clock ``skew`` off from the start and stepped by ``step`` halfway."""

    async def run(bench: Bench, out: TimeOutcome) -> None:
        state = bench.server.state
        original = state.minter
        if no_iat:
            state._minter = NoIatMinter(SECRET, ACCESS_TTL)
        clock = SimClock(bench.server, skew)
        try:
            tm = await _manager(bench, out.name, clock)
        except BaseException:
            state._minter = original
            raise
        base = bench.server.stats()
        try:
            began = clock.monotonic()
            stepped = step == 0.0
            while clock.monotonic() - began < RUN_FOR:
                if not stepped and clock.monotonic() - began >= RUN_FOR / 2:
                    clock.step(step)
                    stepped = True
                asked_at = bench.server.now()
                verdict, token = await _call(out, "access_token", tm.access_token())
                out.calls += 1
                if verdict == "ok":
                    exp = _exp(token)
                    if exp is not None and exp <= asked_at:
                        out.expired_served += 1
                elif verdict in ("ended", "not_signed_in"):
                    break
                await clock.sleep(CALL_EVERY)
            elapsed = clock.monotonic() - began
        finally:
            await tm.close()
            if no_iat:
                state._minter = original
        out.rotations = bench.delta(base, "rotations")
        out.grace_replays = bench.delta(base, "grace_replays")
        # A pair is refreshed at half its life at the earliest (the margin is clamped to
        # that); a wall-clock step may cost one more refresh, never a storm.
        out.allowed_rotations = (
            math.ceil(elapsed / (ACCESS_TTL * MARGIN_FRACTION)) + 1 + int(step != 0.0)
        )
        out.storms = max(0, out.rotations - out.allowed_rotations)
        if out.expired_served:
            out.problems.append(f"{out.expired_served}/{out.calls} calls got an expired token")
        if out.storms:
            out.problems.append(
                f"{out.rotations} rotations in {elapsed:.0f} s of {ACCESS_TTL:.0f} s tokens, "
                f"at most {out.allowed_rotations} expected"
            )

    return run


# ---------------------------------------------------------------------- idle scenarios


def idle_scenario(down: float, step: float = 0.0) -> Scenario:
    """A refresh's answer is lost, the network stays down ``down`` s, the app never calls;
    the wall clock is stepped by ``step`` in the middle of the outage."""

    async def run(bench: Bench, out: TimeOutcome) -> None:
        clock = SimClock(bench.server)
        tm = await _manager(bench, out.name, clock)
        refreshed: list[float] = []
        ended: list[str | None] = []

        def on_event(event: tj.TokenEvent) -> None:
            if event.kind is tj.EventKind.REFRESHED:
                refreshed.append(clock.monotonic())
            elif event.kind is tj.EventKind.ENDED:
                ended.append(event.code)

        tm.subscribe(on_event)
        inside = down < GRACE
        try:
            gen0 = (await tm.journal.load(tm.account)).generation
            base = bench.server.stats()
            resets0 = bench.proxy.counts["reset"]
            # The server commits the rotation, the client gets a reset instead of the pair;
            # every later exchange is reset before it reaches the server: the network is down.
            bench.proxy.script("reset_after")
            bench.proxy.mode = "reset"
            began = clock.monotonic()
            verdict, _ = await _call(out, "refresh (answer lost)", tm.refresh())
            if verdict == "ok":
                out.problems.append("the refresh went through a network that was down")
            if bench.delta(base, "rotations") != 1:
                out.problems.append("set-up: the lost answer never reached the server")
            # Idle: the app makes no call at all from here on.
            if step:
                await clock.sleep(max(0.0, began + down / 2 - clock.monotonic()))
                clock.step(step)
            await clock.sleep(max(0.0, began + down - clock.monotonic()))
            bench.proxy.mode = "pass"
            healed = clock.monotonic()
            out.tries_in_window = bench.proxy.counts["reset"] - resets0
            await clock.sleep(max(0.0, began + GRACE + 10.0 - clock.monotonic()))
            after = [t for t in refreshed if t >= healed]
            out.rescue_seconds = (after[0] - healed) if after else None
            if out.tries_in_window > MAX_TRIES_PER_WINDOW:
                out.storms += 1
                out.problems.append(
                    f"{out.tries_in_window} tries while the network was down "
                    f"(at most {MAX_TRIES_PER_WINDOW} a window)"
                )
            requests = bench.server.stats()["refresh_requests"]
            if inside:
                record = await tm.journal.load(tm.account)
                saved = record.intent is None and record.generation == gen0 + 1
                if not saved:
                    out.problems.append(
                        f"nothing was tried after the network came back at {down:.0f} s: "
                        f"intent {'pending' if record.intent else 'gone'}, "
                        f"generation +{record.generation - gen0}"
                    )
                elif out.rescue_seconds is None or out.rescue_seconds > NOTICE + NOTICE_SLACK:
                    out.late_rescue += 1
                    out.problems.append(f"rescue noticed the network: {out.rescue_seconds} s")
                # Rotations up to here: the app's own call below may legitimately refresh a
                # pair whose short life ran out while it was idle.
                rotations = bench.delta(base, "rotations")
                # The app comes back after the window: the session must still be there, with
                # a live token. A pending intent past the window is a lost session even if the
                # device clock still calls the old access token valid.
                asked_at = bench.server.now()
                verdict, token = await _call(
                    out, "access_token after the window", tm.access_token(), expect_signed_in=False
                )
                exp = _exp(token) if verdict == "ok" else None
                if exp is not None and exp <= asked_at:
                    out.expired_served += 1
                    out.problems.append("the call after the window got an expired token")
                if not saved or verdict in ("ended", "not_signed_in"):
                    out.lost_inside += 1
                    out.problems.append(f"session lost: the call after the window gave {verdict}")
                replays = bench.delta(base, "grace_replays")
                out.grace_replays = replays
                if saved and replays != 1:
                    out.problems.append(f"{replays} grace replays, expected 1")
            else:
                # The app comes back once the offline pause that the last failed try set is
                # over (a call inside it fails fast with that try's error, no request).
                await clock.sleep(_manager_module.OFFLINE_FACTOR * tm.retry.max_delay)
                verdict, exc = await _call(
                    out, "access_token past the window", tm.access_token(), expect_signed_in=False
                )
                record = await tm.journal.load(tm.account)
                code = exc.code if isinstance(exc, tj.SessionEnded) else None
                clean = (
                    verdict == "ended"
                    and code == "token_expired"
                    and ended == ["token_expired"]
                    and tm.state is tj.SessionState.ENDED
                    and record.tokens is None
                    and record.ended_code == "token_expired"
                )
                verdict2, _ = await _call(
                    out, "access_token again", tm.access_token(), expect_signed_in=False
                )
                asked = bench.server.stats()["refresh_requests"] - requests
                if not clean or verdict2 != "ended" or asked > 1:
                    out.not_clean_end += 1
                    out.problems.append(
                        f"past the window: {verdict} {code!r}, ENDED events {ended}, state "
                        f"{tm.state.value}, journal {record.ended_code!r}, then {verdict2}, "
                        f"{asked} requests"
                    )
            out.rotations = rotations if inside else bench.delta(base, "rotations")
            if out.rotations > 1:
                out.storms += out.rotations - 1
                out.problems.append(f"{out.rotations} rotations for one lost answer")
        finally:
            bench.proxy.clear()
            await tm.close()

    return run


#: name -> (kind, scenario, in the short run?)
SCENARIOS: Final[dict[str, tuple[str, Scenario, bool]]] = {
    "clock +1 day from the start": ("clock", clock_scenario(skew=DAY), False),
    "clock -1 day from the start": ("clock", clock_scenario(skew=-DAY), False),
    "clock +1 h from the start": ("clock", clock_scenario(skew=HOUR), False),
    "clock -1 h from the start": ("clock", clock_scenario(skew=-HOUR), False),
    "clock stepped +1 h mid-run": ("clock", clock_scenario(step=HOUR), False),
    "clock stepped -1 h mid-run": ("clock", clock_scenario(step=-HOUR), True),
    "clock stepped +1 day mid-run": ("clock", clock_scenario(step=DAY), True),
    "clock stepped -1 day mid-run": ("clock", clock_scenario(step=-DAY), False),
    "no iat, clock +1 day": ("clock", clock_scenario(skew=DAY, no_iat=True), True),
    "no iat, clock -1 day": ("clock", clock_scenario(skew=-DAY, no_iat=True), False),
    "no iat, clock -1 h, stepped +1 day": (
        "clock",
        clock_scenario(skew=-HOUR, step=DAY, no_iat=True),
        False,
    ),
    "idle: answer lost, down 60 s of 300": ("idle", idle_scenario(60.0), True),
    "idle: answer lost, down 200 s of 300": ("idle", idle_scenario(200.0), False),
    "idle: answer lost, down 60 s, clock +1 h meanwhile": (
        "idle",
        idle_scenario(60.0, step=HOUR),
        False,
    ),
    "idle: answer lost, down 100 s, clock -1 day meanwhile": (
        "idle",
        idle_scenario(100.0, step=-DAY),
        False,
    ),
    "idle: answer lost, down 400 s of 300": ("idle", idle_scenario(400.0), True),
}


async def run_scenario(bench: Bench, name: str) -> TimeOutcome:
    """One scenario under a hang guard; nothing it raises escapes uncounted."""
    kind, scenario, _ = SCENARIOS[name]
    out = TimeOutcome(name, kind)
    began = time.monotonic()
    bench.server.set_faults([])
    bench.proxy.clear()
    try:
        await asyncio.wait_for(scenario(bench, out), HANG)
    except TimeoutError:
        out.hung += 1
        out.problems.append(f"hung for more than {HANG:.0f} s")
    except Exception as exc:  # set-up or SDK: either way nothing may escape uncounted
        out.raw.append(f"{type(exc).__name__}: {str(exc)[:160]}")
    out.seconds = time.monotonic() - began
    return out


async def run_all(
    workdir: Path, rounds: int = 1, *, short: bool = False, names: list[str] | None = None
) -> list[TimeOutcome]:
    """Every scenario (the short list with ``short``, or ``names``), ``rounds`` times."""
    chosen = names or [n for n, (_, _, in_short) in SCENARIOS.items() if in_short or not short]
    outcomes: list[TimeOutcome] = []
    config = ServerConfig(test_mode=True, grace=GRACE, access_ttl=ACCESS_TTL, jwt_secret=SECRET)
    async with (
        ReferenceServer(config) as server,
        FaultProxy(server.port) as proxy,
        Ticker(server, DT),
    ):
        bench = Bench(server, proxy, workdir)
        for _ in range(rounds):
            for name in chosen:
                outcomes.append(await run_scenario(bench, name))
    return outcomes
