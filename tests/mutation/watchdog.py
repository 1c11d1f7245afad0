"""A pytest plugin the mutation run loads: a test that hangs fails after ``LIMIT`` seconds.

mutmut stops a mutant by CPU time, and a mutant that makes a coroutine wait forever uses
none. Here the process exits with status 1 (a kill: the tests noticed) once one test has run
for ``LIMIT`` seconds of wall time; the slowest test mutmut runs takes a few seconds.
"""

from __future__ import annotations

import faulthandler
import sys
from collections.abc import Generator

import pytest

LIMIT = 20.0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    """Arm the watchdog for one test, disarm it after."""
    # mutmut swaps sys.stderr for an object with no file descriptor; the real one has one.
    faulthandler.dump_traceback_later(LIMIT, exit=True, file=sys.__stderr__)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()
