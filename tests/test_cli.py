"""The `tokenjournal` command line: help a newcomer can follow, clear usage errors, serve."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

import tokenjournal
from tokenjournal.cli import main

SUBCOMMANDS = ("demo", "serve", "status", "reseal", "conformance")


def run_help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    out: str = capsys.readouterr().out
    return out


def test_top_level_help_lists_every_command_and_starts_with_the_demo(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = run_help(capsys)
    assert out.startswith("usage: tokenjournal ")
    for name in (*SUBCOMMANDS, "bench"):
        assert f"\n    {name}" in out
    assert "Run `tokenjournal demo`" in out
    assert "examples:\n  tokenjournal demo" in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help_with_examples(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    out = run_help(capsys, command)
    assert out.startswith(f"usage: tokenjournal {command}")
    assert "examples:" in out
    examples = out.split("examples:", 1)[1]
    assert f"tokenjournal {command}" in examples


def test_subcommand_help_names_the_options_users_need(capsys: pytest.CaptureFixture[str]) -> None:
    assert all(o in run_help(capsys, "demo") for o in ("--json", "--quiet"))
    serve = run_help(capsys, "serve")
    assert all(
        o in serve for o in ("--host", "--port", "--db", "--grace", "--access-ttl", "--test-mode")
    )
    assert all(o in run_help(capsys, "status") for o in ("--journal", "--json"))
    conformance = run_help(capsys, "conformance")
    for option in (
        "--protocol",
        "--email",
        "--password",
        "--client-id",
        "--client-secret",
        "--username",
        "--test-clock",
    ):
        assert option in conformance


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"tokenjournal {tokenjournal.__version__}"


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: tokenjournal" in capsys.readouterr().err


def test_unknown_arguments_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["status", "--journal", "x", "--bogus"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--requests", "5"])  # too few to cross the expiry mid-flight
    assert "at least 200" in capsys.readouterr().err


def test_serve_refuses_test_mode_off_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--test-mode", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loopback" in err


def test_serve_rejects_bad_settings_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--grace", "-1", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenjournal serve: ") and err.count("\n") == 1


def test_bench_is_reported_missing_when_not_built_in(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tokenjournal.cli.bench", None)  # import now fails
    assert main(["bench", "--anything"]) == 2
    assert capsys.readouterr().err == "bench is not available in this build\n"


def test_bench_options_belong_to_the_bench_module(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tokenjournal.cli.bench")
    out = run_help(capsys, "bench")
    assert out.startswith("usage: tokenjournal bench")


def test_bench_registers_its_own_options() -> None:
    bench = pytest.importorskip("tokenjournal.cli.bench")
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["bench", "--rounds", "3"])
    assert ns.command == "bench" and ns.rounds == 3 and ns.handler is bench.run_bench


def test_bench_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_help(capsys, "bench")
    examples = out.split("examples:", 1)[1]
    assert "tokenjournal bench --only" in examples and "--journal-dir" in examples


def test_every_serve_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Each option line of `serve --help` carries a description (six had none)."""
    from tokenjournal.cli import serve as serve_command

    commands = argparse.ArgumentParser().add_subparsers()
    serve_command.register(commands)
    serve = commands.choices["serve"]
    bare = [a.option_strings for a in serve._actions if a.option_strings and not a.help]
    assert bare == []


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TOKENJOURNAL_CRASH_AT", None)
    return env


def test_python_dash_m_works_like_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tokenjournal", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        check=False,
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: tokenjournal ")


def test_serve_runs_until_sigterm() -> None:
    """`serve --test-mode --port 0` prints its URL, answers, and stops cleanly on SIGTERM."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenjournal",
            "serve",
            "--test-mode",
            "--port",
            "0",
            "--access-ttl",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("tokenjournal reference server on http://127.0.0.1:"), first
        assert "(test mode)" in first
        url = first.split(" on ", 1)[1].split()[0]
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{url}/api/me", timeout=10)
        assert denied.value.code == 401
        denied.value.close()
        with urllib.request.urlopen(f"{url}/_test/stats", timeout=10) as answer:
            assert json.load(answer)["api_401"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
