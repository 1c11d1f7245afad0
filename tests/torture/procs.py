"""Spawning worker processes and reading their JSON event lines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from .journals import SEAL_ENV

#: The repository root: workers run ``python -m tests.torture.worker`` from here.
ROOT: Final = Path(__file__).resolve().parents[2]
#: Exit code of a process that died at an armed crash point (``os._exit(137)``).
CRASHED: Final = 137
#: What ``returncode`` says after our SIGKILL.
KILLED: Final = -signal.SIGKILL


@dataclass(eq=False)
class Worker:
    """One running worker process and every event line it printed so far."""

    proc: asyncio.subprocess.Process
    spawned: float
    crash_at: str | None
    events: list[dict[str, Any]] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None
    killed: bool = False

    def first(self, ev: str) -> dict[str, Any] | None:
        """The first event named ``ev``, if any."""
        return next((e for e in self.events if e.get("ev") == ev), None)

    def all(self, ev: str) -> list[dict[str, Any]]:
        """Every event named ``ev``."""
        return [e for e in self.events if e.get("ev") == ev]

    async def started(self, timeout: float = 30.0) -> bool:
        """Wait until the worker's imports are done (its ``start`` line); False if it died."""
        deadline = time.monotonic() + timeout
        while self.first("start") is None:
            if self.proc.returncode is not None or time.monotonic() > deadline:
                return self.first("start") is not None
            await asyncio.sleep(0.01)
        return True

    def kill(self) -> None:
        """SIGKILL it, unless it is known to be gone (``wait()`` then says how it ended)."""
        if self.proc.returncode is not None:
            return
        # Not Popen.send_signal: it polls first, and a poll that reaps the child races
        # asyncio's child watcher, which then reports exit code 255 instead of the real one.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
            self.killed = True

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit (killing it after ``timeout``) and for its last lines."""
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader
        assert self.proc.returncode is not None
        return self.proc.returncode


async def _read_lines(worker: Worker) -> None:
    stream = worker.proc.stdout
    assert stream is not None
    while True:
        line = await stream.readline()
        if not line:
            return
        try:
            event = json.loads(line)
        except ValueError:
            event = {"ev": "garbage", "line": line[:200].decode(errors="replace")}
        worker.events.append(event)


async def spawn(
    url: str,
    journal: Path,
    mode: str,
    *,
    crash_at: str | None = None,
    stderr: IO[bytes] | None = None,
    extra: tuple[str, ...] = (),
    module: str = "tests.torture.worker",
    seal_key: str | None = None,
) -> Worker:
    """Start ``python -m MODULE`` (the worker by default; armed at ``crash_at`` if given;
    sealing its journal with ``seal_key``, base64, if given)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENJOURNAL_CRASH_AT", SEAL_ENV)}
    if crash_at:
        env["TOKENJOURNAL_CRASH_AT"] = crash_at
    if seal_key:
        env[SEAL_ENV] = seal_key
    spawned = time.time()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        "--url",
        url,
        "--journal",
        str(journal),
        "--mode",
        mode,
        "--spawned",
        repr(spawned),
        *extra,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr if stderr is not None else asyncio.subprocess.DEVNULL,
    )
    worker = Worker(proc, spawned, crash_at)
    worker._reader = asyncio.ensure_future(_read_lines(worker))
    return worker
