"""`tokenjournal demo`: run as a user would, in a subprocess, and check what it proved.

One run of the demo (about ten seconds) feeds every test in this module.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tokenjournal.cli.demo import DemoReport, StepReport, TimelineEntry, render_summary
from tokenjournal.server import ServerConfig


@pytest.fixture(scope="module")
def demo_run() -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("TOKENJOURNAL_CRASH_AT", None)
    return subprocess.run(
        [sys.executable, "-m", "tokenjournal", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def report(demo_run: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert demo_run.returncode == 0, demo_run.stdout[-4000:] + demo_run.stderr[-4000:]
    data: dict[str, Any] = json.loads(demo_run.stdout)
    return data


def step(report: dict[str, Any], key: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in report["steps"] if s["key"] == key)
    assert found["ok"] is True, found
    return found


def test_every_step_passed_and_the_exit_status_is_zero(report: dict[str, Any]) -> None:
    assert report["ok"] is True
    assert [s["key"] for s in report["steps"]] == ["a", "b", "c", "d"]
    assert report["counters"]["signins"] == 2  # setup only: no step needed a new sign-in


def test_a_one_refresh_serves_a_thousand_requests_across_expiry(report: dict[str, Any]) -> None:
    a = step(report, "a")
    f = a["figures"]
    assert f["requests"] == 1000 and f["ok"] == 1000
    assert f["refresh_requests"] == 1 and f["rotations"] == 1
    assert f["client_refresh_requests"] == 1
    assert f["crossed_expiry"] > 0  # requests really met the expiry (a 401) mid-flight
    assert a["counters"]["api_200"] == 1000


def test_b_a_killed_client_recovers_through_the_grace_window(report: dict[str, Any]) -> None:
    f = step(report, "b")["figures"]
    assert f["killed_after_rotation"] is True and f["answer_arrived"] is False
    assert f["intent_pending"] is True
    assert f["grace_replays"] == 1 and f["recovery_signins"] == 0
    assert f["family_revocations"] == 0
    assert f["child_exit"] == 0 and f["api_status"] == 200


def test_c_recovery_after_the_window_ends_the_session_clearly(report: dict[str, Any]) -> None:
    c = step(report, "c")
    f = c["figures"]
    assert f["killed_after_rotation"] is True and f["intent_pending"] is True
    assert f["code"] == "token_expired" and f["child_exit"] == 3
    assert f["journal_state"] == "ended" and f["journal_code"] == "token_expired"
    assert f["recovery_signins"] == 0
    assert f["reuse_detections"] == 1 and f["family_revocations"] == 1
    assert c["counters"]["grace_replays"] == 0


def test_d_a_flaky_network_costs_no_session(report: dict[str, Any]) -> None:
    f = step(report, "d")["figures"]
    assert f["ok"] == f["requests"]
    assert f["session_lost"] is False and f["state"] == "valid"
    assert f["faults_injected"] == 3 and f["refresh_requests"] == 4
    assert f["rotations"] == 1 and f["grace_replays"] == 1
    assert f["signins"] == 0 and f["family_revocations"] == 0


def test_the_timeline_shows_the_kills_and_the_events(report: dict[str, Any]) -> None:
    timeline = report["timeline"]
    texts = [e["text"] for e in timeline]
    assert sum("SIGKILL" in t for t in texts) == 2
    assert any(t.startswith("event recovering") for t in texts)
    assert any("SessionEnded('token_expired')" in t for t in texts)
    assert any(e["source"].startswith("pid ") for e in timeline)
    ms = [e["ms"] for e in timeline]
    assert ms == sorted(ms)


def test_progress_goes_to_stderr_step_by_step(demo_run: subprocess.CompletedProcess[str]) -> None:
    err = demo_run.stderr
    positions = [err.index(f"[{key}] ") for key in "abcd"]
    assert positions == sorted(positions)
    assert re.search(r"^\s+\d+ ms  server ", err, re.MULTILINE)


def test_no_token_is_ever_printed(demo_run: subprocess.CompletedProcess[str]) -> None:
    # Access tokens are JWTs: a header always starts with "eyJ". Fingerprints are 8 hex chars.
    assert "eyJ" not in demo_run.stdout and "eyJ" not in demo_run.stderr


def test_the_temporary_folder_is_removed(report: dict[str, Any]) -> None:
    line = next(e["text"] for e in report["timeline"] if e["text"].startswith("journals in "))
    folder = Path(line.removeprefix("journals in "))
    assert folder == Path(report["folder"])
    assert folder.name.startswith("tokenjournal-demo-")
    assert not folder.exists()


def test_the_summary_table_reads_the_counters() -> None:
    """The human summary: counters per step, a total row, a verdict per step."""
    steps = tuple(
        StepReport(k, f"step {k}", ok, f"verdict {k}", {}, {"rotations": 1, "api_200": 7}, 1.0)
        for k, ok in (("a", True), ("b", False))
    )
    report = DemoReport(
        ok=False,
        server_url="http://127.0.0.1:1",
        access_ttl=900,
        grace=300,
        steps=steps,
        counters={"signins": 2, "rotations": 2, "api_200": 14},
        timeline=(TimelineEntry(1.0, "a", "demo", "x"),),
        ms=1234.0,
        folder="/nonexistent",
    )
    text = render_summary(report)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("step"))
    for label in (
        "sign-ins",
        "refresh requests",
        "rotations",
        "grace replays",
        "reuse detections",
        "family revocations",
        "API 200",
        "API 401",
        "verdict",
    ):
        assert label in header
    assert re.search(r"^a\s+0\s+0\s+1\s+0\s+0\s+0\s+7\s+0\s+PASS$", text, re.MULTILINE)
    assert re.search(r"^b\s+.*FAIL$", text, re.MULTILINE)
    assert re.search(r"^total\s+2\s+0\s+2\s+0\s+0\s+0\s+14\s+0$", text, re.MULTILINE)
    assert "[b] FAIL  verdict b" in text
    assert text.rstrip().endswith("demo FAILED: at least one step did not behave as expected")


async def test_the_demo_fails_against_a_server_without_grace_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The verdicts can fail: with a 1 ms grace window no crash or dropped answer is saved."""
    import tokenjournal.cli.demo as demo

    def no_grace(**config: Any) -> ServerConfig:
        return ServerConfig(**{**config, "grace": 0.001})

    monkeypatch.setattr(demo, "ServerConfig", no_grace)
    report = await demo.run_demo(demo.DemoOptions(requests=200))
    verdicts = {s.key: s.ok for s in report.steps}
    assert report.ok is False
    # c reuses b's journal, which b's failure already ended: only a, b and d are asserted.
    assert (verdicts["a"], verdicts["b"], verdicts["d"]) == (True, False, False)
    b = next(s for s in report.steps if s.key == "b")
    assert b.figures["grace_replays"] == 0 and b.figures["child_exit"] == 3
    d = next(s for s in report.steps if s.key == "d")
    assert d.figures["session_lost"] is True
