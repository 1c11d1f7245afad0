"""Peer comparison: tokenjournal against Authlib's ``AsyncOAuth2Client`` (httpx based).

    pip install -e '.[bench]'          # authlib, httpx
    python -m tests.bench.peers        # a table; --json for machines; --help for sizes

Both clients speak OAuth 2.0 to the reference server's ``/oauth/token`` (password grant
with the public client ``tokenjournal-demo``, then ``refresh_token`` grants), on 127.0.0.1,
in this process. Three workloads:

* **coalescing** - many concurrent callers at expiry, either asking for a token
  (``tm.access_token()`` / ``client.ensure_active_token(client.token)``) or making a GET of
  ``/api/me`` (through ``tm.client_session()`` / ``client.get``): refresh requests the
  server received per expiry, and the time until the last caller was served;
* **request overhead** - sequential GETs of ``/api/me``: tokenjournal's middleware against a
  plain ``aiohttp.ClientSession`` with a fixed header, Authlib's client against a plain
  ``httpx.AsyncClient`` with a fixed header, all four interleaved; ratios;
* **SIGKILL mid-refresh** - a subprocess signs in and refreshes; the server rotates the token
  and holds the answer; the subprocess is killed; a new process must get a working session
  back. Measured for tokenjournal, for Authlib as it is (it keeps tokens in memory), and for
  Authlib plus an ``update_token`` callback that saves the token as JSON.

Timings are medians of interleaved rounds after a warm-up and are noisy on a shared machine;
counts are exact. The command exits 1 only when tokenjournal misses a count target (one
refresh request per expiry); Authlib's figures are reported, never judged.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

import tokenjournal as tj
from tokenjournal.cli._table import render_table
from tokenjournal.cli.bench import Progress, machine, median
from tokenjournal.server import ReferenceServer, ServerConfig
from tokenjournal.testing import FakeClock

with warnings.catch_warnings():
    # Authlib 1.6+ prefers the httpx2 package and warns when it falls back to httpx.
    import authlib.deprecate  # it installs an "always" filter for its own warnings on import

    warnings.simplefilter("ignore")
    import authlib
    from authlib.integrations.httpx_client import AsyncOAuth2Client

# The HTTP package Authlib itself uses, so the plain baseline runs on the same one.
try:
    import httpx2 as httpx  # type: ignore[import-not-found]
except ImportError:
    import httpx

CLIENT_ID = "tokenjournal-demo"
USER = {"username": "demo@example.com", "password": "demo"}
CHILD = Path(__file__).with_name("_peer_child.py")
#: How long the server holds the answer of the rotation the subprocess dies waiting for.
HOLD = 3.0

Result = dict[str, Any]


def oauth(url: str) -> tj.OAuth2Protocol:
    """The SDK side's protocol, as the issue specifies."""
    return tj.OAuth2Protocol(url + "/oauth/token", client_id=CLIENT_ID, client_auth="none")


def authlib_client(url: str, **kwargs: Any) -> Any:
    """Authlib's async client for the reference server's token endpoint (public client)."""
    return AsyncOAuth2Client(
        client_id=CLIENT_ID,
        token_endpoint_auth_method="none",
        token_endpoint=url + "/oauth/token",
        timeout=30.0,  # 1,000 callers queue for httpx's 100 pooled connections
        **kwargs,
    )


async def served(callers: int, call: Callable[[], Awaitable[Any]]) -> tuple[float, list[Any]]:
    """Run ``callers`` calls at once; seconds until the last one returned, and the results."""
    stamps: list[float] = []

    async def one() -> Any:
        result = await call()
        stamps.append(time.perf_counter())
        return result

    gc.collect()
    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(callers)))
    return max(stamps) - started, list(results)


# --------------------------------------------------------------------------- coalescing


class SdkSide:
    """tokenjournal: a manager with a SQLite journal and its middleware session."""

    name = "tokenjournal"

    def __init__(self, server: ReferenceServer, folder: Path) -> None:
        self.server = server
        self.clock = FakeClock(server.now())
        self.tm = tj.TokenManager(
            server.url, journal=folder / "sdk.db", protocol=oauth(server.url), clock=self.clock
        )
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        await self.tm.open()
        await self.tm.sign_in(**USER)
        self.http = self.tm.client_session()

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        await self.tm.close()

    async def expire(self) -> None:
        tokens = self.tm.tokens
        assert tokens is not None and tokens.expires_at_epoch is not None
        step = tokens.expires_at_epoch - self.clock.time() + 1.0
        await self.server.advance(step)
        self.clock.advance(step)

    async def token(self) -> str:
        return await self.tm.access_token()

    async def get(self) -> int:
        assert self.http is not None
        async with self.http.get(self.server.url + "/api/me") as resp:
            await resp.read()
            return resp.status


class AuthlibSide:
    """Authlib: ``AsyncOAuth2Client`` with auto-refresh (``token_endpoint``), tokens in memory."""

    name = "authlib"

    def __init__(self, server: ReferenceServer) -> None:
        self.server = server
        self.client = authlib_client(server.url)

    async def start(self) -> None:
        await self.client.fetch_token(self.server.url + "/oauth/token", **USER)

    async def close(self) -> None:
        await self.client.aclose()

    async def expire(self) -> None:
        # The server's clock passes the token's expiry, and so does the client's view of it
        # (Authlib compares the integer expires_at with time.time()).
        await self.server.advance(float(self.server.config.access_ttl) + 1.0)
        self.client.token["expires_at"] = int(time.time()) - 1

    async def token(self) -> str:
        await self.client.ensure_active_token(self.client.token)
        return str(self.client.token["access_token"])

    async def get(self) -> int:
        resp = await self.client.get(self.server.url + "/api/me")
        return int(resp.status_code)


async def coalesce_round(side: SdkSide | AuthlibSide, how: str, callers: int) -> Result:
    """Expire the token; ``callers`` concurrent token requests or GETs; count and time."""
    await side.expire()
    side.server.reset_stats()
    call = side.token if how == "token" else side.get
    seconds, results = await served(callers, call)
    stats = side.server.stats()
    ok = len(set(results)) == 1 if how == "token" else all(r == 200 for r in results)
    return {"refresh_requests": stats["refresh_requests"], "seconds": seconds, "ok": ok}


async def bench_coalescing(callers: int, rounds: int, folder: Path, progress: Progress) -> Result:
    """Refresh requests and time-to-last-caller under ``callers`` callers at expiry."""
    config = ServerConfig(test_mode=True)
    async with ReferenceServer(config) as s1, ReferenceServer(config) as s2:
        sides: list[SdkSide | AuthlibSide] = [SdkSide(s1, folder), AuthlibSide(s2)]
        for side in sides:
            await side.start()
        try:
            progress("coalescing: warm-up")
            for side in sides:
                for how in ("token", "get"):
                    await coalesce_round(side, how, min(callers, 50))
            runs: dict[str, list[Result]] = {}
            combos = [(side, how) for side in sides for how in ("token", "get")]
            for r in range(rounds):
                progress(f"coalescing: {callers:,} callers, round {r + 1}/{rounds}")
                shift = r % len(combos)
                for side, how in combos[shift:] + combos[:shift]:
                    result = await coalesce_round(side, how, callers)
                    runs.setdefault(f"{side.name}/{how}", []).append(result)
        finally:
            for side in sides:
                await side.close()
    return {
        key: {
            "callers": callers,
            "refresh_requests_per_expiry": [x["refresh_requests"] for x in results],
            "last_served_s": median([x["seconds"] for x in results]),
            "all_callers_ok": all(x["ok"] for x in results),
        }
        for key, results in runs.items()
    }


# --------------------------------------------------------------------------- overhead


async def bench_overhead(requests: int, rounds: int, folder: Path, progress: Progress) -> Result:
    """Sequential GETs through the four clients, interleaved; ratios of throughput."""
    async with ReferenceServer(ServerConfig(test_mode=True)) as server:
        url = server.url + "/api/me"
        tm = tj.TokenManager(server.url, journal=folder / "overhead.db", protocol=oauth(server.url))
        client = authlib_client(server.url)
        async with tm, client:
            await tm.sign_in(**USER)
            await client.fetch_token(server.url + "/oauth/token", **USER)
            sdk_bearer = {"Authorization": "Bearer " + await tm.access_token()}
            authlib_bearer = {"Authorization": "Bearer " + client.token["access_token"]}
            async with (
                tm.client_session() as sdk,
                aiohttp.ClientSession(headers=sdk_bearer) as plain_aiohttp,
                httpx.AsyncClient(headers=authlib_bearer, timeout=30.0) as plain_httpx,
            ):

                async def aiohttp_get(http: aiohttp.ClientSession) -> int:
                    async with http.get(url) as resp:
                        await resp.read()
                        return resp.status

                async def httpx_get(http: Any) -> int:
                    return int((await http.get(url)).status_code)

                calls: dict[str, Callable[[], Awaitable[int]]] = {
                    "tokenjournal": lambda: aiohttp_get(sdk),
                    "aiohttp": lambda: aiohttp_get(plain_aiohttp),
                    "authlib": lambda: httpx_get(client),
                    "httpx": lambda: httpx_get(plain_httpx),
                }

                async def block(name: str, n: int) -> float:
                    started = time.perf_counter()
                    for _ in range(n):
                        if await calls[name]() != 200:
                            raise RuntimeError(f"{name}: a GET was not answered 200")
                    return time.perf_counter() - started

                progress("request overhead: warm-up")
                for name in calls:
                    await block(name, min(requests, 50))
                took: dict[str, list[float]] = {name: [] for name in calls}
                names = list(calls)
                for r in range(rounds):
                    progress(f"request overhead: round {r + 1}/{rounds}")
                    gc.collect()
                    shift = r % len(names)
                    for name in names[shift:] + names[:shift]:
                        took[name].append(await block(name, requests))

    def paired(a: str, b: str) -> float:
        # Per round, b's time over a's: a throughput ratio of a to b under the same noise.
        return median([y / x for x, y in zip(took[a], took[b], strict=True)])

    return {
        "requests_per_client": requests * rounds,
        "requests_per_s": {name: requests / median(t) for name, t in took.items()},
        "tokenjournal_over_aiohttp": paired("tokenjournal", "aiohttp"),
        "authlib_over_httpx": paired("authlib", "httpx"),
        "tokenjournal_over_authlib": paired("tokenjournal", "authlib"),
    }


# --------------------------------------------------------------------------- SIGKILL


async def _child(client: str, phase: str, url: str, state: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), client, phase, url, str(state),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _line(proc: asyncio.subprocess.Process, timeout: float) -> str:
    assert proc.stdout is not None
    raw = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not raw:
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"child ended early: {err[-1:] or ['(no output)']}")
    return raw.decode().strip()


async def kill_mid_refresh(client: str, folder: Path, progress: Progress) -> Result:
    """Kill a process after the server rotated its token; can the next start go on?"""
    state = folder / client
    state.mkdir()
    async with ReferenceServer(ServerConfig(test_mode=True)) as server:
        server.set_faults([{"kind": "delay_after", "seconds": HOLD}])
        progress(f"SIGKILL mid-refresh: {client}, first process")
        first = await _child(client, "a", server.url, state)
        try:
            if await _line(first, 60) != "signed-in":
                raise RuntimeError(f"{client}: unexpected output from the first process")
            deadline = time.monotonic() + 30
            while server.stats()["rotations"] < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{client}: the server never rotated")
                await asyncio.sleep(0.005)
            first.send_signal(signal.SIGKILL)
        finally:
            if first.returncode is None:
                first.kill()
            await first.communicate()
        rotated = server.stats()
        on_disk = sorted(p.name for p in state.iterdir())
        server.set_faults([])
        server.reset_stats()
        progress(f"SIGKILL mid-refresh: {client}, next start")
        second = await _child(client, "b", server.url, state)
        try:
            outcome = json.loads(await _line(second, 60))
        finally:
            if second.returncode is None:
                second.kill()
            await second.communicate()
        after = server.stats()
    return {
        "killed_by": "SIGKILL" if first.returncode == -signal.SIGKILL else str(first.returncode),
        "killed_after_rotation": rotated["rotations"] == 1,
        "left_on_disk": on_disk,
        "next_start": outcome,
        "next_start_server": {
            k: after[k]
            for k in ("refresh_requests", "grace_replays", "reuse_detections", "signins")
        },
    }


async def bench_kill(folder: Path, progress: Progress) -> Result:
    return {c: await kill_mid_refresh(c, folder, progress) for c in CLIENTS}


CLIENTS = ("tokenjournal", "authlib", "authlib-file")


# --------------------------------------------------------------------------- report


def render(report: Result) -> str:
    """The report as tables for people."""
    out = [
        f"tokenjournal {report['machine']['tokenjournal']} vs Authlib {report['authlib']} "
        f"({report['http_module']}) on {report['machine']['platform']}, "
        f"{report['machine']['cpus']} CPUs, Python {report['machine']['python']}, "
        f"load {(report['machine']['loadavg_at_start'] or [0.0])[0]:.2f}; "
        f"{report['seconds']:.0f} s"
    ]
    coal = report.get("coalescing")
    if coal:
        rows = [
            (
                key,
                ", ".join(str(n) for n in v["refresh_requests_per_expiry"]),
                f"{v['last_served_s'] * 1000:.1f} ms",
                "yes" if v["all_callers_ok"] else "NO",
            )
            for key, v in sorted(coal.items())
        ]
        callers = next(iter(coal.values()))["callers"]
        out += [
            "",
            f"Coalescing: {callers:,} concurrent callers at expiry",
            render_table(
                ("client/caller", "refresh requests per expiry", "last served", "all ok"), rows
            ),
        ]
    over = report.get("overhead")
    if over:
        rates = over["requests_per_s"]
        rows2 = [(name, f"{rate:,.0f}/s") for name, rate in rates.items()]
        rows2 += [
            ("tokenjournal / plain aiohttp", f"{over['tokenjournal_over_aiohttp']:.3f}"),
            ("authlib / plain httpx", f"{over['authlib_over_httpx']:.3f}"),
            ("tokenjournal / authlib", f"{over['tokenjournal_over_authlib']:.3f}"),
        ]
        out += [
            "",
            f"Request overhead: sequential GETs, {over['requests_per_client']:,} per client",
            render_table(("client", "throughput"), rows2),
        ]
    kill = report.get("kill")
    if kill:
        rows3 = []
        for name, v in kill.items():
            nxt = v["next_start"]
            srv = v["next_start_server"]
            rows3.append(
                (
                    name,
                    ", ".join(v["left_on_disk"]) or "nothing",
                    "resumed, no password" if nxt.get("resumed") else "must sign in again",
                    nxt.get("error", "-"),
                    f"{srv['grace_replays']} / {srv['reuse_detections']}",
                )
            )
        out += [
            "",
            "SIGKILL after the server rotated, before the answer arrived; then a new process",
            render_table(
                ("client", "left on disk", "next start", "error", "grace replays / reuse"),
                rows3,
            ),
        ]
    out += [
        "",
        "tokenjournal met its count targets" if report["ok"] else "a COUNT TARGET WAS MISSED",
    ]
    return "\n".join(out)


async def run(ns: argparse.Namespace, progress: Progress) -> Result:
    sections = [s.strip() for s in ns.only.split(",") if s.strip()]
    report: Result = {
        "machine": machine(),
        "authlib": authlib.__version__,
        "http_module": f"{httpx.__name__} {httpx.__version__}",
        "settings": vars(ns),
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokenjournal-peers-") as tmp:
        folder = Path(tmp)
        if "coalescing" in sections:
            report["coalescing"] = await bench_coalescing(ns.callers, ns.rounds, folder, progress)
        if "overhead" in sections:
            report["overhead"] = await bench_overhead(
                ns.requests, ns.overhead_rounds, folder, progress
            )
        if "kill" in sections:
            report["kill"] = await bench_kill(folder, progress)
    report["seconds"] = time.perf_counter() - started
    ok = True
    for key, v in report.get("coalescing", {}).items():
        if key.startswith("tokenjournal/"):
            ok &= all(n == 1 for n in v["refresh_requests_per_expiry"]) and v["all_callers_ok"]
    if "kill" in report:
        ok &= bool(report["kill"]["tokenjournal"]["next_start"].get("resumed"))
    report["ok"] = ok
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.peers",
        description="tokenjournal vs Authlib's AsyncOAuth2Client on the reference server.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--only", default="coalescing,overhead,kill", help="sections to run")
    parser.add_argument("--callers", type=int, default=1000, help="concurrent callers at expiry")
    parser.add_argument("--rounds", type=int, default=3, help="expiries per client and caller")
    parser.add_argument("--requests", type=int, default=300, help="GETs per client per round")
    parser.add_argument("--overhead-rounds", type=int, default=8, help="interleaved GET rounds")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    ns = parser.parse_args(argv)
    report = asyncio.run(run(ns, Progress(not ns.quiet)))
    print(json.dumps(report, indent=2) if ns.json else render(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
