"""`tokenjournal conformance` against servers we do not control (issue 18, items 1-3).

Each trick is a named server in ``servers.py``; the command runs as a subprocess, as users
run it. Whatever the server does, the run ends in bounded time and memory with a table (or
one clear line), a non-zero exit, no control byte and no token in its output.
"""

from __future__ import annotations

import pytest

from tests.hostile.cli import run_cli
from tests.hostile.servers import FINDINGS, HOLDING, running

#: Tricks that need --test-clock to be reached.
CLOCK_TRICKS = ("huge_now", "endless_clock")


@pytest.mark.parametrize("trick", [*FINDINGS, "endless_clock", *HOLDING])
def test_conformance_holds_against(trick: str) -> None:
    """Regression for escape_code (terminal injection), echo_token (a token printed),
    nan_exp/huge_exp/huge_grace/huge_now (tracebacks), endless_clock (1.7 GB read); the
    other tricks already held and must keep holding."""
    with running(trick) as server:
        args = [server.url, "--timeout", "2", "--concurrency", "2"]
        if trick in CLOCK_TRICKS:
            args.append("--test-clock")
        run = run_cli("conformance", *args)
    run.assert_contained(server.tokens | {"demo"})
    assert run.code == 1, (run.code, run.err[-500:])
    last = run.out.strip().splitlines()[-1] if run.out.strip() else run.err.strip()
    assert last.startswith(("FAIL:", "tokenjournal conformance:")), run.out[-800:]


def test_a_forged_verdict_cannot_be_printed() -> None:
    """The escape payload carries a fake "PASS" line after a CR: it must show escaped, on
    the line of the check it came with, never as a line of its own."""
    with running("escape_code") as server:
        run = run_cli("conformance", server.url, "--timeout", "2", "--concurrency", "2")
    lines = run.out.splitlines()
    assert not any(line.startswith("PASS") for line in lines)
    assert "\\x1b" in run.out and lines[-1].startswith("FAIL:")


def test_json_output_holds_no_token_either() -> None:
    with running("echo_token") as server:
        run = run_cli("conformance", server.url, "--timeout", "2", "--concurrency", "2", "--json")
    run.assert_contained(server.tokens)
    assert run.code == 1 and '"ok": false' in run.out
