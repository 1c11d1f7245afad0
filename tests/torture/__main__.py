"""``python -m tests.torture``: kill, starve and corrupt the client; print what was lost.

Run from the repository root. ``--short`` is the CI form (about a minute); the README's
figures come from ``python -m tests.torture --kills 1000``. Exits 1 when a must-be-zero
figure is not zero.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import sys
from pathlib import Path

from .cancel import CancelOptions
from .driver import RunOptions, run
from .kills import KillOptions
from .outbox import OutboxOptions


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m tests.torture",
        description="Crash, kill and starve tokenjournal clients against the reference "
        "server; print the figures; exit 1 if a must-be-zero figure is not zero.",
    )
    p.add_argument("--kills", type=int, default=1000, help="random SIGKILLs in phase 2")
    p.add_argument(
        "--sealed-kills",
        type=int,
        default=None,
        help="random SIGKILLs in phase 2's sealed pass, on sealed journals "
        "(default: as --kills; short 10; 0 skips it)",
    )
    p.add_argument(
        "--short",
        action="store_true",
        help="the CI form: 30 kills (10 sealed), one round of crash points and network faults, "
        "a short list of time scenarios, 4 cancellation workers and 2 fork rounds, one "
        "round of outbox crash points and 20 outbox kills",
    )
    p.add_argument(
        "--crash-rounds",
        type=int,
        default=None,
        help="rounds over every named crash point in phase 1 (default 5; short 1)",
    )
    p.add_argument(
        "--network-rounds",
        type=int,
        default=None,
        help="rounds over every network scenario in phase 3 (default 3; short 1)",
    )
    p.add_argument("--workers", type=int, default=4, help="worker processes in phase 2")
    p.add_argument(
        "--journals",
        type=int,
        default=3,
        help="journals in phase 2 (fewer than workers: some are shared)",
    )
    p.add_argument(
        "--access-ttl", type=float, default=2.0, help="access token lifetime in phase 2, seconds"
    )
    p.add_argument(
        "--arm",
        type=float,
        default=0.2,
        help="share of phase-2 starts armed at a random crash point",
    )
    p.add_argument(
        "--max-life",
        type=float,
        default=2.5,
        help="a phase-2 worker is killed at a uniform time in [0, this] s",
    )
    p.add_argument(
        "--no-chaos", action="store_true", help="no proxy or server faults during phase 2"
    )
    p.add_argument(
        "--time-rounds",
        type=int,
        default=None,
        help="rounds over every time scenario in phase 4 (default 2; short 1 round of a "
        "short list; 0 skips the phase)",
    )
    p.add_argument(
        "--cancel-workers",
        type=int,
        default=None,
        help="cancellation workers in phase 5 (default 40; short 4; 0 skips them)",
    )
    p.add_argument(
        "--cancel-ops",
        type=int,
        default=None,
        help="calls under random timeouts per phase-5 worker (default 30; short 20)",
    )
    p.add_argument(
        "--forks",
        type=int,
        default=None,
        help="fork rounds in phase 5 (default 10; short 2; 0 skips them)",
    )
    p.add_argument("--fork-children", type=int, default=4, help="children per fork round")
    p.add_argument(
        "--drop",
        type=float,
        default=0.3,
        help="share of phase-5 workers that drop their manager without close()",
    )
    p.add_argument(
        "--outbox-kills",
        type=int,
        default=None,
        help="random SIGKILLs of outbox workers in phase 6 (default 300; short 20; 0 skips "
        "the kills)",
    )
    p.add_argument(
        "--outbox-rounds",
        type=int,
        default=None,
        help="rounds over the outbox's delivery crash points in phase 6 (default 2; short 1)",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument(
        "--json-out", type=Path, default=None, help="also write the figures as JSON to this file"
    )
    p.add_argument("--keep", action="store_true", help="keep the journals and worker stderr")
    p.add_argument("--workdir", type=Path, default=None, help="where journals go (kept)")
    return p.parse_args(argv)


def _pick(given: int | None, short: bool, short_default: int, long_default: int) -> int:
    return given if given is not None else (short_default if short else long_default)


def main(argv: list[str] | None = None) -> int:
    """Run, print, return the exit code."""
    ns = parse(argv)
    if ns.short:
        kills, crash_rounds = min(ns.kills, 30), 1 if ns.crash_rounds is None else ns.crash_rounds
    else:
        kills, crash_rounds = ns.kills, 5 if ns.crash_rounds is None else ns.crash_rounds
    sealed_kills = _pick(ns.sealed_kills, ns.short, 10, kills)
    seed = ns.seed if ns.seed is not None else random.SystemRandom().randrange(2**31)
    words = ["python", "-m", "tests.torture", *(argv if argv is not None else sys.argv[1:])]
    if ns.seed is None:
        words += ["--seed", str(seed)]
    options = RunOptions(
        kills=KillOptions(
            kills=kills,
            slots=ns.workers,
            journals=ns.journals,
            access_ttl=ns.access_ttl,
            arm_probability=ns.arm,
            max_life=ns.max_life,
            chaos=not ns.no_chaos,
            seed=seed,
        ),
        sealed_kills=KillOptions(
            kills=sealed_kills,
            slots=ns.workers,
            journals=ns.journals,
            access_ttl=ns.access_ttl,
            arm_probability=ns.arm,
            max_life=ns.max_life,
            chaos=not ns.no_chaos,
            seed=seed + 1,
            sealed=True,
        ),
        crash_rounds=crash_rounds,
        network_rounds=ns.network_rounds
        if ns.network_rounds is not None
        else (1 if ns.short else 3),
        keep=ns.keep,
        workdir=ns.workdir,
        command=shlex.join(words),
        time_rounds=_pick(ns.time_rounds, ns.short, 1, 2),
        time_short=ns.short,
        cancel=CancelOptions(
            workers=_pick(ns.cancel_workers, ns.short, 4, 40),
            ops=_pick(ns.cancel_ops, ns.short, 20, 30),
            forks=_pick(ns.forks, ns.short, 2, 10),
            children=ns.fork_children,
            drop_share=ns.drop,
            seed=seed,
        ),
        outbox=OutboxOptions(
            kills=_pick(ns.outbox_kills, ns.short, 20, 300),
            crash_rounds=_pick(ns.outbox_rounds, ns.short, 1, 2),
            seed=seed,
        ),
    )
    figures = asyncio.run(run(options))
    if ns.json_out is not None:
        ns.json_out.write_text(figures.dumps() + "\n")
    print(figures.dumps() if ns.json else figures.render(), flush=True)
    return 0 if figures.passed() else 1


if __name__ == "__main__":
    sys.exit(main())
