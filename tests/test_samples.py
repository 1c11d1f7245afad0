"""The samples run, each as a user would run it: `python samples/NAME.py ...` in a subprocess.

Every sample's `--smoke` scenario checks itself (exit 0 only if the sample behaved); these
tests also read its output for the lines that prove the scenario really ran. The IoT daemon
is also stopped with SIGTERM and killed in the middle of a refresh, and the desktop sample
drives its real Tk window under Xvfb when Xvfb is installed (Debian package `xvfb`), then
measures what the idle window costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
#: A run that takes longer than this is hung (each smoke takes a few seconds).
HUNG = 60.0


def sample_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment without anything that would change a sample's behaviour."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TJ_") and k not in ("DISPLAY", "TOKENJOURNAL_CRASH_AT")
    }
    env["XDG_STATE_HOME"] = str(tmp_path / "xdg")  # never the user's home
    env.update(extra)
    return env


def run_sample(
    tmp_path: Path, name: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one sample to completion from an unrelated folder (so it needs nothing but itself)."""
    return subprocess.run(
        [sys.executable, str(SAMPLES / name), *args],
        cwd=tmp_path,
        env=env or sample_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=HUNG,
        check=False,
    )


def assert_lines(result: subprocess.CompletedProcess[str], code: int, *lines: str) -> None:
    assert result.returncode == code, result.stdout
    for line in lines:
        assert line in result.stdout, f"{line!r} missing from:\n{result.stdout}"


# ---------------------------------------------------------------------------- IoT daemon


def test_iot_daemon_smoke_keeps_the_session_through_expiry_outage_and_drop(
    tmp_path: Path,
) -> None:
    result = run_sample(tmp_path, "iot_daemon.py", "--smoke")
    assert_lines(
        result,
        0,
        "outbox readings failed (server_error)",  # the 503s outlasted the refresh's retries
        "ok: all 6 readings were delivered, those queued while offline included",
        "ok: the upload whose answer was lost was retried with its key and applied once",
        "ok: the dropped rotation was recovered by a grace-window replay",
        "ok: no token in",
        "smoke: daemon SIGKILLed mid-upload with",
        "ok: every reading the killed daemon queued arrived",
        "ok: each arrived once",
        "SMOKE OK:",
    )


async def test_iot_daemon_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SAMPLES / "iot_daemon.py"),
        "--state-dir",
        str(tmp_path / "state"),
        "--interval",
        "0.05",
        cwd=tmp_path,
        env=sample_env(tmp_path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(HUNG):
            while "outbox: 2 delivered" not in "".join(seen):
                line = (await proc.stdout.readline()).decode()
                assert line, "the daemon exited early:\n" + "".join(seen)
                seen.append(line)
            proc.send_signal(signal.SIGTERM)
            rest, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = "".join(seen) + rest.decode()
    assert proc.returncode == 0, output
    assert "SIGTERM received: stopping" in output
    assert "stopped by SIGTERM" in output and "session valid" in output


def server_line(result: subprocess.CompletedProcess[str]) -> str:
    """The self-started server's address, as the sample printed it."""
    lines = result.stdout.splitlines()
    return next(line for line in lines if line.startswith("reference server on"))


def test_a_sample_whose_last_port_is_taken_says_so_and_starts_on_another(tmp_path: Path) -> None:
    """The port a state folder's server had is kept for its next start; when another program
    holds it, the sample starts anyway and says what that means for what was queued."""
    state = tmp_path / "state"
    args = ("--state-dir", str(state), "--iterations", "1", "--interval", "0.01")
    first = run_sample(tmp_path, "iot_daemon.py", *args)
    assert first.returncode == 0, first.stdout
    port = int(server_line(first).split(":")[2].split()[0])
    assert (state / "server.port").read_text() == str(port)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        second = run_sample(tmp_path, "iot_daemon.py", *args)
    assert second.returncode == 0, second.stdout
    assert f"port {port} of the last run is taken" in second.stdout
    assert server_line(second) != server_line(first)
    assert (state / "server.port").read_text() == server_line(second).split(":")[2].split()[0]


def test_iot_daemon_resumes_a_refresh_cut_short_by_a_crash(tmp_path: Path) -> None:
    """Killed between the server's answer and the journal commit (the worst moment), the
    daemon's next start replays the old refresh token into the grace window: no new sign-in,
    no session lost. The self-started server keeps its database in the state folder."""
    state = str(tmp_path / "state")
    args = ("--state-dir", state, "--access-ttl", "2", "--interval", "0.1")
    crash_env = sample_env(tmp_path, TOKENJOURNAL_CRASH_AT="after_response")
    crashed = run_sample(tmp_path, "iot_daemon.py", *args, env=crash_env)
    assert crashed.returncode == 137, crashed.stdout  # the SDK's crash point: os._exit(137)
    assert "session signed_in" in crashed.stdout and "session state -> refreshing" in crashed.stdout

    resumed = run_sample(tmp_path, "iot_daemon.py", *args, "--iterations", "2")
    # Back at the same address: a reading queued before the crash is addressed to it (a
    # server on a new port left it undeliverable, and the daemon waiting for it for ever).
    assert server_line(resumed) == server_line(crashed)
    assert_lines(
        resumed,
        0,
        "session recovering: replaying a refresh cut short by a crash",
        "session refreshed",
        "2 reading(s) taken,",
        "delivered, 0 unsent",
        "session valid",
    )
    assert "session signed_in" not in resumed.stdout  # resumed, not signed in again
    assert "ended" not in resumed.stdout


# ---------------------------------------------------------------------------- kiosk


def test_kiosk_smoke_goes_online_offline_online_then_session_ended(tmp_path: Path) -> None:
    result = run_sample(tmp_path, "kiosk.py", "--smoke")
    assert_lines(
        result,
        0,
        "[OFFLINE] serving with the current pass for",
        "[OFFLINE] cannot serve until the network is back",
        "visit(s) queued",  # the outbox's depth on the status line
        "ok: every queued visit was delivered once",
        "renewed 1x",  # the status line shows the refresh happen ("watch it refresh")
        "[SESSION ENDED] not serving: an operator must sign in again",
        "SESSION ENDED: the auth server ended this kiosk's session (token_expired).",
        "TJ_EMAIL=demo@example.com TJ_PASSWORD=... python samples/kiosk.py --state-dir",
        "SMOKE OK: ONLINE -> OFFLINE -> ONLINE -> SESSION ENDED",
    )


# ---------------------------------------------------------------------------- requests script


def test_cli_requests_smoke_stays_signed_in_across_runs(tmp_path: Path) -> None:
    result = run_sample(tmp_path, "cli_requests.py", "--smoke")
    assert_lines(
        result,
        0,
        "ok: the second run resumes the session from the journal, no new sign-in",
        "ok: after expiry the next run refreshes once and gets its 200",
        "ok: a session the server ended is signed into again, and the call made",
        "SMOKE OK:",
    )


def test_cli_requests_second_process_resumes_without_signing_in(tmp_path: Path) -> None:
    """Two separate processes on one state folder: the second needs no password."""
    state = str(tmp_path / "state")
    first = run_sample(tmp_path, "cli_requests.py", "--state-dir", state)
    assert_lines(first, 0, "signed in as demo@example.com", "GET /api/me: 200")
    second = run_sample(tmp_path, "cli_requests.py", "--state-dir", state)
    assert_lines(second, 0, "session resumed from journal.db", "GET /api/me: 200")
    assert "signed in as" not in second.stdout
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "journal.db")) as db, db:
        (access, refresh), *_ = db.execute("SELECT access_token, refresh_token FROM accounts")
    assert access not in first.stdout + second.stdout  # fingerprints only
    assert refresh not in first.stdout + second.stdout


# ---------------------------------------------------------------------------- desktop


DESKTOP_STEPS = (
    "ok: a wrong password is refused",
    "ok: the expired token was refreshed once, the new one is shown",
    "ok: session end explained ('Your session has ended (token_expired)",
    "ok: the sign-in form is back",
    "SMOKE OK: sign-in, API call, refresh, session end, sign-in again",
)


def test_desktop_controller_smoke_headless(tmp_path: Path) -> None:
    result = run_sample(tmp_path, "desktop_tk.py", "--smoke", "--headless")
    assert_lines(result, 0, "smoke: headless (controller only)", *DESKTOP_STEPS)


def test_desktop_window_without_a_display_fails_loudly(tmp_path: Path) -> None:
    """No display must never look like a passing smoke run."""
    result = run_sample(tmp_path, "desktop_tk.py", "--smoke")
    assert_lines(result, 2, "cannot open a window")
    assert "SMOKE OK" not in result.stdout


@pytest.fixture
def xvfb_display() -> Iterator[str]:
    """A private X display from Xvfb (started and stopped here), e.g. ``:7``."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("Xvfb is not installed (apt-get install -y xvfb); the Tk window is untested")
    try:
        import tkinter  # noqa: F401
    except ImportError:
        pytest.skip("this Python has no tkinter; the Tk window is untested")
    read_fd, write_fd = os.pipe()
    # -displayfd: Xvfb picks a free display number and writes it once it accepts clients.
    proc = subprocess.Popen(
        [xvfb, "-displayfd", str(write_fd), "-screen", "0", "800x600x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], HUNG)
        number = os.read(read_fd, 64).decode().strip() if ready else ""
        assert number.isdigit(), "Xvfb did not start"
        yield f":{number}"
    finally:
        os.close(read_fd)
        proc.terminate()
        proc.wait(timeout=HUNG)


#: The idle window's share of a core: Tk's mainloop() sleeps until something happens (the
#: asyncio version that pumped root.update() 60 times a second took ~1.7-2.8%).
IDLE_CPU_LIMIT: Final = 0.5


def test_desktop_tk_window_smoke_under_xvfb(tmp_path: Path, xvfb_display: str) -> None:
    """The real window, driven from a thread of the smoke's own through Tk's hand-overs; then
    left idle, signed in, for 3 s while the sample measures its process's CPU time."""
    env = sample_env(tmp_path, DISPLAY=xvfb_display)
    result = run_sample(tmp_path, "desktop_tk.py", "--smoke", "--idle-cpu", "3", env=env)
    assert_lines(result, 0, "smoke: driving the Tk window", *DESKTOP_STEPS, "idle CPU: ")
    idle = re.search(r"idle CPU: ([0-9.]+)% of a core", result.stdout)
    assert idle is not None and float(idle.group(1)) < IDLE_CPU_LIMIT, result.stdout


OAUTH_STEPS = (
    "ok: starts signed out",
    "ok: a denial in the browser is explained",
    "ok: signed in through the browser, the email read from the ID token",
    "ok: the expired token was refreshed once",
    "ok: signed out, and the server revoked the session",
    "SMOKE OK: discovery, browser sign-in (denied, allowed), refresh, sign-out",
)


def test_desktop_oauth_smoke_headless(tmp_path: Path) -> None:
    """Discovery from the issuer URL, browser sign-in (a scripted person at the login page)
    denied then allowed, a refresh, sign-out through the revocation endpoint."""
    result = run_sample(tmp_path, "desktop_oauth.py", "--smoke", "--headless")
    assert_lines(result, 0, "smoke: headless (controller only)", *OAUTH_STEPS)


def test_desktop_oauth_window_smoke_under_xvfb(tmp_path: Path, xvfb_display: str) -> None:
    env = sample_env(tmp_path, DISPLAY=xvfb_display)
    result = run_sample(tmp_path, "desktop_oauth.py", "--smoke", env=env)
    assert_lines(result, 0, "smoke: driving the Tk window", *OAUTH_STEPS)
