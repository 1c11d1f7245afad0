"""The driver: runs the five phases and gathers their figures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tokenjournal._faults import SESSION_POINTS as CRASH_POINTS
from tokenjournal.server import ReferenceServer, ServerConfig

from . import network, timephase
from .cancel import CancelOptions, CancelPhase
from .crashes import crash_round
from .kills import KillOptions, KillPhase
from .outbox import OutboxOptions, OutboxPhase
from .table import Figures


@dataclass
class RunOptions:
    """What one run does (see ``python -m tests.torture --help``)."""

    kills: KillOptions
    #: Phase 2 again on sealed journals (``None`` or 0 kills: skipped).
    sealed_kills: KillOptions | None = None
    crash_rounds: int = 3
    network_rounds: int = 1
    keep: bool = False
    workdir: Path | None = None
    command: str = "python -m tests.torture"
    time_rounds: int = 1
    time_short: bool = False
    cancel: CancelOptions | None = None
    outbox: OutboxOptions | None = None


async def run(options: RunOptions) -> Figures:
    """Phase 1 (named crash points) beside phase 3 (network faults), then phase 2 (kills),
    then phase 4 (time) beside phase 5 (cancellation and lifecycle), then phase 6 (the
    outbox)."""
    # The SDK logs every transient failure and every ended session at INFO/WARNING; in a run
    # that provokes thousands of them on purpose, the table is the output.
    logging.getLogger("tokenjournal").setLevel(logging.CRITICAL)
    logging.getLogger("tokenjournal.server").setLevel(logging.CRITICAL)
    began = time.monotonic()
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="tokenjournal-torture-"))
    workdir.mkdir(parents=True, exist_ok=True)
    figures = Figures(options.command, options.kills.seed)
    try:
        with open(workdir / "workers.stderr", "ab") as stderr:

            async def crash_phase() -> None:
                async with ReferenceServer(ServerConfig(test_mode=True)) as server:
                    for index in range(options.crash_rounds):
                        for point in CRASH_POINTS:
                            figures.crash_rounds.append(
                                await crash_round(server, workdir, point, index, stderr)
                            )

            async def network_phase() -> None:
                if options.network_rounds:
                    figures.network = await network.run_all(
                        workdir, options.network_rounds, stderr=stderr
                    )

            # Phases 1 and 3 have their own servers and mostly wait: run them side by side.
            await asyncio.gather(crash_phase(), network_phase())
            if options.kills.kills:
                figures.kills = await KillPhase(options.kills, workdir, stderr).run()
            sealed = options.sealed_kills
            if sealed is not None and sealed.kills:
                figures.sealed_kills = await KillPhase(sealed, workdir, stderr).run()

            async def time_phase() -> None:
                if options.time_rounds:
                    figures.time = await timephase.run_all(
                        workdir, options.time_rounds, short=options.time_short
                    )

            async def cancel_phase() -> None:
                if options.cancel is not None:
                    figures.cancel = await CancelPhase(options.cancel, workdir, stderr).run()

            # Phase 4 runs in this process on virtual time, phase 5 mostly in workers.
            await asyncio.gather(time_phase(), cancel_phase())
            if options.outbox is not None:
                figures.outbox = await OutboxPhase(options.outbox, workdir, stderr).run()
    finally:
        if not options.keep and options.workdir is None:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)
    figures.seconds = time.monotonic() - began
    return figures
