"""Long-running commands under SIGTERM and SIGHUP (issue 18, item 5): what `timeout`, CI
cancellation, systemd and a closed terminal send. They must clean up as Ctrl-C does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenjournal.cli._signals import stop_signals_interrupt


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _ignore_sigint() -> None:
    """What a non-interactive shell does to a job it starts with ``&``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sigint", ["handled", "ignored"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_demo_under_a_stop_signal_leaves_no_folder_and_no_orphan(
    tmp_path: Path, sig: signal.Signals, sigint: str
) -> None:
    """Regression: SIGTERM killed the demo on the spot: its temporary folder (journals with
    real tokens) stayed, and the client process it had started ran on as an orphan. And
    when the demo was started with SIGINT ignored (a script's ``demo &``), the forwarded
    signal was ignored with it: the demo ran to the end as if nothing had been asked."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenjournal", "demo", "--requests", "200"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        preexec_fn=_ignore_sigint if sigint == "ignored" else None,
    )
    child = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until a client process is running
            found = re.search(rb"started client process pid (\d+)", line)
            if found:
                child = int(found.group(1))
                proc.send_signal(sig)
                break
        assert child is not None, "the demo never started a client process"
        rest = proc.communicate(timeout=20)[0].decode("utf-8", "replace")
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(child), "the demo's client process was orphaned"
        assert list(tmp_path.iterdir()) == [], "the demo's temporary folder was left behind"
        assert proc.returncode == 128 + sig, proc.returncode
        assert "Traceback" not in rest, rest[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("sigint", [signal.default_int_handler, signal.SIG_IGN])
def test_stop_signals_are_forwarded_as_ctrl_c_and_handlers_restored(sigint: object) -> None:
    """SIGTERM becomes Ctrl-C's KeyboardInterrupt, also when SIGINT is ignored (then it used
    to be ignored with it)."""
    previous = signal.signal(signal.SIGINT, sigint)  # type: ignore[arg-type]
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
        with stop_signals_interrupt() as received, pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
            time.sleep(1)  # the handler runs between bytecodes; never reached
        assert received.signum == signal.SIGTERM and received.exit_status == 143
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        signal.signal(signal.SIGINT, previous)
