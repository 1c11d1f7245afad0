"""Run the ``tokenjournal`` command as users do (a subprocess) and judge its output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from typing import Final

#: Generous bounds: every case here ends in a second or two when the command behaves.
TIME_LIMIT: Final = 30.0
#: A Python process with aiohttp loaded sits near 50 MiB; a 1 MiB body cap leaves room.
RSS_LIMIT_KIB: Final = 200 * 1024


def is_clean(text: str) -> bool:
    """No control, format or separator character but newline (ESC, CR, BEL, bidi...)."""
    return not any(
        ch != "\n" and (unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in "ZlZp")
        for ch in text
    )


@dataclass(frozen=True)
class Run:
    """One finished command: exit status, output, wall time and peak memory (KiB)."""

    code: int
    out: str
    err: str
    seconds: float
    max_rss_kib: int

    def assert_contained(self, secrets: set[str]) -> None:
        """Bounded time and memory, no control byte but newline, no token, no traceback,
        and at most one line on stderr."""
        assert self.seconds < TIME_LIMIT, f"took {self.seconds:.1f} s"
        assert self.max_rss_kib < RSS_LIMIT_KIB, f"peak RSS {self.max_rss_kib // 1024} MiB"
        for name, text in (("stdout", self.out), ("stderr", self.err)):
            assert is_clean(text), f"a control character reached {name}: {text[-400:]!r}"
            leaked = [s for s in secrets if s and s in text]
            assert not leaked, f"a token reached {name}"
        assert "Traceback" not in self.err, self.err[-2000:]
        assert len(self.err.strip().splitlines()) <= 1, self.err[-2000:]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = TIME_LIMIT) -> Run:
    """``python -m tokenjournal ARGS``; killed (and the test failed) past ``timeout``.

    The child is reaped with ``os.wait4`` so its own peak RSS is known, whatever other
    children this test process had.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenjournal", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        seconds = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return Run(
            proc.returncode,
            out.read().decode("utf-8", "replace"),
            err.read().decode("utf-8", "replace"),
            seconds,
            int(usage.ru_maxrss),
        )
