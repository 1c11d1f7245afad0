"""The torture harness: prove "no session lost" with figures (issue 4).

``python -m tests.torture --kills 1000`` (from the repository root) runs six phases
against the reference server and prints a table; ``--json`` prints the figures as JSON;
the exit code is 1 when a must-be-zero figure is not zero.

1. Named crash points (:mod:`.crashes`): a worker dies at each point of a refresh and of a
   sign-out; a fresh worker on the same journal must recover as the point demands.
2. Random kills (:mod:`.kills`): workers loop over authenticated requests with a short access
   TTL while the driver SIGKILLs and restarts them, through a misbehaving proxy
   (:mod:`.proxy`) and the server's scripted faults.
3. Network faults (:mod:`.network`): every server fault kind and proxy mode in front of a
   refresh, including a black-hole that outlasts the grace window.
4. Time (:mod:`.timephase`, on the virtual clocks of :mod:`.clocks`): skewed and stepped
   device clocks, idle gaps after a lost answer with no caller.
5. Cancellation and lifecycle (:mod:`.cancel`, workers :mod:`.cancelworker`): random
   ``wait_for`` timeouts around every public coroutine, dropped managers, forks.
6. The durable outbox (:mod:`.outbox`, workers :mod:`.outboxworker`): delivery crash
   points, random SIGKILLs of enqueuing and delivering workers under network faults.

The worker program is :mod:`.worker`, the driver :mod:`.driver`, the table :mod:`.table`.
Nothing is imported here: every worker start imports this package, and a restart should
cost the interpreter and the SDK, not the harness.
"""
