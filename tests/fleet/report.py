"""Figures from a fleet run's raw results: the table, and the plot of requests over time."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

#: Width of the rate windows, in simulated seconds.
WINDOW = 10
OK_STATES = frozenset({"valid"})
#: After recovery, this long is "the recovery" for the peak figure (simulated seconds).
RECOVERY = 300.0


def rates(raw: dict[str, Any], outcomes: frozenset[str] | None = None) -> list[float]:
    """Refresh requests per second arriving at the server, per ``WINDOW``-second window."""
    windows = [0] * (int(raw["until"]) // WINDOW + 1)
    for second, outcome, n in raw["buckets"]:
        if (outcomes is None or outcome in outcomes) and second // WINDOW < len(windows):
            windows[second // WINDOW] += n
    return [n / WINDOW for n in windows]


def _between(series: list[float], start: float, end: float) -> list[float]:
    return series[int(start) // WINDOW : max(int(start) // WINDOW + 1, int(end) // WINDOW)]


def _recovered_after(device: dict[str, Any], end: float) -> float:
    """Seconds after ``end`` from which the device stays usable (inf: never again).
    REFRESHING says nothing either way (a routine refresh, or a try while offline)."""
    ok = True
    for at, state in device["states"]:
        if at <= end and state != "refreshing":
            ok = state in OK_STATES
    since = end if ok else math.inf
    for at, state in device["states"]:
        if at <= end or state == "refreshing":
            continue
        if state in OK_STATES and not ok:
            ok, since = True, at
        elif state not in OK_STATES and ok:
            ok, since = False, math.inf
    return since - end


def figures(raw: dict[str, Any]) -> dict[str, Any]:
    """The numbers the README's table shows for one scenario."""
    devices = raw["devices"]
    n, ttl, until = len(devices), raw["ttl"], raw["until"]
    every = rates(raw)
    outage = raw["outage"]
    # Steady state: before the trouble; without trouble, the last two token lives (a common
    # start's wave has had the run's length to spread).
    start, steady_end = (ttl, outage[0]) if outage else (max(ttl, until - 2 * ttl), until)
    steady = _between(every, start, steady_end)
    first = _between(every, ttl, 2 * ttl)
    steady_mean = statistics.fmean(steady) if steady else float("nan")
    out: dict[str, Any] = {
        "scenario": raw["scenario"],
        "title": raw["title"],
        "devices": n,
        "ideal_rate": n / ttl,
        "steady_rate": steady_mean,
        "steady_peak_ratio": max(steady) / steady_mean if steady and steady_mean else math.nan,
        "first_life_peak_ratio": max(first) / steady_mean if first and steady_mean else math.nan,
        "requests": sum(c for _, _, c in raw["buckets"]),
        "refused": sum(c for _, o, c in raw["buckets"] if o == "refused"),
        "dropped": sum(c for _, o, c in raw["buckets"] if o == "dropped"),
        "lost": sum(1 for d in devices if d["ended"] is not None or d["state"] == "signed_out"),
        "server": raw["server"],
        "restarts": raw["restarts"],
    }
    if outage:
        start, end = outage
        recovery = _between(every, end, end + RECOVERY)
        out["recovery_peak_ratio"] = max(recovery) / steady_mean if steady_mean else math.nan
        waits = [_recovered_after(d, end) for d in devices]
        out["all_valid_after"] = max(waits) if waits else 0.0
        # The price a device pays for the fleet's calm: how long those not usable when the
        # server came back waited after its return.
        late = sorted(w for w in waits if 0 < w < math.inf)
        out["waited_after_return"] = {
            "devices": len(late),
            "mean": statistics.fmean(late) if late else 0.0,
            "p99": late[int(0.99 * (len(late) - 1))] if late else 0.0,
        }
        during = [[t for t in d["sent"] if start <= t < end] for d in devices]
        per_device = [len(sent) for sent in during]
        out["outage_seconds"] = end - start
        out["requests_per_device_mean"] = statistics.fmean(per_device) if per_device else 0.0
        out["requests_per_device_max"] = max(per_device, default=0)
        out["busiest_device_rate"] = max(per_device, default=0) / (end - start)
        out["max_in_any_10s"] = max((_densest(sent, WINDOW) for sent in during), default=0)
    return out


def _densest(times: list[float], width: float) -> int:
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def table(rows: list[dict[str, Any]]) -> str:
    """The README table."""
    head = (
        "scenario", "devices", "refresh/s steady (ideal N/T)", "steady peak/mean",
        "recovery peak/steady", "all VALID after", "sessions lost",
        "req/device while down (mean, max)", "busiest device while down",
        "most in 10 s, one device", "refused", "reuse",
    )  # fmt: skip
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for f in rows:
        down = "outage_seconds" in f
        lines.append(
            " | ".join(
                [
                    f["title"],
                    f"{f['devices']:,}",
                    f"{f['steady_rate']:.1f} ({f['ideal_rate']:.1f})",
                    f"{f['steady_peak_ratio']:.2f}",
                    f"{f['recovery_peak_ratio']:.2f}x" if down else "-",
                    f"{f['all_valid_after']:.0f} s" if down else "-",
                    str(f["lost"]),
                    f"{f['requests_per_device_mean']:.1f}, {f['requests_per_device_max']}"
                    if down
                    else "-",
                    f"1 per {1 / f['busiest_device_rate']:.0f} s"
                    if down and f["busiest_device_rate"]
                    else "-",
                    str(f["max_in_any_10s"]) if down else "-",
                    f"{f['refused']:,}",
                    str(f["server"]["reuse_detections"]),
                ]
            )
        )
    return "\n".join(lines)


def plot(raws: list[dict[str, Any]], path: Path) -> None:
    """Requests per second over simulated time, one line per scenario (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=120)
    for raw in raws:
        series = rates(raw)
        ax.plot([i * WINDOW / 60 for i in range(len(series))], series, label=raw["title"])
    n = len(raws[0]["devices"]) if raws else 0
    if raws:
        ax.axhline(n / raws[0]["ttl"], color="grey", linestyle=":", label="ideal N/T")
    ax.set_xlabel("simulated minutes")
    ax.set_ylabel(f"refresh requests/s at the server ({WINDOW} s windows)")
    ax.set_title(f"tokenjournal fleet run: {n:,} devices")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
