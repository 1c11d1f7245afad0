"""The fleet run's CI form: ``python -m tests.fleet --short`` (200 devices, five scenarios, on
a sped-up clock). The README's figures come from the full run (``--devices 10000``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fleet.__main__ import NAMES, device_pacing, parse, scenarios
from tests.fleet.model import main as model_main
from tests.fleet.model import recovery
from tests.fleet.report import _densest, _recovered_after

ROOT = Path(__file__).resolve().parents[1]


def test_short_fleet_run_loses_no_session_and_paces_every_device(tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "sdk"), str(ROOT)]))
    run = subprocess.run(
        [sys.executable, "-m", "tests.fleet", "--short", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {row["scenario"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"steady", "outage", "long_outage", "overload", "skew_kill"}
    for name, row in rows.items():
        assert row["server"]["reuse_detections"] == 0, name
        assert row["server"]["family_revocations"] == 0, name
        if name != "long_outage":  # an outage past the grace window may cost a session
            assert row["lost"] == 0, (name, row)
        if "outage_seconds" in row:
            # No device above one request per 10 s while the server is away: on average,
            # and in any 10 s (the offline floor; the rescue waits a gap after any try).
            assert row["busiest_device_rate"] <= 0.1, (name, row)
            assert row["max_in_any_10s"] <= 1, (name, row)
        if name in ("outage", "long_outage"):  # the server is whole again: all come back
            assert row["all_valid_after"] < float("inf"), (name, row)
            waited = row["waited_after_return"]  # those not usable at the return
            assert waited["devices"] <= row["devices"], (name, row)
            assert waited["p99"] <= row["all_valid_after"], (name, row)
    long = rows["long_outage"]["waited_after_return"]
    assert long["devices"] > 0 and 0 < long["mean"] <= rows["long_outage"]["all_valid_after"]
    assert rows["skew_kill"]["restarts"] == 1
    assert rows["overload"]["refused"] > 0  # the capacity limit was reached, and survived


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--only", "steady,stedy"], "--only: no scenario stedy; the scenarios: steady, outage"),
        (["--devices", "0"], "--devices must be 1 to 100,000"),
        (["--speed", "0"], "--speed must be above 0"),
        (["--ttl", "-1"], "--ttl must be 120 s"),
        (["--workers", "3", "--devices", "2"], "--workers must be 1 to the number of devices"),
        (["--max-delay", "0"], "--max-delay must be above 0"),
    ],
)
def test_the_fleet_run_refuses_what_it_cannot_run(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    assert error in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--outage", "-5"], ["--cap", "0"], ["--least", "-1"]])
def test_the_model_refuses_what_it_cannot_price(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        model_main(argv)
    assert exit_.value.code == 2
    assert "must be above 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "pacing"),
    [
        ([], (30.0, 3.0)),
        (["--policy", "fleet"], (90.0, 40.0)),  # RetryPolicy.fleet()
        (["--policy", "fleet", "--short"], (30.0, 40.0)),  # scaled to 5-minute tokens
        (["--policy", "fleet", "--max-delay", "60"], (60.0, 40.0)),
    ],
)
def test_the_devices_pace_as_the_policy_named(argv: list[str], pacing: tuple[float, float]) -> None:
    assert device_pacing(parse(argv)) == pacing


def test_the_fleet_runs_every_scenario_it_names() -> None:
    assert tuple(sc.name for sc in scenarios(900.0, 300.0, False, 10)) == NAMES
    assert parse(["--devices", "1"]).workers == 1  # not more processes than devices
    assert parse(["--only", "outage,long_outage"]).only == "outage,long_outage"


def test_recovery_is_measured_from_the_last_return_to_a_usable_state() -> None:
    device = {
        "states": [
            [100.0, "refreshing"],
            [101.0, "offline"],  # before the end of the outage
            [250.0, "refreshing"],
            [251.0, "valid"],  # back 51 s after the end at 200
            [900.0, "refreshing"],
            [900.5, "valid"],  # a routine refresh later: not a recovery
        ]
    }
    assert _recovered_after(device, 200.0) == 51.0
    assert _recovered_after({"states": [[10.0, "valid"]]}, 200.0) == 0.0
    assert _recovered_after({"states": [[10.0, "valid"], [300.0, "ended"]]}, 200.0) == float("inf")


def test_the_densest_window_counts_requests_closer_than_its_width() -> None:
    assert _densest([], 10) == 0
    assert _densest([0.0, 10.0, 20.0], 10) == 1
    assert _densest([0.0, 9.9, 10.5, 30.0], 10) == 2


def test_the_model_prices_the_pacing_rules_in_the_directions_docs_fleet_md_says() -> None:
    """The pacing model behind docs/fleet.md's price table: gaps that grow with the time
    offline lower the peak against a constant gap, and a longer cap lowers it further but
    makes devices wait longer after the return."""
    constant, _, _ = recovery(240.0, growth=0.0, rate=5.0)
    growing, wait, _ = recovery(240.0, rate=5.0)
    assert constant > growing + 1.0
    capped, longer_wait, _ = recovery(600.0, cap=600.0, rate=5.0)
    default, default_wait, _ = recovery(600.0, rate=5.0)
    assert capped < default
    assert longer_wait > default_wait > wait > 0
