"""What only the tests run: the multi-process refresh bench and its worker programs.

Kept out of the wheel: nothing here is part of tokenjournal. Run from the repository root,
e.g. ``python -m tests.harness.mpbench --rounds 20``; worker processes are started with the
root as their working folder so that ``-m tests.harness...`` resolves the same way.
"""
