"""``python -m tests.fleet.model``: the fleet's recovery peak from the pacing rules alone.

A quick model of what ``python -m tests.fleet`` measures, without its cost (seconds, not
minutes): the devices whose refresh point falls inside an outage of ``D`` seconds, each with
the SDK's rules (docs/fleet.md): a first try at the first use after its refresh point, then
pauses of ``least`` plus a random share of the rest of min(cap, max(floor, growth x time
offline)), or, while the token still works for longer than that, a try in the token's last
``lead`` seconds; every try at the first use (every 30 s) after its pause. It prints the
peak 10 s window of the 300 s after the server's return (over the steady rate) and how long
devices stay without a working token after it (mean, 99th percentile). The model leaves out
the run's noise and its machinery: it reads about 0.4x below the run's peak. It is how
docs/fleet.md prices other settings.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from collections.abc import Sequence

MARGIN, SPREAD, TTL, USE = 60.0, 0.2, 900.0, 30.0


def recovery(
    outage: float,
    *,
    cap: float = 300.0,
    floor: float = 30.0,
    least: float = 10.0,
    growth: float = 3.0,
    lead: float = 60.0,
    rate: float = 13.4,
    seed: int = 1,
) -> tuple[float, float, float]:
    """(peak over steady, mean wait, p99 wait) after an outage of ``outage`` seconds."""
    rnd = random.Random(seed)
    windows = [0] * 30
    waits = []
    for _ in range(int(rate * outage)):
        due = rnd.uniform(0.0, outage)  # this device's refresh point, inside the outage
        phase = rnd.uniform(0.0, USE)
        expiry = due + MARGIN + rnd.uniform(0.0, SPREAD * TTL)

        def use(t: float, phase: float = phase) -> float:
            return phase + math.ceil((t - phase) / USE) * USE

        t = first = use(due)
        if t >= outage:
            continue  # its first try found the server back: a routine refresh
        while t < outage:
            pause = min(cap, max(floor, growth * (t - first)))
            draw, left = rnd.random(), expiry - t
            # While the token works for longer than the pause: a try in its last stretch.
            late = t + max(least, left - (1 - draw) * min(left, lead))
            nxt = late if left > pause else t + least + draw * (pause - least)
            t = use(max(nxt, t + 1e-9))
        if t - outage < 300.0:
            windows[int((t - outage) // 10)] += 1
        waits.append(max(0.0, t - max(outage, expiry)))
    steady = rate * 10
    waits.sort()
    return (max(windows) + steady) / steady, statistics.fmean(waits), waits[int(0.99 * len(waits))]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.fleet.model", description=__doc__)
    p.add_argument("--outage", type=float, action="append", help="seconds (repeatable)")
    p.add_argument("--cap", type=float, action="append", help="longest pause (repeatable)")
    p.add_argument("--growth", type=float, default=3.0)
    p.add_argument("--least", type=float, default=10.0, help="the jitter's floor (0: full)")
    ns = p.parse_args(argv)
    if any(x <= 0 for x in [*(ns.outage or []), *(ns.cap or []), ns.growth]) or ns.least < 0:
        p.error("--outage, --cap and --growth must be above 0, --least at least 0")
    print("outage  cap    peak  wait mean  wait p99")
    for outage in ns.outage or [240.0, 600.0]:
        for cap in ns.cap or [300.0]:
            rules = {"cap": cap, "least": ns.least, "growth": ns.growth}
            peaks = [recovery(outage, **rules, seed=s)[0] for s in range(4)]
            _, mean, p99 = recovery(outage, **rules, rate=30.0)
            peak = statistics.fmean(peaks)
            print(f"{outage:5.0f}s {cap:4.0f}s {peak:5.2f}x {mean:7.0f} s {p99:7.0f} s")


if __name__ == "__main__":
    main()
