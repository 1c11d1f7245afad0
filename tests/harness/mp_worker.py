"""A worker process for tests/test_multiprocess.py: the bench's worker plus a freeze point.

Run as ``python -m tests.harness.mp_worker [--freeze-at POINT] --url ... --journal ...``. It speaks
the JSON-line protocol of :mod:`tests.harness.mpbench`. ``--freeze-at`` names one of
``tokenjournal._faults.CRASH_POINTS``: the first time the SDK passes it, the worker prints
``{"event": "frozen", "point": ...}`` and stops itself with SIGSTOP, so a test can hold a
lease holder frozen at an exact step and resume it later with SIGCONT.
"""

from __future__ import annotations

import os
import signal
import sys

from tests.harness.mpbench import Worker, say, worker_main
from tokenjournal import _faults


def install_freeze(point: str) -> None:
    """Stop this process (once) when the SDK reaches ``point``."""
    # Arming makes the manager install its after_send trace hook; the hook calls
    # _faults.crash_point through the module, so replacing it below takes effect there too.
    _faults.arm(point)
    frozen = False

    def freeze_at(name: str) -> None:
        nonlocal frozen
        if name == point and not frozen:
            frozen = True
            say({"event": "frozen", "point": name})
            os.kill(os.getpid(), signal.SIGSTOP)

    _faults.crash_point = freeze_at


def main() -> None:
    """Parse ``--freeze-at`` and run the worker with the rest of the arguments."""
    argv = sys.argv[1:]
    if "--freeze-at" in argv:
        i = argv.index("--freeze-at")
        install_freeze(argv[i + 1])
        del argv[i : i + 2]
    worker_main(Worker, argv)


if __name__ == "__main__":
    main()
