"""Phase 3: network faults, one scenario at a time, each with the outcome it must have.

Every fault kind of the reference server's test mode, and every mode of the
:class:`~tests.torture.proxy.FaultProxy`, is put in front of a forced refresh. A scenario
passes when the outcome is the expected one *and* the bookkeeping holds: no new sign-in,
server rotations equal committed refreshes, no family revocation, tokens kept through every
transient failure. The client runs on a :class:`~tokenjournal.testing.FakeClock`, so backoff
costs no time; only the per-try network timeout (``attempt_timeout``) is real.

Two scenarios are recoveries *outside* the grace window, the one loss no client can
prevent: the answer to a refresh is black-holed, the server clock moves past the grace
window, the network heals. The only acceptable end is a clean ``SessionEnded("token_expired")``
(state ENDED, the reason in the journal, the file still there), reached without a hang.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import tokenjournal as tj
from tokenjournal.server import ReferenceServer, ServerConfig
from tokenjournal.testing import FakeClock

from . import journals
from .procs import CRASHED, spawn
from .proxy import FaultProxy

#: A scenario must end well inside this, or it counts as a hang.
HANG: Final = 60.0
GRACE: Final = 300.0
#: Patient tries: a slow answer on a loaded machine must not turn into a timeout and a
#: replay, or the replay counts a scenario expects would be a matter of luck.
NET_RETRY: Final = tj.RetryPolicy(
    max_attempts=6, max_elapsed=120.0, base_delay=0.2, max_delay=2.0, attempt_timeout=10.0
)
#: For the scenarios that are about timeouts: a black-holed try costs this much real time.
SHORT_TRY: Final = tj.RetryPolicy(
    max_attempts=6, max_elapsed=120.0, base_delay=0.2, max_delay=2.0, attempt_timeout=0.4
)


@dataclass
class NetOutcome:
    """One scenario's result."""

    name: str
    expected: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    outside_window: bool = False
    seconds: float = 0.0


class Bench:
    """One server, one proxy in front of it, a folder for journals."""

    def __init__(
        self,
        server: ReferenceServer,
        proxy: FaultProxy,
        workdir: Path,
        stderr: IO[bytes] | None = None,
    ) -> None:
        self.server = server
        self.proxy = proxy
        self.workdir = workdir
        self.stderr = stderr
        self._n = 0

    def journal(self, name: str) -> Path:
        """A fresh journal path."""
        self._n += 1
        return self.workdir / f"net-{self._n}-{name}.db"

    def reset(self) -> None:
        """No leftover fault from the previous scenario."""
        self.server.set_faults([])
        self.proxy.clear()


class Check:
    """Collects a scenario's broken expectations."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def that(self, condition: bool, problem: str) -> None:
        """Record ``problem`` unless ``condition`` holds."""
        if not condition:
            self.problems.append(problem)


Scenario = Callable[[Bench, Check], Awaitable[None]]


async def _session(
    bench: Bench, name: str, *, retry: tj.RetryPolicy = NET_RETRY
) -> tuple[tj.TokenManager, dict[str, int]]:
    """A signed-in manager (signed in directly, not through the faults) and the base stats.

    It talks through the proxy; the server's own faults apply either way.
    """
    path = bench.journal(name)
    await journals.sign_in(bench.server.url, path)
    tm = tj.TokenManager(
        bench.proxy.url, journal=path, clock=FakeClock(), retry=retry, grace_period=GRACE
    )
    await tm.open()
    return tm, bench.server.stats()


def _delta(bench: Bench, base: dict[str, int], key: str) -> int:
    return bench.server.stats()[key] - base[key]


async def _expect_success(
    bench: Bench,
    check: Check,
    name: str,
    *,
    replays: int | None = None,
    server_faults: list[dict[str, Any]] | None = None,
    proxy_modes: tuple[Any, ...] = (),
    retry: tj.RetryPolicy = NET_RETRY,
) -> None:
    """The refresh goes through the faults and lands: one rotation, one commit, same session."""
    tm, base = await _session(bench, name, retry=retry)
    try:
        old = tm.tokens
        gen0 = (await tm.journal.load(tm.account)).generation
        if server_faults:
            bench.server.set_faults(server_faults)
        if proxy_modes:
            bench.proxy.script(*proxy_modes)
        new = await tm.refresh()
        record = await tm.journal.load(tm.account)
        check.that(old is not None and new.refresh_token != old.refresh_token, "no new pair")
        check.that(record.tokens == new, "the journal does not hold the new pair")
        check.that(record.intent is None, "intent left behind")
        check.that(
            _delta(bench, base, "rotations") == 1,
            f"{_delta(bench, base, 'rotations')} rotations, expected 1",
        )
        check.that(record.generation - gen0 == 1, "not exactly one commit")
        if replays is not None:
            got = _delta(bench, base, "grace_replays")
            check.that(got == replays, f"{got} grace replays, expected {replays}")
    finally:
        await tm.close()
        _common(bench, check, base)


def _common(bench: Bench, check: Check, base: dict[str, int]) -> None:
    check.that(_delta(bench, base, "signins") == 0, "a new sign-in happened")
    check.that(_delta(bench, base, "family_revocations") == 0, "the family was revoked")


async def _expect_kept_then_success(
    bench: Bench,
    check: Check,
    name: str,
    error: type[tj.TokenJournalError],
    *,
    server_faults: list[dict[str, Any]] | None = None,
    proxy_mode: Any = None,
    replays: int | None,
    retry: tj.RetryPolicy = NET_RETRY,
) -> None:
    """The faults outlast the budget: ``error``, tokens and journal kept; healed: success."""
    tm, base = await _session(bench, name, retry=retry)
    try:
        old = tm.tokens
        if server_faults:
            bench.server.set_faults(server_faults)
        if proxy_mode is not None:
            bench.proxy.mode = proxy_mode
        try:
            await tm.refresh()
            check.that(False, f"refreshed through a lasting fault, not {error.__name__}")
        except error:
            pass
        record = await tm.journal.load(tm.account)
        check.that(tm.tokens == old and record.tokens == old, "tokens changed or dropped")
        check.that(
            tm.state in (tj.SessionState.VALID, tj.SessionState.OFFLINE),
            f"state {tm.state.value} after a transient failure",
        )
        bench.reset()
        tm.retry = NET_RETRY  # healed: no timeout may turn the next try into a replay
        new = await tm.refresh()
        check.that(new != old, "no new pair after healing")
        check.that(_delta(bench, base, "rotations") == 1, "not exactly one rotation")
        got = _delta(bench, base, "grace_replays")
        check.that(replays is None or got == replays, f"{got} grace replays, expected {replays}")
    finally:
        bench.reset()
        await tm.close()
        _common(bench, check, base)


# ---------------------------------------------------------------------- server faults


def _server_success(
    fault: dict[str, Any], replays: int | None, retry: tj.RetryPolicy = NET_RETRY
) -> Scenario:
    async def run(bench: Bench, check: Check) -> None:
        await _expect_success(
            bench, check, fault["kind"], server_faults=[fault], replays=replays, retry=retry
        )

    return run


async def _status_400(bench: Bench, check: Check) -> None:
    """A 4xx the protocol does not know: ProtocolError, no retry, tokens kept."""
    tm, base = await _session(bench, "status400")
    try:
        old = tm.tokens
        bench.server.set_faults([{"kind": "status", "status": 400}])
        try:
            await tm.refresh()
            check.that(False, "a 400 gave a pair")
        except tj.ProtocolError:
            pass
        check.that((await tm.journal.load(tm.account)).tokens == old, "tokens not kept")
        check.that(_delta(bench, base, "refresh_requests") == 1, "a 400 was retried")
        new = await tm.refresh()
        check.that(new != old, "no pair after the 400 passed")
    finally:
        bench.reset()
        await tm.close()
        _common(bench, check, base)


async def _status_budget(bench: Bench, check: Check) -> None:
    await _expect_kept_then_success(
        bench,
        check,
        "503-forever",
        tj.ServerError,
        server_faults=[{"kind": "status", "status": 503, "count": 1000}],
        replays=0,
    )


async def _status_401_unknown(bench: Bench, check: Check) -> None:
    """A 401 without a known code is not a session end: ProtocolError, tokens kept."""
    tm, base = await _session(bench, "status401")
    try:
        old = tm.tokens
        bench.server.set_faults([{"kind": "status", "status": 401}])
        try:
            await tm.refresh()
            check.that(False, "a bare 401 gave a pair")
        except tj.SessionEnded:
            check.that(False, "a bare 401 ended the session")
        except tj.ProtocolError:
            pass
        check.that((await tm.journal.load(tm.account)).tokens == old, "tokens not kept")
    finally:
        bench.reset()
        await tm.close()
        _common(bench, check, base)


# ---------------------------------------------------------------------- proxy faults


def _proxy_success(
    modes: tuple[Any, ...],
    replays: int,
    stall: float | None = None,
    retry: tj.RetryPolicy = NET_RETRY,
) -> Scenario:
    async def run(bench: Bench, check: Check) -> None:
        if stall is not None:
            bench.proxy.stall_seconds = stall
        try:
            await _expect_success(
                bench, check, modes[0], proxy_modes=modes, replays=replays, retry=retry
            )
        finally:
            bench.proxy.stall_seconds = 2.0

    return run


async def _blackhole(bench: Bench, check: Check) -> None:
    await _expect_kept_then_success(
        bench,
        check,
        "blackhole",
        tj.NetworkError,
        proxy_mode="blackhole",
        replays=0,
        retry=SHORT_TRY,
    )


async def _blackhole_after(bench: Bench, check: Check) -> None:
    await _expect_kept_then_success(
        bench,
        check,
        "blackhole_after",
        tj.NetworkError,
        proxy_mode="blackhole_after",
        replays=None,
        retry=SHORT_TRY,
    )


async def _blackhole_past_grace(bench: Bench, check: Check) -> None:
    """The server rotated, every answer is lost, the grace window ends: token_expired."""
    tm, base = await _session(bench, "past-grace", retry=SHORT_TRY)
    path = Path(str(getattr(tm.journal, "path", "")))
    try:
        old = tm.tokens
        bench.proxy.mode = "blackhole_after"
        try:
            await tm.refresh()
            check.that(False, "a black-holed refresh gave a pair")
        except tj.NetworkError:
            pass
        record = await tm.journal.load(tm.account)
        check.that(
            record.tokens == old and record.intent is not None,
            "tokens or intent dropped while black-holed (a silent sign-out)",
        )
        check.that(_delta(bench, base, "rotations") == 1, "the server never saw the refresh")
        await bench.server.advance(GRACE + 1)
        bench.reset()
        tm.retry = NET_RETRY
        requests = bench.server.stats()["refresh_requests"]
        try:
            await tm.refresh()
            check.that(False, "a refresh past the grace window gave a pair")
        except tj.SessionEnded as exc:
            check.that(exc.code == "token_expired", f"SessionEnded({exc.code!r})")
        check.that(tm.state is tj.SessionState.ENDED, f"state {tm.state.value}, not ended")
        record = await tm.journal.load(tm.account)
        check.that(record.ended_code == "token_expired", f"journal says {record.ended_code!r}")
        try:
            await tm.access_token()
            check.that(False, "an ended session gave an access token")
        except tj.SessionEnded:
            pass
        check.that(
            bench.server.stats()["refresh_requests"] == requests + 1,
            "the ended session asked the server again",
        )
    finally:
        bench.reset()
        await tm.close()
    check.that(path.exists(), "the journal file is gone")
    check.that(_delta(bench, base, "signins") == 0, "a new sign-in happened")


async def _worker_past_grace(bench: Bench, check: Check) -> None:
    """A worker dies right after sending; it comes back only after the grace window."""
    path = bench.journal("worker-past-grace")
    await journals.sign_in(bench.server.url, path)
    base = bench.server.stats()
    dying = await spawn(
        bench.server.url, path, "refresh", crash_at="after_send", stderr=bench.stderr
    )
    check.that(await dying.wait(60) == CRASHED, "the worker did not die at after_send")
    deadline = time.monotonic() + 5
    while _delta(bench, base, "rotations") < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await bench.server.advance(GRACE + 1)
    fresh = await spawn(bench.server.url, path, "check", stderr=bench.stderr)
    code = await fresh.wait(HANG)
    lost = fresh.all("lost")
    check.that(
        bool(lost) and lost[0].get("code") == "token_expired",
        f"the fresh worker did not end cleanly: exit {code}, lost {lost}",
    )
    check.that(not fresh.all("fatal"), "an exception escaped the SDK")
    record = await journals.read(path)
    check.that(
        record.tokens is None and record.ended_code == "token_expired",
        f"journal: tokens kept {record.tokens is not None}, ended {record.ended_code!r}",
    )
    check.that(_delta(bench, base, "signins") == 0, "a new sign-in happened")


#: name -> (expected outcome, scenario, outside the grace window?)
SCENARIOS: Final[dict[str, tuple[str, Scenario, bool]]] = {
    "server status 500 x2": (
        "retried, refreshed",
        _server_success({"kind": "status", "status": 500, "count": 2}, 0),
        False,
    ),
    "server status 503 Retry-After": (
        "retried, refreshed",
        _server_success({"kind": "status", "status": 503, "retry_after": 1}, 0),
        False,
    ),
    "server status 429 Retry-After": (
        "retried, refreshed",
        _server_success({"kind": "status", "status": 429, "retry_after": 2}, 0),
        False,
    ),
    "server status 400": ("ProtocolError, tokens kept", _status_400, False),
    "server status 401 (no code)": ("ProtocolError, tokens kept", _status_401_unknown, False),
    "server status 503 beyond budget": (
        "ServerError, tokens kept; healed: refreshed",
        _status_budget,
        False,
    ),
    "server rotation_in_progress x3": (
        "waited, refreshed",
        _server_success({"kind": "rotation_in_progress", "count": 3}, 0),
        False,
    ),
    "server delay_before 1.5 s": (
        "timed out, replayed, refreshed",
        _server_success({"kind": "delay_before", "seconds": 1.5}, None, SHORT_TRY),
        False,
    ),
    "server delay_after 1.5 s": (
        "timed out, replayed, refreshed",
        _server_success({"kind": "delay_after", "seconds": 1.5}, None, SHORT_TRY),
        False,
    ),
    "server drop_after_commit": (
        "grace replay",
        _server_success({"kind": "drop_after_commit"}, 1),
        False,
    ),
    "server truncated": ("grace replay", _server_success({"kind": "truncated"}, 1), False),
    "server invalid_json": ("grace replay", _server_success({"kind": "invalid_json"}, 1), False),
    "proxy stall 0.2 s": ("refreshed", _proxy_success(("stall",), 0, stall=0.2), False),
    "proxy stall 1.5 s": (
        "timed out, grace replay",
        _proxy_success(("stall",), 1, stall=1.5, retry=SHORT_TRY),
        False,
    ),
    "proxy reset x2": ("retried, refreshed", _proxy_success(("reset", "reset"), 0), False),
    "proxy reset after send": ("grace replay", _proxy_success(("reset_after",), 1), False),
    "proxy truncate": ("grace replay", _proxy_success(("truncate",), 1), False),
    "proxy blackhole": ("NetworkError, tokens kept; healed: refreshed", _blackhole, False),
    "proxy blackhole answers": (
        "NetworkError, tokens kept; healed: grace replay",
        _blackhole_after,
        False,
    ),
    "proxy blackhole past grace": ("SessionEnded(token_expired)", _blackhole_past_grace, True),
    "worker killed, back past grace": ("SessionEnded(token_expired)", _worker_past_grace, True),
}


async def run_scenario(bench: Bench, name: str) -> NetOutcome:
    """Run one scenario under a hang guard."""
    expected, scenario, outside = SCENARIOS[name]
    check = Check()
    began = time.monotonic()
    bench.reset()
    try:
        await asyncio.wait_for(scenario(bench, check), HANG)
    except TimeoutError:
        check.problems.append(f"hung for more than {HANG:.0f} s")
    except Exception as exc:  # the figure that must stay zero: nothing else escapes
        check.problems.append(f"unexpected {type(exc).__name__}: {exc}")
    finally:
        bench.reset()
    return NetOutcome(
        name, expected, not check.problems, check.problems, outside, time.monotonic() - began
    )


async def run_all(
    workdir: Path,
    rounds: int = 1,
    names: list[str] | None = None,
    stderr: IO[bytes] | None = None,
) -> list[NetOutcome]:
    """Every scenario (or ``names``), ``rounds`` times, each on a fresh journal."""
    outcomes: list[NetOutcome] = []
    # One server per round: the past-grace scenarios move its clock for good.
    for _ in range(rounds):
        config = ServerConfig(test_mode=True, grace=GRACE)
        async with ReferenceServer(config) as server, FaultProxy(server.port) as proxy:
            bench = Bench(server, proxy, workdir, stderr)
            for name in names or list(SCENARIOS):
                outcomes.append(await run_scenario(bench, name))
    return outcomes
