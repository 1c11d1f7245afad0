"""`tokenjournal bench`: a smoke run with tiny sizes that asserts the COUNT targets.

Timings are never asserted here (they belong to the bench's output); what is asserted is what
can be counted: one refresh request for many concurrent callers at expiry, no journal call on
the hot path, a bounded number of durable commits per refresh, and the exit status that a
missed count target produces.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import py_compile
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tokenjournal._journal
from tokenjournal import MemoryJournal, TokenManager
from tokenjournal.cli import bench
from tokenjournal.server import ReferenceServer
from tokenjournal.testing import FakeClock

DEMO = {"email": "demo@example.com", "password": "demo"}
TINY = [
    "--rounds", "2", "--hot-calls", "300", "--requests", "20", "--overhead-rounds", "2",
    "--callers", "200", "--coalesce-rounds", "2", "--refreshes", "3",
    "--footprint-rounds", "1", "--accounts", "3", "--no-strace", "--quiet",
]  # fmt: skip


def parse(*args: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_bench_arguments(parser)
    return parser.parse_args(list(args))


def run_json(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> tuple[int, Any]:
    status = bench.run_bench(parse(*TINY, "--json", "--journal-dir", str(tmp_path), *args))
    return status, json.loads(capsys.readouterr().out)


def test_smoke_run_meets_every_count_target(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, report = run_json(capsys, tmp_path, "--only", "hot,overhead,coalescing,durability")
    sections = report["sections"]
    assert status == 0 and report["ok"] is True
    # Coalescing: 200 callers on an expired token, one refresh request per expiry, and
    # every caller got the same, new token.
    coal = sections["coalescing"]
    assert coal["refresh_requests_per_round"] == [1, 1]
    assert coal["every_caller_same_new_token"] is True
    # Hot path: no journal call at all, and no refresh.
    hot = sections["hot"]
    assert hot["journal_calls"] == 0
    assert hot["audited_calls_touching_journal"] == 0
    assert hot["durable_commits"] == 0 and hot["refresh_requests"] == 0
    # Request overhead: every GET through both sessions was a 200, with no refresh.
    over = sections["overhead"]
    assert over["not_200"] == 0 and over["refresh_requests"] == 0
    # Durability: one refresh request per refresh; the intent and the commit are durable
    # (invariants 1 and 3) and nothing more; the memory journal writes nothing to disk.
    dur = sections["durability"]
    assert dur["refresh_requests_per_refresh"] == 1
    assert 1 <= dur["durable_commits_per_refresh"] <= 2
    assert dur["fsync"] == {"measured": False, "why": "--no-strace"}
    # The folder made inside --journal-dir is removed afterwards.
    assert list(tmp_path.iterdir()) == []
    # The same report as a table for people names each figure and the verdict.
    table = bench.render(report)
    for figure in (
        "hot path: access_token()",
        "calls that touched the journal",
        "request overhead: client_session / plain",
        "coalescing: refresh requests, 200 callers",
        "durability: durable commits per refresh",
        "all count targets met",
    ):
        assert figure in table


def test_footprint_runs_subprocesses_and_sizes_the_journal(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, report = run_json(capsys, tmp_path, "--only", "footprint")
    foot = report["sections"]["footprint"]
    assert status == 0
    assert foot["sdk_rss_bytes"] > 0 and foot["aiohttp_rss_bytes"] > 0
    assert foot["journal_bytes_one_account"] > 0
    assert foot["journal_bytes_many_accounts"] >= foot["journal_bytes_one_account"]
    assert [t["name"] for t in report["targets"]] == ["extra RSS"]
    assert foot["bytecode_cached"] is bench.bytecode_cached(tokenjournal._journal)


def test_a_package_without_bytecode_on_disk_is_said_to_be_compiled(tmp_path: Path) -> None:
    """The footprint of a process that compiled the package is ~4 MiB more than an installed
    wheel's: the bench says when that is the case, from the module's bytecode path."""
    source = tmp_path / "m.py"
    source.write_text("x = 1\n")
    spec = importlib.util.spec_from_file_location("m", source)
    assert spec is not None and spec.cached is not None
    module = importlib.util.module_from_spec(spec)
    assert not bench.bytecode_cached(module)
    Path(spec.cached).parent.mkdir(parents=True, exist_ok=True)
    py_compile.compile(str(source), cfile=spec.cached)
    assert bench.bytecode_cached(module)
    module.__spec__ = None
    assert bench.bytecode_cached(module)  # nothing to tell: not counted as compiled


def test_blocking_clients_are_measured_against_their_bare_twins(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, report = run_json(capsys, tmp_path, "--only", "blocking", "--blocking-rounds", "2")
    blocking = report["sections"]["blocking"]
    assert status == 0
    assert set(blocking["pairs"]) == {"sync_manager", "requests_auth", "httpx_auth"}
    assert blocking["not_200"] == 0 and blocking["refresh_requests"] == 0
    assert blocking["requests_per_side"] == 40
    assert set(blocking["adapter_s_per_request"]) == {"requests_auth", "httpx_auth"}
    assert blocking["access_token_fresh_s"] > 0 and blocking["access_token_hop_s"] > 0
    names = [t["name"] for t in report["targets"]]
    assert names == [f"blocking throughput ratio ({side})" for side in blocking["pairs"]]
    table = bench.render(report)
    for figure in ("requests + RequestsAuth / bare", "httpx + HttpxAuth / bare", "own cost"):
        assert figure in table


def test_sealing_compares_a_sealed_journal_with_an_unsealed_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Issue 16: the sealed figures beside the unsealed ones of the same run; the sealed
    hot path still reads memory only (a count target)."""
    status, report = run_json(capsys, tmp_path, "--only", "sealing")
    seal = report["sections"]["sealing"]
    assert status == 0 and report["ok"] is True
    assert seal["sealed_hot_journal_calls"] == 0
    assert seal["sealed_audited_calls_touching_journal"] == 0
    assert seal["refreshes_per_side"] == 6
    assert seal["sealed_rss_bytes"] > 0 and seal["unsealed_rss_bytes"] > 0
    assert [t["name"] for t in report["targets"]] == ["sealed hot path journal calls"]
    table = bench.render(report)
    for figure in ("sealing: refresh, sealed / unsealed", "RSS, sealed manager over unsealed"):
        assert figure in table
    assert list(tmp_path.iterdir()) == []


def test_outbox_section_counts_group_commits_and_no_item_applied_twice(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, report = run_json(capsys, tmp_path, "--only", "outbox", "--outbox-items", "40")
    box = report["sections"]["outbox"]
    assert status == 0 and report["ok"] is True
    assert box["durable_commits_for_100_concurrent_enqueues"] <= 10
    assert box["items_applied_twice"] == 0
    assert box["journal_bytes_per_pending_item"] > 0
    names = {t["name"]: t for t in report["targets"]}
    assert names["commits for 100 concurrent enqueues"]["enforced"] is True
    assert names["outbox delivery / plain POST loop"]["enforced"] is False  # timing
    assert "outbox: durable enqueue, 100 callers / 1" in bench.render(report)


async def test_probe_charges_a_background_refresh_to_the_call_that_started_it(
    server: ReferenceServer,
) -> None:
    # The hot path's "0 journal calls" means something only if the probe would see one:
    # a token inside the refresh margin is answered from memory, but the call starts a
    # refresh whose journal calls the audit must count.
    clock = FakeClock(server.now())
    async with TokenManager(server.url, MemoryJournal(), clock=clock) as tm:
        await tm.sign_in(**DEMO)
        probe = bench.JournalProbe(tm.journal)
        assert await bench.audit_hot_path(tm, probe, 50) == 0
        assert probe.total == 0
        clock.advance(900 - 30)  # inside the 60 s margin, not expired
        touched = await bench.audit_hot_path(tm, probe, 50)
        assert touched >= 1
        assert probe.calls.get("load", 0) >= 1
        await asyncio.wait_for(tm.refresh(), 10)


async def test_coalescing_counts_the_server_side_requests(server: ReferenceServer) -> None:
    clock = FakeClock(server.now())
    async with TokenManager(server.url, MemoryJournal(), clock=clock) as tm:
        await tm.sign_in(**DEMO)
        first = await bench.coalesce_once(tm, clock, server, 300)
        second = await bench.coalesce_once(tm, clock, server, 300)
    for result in (first, second):
        assert result["refresh_requests"] == 1
        assert result["sdk_refresh_requests"] == 1
        assert result["distinct_tokens"] == 1 and result["all_new"] is True


def test_a_missed_count_target_fails_the_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def two_requests(*_: object) -> dict[str, Any]:
        return {"refresh_requests_per_round": [1, 2]}

    monkeypatch.setitem(bench._RUNNERS, "coalescing", two_requests)
    assert bench.run_bench(parse(*TINY, "--only", "coalescing", "--json")) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    [target] = report["targets"]
    assert target["enforced"] is True and target["met"] is False and target["value"] == "1,2"


def test_timing_targets_are_reported_but_never_fail_the_command() -> None:
    checks = bench.targets(
        {
            "overhead": {"ratio": 0.5, "middleware_cpu_s": 9e-6, "bare_middleware_cpu_s": 1e-6},
            "footprint": {"extra_rss_mib": 50.0},
            "hot": {"journal_calls": 0, "audited_calls_touching_journal": 0},
        }
    )
    by_name = {t.name: t for t in checks}
    assert by_name["request throughput ratio"].met is False
    assert by_name["extra RSS"].met is False
    assert not by_name["request throughput ratio"].enforced
    assert not by_name["extra RSS"].enforced
    added = by_name["middleware CPU over a bare bearer middleware"]
    assert added.met is False and not added.enforced and added.value == "+8.00 us"
    assert by_name["hot path journal calls"].met and by_name["hot path journal calls"].enforced
    hot_touch = bench.targets({"hot": {"journal_calls": 3, "audited_calls_touching_journal": 1}})
    assert hot_touch[0].met is False


def test_unknown_section_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.run_bench(parse("--only", "hot,warp")) == 2
    assert "warp" in capsys.readouterr().err


def test_fsync_trace_counts_only_between_the_markers() -> None:
    trace = "\n".join(
        [
            "101 fsync(3</j/fsync.db-wal>) = 0",  # sign-in: before the start marker
            "101 fsync(7</j/tj-bench-start.marker>) = 0",
            "102 fsync(3</j/fsync.db-wal>) = 0",
            "102 fdatasync(3</j/fsync.db-wal> <unfinished ...>",
            "102 <... fdatasync resumed>) = 0",
            "102 fsync(3</j/fsync.db-wal>) = 0",
            "101 fsync(8</j/tj-bench-end.marker>) = 0",
            "101 fsync(3</j/fsync.db>) = 0",  # close: after the end marker
        ]
    )
    assert bench.parse_fsync_trace(trace) == {"fsync": 2, "fdatasync": 1}


def test_rounds_interleave_the_two_sides() -> None:
    orders = [order for _, order in bench.interleaved(4)]
    assert orders == [("a", "b"), ("b", "a"), ("a", "b"), ("b", "a")]


def test_module_runs_standalone() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tokenjournal.cli.bench", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    for option in ("--json", "--journal-dir", "--callers", "--only"):
        assert option in done.stdout
