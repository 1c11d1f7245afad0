"""``tokenjournal bench``: what keeping a device signed in costs, measured on this device.

Every figure is taken against an in-process reference server (test mode) on 127.0.0.1 and is
reported next to a baseline measured in the same run, so the ratios say more than the
absolute times:

* **hot path** - ``access_token()`` on a fresh token, calls per second, next to an async
  method that only returns a string; every journal method is wrapped and counted, and the
  target is that no call touches the journal;
* **request overhead** - GETs of ``/api/me`` through ``tm.client_session()`` against a plain
  ``aiohttp.ClientSession`` with a fixed ``Authorization`` header (target ratio >= 0.95),
  with the process's CPU-time ratio and the extra time per request of the fastest rounds
  beside it, since other programs steal wall time unevenly;
* **coalescing** - many concurrent callers on an expired token: refresh requests made
  (target 1; the command exits 1 otherwise) and the time until the last caller has its
  token, as a multiple of one bare refresh round trip and of the asyncio floor (as many
  plain tasks sharing one bare refresh through a shielded task);
* **durability** - durable journal commits (each one WAL fsync under ``synchronous=FULL``;
  real ``fsync``/``fdatasync`` calls too when ``strace`` is available) and wall time per
  refresh, journal in ``--journal-dir`` against a refresh that stores nothing;
* **footprint** - RSS of a process holding a signed-in manager minus a process that only
  imported aiohttp and started an event loop (target <= 5 MiB; it says so when the package
  has no bytecode on disk and each process compiles it, which costs about 4 MiB more), and
  the journal's size per account;
* **blocking** - per-request cost for programs that are not asyncio ones: GETs of
  ``/api/me`` with ``requests`` taking its header from the sync manager, through
  ``RequestsAuth``, and with ``httpx`` through ``HttpxAuth``, each against the same bare
  client with a fixed header (target ratio >= 0.95); and the sync manager's
  ``access_token()`` on a fresh token (no thread hop) next to a call that hops to its loop.
* **sealing** - the same figures with the journal sealed (``seal=Seal(...)``) next to an
  unsealed journal in the same run: a refresh's added time, ``access_token()`` calls per
  second (the hot path reads memory: no journal call, target 0) and the RSS a sealed
  manager's process adds over an unsealed one (``cryptography`` loaded).
* **outbox** - durable ``enqueue`` throughput with 1 caller and with 100 concurrent callers
  on the same disk (group commit: target >= 10x; the durable commits 100 concurrent
  enqueues take are a count target, <= 10), delivery of queued items against a plain
  ``aiohttp`` POST loop to the same endpoint with the same bodies and a fixed bearer
  (target >= 0.9x), and the journal's bytes per pending item.

Rounds are interleaved (A B, then B A) so machine noise hits both sides; figures are medians
of rounds timed with :func:`time.perf_counter` after a warm-up. Only count targets decide the
exit status; timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import inspect
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Final, TextIO

import aiohttp
from aiohttp import hdrs
from yarl import URL

from .. import _journal as _journal_module
from .._journal import Journal, MemoryJournal
from .._manager import TokenManager
from .._seal import Seal
from ..server import ReferenceServer, ServerConfig
from ..testing import FakeClock
from ._args import Formatter, Subparsers
from ._table import render_table

SECTIONS: Final = (
    "hot",
    "overhead",
    "coalescing",
    "durability",
    "footprint",
    "blocking",
    "sealing",
    "outbox",
)
DEMO: Final = {"email": "demo@example.com", "password": "demo"}
MIB: Final = 1024 * 1024
#: Targets from the issue. Only the count targets (``enforced``) decide the exit status.
TARGET_OVERHEAD_RATIO: Final = 0.95
TARGET_RSS_MIB: Final = 5.0
#: Client CPU the middleware may add per request over a bare bearer middleware, in us.
TARGET_MIDDLEWARE_US: Final = 2.0
TARGET_GROUP_COMMIT: Final = 10.0  # 100 concurrent enqueue callers / 1 caller, throughput
TARGET_DELIVERY_RATIO: Final = 0.9  # outbox delivery / plain POST loop, throughput
OUTBOX_CALLERS: Final = 100
#: Every async method of the Journal protocol: what the probe wraps and counts.
JOURNAL_METHODS: Final = tuple(
    name for name, member in vars(Journal).items() if inspect.iscoroutinefunction(member)
)

Result = dict[str, Any]


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class Settings:
    """Sizes of one bench run; the defaults finish well under two minutes on two cores."""

    rounds: int = 5
    hot_calls: int = 100_000
    requests: int = 100
    overhead_rounds: int = 30
    concurrency: int = 1
    callers: int = 10_000
    coalesce_rounds: int = 3
    refreshes: int = 20
    footprint_rounds: int = 3
    accounts: int = 50
    blocking_rounds: int = 15
    outbox_items: int = 500
    journal_dir: str | None = None
    strace: bool = True
    sections: tuple[str, ...] = SECTIONS


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` (used by ``tokenjournal bench``)."""
    d = Settings()
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--journal-dir",
        metavar="DIR",
        help="folder for the journals under test, e.g. on the SD card the app will use "
        "(a temporary subfolder is made and removed); default: the system temp folder",
    )
    parser.add_argument(
        "--only",
        metavar="SECTIONS",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    parser.add_argument("--rounds", type=_positive, default=d.rounds, help="timed rounds")
    parser.add_argument(
        "--hot-calls", type=_positive, default=d.hot_calls, help="access_token() calls per round"
    )
    parser.add_argument(
        "--requests", type=_positive, default=d.requests, help="GETs per side per round"
    )
    parser.add_argument(
        "--overhead-rounds",
        type=_positive,
        default=d.overhead_rounds,
        help="interleaved rounds of the request-overhead figure",
    )
    parser.add_argument(
        "--concurrency", type=_positive, default=d.concurrency, help="GETs in flight at once"
    )
    parser.add_argument(
        "--callers", type=_positive, default=d.callers, help="concurrent callers at expiry"
    )
    parser.add_argument(
        "--coalesce-rounds", type=_positive, default=d.coalesce_rounds, help="expiries measured"
    )
    parser.add_argument(
        "--refreshes", type=_positive, default=d.refreshes, help="refreshes per side per round"
    )
    parser.add_argument(
        "--footprint-rounds",
        type=_positive,
        default=d.footprint_rounds,
        help="subprocess pairs measured for RSS",
    )
    parser.add_argument(
        "--accounts",
        type=_at_least_two,
        default=d.accounts,
        help="accounts signed into one journal to size it",
    )
    parser.add_argument(
        "--blocking-rounds",
        type=_positive,
        default=d.blocking_rounds,
        help="interleaved rounds of the blocking-client figures",
    )
    parser.add_argument(
        "--outbox-items",
        type=_at_least_two,
        default=d.outbox_items,
        help="items per side per round in the outbox section",
    )
    parser.add_argument(
        "--no-strace", action="store_true", help="do not count real fsyncs with strace"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("must be at least 2")
    return value


def settings_from(ns: argparse.Namespace) -> Settings:
    """Settings from parsed arguments; ``ValueError`` for an unknown section name."""
    sections = tuple(s.strip() for s in str(ns.only).split(",") if s.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        raise ValueError(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    return Settings(
        rounds=ns.rounds,
        hot_calls=ns.hot_calls,
        requests=ns.requests,
        overhead_rounds=ns.overhead_rounds,
        concurrency=ns.concurrency,
        callers=ns.callers,
        coalesce_rounds=ns.coalesce_rounds,
        refreshes=ns.refreshes,
        footprint_rounds=ns.footprint_rounds,
        accounts=ns.accounts,
        blocking_rounds=ns.blocking_rounds,
        outbox_items=ns.outbox_items,
        journal_dir=ns.journal_dir,
        strace=not ns.no_strace,
        sections=tuple(s for s in SECTIONS if s in sections),
    )


# --------------------------------------------------------------------------- plumbing


class Progress:
    """Progress lines on stderr while the bench runs (stdout stays clean for ``--json``)."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._started = time.perf_counter()

    def __call__(self, message: str) -> None:
        """Show one step."""
        if self.enabled:
            elapsed = time.perf_counter() - self._started
            print(f"bench [{elapsed:5.1f}s] {message}", file=self.stream, flush=True)


class JournalProbe:
    """Counts every call of a journal's methods by wrapping them on the instance.

    The manager sees the same object, so whatever it does to the journal is counted; the
    hot path's target is that this count does not move.
    """

    def __init__(self, journal: Journal) -> None:
        self.calls: dict[str, int] = {}
        for name in JOURNAL_METHODS:
            setattr(journal, name, self._wrap(name, getattr(journal, name)))

    @property
    def total(self) -> int:
        """Journal calls counted so far."""
        return sum(self.calls.values())

    def reset(self) -> None:
        """Start counting from zero."""
        self.calls.clear()

    def _wrap(
        self, name: str, method: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return await method(*args, **kwargs)

        return counted


def median(values: Sequence[float]) -> float:
    """The median (0.0 for no values)."""
    return float(statistics.median(values)) if values else 0.0


def fastest(values: Sequence[float]) -> float:
    """The mean of the fastest tenth (at least one): the rounds least disturbed by noise."""
    ordered = sorted(values)
    head = ordered[: max(1, len(ordered) // 10)]
    return sum(head) / len(head) if head else 0.0


def interleaved(rounds: int) -> Iterator[tuple[int, tuple[str, str]]]:
    """Round numbers with the order of the two sides: A B, B A, A B, ..."""
    for r in range(rounds):
        yield r, (("a", "b") if r % 2 == 0 else ("b", "a"))


@asynccontextmanager
async def _server(**config: Any) -> AsyncIterator[ReferenceServer]:
    async with ReferenceServer(ServerConfig(test_mode=True, **config)) as server:
        yield server


def _fs_type(folder: Path) -> str:
    """The filesystem type of ``folder`` (from /proc/mounts), or ``unknown``."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    target = str(folder.resolve())
    best, kind = "", "unknown"
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def _file_size(path: Path) -> int:
    """The journal's bytes on disk: the file plus any WAL and shared-memory file."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        if p.exists():
            total += p.stat().st_size
    return total


# --------------------------------------------------------------------------- hot path


class _Floor:
    """The cheapest possible token source: an async method that returns a string."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def access_token(self) -> str:
        return self._token


async def _call_loop(source: TokenManager | _Floor, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        await source.access_token()
    return time.perf_counter() - started


async def audit_hot_path(tm: TokenManager, probe: JournalProbe, calls: int) -> int:
    """How many of ``calls`` calls of ``access_token()`` touched the journal.

    After each call the loop runs once more, so a refresh the call started in the background
    makes its first journal call then and is charged to the call that started it.
    """
    touched = 0
    for _ in range(calls):
        before = probe.total
        await tm.access_token()
        await asyncio.sleep(0)
        touched += probe.total != before
    return touched


async def bench_hot(s: Settings, journal_dir: Path, progress: Progress) -> Result:
    """``access_token()`` on a fresh token: calls/s, and how many touched the journal."""
    async with _server() as server:
        tm = TokenManager(server.url, journal=journal_dir / "hot.db")
        async with tm:
            await tm.sign_in(**DEMO)
            probe = JournalProbe(tm.journal)
            floor = _Floor(await tm.access_token())
            commits, sent = tm.journal.durable_commits, tm.refresh_requests
            progress("hot path: warm-up")
            await _call_loop(tm, min(s.hot_calls, 10_000))
            await _call_loop(floor, min(s.hot_calls, 10_000))
            probe.reset()
            progress(f"hot path: auditing {s.hot_calls:,} calls for journal access")
            touched = await audit_hot_path(tm, probe, s.hot_calls)
            rates: list[float] = []
            floor_rates: list[float] = []
            for r, order in interleaved(s.rounds):
                progress(f"hot path: round {r + 1}/{s.rounds}")
                gc.collect()
                for side in order:
                    if side == "a":
                        rates.append(s.hot_calls / await _call_loop(tm, s.hot_calls))
                    else:
                        floor_rates.append(s.hot_calls / await _call_loop(floor, s.hot_calls))
            await asyncio.sleep(0)  # let any background work the timed calls started show up
            calls = s.hot_calls * (s.rounds + 1)
            return {
                "calls_per_s": median(rates),
                "floor_calls_per_s": median(floor_rates),
                "ratio_to_floor": median(rates) / median(floor_rates),
                "rounds_calls_per_s": rates,
                "calls": calls,
                "audited_calls": s.hot_calls,
                "audited_calls_touching_journal": touched,
                "journal_calls": probe.total,
                "journal_calls_by_method": dict(probe.calls),
                "touched_fraction": probe.total / calls,
                "durable_commits": tm.journal.durable_commits - commits,
                "refresh_requests": tm.refresh_requests - sent,
            }


# --------------------------------------------------------------------------- overhead


async def _get_many(
    http: aiohttp.ClientSession, url: str, n: int, concurrency: int
) -> tuple[float, float, int]:
    """``n`` GETs, ``concurrency`` at a time: wall seconds, CPU seconds, how many not 200.

    CPU time (of this whole process: client and in-process server) is reported beside the
    wall time because other programs on the machine steal wall time from both sides unevenly.
    """
    bad = 0

    async def worker(count: int) -> None:
        nonlocal bad
        for _ in range(count):
            async with http.get(url) as resp:
                await resp.read()
                bad += resp.status != 200

    shares = [n // concurrency + (i < n % concurrency) for i in range(concurrency)]
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(k) for k in shares if k))
    return time.perf_counter() - wall, time.process_time() - cpu, bad


async def _middleware_cpu(tm: TokenManager, url: str, calls: int) -> dict[str, float]:
    """The client CPU one request spends in the middleware, against the floor: a bare
    middleware that sets a fixed bearer. Both run on one reused request with a handler that
    answers at once, so nothing but the middlewares is measured (seconds per call, the
    fastest of several interleaved rounds)."""
    request = aiohttp.ClientRequest("GET", URL(url), loop=asyncio.get_running_loop())
    answer = SimpleNamespace(status=200)
    bearer = "Bearer " + await tm.access_token()

    async def handler(req: aiohttp.ClientRequest) -> Any:
        return answer

    async def bare(req: aiohttp.ClientRequest, handler: Any) -> Any:
        req.headers[hdrs.AUTHORIZATION] = bearer
        return await handler(req)

    async def timed(middleware: Any) -> float:
        headers = request.headers
        started = time.perf_counter()
        for _ in range(calls):
            headers.pop(hdrs.AUTHORIZATION, None)
            await middleware(request, handler)
        return (time.perf_counter() - started) / calls

    best = {"sdk": math.inf, "bare": math.inf}
    for _ in range(7):
        best["sdk"] = min(best["sdk"], await timed(tm.middleware))
        best["bare"] = min(best["bare"], await timed(bare))
    return best


async def bench_overhead(s: Settings, journal_dir: Path, progress: Progress) -> Result:
    """GETs through ``tm.client_session()`` vs a plain session with a fixed header."""
    async with _server() as server:
        tm = TokenManager(server.url, journal=journal_dir / "overhead.db")
        async with tm:
            await tm.sign_in(**DEMO)
            token = await tm.access_token()
            url = server.url + "/api/me"
            plain_headers = {"Authorization": "Bearer " + token}
            async with (
                tm.client_session() as sdk,
                aiohttp.ClientSession(headers=plain_headers) as plain,
            ):
                progress("request overhead: warm-up")
                warm = min(s.requests, 50)
                await _get_many(sdk, url, warm, s.concurrency)
                await _get_many(plain, url, warm, s.concurrency)
                wall: dict[str, list[float]] = {"a": [], "b": []}
                cpu: dict[str, list[float]] = {"a": [], "b": []}
                bad = 0
                for r, order in interleaved(s.overhead_rounds):
                    progress(f"request overhead: round {r + 1}/{s.overhead_rounds}")
                    gc.collect()
                    for side in order:
                        took, used, failed = await _get_many(
                            sdk if side == "a" else plain, url, s.requests, s.concurrency
                        )
                        wall[side].append(took)
                        cpu[side].append(used)
                        bad += failed
            # Paired per round: a round's two halves ran back to back under the same noise.
            ratios = [b / a for a, b in zip(wall["a"], wall["b"], strict=True)]
            cpu_ratios = [b / a for a, b in zip(cpu["a"], cpu["b"], strict=True) if a > 0]
            progress("request overhead: the middleware alone")
            alone = await _middleware_cpu(tm, url, max(1000, s.requests * 10))
            return {
                "middleware_cpu_s": alone["sdk"],
                "bare_middleware_cpu_s": alone["bare"],
                "sdk_extra_s_per_request": (fastest(wall["a"]) - fastest(wall["b"])) / s.requests,
                "sdk_requests_per_s": s.requests / median(wall["a"]),
                "plain_requests_per_s": s.requests / median(wall["b"]),
                "ratio": median(ratios),
                "rounds_ratio": ratios,
                "cpu_ratio": median(cpu_ratios),
                "sdk_cpu_s_per_request": median(cpu["a"]) / s.requests,
                "plain_cpu_s_per_request": median(cpu["b"]) / s.requests,
                "requests_per_side": s.requests * s.overhead_rounds,
                "concurrency": s.concurrency,
                "not_200": bad,
                "refresh_requests": tm.refresh_requests,
            }


# --------------------------------------------------------------------------- blocking

#: The blocking clients measured, each against its bare twin (same library, fixed header).
BLOCKING_PAIRS: Final = (
    ("sync_manager", "requests + sync access_token()", "bare_requests"),
    ("requests_auth", "requests + RequestsAuth", "bare_requests"),
    ("httpx_auth", "httpx + HttpxAuth", "bare_httpx"),
)


def _blocking_sides(tm: Any, url: str, token: str) -> tuple[dict[str, Any], list[Any]]:
    """One GET function per side (``requests`` and, when installed, ``httpx``) and what to
    close afterwards."""
    import requests

    from ..adapters import HttpxAuth, RequestsAuth

    header = {"Authorization": "Bearer " + token}
    bare = requests.Session()
    bare.headers.update(header)
    manual = requests.Session()
    authed = requests.Session()
    authed.auth = RequestsAuth(tm)
    sides: dict[str, Any] = {
        "bare_requests": lambda: bare.get(url).status_code,
        "sync_manager": lambda: (
            manual.get(url, headers={"Authorization": "Bearer " + tm.access_token()}).status_code
        ),
        "requests_auth": lambda: authed.get(url).status_code,
    }
    closing: list[Any] = [bare, manual, authed]
    if importlib.util.find_spec("httpx") is not None:
        import httpx

        bare_httpx = httpx.Client(headers=header)
        authed_httpx = httpx.Client(auth=HttpxAuth(tm))
        sides["bare_httpx"] = lambda: bare_httpx.get(url).status_code
        sides["httpx_auth"] = lambda: authed_httpx.get(url).status_code
        closing += [bare_httpx, authed_httpx]
    return sides, closing


def _blocking_rounds(s: Settings, tm: Any, url: str, progress: Progress) -> Result:
    """The timed part, on a worker thread (the server answers on the bench's loop)."""
    sides, closing = _blocking_sides(tm, url, tm.access_token())
    names = list(sides)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    bad = 0
    try:
        for get in sides.values():  # warm-up: connections, imports, caches
            for _ in range(min(s.requests, 20)):
                get()
        for r in range(s.blocking_rounds):
            progress(f"blocking clients: round {r + 1}/{s.blocking_rounds}")
            gc.collect()
            shift = r % len(names)  # each side takes each position in turn
            for name in names[shift:] + names[:shift]:
                get = sides[name]
                used, started = time.process_time(), time.perf_counter()
                for _ in range(s.requests):
                    bad += get() != 200
                wall[name].append(time.perf_counter() - started)
                # CPU time of the whole process (client and server): other programs on the
                # machine steal wall time unevenly, CPU time much less so.
                cpu[name].append(time.process_time() - used)
        adapter_s = _adapter_costs(tm, url, max(1, s.hot_calls // 10))
        hop_calls = max(1, s.hot_calls // 100)
        started = time.perf_counter()
        for _ in range(s.hot_calls):
            tm.access_token()
        fresh_s = (time.perf_counter() - started) / s.hot_calls
        started = time.perf_counter()
        for _ in range(hop_calls):
            tm.submit(tm.manager.access_token).result()
        hop_s = (time.perf_counter() - started) / hop_calls
    finally:
        for client in closing:
            client.close()
    pairs: Result = {}
    for side, label, bare in BLOCKING_PAIRS:
        if side not in wall:
            continue
        ratios = [b / a for a, b in zip(wall[side], wall[bare], strict=True)]
        cpu_ratios = [b / a for a, b in zip(cpu[side], cpu[bare], strict=True) if a > 0]
        pairs[side] = {
            "label": label,
            "ratio": median(ratios),
            "cpu_ratio": median(cpu_ratios),
            "rounds_ratio": ratios,
            "requests_per_s": s.requests / median(wall[side]),
            "bare_requests_per_s": s.requests / median(wall[bare]),
            "extra_s_per_request": (fastest(wall[side]) - fastest(wall[bare])) / s.requests,
        }
    return {
        "pairs": pairs,
        "requests_per_side": s.requests * s.blocking_rounds,
        "not_200": bad,
        "adapter_s_per_request": adapter_s,
        "access_token_fresh_s": fresh_s,
        "access_token_hop_s": hop_s,
        "refresh_requests": tm.manager.refresh_requests,
    }


def _adapter_costs(tm: Any, url: str, n: int) -> dict[str, float]:
    """What each adapter adds to one request with no network in the way: RequestsAuth on a
    prepared request, HttpxAuth's flow up to the request it sends (a fresh token, no 401)."""
    import requests

    from ..adapters import HttpxAuth, RequestsAuth

    out: dict[str, float] = {}
    auth = RequestsAuth(tm)
    prepared = requests.Request("GET", url).prepare()
    started = time.perf_counter()
    for _ in range(n):
        prepared.headers.pop("Authorization", None)
        auth(prepared)
    out["requests_auth"] = (time.perf_counter() - started) / n
    if importlib.util.find_spec("httpx") is not None:
        import httpx

        flow_auth = HttpxAuth(tm)
        request = httpx.Request("GET", url)
        started = time.perf_counter()
        for _ in range(n):
            request.headers.pop("Authorization", None)
            next(flow_auth.sync_auth_flow(request))
        out["httpx_auth"] = (time.perf_counter() - started) / n
    return out


async def bench_blocking(s: Settings, journal_dir: Path, progress: Progress) -> Result:
    """Blocking clients (the sync manager, RequestsAuth, HttpxAuth) vs their bare twins."""
    if importlib.util.find_spec("requests") is None:
        return {"skipped": "requests is not installed (pip install 'tokenjournal[requests]')"}
    from ..sync import TokenManager as SyncTokenManager

    async with _server() as server:
        tm = SyncTokenManager(server.url, journal=journal_dir / "blocking.db")
        # The blocking calls run on a worker thread: this loop keeps serving meanwhile.
        await asyncio.to_thread(tm.open)
        try:
            await asyncio.to_thread(
                lambda: tm.sign_in(email=DEMO["email"], password=DEMO["password"])
            )
            progress("blocking clients: warm-up")
            return await asyncio.to_thread(
                _blocking_rounds, s, tm, server.url + "/api/me", progress
            )
        finally:
            await asyncio.to_thread(tm.close)


# --------------------------------------------------------------------------- coalescing


class BareClient:
    """The bare minimum: Mana sign-in and refresh with nothing but aiohttp, nothing stored."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url
        self.device = {
            "deviceId": str(uuid.uuid4()),
            "deviceName": "bench",
            "deviceType": "bench",
            "userAgent": "tokenjournal-bench",
        }
        self._refresh = ""

    async def sign_in(self) -> None:
        """Get a first pair."""
        body = {**DEMO, "deviceInfo": self.device}
        async with self.http.post(self.url + "/auth/signin", json=body) as resp:
            self._refresh = str((await resp.json())["refreshToken"])

    async def refresh(self) -> str:
        """One refresh round trip; returns the new access token."""
        body = {"refreshToken": self._refresh, "deviceInfo": self.device}
        async with self.http.post(self.url + "/auth/refresh", json=body) as resp:
            answer = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"bare refresh failed with HTTP {resp.status}")
        self._refresh = str(answer["refreshToken"])
        return str(answer["appToken"])

    async def timed_refreshes(self, n: int) -> list[float]:
        """``n`` refreshes one after another; seconds each."""
        times: list[float] = []
        for _ in range(n):
            started = time.perf_counter()
            await self.refresh()
            times.append(time.perf_counter() - started)
        return times


async def floor_coalesce(bare: BareClient, callers: int) -> float:
    """The floor of coalescing: ``callers`` tasks share one bare refresh through a shielded
    task (single flight, no journal, no clock, no state); seconds until the last has it."""
    shared: asyncio.Task[str] | None = None
    served: list[float] = []

    async def caller() -> str:
        nonlocal shared
        if shared is None:
            shared = asyncio.ensure_future(bare.refresh())
        token = await asyncio.shield(shared)
        served.append(time.perf_counter())
        return token

    gc.collect()
    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return max(served) - started


async def _expire(tm: TokenManager, clock: FakeClock, server: ReferenceServer) -> None:
    """Move the client's and the server's clocks past the access token's expiry."""
    tokens = tm.tokens
    assert tokens is not None and tokens.expires_at_epoch is not None
    step = max(0.0, tokens.expires_at_epoch - clock.time()) + 1.0
    await server.advance(step)
    clock.advance(step)


async def coalesce_once(
    tm: TokenManager, clock: FakeClock, server: ReferenceServer, callers: int
) -> Result:
    """Expire the token, then let ``callers`` coroutines ask for one at once."""
    await _expire(tm, clock, server)
    old = tm.tokens.access_token if tm.tokens else ""
    server.reset_stats()
    sent = tm.refresh_requests
    served: list[float] = []

    async def caller() -> str:
        token = await tm.access_token()
        served.append(time.perf_counter())
        return token

    gc.collect()
    started = time.perf_counter()
    tokens = await asyncio.gather(*(caller() for _ in range(callers)))
    return {
        "callers": callers,
        "refresh_requests": server.stats()["refresh_requests"],
        "sdk_refresh_requests": tm.refresh_requests - sent,
        "distinct_tokens": len(set(tokens)),
        "all_new": old not in tokens,
        "first_served_s": min(served) - started,
        "last_served_s": max(served) - started,
    }


async def bench_coalescing(s: Settings, journal_dir: Path, progress: Progress) -> Result:
    """Concurrent callers at expiry: refresh requests, and time to serve the last one."""
    async with _server() as server, aiohttp.ClientSession() as http:
        clock = FakeClock(server.now())
        tm = TokenManager(server.url, journal=journal_dir / "coalescing.db", clock=clock)
        bare = BareClient(http, server.url)
        async with tm:
            await tm.sign_in(**DEMO)
            await bare.sign_in()
            progress("coalescing: warm-up")
            await bare.timed_refreshes(3)
            await floor_coalesce(bare, min(s.callers, 100))
            await coalesce_once(tm, clock, server, min(s.callers, 100))
            rounds: list[Result] = []
            floors: list[float] = []
            trips: list[float] = []
            ratios: list[float] = []
            for r, order in interleaved(s.coalesce_rounds):
                progress(f"coalescing: {s.callers:,} callers, round {r + 1}/{s.coalesce_rounds}")
                for side in order:
                    if side == "a":
                        rounds.append(await coalesce_once(tm, clock, server, s.callers))
                    else:
                        floors.append(await floor_coalesce(bare, s.callers))
                        trips.append(median(await bare.timed_refreshes(5)))
                ratios.append(rounds[-1]["last_served_s"] / trips[-1])
            requests = [int(x["refresh_requests"]) for x in rounds]
            last = [float(x["last_served_s"]) for x in rounds]
            return {
                "callers": s.callers,
                "refresh_requests_per_round": requests,
                "refresh_requests": max(requests),
                "every_caller_same_new_token": all(
                    x["distinct_tokens"] == 1 and x["all_new"] for x in rounds
                ),
                "last_served_s": median(last),
                "first_served_s": median([x["first_served_s"] for x in rounds]),
                "bare_refresh_s": median(trips),
                "ratio_to_bare_refresh": median(ratios),
                "floor_last_served_s": median(floors),
                "ratio_to_floor": median([a / b for a, b in zip(last, floors, strict=True)]),
            }


# --------------------------------------------------------------------------- durability


async def _refresh_many(tm: TokenManager, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        await tm.refresh()
    return time.perf_counter() - started


async def bench_durability(s: Settings, journal_dir: Path, progress: Progress) -> Result:
    """Wall time and durable commits per refresh: journal on disk vs one in memory."""
    async with _server() as server:
        disk = TokenManager(server.url, journal=journal_dir / "durability.db")
        memory = TokenManager(server.url, journal=MemoryJournal())
        async with disk, memory:
            await disk.sign_in(**DEMO)
            await memory.sign_in(**DEMO)
            progress("durability: warm-up")
            await _refresh_many(disk, 2)
            await _refresh_many(memory, 2)
            per: dict[str, list[float]] = {"a": [], "b": []}
            commits = disk.journal.durable_commits
            mem_commits = memory.journal.durable_commits
            sent = disk.refresh_requests
            for r, order in interleaved(s.rounds):
                progress(f"durability: round {r + 1}/{s.rounds}")
                for side in order:
                    tm = disk if side == "a" else memory
                    per[side].append(await _refresh_many(tm, s.refreshes) / s.refreshes)
            n = s.refreshes * s.rounds
            disk_s, memory_s = median(per["a"]), median(per["b"])
            result: Result = {
                "journal_dir": str(journal_dir),
                "filesystem": _fs_type(journal_dir),
                "refreshes_per_side": n,
                "disk_refresh_s": disk_s,
                "memory_refresh_s": memory_s,
                "durability_cost_s": disk_s - memory_s,
                "durable_commits_per_refresh": (disk.journal.durable_commits - commits) / n,
                "memory_commits_per_refresh": (memory.journal.durable_commits - mem_commits) / n,
                "refresh_requests_per_refresh": (disk.refresh_requests - sent) / n,
            }
            if s.strace:
                progress("durability: counting real fsyncs with strace")
                result["fsync"] = await _count_fsyncs(server.url, journal_dir, s.refreshes)
            else:
                result["fsync"] = {"measured": False, "why": "--no-strace"}
            return result


#: The strace child: sign in, then fsync a marker, refresh, fsync another marker. ``strace -y``
#: prints each fsync's path, so the fsyncs between the markers are the refreshes' own.
_FSYNC_CHILD: Final = """
import asyncio, os, sys
import tokenjournal as tj

async def main(url, folder, n):
    def marker(name):
        fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT, 0o600)
        os.fsync(fd)
        os.close(fd)
    async with tj.TokenManager(url, journal=os.path.join(folder, "fsync.db")) as tm:
        await tm.sign_in(email="demo@example.com", password="demo")
        await tm.refresh()
        marker("tj-bench-start.marker")
        for _ in range(n):
            await tm.refresh()
        marker("tj-bench-end.marker")

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def parse_fsync_trace(text: str) -> dict[str, int]:
    """Count fsync/fdatasync calls between the start and end markers of an ``strace -y`` log."""
    counts = {"fsync": 0, "fdatasync": 0}
    inside = False
    for line in text.splitlines():
        if "tj-bench-start.marker" in line:
            inside = True
        elif "tj-bench-end.marker" in line:
            inside = False
        elif inside:
            for call in counts:
                if f"{call}(" in line and "resumed>" not in line:
                    counts[call] += 1
    return counts


async def _count_fsyncs(url: str, journal_dir: Path, refreshes: int) -> Result:
    strace = shutil.which("strace")
    if strace is None:
        return {"measured": False, "why": "strace not found"}
    folder = Path(tempfile.mkdtemp(prefix="fsync-", dir=journal_dir))
    trace = folder / "trace.txt"
    cmd = [
        strace, "-f", "-qq", "-y", "-e", "trace=fsync,fdatasync", "-o", str(trace),
        sys.executable, "-c", _FSYNC_CHILD, url, str(folder), str(refreshes),
    ]  # fmt: skip
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), timeout=120)
        if proc.returncode != 0 or not trace.exists():
            why = err.decode(errors="replace").strip().splitlines()[-1:] or ["no trace"]
            return {"measured": False, "why": f"strace failed: {why[0][:200]}"}
        counts = parse_fsync_trace(trace.read_text(errors="replace"))
    except (OSError, TimeoutError) as exc:
        return {"measured": False, "why": f"strace failed: {type(exc).__name__}"}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "measured": True,
        "refreshes": refreshes,
        "fsync": counts["fsync"],
        "fdatasync": counts["fdatasync"],
        "per_refresh": (counts["fsync"] + counts["fdatasync"]) / refreshes,
    }


# --------------------------------------------------------------------------- footprint

_RSS: Final = """
import gc, json, sys
def rss():
    gc.collect()
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
"""

#: Baseline: a process that imported aiohttp and runs an event loop, nothing more.
_BASE_CHILD: Final = (
    _RSS
    + """
import asyncio
import aiohttp

async def main():
    await asyncio.sleep(0)
    print(json.dumps({"rss": rss()}))

asyncio.run(main())
"""
)

#: A process holding a signed-in manager (SQLite journal, its own aiohttp session).
_SDK_CHILD: Final = (
    _RSS
    + """
import asyncio
import aiohttp
import tokenjournal as tj

async def main(url, path):
    async with tj.TokenManager(url, journal=path) as tm:
        await tm.sign_in(email="demo@example.com", password="demo")
        await tm.access_token()
        print(json.dumps({"rss": rss()}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""
)


#: The same manager with its journal sealed (``cryptography`` loaded, AES-GCM per write).
_SEALED_CHILD: Final = _SDK_CHILD.replace(
    "tj.TokenManager(url, journal=path)",
    "tj.TokenManager(url, journal=path, seal=tj.Seal(__import__('os').urandom(32)))",
)


async def _child_rss(script: str, *args: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"footprint subprocess failed: {tail[0][:200]}")
    return int(json.loads(out.decode().strip().splitlines()[-1])["rss"])


async def _journal_sizes(url: str, folder: Path, accounts: int) -> tuple[int, int]:
    """Bytes of a journal with one account, then with ``accounts`` accounts."""
    path = folder / "size.db"
    sizes: list[int] = []
    for i in range(accounts):
        async with TokenManager(url, journal=path, account=f"account-{i}") as tm:
            await tm.sign_in(**DEMO)
        if i == 0:
            sizes.append(_file_size(path))
    sizes.append(_file_size(path))
    return sizes[0], sizes[1]


def bytecode_cached(module: types.ModuleType) -> bool:
    """Whether ``module`` has its compiled bytecode on disk. Without it (a source tree run
    with PYTHONDONTWRITEBYTECODE, a read-only install) every process compiles the package at
    import, and its RSS keeps about 4 MiB of the compiler's memory; an installed wheel has it."""
    spec = module.__spec__
    return spec is None or spec.cached is None or os.path.exists(spec.cached)


async def bench_footprint(s: Settings, journal_dir: Path, progress: Progress) -> Result:
    """RSS of a signed-in manager's process over an aiohttp-only process; journal bytes."""
    async with _server() as server:
        base: list[int] = []
        sdk: list[int] = []
        for r, order in interleaved(s.footprint_rounds):
            progress(f"footprint: subprocess pair {r + 1}/{s.footprint_rounds}")
            for side in order:
                if side == "a":
                    path = journal_dir / f"footprint-{r}.db"
                    sdk.append(await _child_rss(_SDK_CHILD, server.url, str(path)))
                else:
                    base.append(await _child_rss(_BASE_CHILD))
        progress(f"footprint: journal size with {s.accounts} accounts")
        one, many = await _journal_sizes(server.url, journal_dir, s.accounts)
        return {
            "sdk_rss_bytes": median(sdk),
            "aiohttp_rss_bytes": median(base),
            "extra_rss_bytes": median(sdk) - median(base),
            "extra_rss_mib": (median(sdk) - median(base)) / MIB,
            "journal_bytes_one_account": one,
            "journal_bytes_accounts": s.accounts,
            "journal_bytes_many_accounts": many,
            "journal_bytes_per_account": (many - one) / (s.accounts - 1),
            "bytecode_cached": bytecode_cached(_journal_module),
        }


async def bench_sealing(s: Settings, journal_dir: Path, progress: Progress) -> Result:
    """A sealed journal next to an unsealed one, in the same run: refresh time, the hot
    path (and its journal calls: none), and the RSS sealing adds to a manager's process."""
    async with _server() as server:
        sealed = TokenManager(
            server.url, journal=journal_dir / "sealed.db", seal=Seal(os.urandom(32))
        )
        plain = TokenManager(server.url, journal=journal_dir / "unsealed.db")
        async with sealed, plain:
            await sealed.sign_in(**DEMO)
            await plain.sign_in(**DEMO)
            progress("sealing: warm-up")
            await _refresh_many(sealed, 2)
            await _refresh_many(plain, 2)
            await _call_loop(sealed, min(s.hot_calls, 10_000))
            await _call_loop(plain, min(s.hot_calls, 10_000))
            probe = JournalProbe(sealed.journal)
            touched = await audit_hot_path(sealed, probe, s.hot_calls)
            hot_journal_calls = probe.total
            refresh: dict[str, list[float]] = {"a": [], "b": []}
            rates: dict[str, list[float]] = {"a": [], "b": []}
            for r, order in interleaved(s.rounds):
                progress(f"sealing: round {r + 1}/{s.rounds}")
                gc.collect()
                for side in order:
                    tm = sealed if side == "a" else plain
                    refresh[side].append(await _refresh_many(tm, s.refreshes) / s.refreshes)
                    before = probe.total  # the refreshes' own journal calls are not counted
                    rates[side].append(s.hot_calls / await _call_loop(tm, s.hot_calls))
                    await asyncio.sleep(0)  # a refresh the calls started would show now
                    hot_journal_calls += probe.total - before
        base: list[int] = []
        unsealed_rss: list[int] = []
        sealed_rss: list[int] = []
        for r in range(s.footprint_rounds):
            progress(f"sealing: subprocess trio {r + 1}/{s.footprint_rounds}")
            base.append(await _child_rss(_BASE_CHILD))
            unsealed_rss.append(
                await _child_rss(_SDK_CHILD, server.url, str(journal_dir / f"rss-plain-{r}.db"))
            )
            sealed_rss.append(
                await _child_rss(_SEALED_CHILD, server.url, str(journal_dir / f"rss-sealed-{r}.db"))
            )
    sealed_s, plain_s = median(refresh["a"]), median(refresh["b"])
    return {
        "refreshes_per_side": s.refreshes * s.rounds,
        "sealed_refresh_s": sealed_s,
        "unsealed_refresh_s": plain_s,
        "sealing_cost_s": sealed_s - plain_s,
        "sealed_calls_per_s": median(rates["a"]),
        "unsealed_calls_per_s": median(rates["b"]),
        "hot_ratio": median(rates["a"]) / median(rates["b"]),
        "sealed_hot_journal_calls": hot_journal_calls,
        "sealed_audited_calls_touching_journal": touched,
        "aiohttp_rss_bytes": median(base),
        "unsealed_rss_bytes": median(unsealed_rss),
        "sealed_rss_bytes": median(sealed_rss),
        "sealing_rss_bytes": median(sealed_rss) - median(unsealed_rss),
        "sealed_extra_rss_bytes": median(sealed_rss) - median(base),
    }


# --------------------------------------------------------------------------- outbox


def _reading(n: int) -> dict[str, Any]:
    """A typical small IoT reading (~80 bytes of JSON)."""
    return {"uid": uuid.uuid4().hex, "seq": n, "sensor": "thermo-1", "celsius": 21.5}


async def _enqueue_rate(tm: TokenManager, name: str, items: int, callers: int) -> tuple[float, int]:
    """Seconds for ``items`` durable enqueues made by ``callers`` concurrent callers, and the
    durable commits they took."""
    outbox = tm.outbox(name)
    url = tm.auth_url + "/api/readings"
    commits = tm.journal.durable_commits
    per = [items // callers + (1 if k < items % callers else 0) for k in range(callers)]

    async def caller(count: int) -> None:
        for n in range(count):
            await outbox.enqueue("POST", url, json=_reading(n))

    started = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in per if c))
    return time.perf_counter() - started, tm.journal.durable_commits - commits


async def _plain_posts(server: ReferenceServer, token: str, bodies: list[Any]) -> float:
    """The baseline: one plain aiohttp session POSTing the bodies in order, each with a
    fixed bearer and its own Idempotency-Key."""
    url = server.url + "/api/readings"
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer " + token}) as http:
        started = time.perf_counter()
        for body in bodies:
            key = uuid.uuid4().hex
            async with http.post(url, json=body, headers={"Idempotency-Key": key}) as resp:
                await resp.read()
                if resp.status != 201:
                    raise RuntimeError(f"the baseline POST answered {resp.status}")
        return time.perf_counter() - started


async def _outbox_delivery(
    server: ReferenceServer, journal: Path, bodies: list[Any], name: str, ordered: bool
) -> float:
    """Seconds from naming the outbox (delivery starts) until every queued item is
    delivered; the items are queued beforehand, straight into the journal."""
    from .._outbox import OutboxLimits, build_item

    store = TokenManager(server.url, journal=journal)
    async with store:
        for body in bodies:
            item = build_item("POST", server.url + "/api/readings", json=body, now=time.time())
            await store.journal.outbox_add("default", name, item, OutboxLimits())
    tm = TokenManager(server.url, journal=journal)
    async with tm:
        await tm.access_token()  # a fresh token in memory, as in the baseline
        started = time.perf_counter()
        outbox = tm.outbox(name, ordered=ordered)
        await outbox.drain(timeout=600)
        took = time.perf_counter() - started
        stats = await outbox.stats()
        if stats.delivered != len(bodies) or stats.dead:
            raise RuntimeError(f"outbox delivery incomplete: {stats}")
        return took


async def bench_outbox(s: Settings, journal_dir: Path, progress: Progress) -> Result:
    """Durable enqueue with 1 and 100 callers; delivery vs a plain POST loop; bytes/item."""
    n = s.outbox_items
    async with _server() as server:
        progress("outbox: enqueue throughput, 1 caller vs 100")
        # Nobody is signed in on this journal: delivery waits, enqueue alone is measured.
        tm = TokenManager(server.url, journal=journal_dir / "outbox-enqueue.db")
        single: list[float] = []
        many: list[float] = []
        commits_many: list[int] = []
        async with tm:
            await _enqueue_rate(tm, "warm", 20, 1)
            for r, order in interleaved(s.rounds):
                progress(f"outbox: enqueue round {r + 1}/{s.rounds}")
                for side in order:
                    if side == "a":
                        single.append((await _enqueue_rate(tm, f"one{r}", n, 1))[0])
                    else:
                        took, commits = await _enqueue_rate(
                            tm, f"many{r}", n, min(OUTBOX_CALLERS, n)
                        )
                        many.append(took)
                        commits_many.append(commits)
            progress("outbox: commits taken by 100 concurrent enqueues")
            _, group_commits = await _enqueue_rate(tm, "group", OUTBOX_CALLERS, OUTBOX_CALLERS)
        async with TokenManager(server.url, journal=journal_dir / "outbox-token.db") as signed:
            await signed.sign_in(**DEMO)
            token = await signed.access_token()
        await _plain_posts(server, token, [_reading(k) for k in range(20)])  # warm-up
        plain: list[float] = []
        ordered: list[float] = []
        unordered: list[float] = []
        for r, order in interleaved(s.rounds):
            progress(f"outbox: delivery round {r + 1}/{s.rounds}")
            for side in order:
                # Fresh readings for each side: the server counts a uid applied twice.
                if side == "a":
                    journal = journal_dir / f"outbox-deliver-{r}.db"
                    shutil.copy(journal_dir / "outbox-token.db", journal)
                    bodies = [_reading(k) for k in range(n)]
                    ordered.append(await _outbox_delivery(server, journal, bodies, "o", True))
                    bodies = [_reading(k) for k in range(n)]
                    unordered.append(await _outbox_delivery(server, journal, bodies, "u", False))
                else:
                    plain.append(await _plain_posts(server, token, [_reading(k) for k in range(n)]))
        progress("outbox: journal bytes per pending item")
        empty, full = await _outbox_sizes(server.url, journal_dir, n)
        applied_twice = server.stats()["items_applied_twice"]
    one_s, many_s = median(single), median(many)
    plain_s, ordered_s = median(plain), median(ordered)
    # Paired per round: a round's two sides ran back to back under the same noise.
    delivery = [p / o for p, o in zip(plain, ordered, strict=True)]
    return {
        "items_per_round": n,
        "rounds": s.rounds,
        "enqueue_1_caller_per_s": n / one_s,
        "enqueue_100_callers_per_s": n / many_s,
        "group_commit_ratio": median([a / b for a, b in zip(single, many, strict=True)]),
        "durable_commits_per_enqueue_100_callers": median(commits_many) / n,
        "durable_commits_for_100_concurrent_enqueues": group_commits,
        "plain_posts_per_s": n / plain_s,
        "outbox_ordered_per_s": n / ordered_s,
        "outbox_unordered_per_s": n / median(unordered),
        "delivery_ratio": median(delivery),
        "rounds_delivery_ratio": delivery,
        "delivery_extra_s_per_item": (ordered_s - plain_s) / n,
        "journal_bytes_per_pending_item": (full - empty) / n,
        "items_applied_twice": applied_twice,
    }


async def _outbox_sizes(url: str, folder: Path, items: int) -> tuple[int, int]:
    """The journal file's bytes signed in with no item, and with ``items`` pending ones
    (measured after close, when SQLite has folded the WAL back into the file)."""
    from .._outbox import OutboxLimits, build_item

    path = folder / "outbox-size.db"
    async with TokenManager(url, journal=path) as tm:
        await tm.sign_in(**DEMO)
    empty = _file_size(path)
    async with TokenManager(url, journal=path) as tm:
        for n in range(items):
            item = build_item("POST", url + "/api/readings", json=_reading(n), now=time.time())
            await tm.journal.outbox_add("default", "readings", item, OutboxLimits())
    return empty, _file_size(path)


# --------------------------------------------------------------------------- run


@dataclass(frozen=True, slots=True)
class Target:
    """One target of the issue and whether this run met it."""

    name: str
    target: str
    value: str
    met: bool
    enforced: bool  # a count target: missing it makes the command exit 1


def targets(sections: Result) -> list[Target]:
    """The targets that the measured sections speak to."""
    out: list[Target] = []
    hot = sections.get("hot")
    if hot:
        touched = int(hot["journal_calls"]) + int(hot["audited_calls_touching_journal"])
        out.append(
            Target("hot path journal calls", "0", str(hot["journal_calls"]), touched == 0, True)
        )
    coal = sections.get("coalescing")
    if coal:
        per_round = coal["refresh_requests_per_round"]
        out.append(
            Target(
                "refresh requests per expiry",
                "1",
                ",".join(str(n) for n in per_round),
                bool(per_round) and all(n == 1 for n in per_round),
                True,
            )
        )
    over = sections.get("overhead")
    if over:
        ratio = float(over["ratio"])
        out.append(
            Target(
                "request throughput ratio",
                f">= {TARGET_OVERHEAD_RATIO}",
                f"{ratio:.3f}",
                ratio >= TARGET_OVERHEAD_RATIO,
                False,
            )
        )
        added = (float(over["middleware_cpu_s"]) - float(over["bare_middleware_cpu_s"])) * 1e6
        out.append(
            Target(
                "middleware CPU over a bare bearer middleware",
                f"<= {TARGET_MIDDLEWARE_US:g} us",
                f"{added:+.2f} us",
                added <= TARGET_MIDDLEWARE_US,
                False,
            )
        )
    blocking = sections.get("blocking") or {}
    for side, pair in blocking.get("pairs", {}).items():
        ratio = float(pair["ratio"])
        out.append(
            Target(
                f"blocking throughput ratio ({side})",
                f">= {TARGET_OVERHEAD_RATIO}",
                f"{ratio:.3f}",
                ratio >= TARGET_OVERHEAD_RATIO,
                False,
            )
        )
    seal = sections.get("sealing")
    if seal:
        calls = int(seal["sealed_hot_journal_calls"])
        out.append(
            Target(
                "sealed hot path journal calls",
                "0",
                str(calls),
                calls + int(seal["sealed_audited_calls_touching_journal"]) == 0,
                True,
            )
        )
    foot = sections.get("footprint")
    if foot:
        mib = float(foot["extra_rss_mib"])
        out.append(
            Target(
                "extra RSS", f"<= {TARGET_RSS_MIB} MiB", f"{mib:.2f} MiB", mib <= TARGET_RSS_MIB,
                False,
            )
        )  # fmt: skip
    box = sections.get("outbox")
    if box:
        commits = int(box["durable_commits_for_100_concurrent_enqueues"])
        out.append(
            Target(
                "commits for 100 concurrent enqueues",
                f"<= {OUTBOX_CALLERS // 10}",
                str(commits),
                commits <= OUTBOX_CALLERS // 10,
                True,
            )
        )
        out.append(
            Target(
                "outbox items applied twice", "0", str(box["items_applied_twice"]),
                box["items_applied_twice"] == 0, True,
            )
        )  # fmt: skip
        group = float(box["group_commit_ratio"])
        out.append(
            Target(
                "enqueue throughput 100 callers / 1",
                f">= {TARGET_GROUP_COMMIT:g}x",
                f"{group:.1f}x",
                group >= TARGET_GROUP_COMMIT,
                False,
            )
        )
        ratio = float(box["delivery_ratio"])
        out.append(
            Target(
                "outbox delivery / plain POST loop",
                f">= {TARGET_DELIVERY_RATIO}",
                f"{ratio:.3f}",
                ratio >= TARGET_DELIVERY_RATIO,
                False,
            )
        )
    return out


def machine() -> Result:
    """What the figures were measured on."""
    from .. import __version__

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "tokenjournal": __version__,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "aiohttp": aiohttp.__version__,
        # PyJWT imports cryptography when it is installed, which weighs on the footprint.
        "cryptography_installed": importlib.util.find_spec("cryptography") is not None,
        "loadavg_at_start": list(load) if load else None,
    }


_RUNNERS: Final[dict[str, Callable[[Settings, Path, Progress], Awaitable[Result]]]] = {
    "hot": bench_hot,
    "overhead": bench_overhead,
    "coalescing": bench_coalescing,
    "durability": bench_durability,
    "footprint": bench_footprint,
    "blocking": bench_blocking,
    "sealing": bench_sealing,
    "outbox": bench_outbox,
}


@contextmanager
def _work_dir(parent: str | None) -> Iterator[Path]:
    """A fresh folder for the bench's journals inside ``parent``; removed afterwards."""
    base = Path(os.path.expanduser(parent)) if parent else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="tokenjournal-bench-", dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def run(s: Settings, progress: Progress) -> Result:
    """Run the chosen sections; returns the whole report (JSON-ready)."""
    report: Result = {"machine": machine(), "settings": asdict(s)}
    sections: Result = {}
    with _work_dir(s.journal_dir) as folder:
        report["journal_filesystem"] = _fs_type(folder)
        started = time.perf_counter()
        for name in s.sections:
            sections[name] = await _RUNNERS[name](s, folder, progress)
        report["seconds"] = time.perf_counter() - started
    report["sections"] = sections
    checks = targets(sections)
    report["targets"] = [asdict(t) for t in checks]
    report["ok"] = all(t.met for t in checks if t.enforced)
    return report


# --------------------------------------------------------------------------- table


def _rate(x: float) -> str:
    return f"{x:,.0f}/s"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _bytes(n: float) -> str:
    return f"{n / MIB:.2f} MiB" if abs(n) >= MIB else f"{n / 1024:.1f} KiB"


def _verdict(checks: dict[str, Target], name: str) -> tuple[str, str]:
    t = checks.get(name)
    if t is None:
        return "", ""
    return t.target, ("ok" if t.met else "MISSED")


def render(report: Result) -> str:
    """The report as a table for people."""
    sec = report["sections"]
    checks = {t["name"]: Target(**t) for t in report["targets"]}
    rows: list[tuple[str, str, str, str]] = []
    if "hot" in sec:
        h = sec["hot"]
        rows.append(("hot path: access_token(), fresh token", _rate(h["calls_per_s"]), "", ""))
        rows.append(
            (
                "  floor: async method returning a str",
                f"{_rate(h['floor_calls_per_s'])} ({h['ratio_to_floor']:.2f}x of it)",
                "",
                "",
            )
        )
        rows.append(
            (
                "  calls that touched the journal",
                f"{h['journal_calls']} of {h['calls']:,}",
                *_verdict(checks, "hot path journal calls"),
            )
        )
    if "overhead" in sec:
        o = sec["overhead"]
        spread = o["rounds_ratio"]
        rows.append(
            (
                "request overhead: client_session / plain",
                f"{o['ratio']:.3f} (rounds {min(spread):.2f}-{max(spread):.2f}); "
                f"CPU time {o['cpu_ratio']:.3f}",
                *_verdict(checks, "request throughput ratio"),
            )
        )
        rows.append(
            (
                "  GETs of /api/me, each side's median",
                f"{_rate(o['sdk_requests_per_s'])} vs {_rate(o['plain_requests_per_s'])}",
                "",
                "",
            )
        )
        rows.append(
            (
                "  extra time per request (fastest rounds)",
                f"{o['sdk_extra_s_per_request'] * 1e6:+.1f} us",
                "",
                "",
            )
        )
        rows.append(
            (
                "middleware CPU per request vs the floor",
                f"{o['middleware_cpu_s'] * 1e6:.2f} us vs {o['bare_middleware_cpu_s'] * 1e6:.2f} us"
                " (a bare bearer middleware)",
                *_verdict(checks, "middleware CPU over a bare bearer middleware"),
            )
        )
    if "coalescing" in sec:
        c = sec["coalescing"]
        rows.append(
            (
                f"coalescing: refresh requests, {c['callers']:,} callers",
                ", ".join(str(n) for n in c["refresh_requests_per_round"]) + " (per expiry)",
                *_verdict(checks, "refresh requests per expiry"),
            )
        )
        rows.append(
            (
                "  last caller served / bare refresh",
                f"{c['ratio_to_bare_refresh']:.1f}x ({_ms(c['last_served_s'])} vs "
                f"{_ms(c['bare_refresh_s'])})",
                "",
                "",
            )
        )
        rows.append(
            (
                "  ... / asyncio floor (tasks sharing 1 bare refresh)",
                f"{c['ratio_to_floor']:.2f}x (floor {_ms(c['floor_last_served_s'])})",
                "",
                "",
            )
        )
    if "durability" in sec:
        d = sec["durability"]
        fs = d["fsync"]
        real = (
            f", {fs['per_refresh']:g} fsync calls (strace)"
            if fs.get("measured")
            else f" (fsyncs not counted: {fs.get('why')})"
        )
        rows.append(
            (
                "durability: durable commits per refresh",
                f"{d['durable_commits_per_refresh']:g}{real}",
                "",
                "",
            )
        )
        rows.append(
            (
                f"  refresh, journal ({d['filesystem']}) / memory",
                f"{_ms(d['disk_refresh_s'])} vs {_ms(d['memory_refresh_s'])} "
                f"(+{_ms(d['durability_cost_s'])})",
                "",
                "",
            )
        )
    if "footprint" in sec:
        f = sec["footprint"]
        rows.append(
            (
                "footprint: RSS over aiohttp alone",
                f"{_bytes(f['extra_rss_bytes'])} ({_bytes(f['sdk_rss_bytes'])} vs "
                f"{_bytes(f['aiohttp_rss_bytes'])})"
                + ("" if f["bytecode_cached"] else "; compiled at import: no bytecode on disk"),
                *_verdict(checks, "extra RSS"),
            )
        )
        rows.append(
            (
                "  journal size per account",
                f"{_bytes(f['journal_bytes_per_account'])} "
                f"(file with 1 account: {_bytes(f['journal_bytes_one_account'])})",
                "",
                "",
            )
        )
    if "blocking" in sec:
        rows += _blocking_rows(sec["blocking"], checks)
    if "sealing" in sec:
        z = sec["sealing"]
        rows.append(
            (
                "sealing: refresh, sealed / unsealed journal",
                f"{_ms(z['sealed_refresh_s'])} vs {_ms(z['unsealed_refresh_s'])} "
                f"({z['sealing_cost_s'] * 1e6:+.0f} us)",
                "",
                "",
            )
        )
        rows.append(
            (
                "  access_token(), sealed / unsealed",
                f"{_rate(z['sealed_calls_per_s'])} vs {_rate(z['unsealed_calls_per_s'])} "
                f"({z['hot_ratio']:.2f}x); journal calls {z['sealed_hot_journal_calls']}",
                *_verdict(checks, "sealed hot path journal calls"),
            )
        )
        rows.append(
            (
                "  RSS, sealed manager over unsealed",
                f"{_bytes(z['sealing_rss_bytes'])} ({_bytes(z['sealed_extra_rss_bytes'])} over "
                "aiohttp alone)",
                "",
                "",
            )
        )
    if "outbox" in sec:
        b = sec["outbox"]
        rows.append(
            (
                "outbox: durable enqueue, 100 callers / 1",
                f"{b['group_commit_ratio']:.1f}x ({_rate(b['enqueue_100_callers_per_s'])} vs "
                f"{_rate(b['enqueue_1_caller_per_s'])})",
                *_verdict(checks, "enqueue throughput 100 callers / 1"),
            )
        )
        rows.append(
            (
                "  durable commits for 100 concurrent enqueues",
                str(b["durable_commits_for_100_concurrent_enqueues"]),
                *_verdict(checks, "commits for 100 concurrent enqueues"),
            )
        )
        rows.append(
            (
                "outbox: delivery / plain POST loop",
                f"{b['delivery_ratio']:.3f} (rounds {min(b['rounds_delivery_ratio']):.2f}-"
                f"{max(b['rounds_delivery_ratio']):.2f}; {_rate(b['outbox_ordered_per_s'])} "
                f"ordered vs {_rate(b['plain_posts_per_s'])}; unordered "
                f"{_rate(b['outbox_unordered_per_s'])})",
                *_verdict(checks, "outbox delivery / plain POST loop"),
            )
        )
        rows.append(
            (
                "  journal bytes per pending item",
                f"{b['journal_bytes_per_pending_item']:.0f} B (~80-byte JSON body)",
                "",
                "",
            )
        )
        rows.append(
            (
                "  items applied twice",
                str(b["items_applied_twice"]),
                *_verdict(checks, "outbox items applied twice"),
            )
        )
    m = report["machine"]
    load = m["loadavg_at_start"]
    head = (
        f"tokenjournal {m['tokenjournal']} bench on {m['platform']}, {m['cpus']} CPUs, "
        f"Python {m['python']}, aiohttp {m['aiohttp']}"
        + (f", load {load[0]:.2f}" if load else "")
        + f"; {report['seconds']:.0f} s"
    )
    table = render_table(("figure", "value", "target", ""), rows)
    verdict = "all count targets met" if report["ok"] else "a COUNT TARGET WAS MISSED"
    return f"{head}\n\n{table}\n\n{verdict}"


def _blocking_rows(b: Result, checks: dict[str, Target]) -> list[tuple[str, str, str, str]]:
    if "skipped" in b:
        return [("blocking clients", f"skipped: {b['skipped']}", "", "")]
    rows: list[tuple[str, str, str, str]] = []
    for side, pair in b["pairs"].items():
        spread = pair["rounds_ratio"]
        rows.append(
            (
                f"blocking: {pair['label']} / bare",
                f"{pair['ratio']:.3f} (rounds {min(spread):.2f}-{max(spread):.2f}); "
                f"CPU time {pair['cpu_ratio']:.3f}; "
                f"{_rate(pair['requests_per_s'])} vs {_rate(pair['bare_requests_per_s'])}",
                *_verdict(checks, f"blocking throughput ratio ({side})"),
            )
        )
    costs = b["adapter_s_per_request"]
    rows.append(
        (
            "  adapter's own cost per request (no network)",
            ", ".join(f"{name} {seconds * 1e6:.1f} us" for name, seconds in costs.items()),
            "",
            "",
        )
    )
    rows.append(
        (
            "  sync access_token(): fresh / via the loop thread",
            f"{b['access_token_fresh_s'] * 1e6:.2f} us / {b['access_token_hop_s'] * 1e6:.1f} us",
            "",
            "",
        )
    )
    return rows


def run_bench(ns: argparse.Namespace) -> int:
    """Run the bench as parsed by :func:`add_bench_arguments`; returns the exit status.

    0 when every count target was met, 1 when one was missed (timings never fail it),
    2 for bad arguments.
    """
    try:
        settings = settings_from(ns)
    except ValueError as exc:
        print(f"tokenjournal bench: {exc}", file=sys.stderr)
        return 2
    progress = Progress(not ns.quiet)
    report = asyncio.run(run(settings, progress))
    if ns.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 0 if report["ok"] else 1


DESCRIPTION: Final = """\
Measure what tokenjournal costs on this device against a loopback reference server: hot
path, request overhead, coalescing, durability, footprint, blocking clients (the sync
manager, RequestsAuth, HttpxAuth), sealing, outbox. Each figure stands next to a baseline
measured in the same run. Only the count targets (one refresh for many callers at expiry, no
journal call on the hot path, group commit, no outbox item applied twice) decide the exit
status: 0 when all are met, 1 when
one is missed, 2 for bad arguments. The defaults finish in under two minutes on two cores."""

EPILOG: Final = """\
examples:
  tokenjournal bench                                  every section, a table on stdout
  tokenjournal bench --only hot,coalescing --rounds 3 two sections, fewer rounds
  tokenjournal bench --journal-dir /mnt/sdcard --only durability
                                                      fsyncs and time per refresh on that disk
  tokenjournal bench --only blocking                  sync manager, RequestsAuth, HttpxAuth
  tokenjournal bench --json --quiet > bench.json      the figures for a script, no progress"""


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_bench_arguments(parser)
    parser.set_defaults(handler=run_bench)
    return parser


def register(sub: Subparsers) -> None:
    """Add ``bench`` and its options to the command line."""
    _configure(
        sub.add_parser(
            "bench",
            help="measure refresh and journal costs",
            description=DESCRIPTION,
            epilog=EPILOG,
            formatter_class=Formatter,
        )
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m tokenjournal.cli.bench``: the bench without the rest of the CLI."""
    parser = argparse.ArgumentParser(
        prog="tokenjournal bench", description=DESCRIPTION, epilog=EPILOG, formatter_class=Formatter
    )
    return run_bench(_configure(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
