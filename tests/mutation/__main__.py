"""Mutation testing of the pure core and the journal: ``python -m tests.mutation``.

Runs mutmut 3.8 (configured in ``[tool.mutmut]`` of pyproject.toml) on the modules in
``MODULES``, each mutant against only the tests that reach it (mutmut records which tests call
which function), then prints one row per module: mutants, killed, equivalent, survived, score,
where score = killed / (mutants - equivalent). Survivors listed in ``equivalent.toml`` (next to
this file, each with its reason) count as equivalent; every other survivor is printed with its
diff. Exits 1 when a module scores below ``THRESHOLD``.

mutmut names a mutated module after its file path and strips only a leading ``src.``, so the
package is staged as ``.mutation/src/tokenjournal`` (a copy of ``sdk/tokenjournal``) together
with ``tests/`` and ``pyproject.toml``; mutmut's own ``mutants/`` folder lives in there too.
Every run starts from a fresh copy: mutmut's cache does not notice a changed test.

Options: ``--sample N`` tests N mutants drawn at random (seeded by ``--seed``) across the
modules, for CI; ``--module NAME`` (repeatable) limits the run; ``--function PATTERN``
(repeatable) runs only the mutants of matching functions (``Cls.meth`` or ``func``);
``--max-children`` (default 2) is how many mutants run at once; ``--stubs`` prints an
``equivalent.toml`` entry per survivor.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import random
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / ".mutation"
EQUIVALENT = Path(__file__).with_name("equivalent.toml")
THRESHOLD = 95.0
# The pure core (protocols, retry timing, tokens, numbers from servers) and the journal.
# `_outbox` and `_seal` join the list when they exist.
MODULES = ("_protocols", "_retry", "_tokens", "_numbers", "_journal", "_outbox", "_seal")

# A failing test, a timeout (a mutant that hangs), the test process killed (a mutant that spins).
KILLED = {1, 3, 24, -24, 152, 255, 36, 37, -9, -11}
# Timeouts (mutmut's CPU limit: SIGXCPU, or its own code) count as kills, but a test that
# busy-waits on a subprocess burns more CPU the more loaded the machine is, so some are the
# load's doing: a timed-out mutant listed as equivalent is counted as equivalent, and the
# table shows how many kills were timeouts. A mutant that spins without an await (the event
# loop never runs again) dies at the CPU limit too, and mutmut reports the run killed by a
# signal (-9, -11: its "segfault"): the same stop, counted the same way.
TIMED_OUT = {24, -24, 152, 36, -9, -11}
SURVIVED = {0}
NO_TESTS = {33, 5}


@dataclass
class Row:
    """One module's tally."""

    module: str
    mutants: int = 0
    killed: int = 0
    equivalent: int = 0
    timed_out: int = 0  # of the killed
    survived: list[tuple[str, str]] = field(default_factory=list)  # (mutant name, diff)
    no_tests: list[tuple[str, str]] = field(default_factory=list)
    other: list[tuple[str, int | None]] = field(default_factory=list)

    @property
    def score(self) -> float:
        counted = self.mutants - self.equivalent
        return 100.0 if counted == 0 else 100.0 * self.killed / counted


def _present_modules(selected: list[str]) -> list[str]:
    names = selected or list(MODULES)
    return [m for m in names if (ROOT / "sdk" / "tokenjournal" / f"{m}.py").exists()]


def _stage(modules: list[str]) -> None:
    """A fresh staging copy: src/tokenjournal, tests, and pyproject.toml (narrowed to `modules`)."""
    if STAGE.exists():
        shutil.rmtree(STAGE)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(ROOT / "sdk" / "tokenjournal", STAGE / "src" / "tokenjournal", ignore=ignore)
    shutil.copytree(ROOT / "tests", STAGE / "tests", ignore=ignore)
    text = (ROOT / "pyproject.toml").read_text()
    only = ", ".join(f'"src/tokenjournal/{m}.py"' for m in modules)
    lines = []
    for line in text.splitlines():
        if line.startswith("only_mutate ="):
            line = f"only_mutate = [{only}]"
        elif line.startswith("pytest_add_cli_args ="):  # add the watchdog (a hung mutant fails)
            line = line.replace("]", ', "-p", "_mutation_watchdog"]')
        lines.append(line)
    (STAGE / "pyproject.toml").write_text("\n".join(lines) + "\n")
    # Exists before mutmut starts, so that the PYTHONPATH entry pointing there is not cached
    # as missing (Python would then keep importing the editable install from sdk/).
    (STAGE / "mutants" / "src").mkdir(parents=True)
    # mutmut puts mutants/ on sys.path (and takes the working directory off it).
    shutil.copy2(
        Path(__file__).with_name("watchdog.py"), STAGE / "mutants" / "_mutation_watchdog.py"
    )


def _all_mutant_names(modules: list[str]) -> list[str]:
    """Every mutant mutmut will generate for `modules`, named as mutmut names them."""
    from mutmut.mutation.file_mutation import mutate_file_contents
    from mutmut.utils.format_utils import get_mutant_name

    names: list[str] = []
    for m in modules:
        rel = Path("src") / "tokenjournal" / f"{m}.py"
        code = (STAGE / rel).read_text()
        names += [
            get_mutant_name(rel, n) for n in mutate_file_contents(str(rel), code).mutant_names
        ]
    return names


def _run_mutmut(names: list[str], max_children: int) -> None:
    env = dict(os.environ)
    # Tests that start a subprocess must import the mutated package too.
    env["PYTHONPATH"] = str(STAGE / "mutants" / "src")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *names]
    proc = subprocess.run(cmd, cwd=STAGE, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"mutmut failed (exit {proc.returncode})")


def _signature(diff: str) -> tuple[str, str]:
    removed = [
        ln[1:].strip()
        for ln in diff.splitlines()
        if ln.startswith("-") and not ln.startswith("---")
    ]
    added = [
        ln[1:].strip()
        for ln in diff.splitlines()
        if ln.startswith("+") and not ln.startswith("+++")
    ]
    return "\n".join(removed), "\n".join(added)


def _function(mutant: str) -> str:
    """``pkg.mod.xǁClsǁmeth__mutmut_3`` -> ``Cls.meth``; ``pkg.mod.x_f__mutmut_1`` -> ``f``."""
    key = mutant.rpartition(".")[2].partition("__mutmut_")[0]
    if key.startswith("xǁ"):
        _, cls, meth = key.split("ǁ")
        return f"{cls}.{meth}"
    return key[2:]


def _load_equivalents() -> list[dict[str, str]]:
    data = tomllib.loads(EQUIVALENT.read_text())
    entries: list[dict[str, str]] = data.get("equivalent", [])
    for e in entries:
        missing = {"module", "function", "before", "after", "reason"} - e.keys()
        if missing:
            raise SystemExit(f"equivalent.toml: entry {e} lacks {sorted(missing)}")
    return entries


def _tally(modules: list[str], names: list[str] | None) -> tuple[list[Row], list[dict[str, str]]]:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    wanted = set(names) if names is not None else None
    equivalents = _load_equivalents()
    used: set[int] = set()
    rows = []
    cwd = os.getcwd()
    os.chdir(STAGE)  # mutmut reads its mutants/ relative to the working directory
    try:
        for m in modules:
            row = Row(m)
            rel = Path("src") / "tokenjournal" / f"{m}.py"
            meta = json.loads((Path("mutants") / f"{rel}.meta").read_text())
            for name, code in sorted(meta["exit_code_by_key"].items()):
                if wanted is not None and name not in wanted:
                    continue
                row.mutants += 1
                if code in KILLED and code not in TIMED_OUT:
                    row.killed += 1
                    continue
                diff = get_diff_for_mutant(name, path=rel)
                before, after = _signature(diff)
                match = next(
                    (
                        i
                        for i, e in enumerate(equivalents)
                        if e["module"] == m
                        and e["function"] == _function(name)
                        and e["before"].strip() == before
                        and e["after"].strip() == after
                    ),
                    None,
                )
                if code in TIMED_OUT and match is None:
                    row.killed += 1
                    row.timed_out += 1
                elif (code in SURVIVED or code in TIMED_OUT) and match is not None:
                    row.equivalent += 1
                    used.add(match)
                elif code in SURVIVED:
                    row.survived.append((name, diff))
                elif code in NO_TESTS:
                    row.no_tests.append((name, diff))
                else:
                    row.other.append((name, code))
            rows.append(row)
    finally:
        os.chdir(cwd)
    stale = [e for i, e in enumerate(equivalents) if i not in used and e["module"] in modules]
    return rows, stale


def _print(rows: list[Row], stale: list[dict[str, str]], sampled: bool, stubs: bool) -> None:
    for row in rows:
        for name, diff in row.survived + row.no_tests:
            kind = "survived" if (name, diff) in row.survived else "no test reaches it"
            print(f"\n--- {name} ({kind})\n{diff}")
            if stubs:
                before, after = _signature(diff)
                print("[[equivalent]]")
                print(f'module = "{row.module}"\nfunction = "{_function(name)}"')
                print(f"before = '''{before}'''\nafter = '''{after}'''\nreason = \"\"")
        for name, code in row.other:
            print(f"\n--- {name}: mutmut status {code}")
    if stale and not sampled:
        print("\nequivalent.toml entries that matched no surviving mutant (remove or fix them):")
        for e in stale:
            print(f"  {e['module']} {e['function']}: {e['before']!r} -> {e['after']!r}")
    print()
    print("| module | mutants | killed (by timeout) | equivalent | survived | no test | score |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.module} | {r.mutants} | {r.killed} ({r.timed_out}) | {r.equivalent}"
            f" | {len(r.survived)}"
            f" | {len(r.no_tests)} | {r.score:.1f}% |"
        )
    total = Row(
        "all", *(sum(getattr(r, a) for r in rows) for a in ("mutants", "killed", "equivalent"))
    )
    total.survived = [s for r in rows for s in r.survived]
    total.no_tests = [s for r in rows for s in r.no_tests]
    print(
        f"| **all** | {total.mutants} | {total.killed} ({sum(r.timed_out for r in rows)})"
        f" | {total.equivalent} | {len(total.survived)}"
        f" | {len(total.no_tests)} | {total.score:.1f}% |"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the mutation tests; 0 when every module reaches the threshold."""
    p = argparse.ArgumentParser(
        prog="python -m tests.mutation", description=__doc__.splitlines()[0]
    )
    p.add_argument("--sample", type=int, metavar="N", help="test N random mutants only (CI)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sample (default: random)")
    p.add_argument("--module", action="append", default=[], help="e.g. _journal (repeatable)")
    p.add_argument(
        "--function",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only the mutants of functions matching this shell pattern, e.g. 'Seal.from_*' "
        "or 'parse_metadata' (repeatable): checks the tests written for a few survivors",
    )
    p.add_argument("--max-children", type=int, default=2)
    p.add_argument(
        "--stubs", action="store_true", help="print an equivalent.toml stub per survivor"
    )
    args = p.parse_args(argv)

    started = time.monotonic()
    modules = _present_modules(args.module)
    _stage(modules)
    names: list[str] | None = None
    if args.sample:
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
        everything = _all_mutant_names(modules)
        names = sorted(random.Random(seed).sample(everything, min(args.sample, len(everything))))
        print(f"sample: {len(names)} of {len(everything)} mutants (--seed {seed})")
    if args.function:
        everything = _all_mutant_names(modules)
        names = [
            n
            for n in everything
            if any(fnmatch.fnmatchcase(_function(n), pat) for pat in args.function)
        ]
        if not names:
            raise SystemExit(f"no mutant of {args.function} in {modules}")
        print(f"{len(names)} mutants of {', '.join(args.function)}")
    _run_mutmut(names or [f"tokenjournal.{m}.*" for m in modules], args.max_children)
    rows, stale = _tally(modules, names)
    _print(rows, stale, sampled=names is not None, stubs=args.stubs)
    print(f"\n{time.monotonic() - started:.0f} s, threshold {THRESHOLD:.0f}% per module")
    if names is not None:
        total_killed = sum(r.killed for r in rows)
        counted = sum(r.mutants - r.equivalent for r in rows)
        ok = counted == 0 or 100.0 * total_killed / counted >= THRESHOLD
    else:
        ok = all(r.score >= THRESHOLD for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
