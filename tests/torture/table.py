"""The run's figures: the table a person reads, the JSON a test reads, the must-be-zero list."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tokenjournal._faults import SESSION_POINTS as CRASH_POINTS

from .cancel import CancelFigures
from .crashes import CrashOutcome
from .kills import KillFigures, quantiles
from .network import NetOutcome
from .outbox import OutboxFigures
from .timephase import TimeOutcome


@dataclass
class Figures:
    """Everything one run measured."""

    command: str
    seed: int
    seconds: float = 0.0
    crash_rounds: list[CrashOutcome] = field(default_factory=list)
    kills: KillFigures | None = None
    #: Phase 2 again, on sealed journals.
    sealed_kills: KillFigures | None = None
    network: list[NetOutcome] = field(default_factory=list)
    time: list[TimeOutcome] = field(default_factory=list)
    cancel: CancelFigures | None = None
    outbox: OutboxFigures | None = None

    # ------------------------------------------------------------------ derived figures

    def _time_sum(self, name: str) -> int:
        return sum(getattr(o, name) for o in self.time)

    def new_axes(self) -> dict[str, int]:
        """The must-be-zero figures of phases 4 (time) and 5 (cancellation, lifecycle)."""
        c = self.cancel or CancelFigures()
        return {
            "sessions lost inside the window (time, cancellation)": self._time_sum("lost_inside")
            + c.lost,
            "hung processes": self._time_sum("hung") + c.hung,
            "stuck transactions": c.stuck,
            "raw exceptions escaping (time, cancellation)": sum(len(o.raw) for o in self.time)
            + c.raw,
            "refresh storms": self._time_sum("storms"),
            "expired access tokens served": self._time_sum("expired_served"),
            "grace rescues later than min(10% of window, 30 s)": self._time_sum("late_rescue"),
            "idle past the window, not one clean SessionEnded": self._time_sum("not_clean_end"),
            "forked children sending one token again": c.fork_excess,
            "events() iterators open after close": c.iterators_open,
        }

    def crashes_injected(self) -> Counter[str]:
        """Workers that died at each named point, both phases."""
        counts: Counter[str] = Counter(o.point for o in self.crash_rounds if o.crashed)
        for k in (self.kills, self.sealed_kills):
            if k is not None:
                counts.update(k.crashes)
        return counts

    def crash_failures(self) -> list[str]:
        """Phase 1 rounds that did not recover as their point demands."""
        return [f"{o.point}: {'; '.join(o.problems)}" for o in self.crash_rounds if not o.recovered]

    def outside_window(self) -> tuple[int, int]:
        """(recoveries outside the grace window, of which ended in a clean SessionEnded)."""
        runs = [o for o in self.network if o.outside_window]
        return len(runs), sum(o.ok for o in runs)

    def must_be_zero(self) -> dict[str, int]:
        """The figures a passing run has at zero."""
        k = self.kills or KillFigures()
        runs, clean = self.outside_window()
        return {
            "sessions lost inside the grace window": k.lost_inside + k.lost_outside,
            "double rotations": k.double_rotations,
            "family revocations": k.family_revocations,
            "exceptions escaping the SDK": k.fatal,
            "workers that exited unexpectedly": k.unexpected_exits,
            "crash points not recovered": len(self.crash_failures()),
            "network scenarios failed": sum(
                1 for o in self.network if not o.ok and not o.outside_window
            ),
            "outside-window recoveries not a clean SessionEnded": runs - clean,
            "journals not clean after the final recovery": len(k.final_check_failures),
            **self.sealed_axes(),
            **self.new_axes(),
            **(self.outbox or OutboxFigures()).must_be_zero(),
        }

    def sealed_axes(self) -> dict[str, int]:
        """Phase 2's sealed pass: the same must-be-zero figures, and no readable token."""
        s = self.sealed_kills or KillFigures()
        return {
            "sealed: sessions lost": s.lost_inside + s.lost_outside,
            "sealed: double rotations": s.double_rotations,
            "sealed: family revocations": s.family_revocations,
            "sealed: exceptions escaping or unexpected exits": s.fatal + s.unexpected_exits,
            "sealed: journals not clean after the final recovery": len(s.final_check_failures),
            "sealed: tokens readable in the journal files": s.readable_tokens,
            "sealed: journals left unsealed": s.unsealed_journals,
        }

    def passed(self) -> bool:
        """Every must-be-zero figure is zero."""
        return not any(self.must_be_zero().values())

    # ------------------------------------------------------------------ output

    def as_json(self) -> dict[str, Any]:
        """The figures as plain data (``--json``)."""
        k = self.kills or KillFigures()
        sdk = quantiles(k.recovery_sdk)
        restart = quantiles(k.recovery_restart)
        runs, clean = self.outside_window()
        return {
            "command": self.command,
            "seed": self.seed,
            "seconds": round(self.seconds, 1),
            "passed": self.passed(),
            "must_be_zero": self.must_be_zero(),
            "crashes_injected": dict(self.crashes_injected()),
            "crash_rounds": [
                {
                    "point": o.point,
                    "crashed": o.crashed,
                    "recovered": o.recovered,
                    "problems": o.problems,
                }
                for o in self.crash_rounds
            ],
            "random_kills": k.kills,
            "aimed_kills": k.aimed_kills,
            "restarts": k.restarts,
            "worker_starts": k.starts,
            "authenticated_requests_ok": k.api_200,
            "server_rotations": k.rotations,
            "committed_refreshes": k.committed,
            "refreshed_event_lines": k.refreshed_lines,
            "grace_replays": k.grace_replays,
            "double_rotations": k.double_rotations,
            "family_revocations": k.family_revocations,
            "reuse_detections": k.reuse_detections,
            "sessions_lost_inside_window": k.lost_inside,
            "sessions_lost_details": k.lost_details,
            "resignins_after_loss": k.resignins,
            "exceptions_escaping": k.fatal,
            "exceptions_details": k.fatal_details[:20],
            "worker_errors_survived": dict(k.worker_errors),
            "server_faults_scheduled": dict(k.server_faults),
            "server_faults_applied": k.server_faults_applied,
            "workers_exited_unexpectedly": k.unexpected_exits,
            "proxy_faults_injected": dict(k.proxy_faults),
            "killed_before_first_200": k.killed_before_first_200,
            "recovery_sdk_seconds": {"median": sdk[0], "p99": sdk[1], "n": len(k.recovery_sdk)},
            "recovery_restart_seconds": {
                "median": restart[0],
                "p99": restart[1],
                "n": len(k.recovery_restart),
            },
            "final_check_failures": k.final_check_failures,
            "kill_phase_seconds": round(k.seconds, 1),
            "outside_window_recoveries": runs,
            "outside_window_clean": clean,
            "network": [
                {
                    "scenario": o.name,
                    "expected": o.expected,
                    "ok": o.ok,
                    "outside_window": o.outside_window,
                    "problems": o.problems,
                }
                for o in self.network
            ],
            "time": [
                {
                    "scenario": o.name,
                    "kind": o.kind,
                    "ok": o.ok,
                    "calls": o.calls,
                    "rotations": o.rotations,
                    "allowed_rotations": o.allowed_rotations,
                    "grace_replays": o.grace_replays,
                    "rescue_seconds": o.rescue_seconds,
                    "tries_while_down": o.tries_in_window,
                    "raw": o.raw,
                    "problems": o.problems,
                    "seconds": round(o.seconds, 1),
                }
                for o in self.time
            ],
            "cancellation": self._cancel_json(),
            "sealed_kill_phase": self._sealed_json(),
            "outbox": self._outbox_json(),
        }

    def _sealed_json(self) -> dict[str, Any]:
        s = self.sealed_kills or KillFigures()
        return {
            "random_kills": s.kills,
            "aimed_kills": s.aimed_kills,
            "crashes_injected": dict(s.crashes),
            "authenticated_requests_ok": s.api_200,
            "server_rotations": s.rotations,
            "committed_refreshes": s.committed,
            "grace_replays": s.grace_replays,
            "sessions_lost_details": s.lost_details,
            "exceptions_details": s.fatal_details[:20],
            "final_check_failures": s.final_check_failures,
            "readable_tokens": s.readable_tokens,
            "seconds": round(s.seconds, 1),
        }

    def _outbox_json(self) -> dict[str, Any]:
        o = self.outbox or OutboxFigures()
        return {
            "crash_rounds": o.crash_rounds,
            "crashes_injected": o.crashes,
            "crash_failures": o.crash_failures,
            "kills": o.kills,
            "worker_starts": o.starts,
            "enqueued": o.enqueued,
            "delivered": o.delivered,
            "lost": o.lost,
            "lost_uids": o.lost_uids,
            "applied_twice": o.applied_twice,
            "keys_seen_twice": o.keys_seen_twice,
            "dead_letters": o.dead,
            "refused_by_server": o.refused,
            "pending_after_final_drain": o.pending_after_drain,
            "api_faults_injected": o.api_faults,
            "proxy_faults_injected": o.proxy_faults,
            "failed_workers": o.fatal,
            "failed_details": o.fatal_details[:10],
            "seconds": round(o.seconds, 1),
        }

    def _cancel_json(self) -> dict[str, Any]:
        c = self.cancel or CancelFigures()
        return {
            "workers": c.workers,
            "calls": c.ops,
            "calls_under_a_held_write_lock": c.locked_calls,
            "outcomes": dict(c.outcomes),
            "managers_dropped_without_close": c.dropped,
            "sessions_lost": c.lost,
            "raw_exceptions": c.raw,
            "stuck_transactions": c.stuck,
            "hung_processes": c.hung,
            "iterators_open_after_close": c.iterators_open,
            "fork_rounds": c.fork_rounds,
            "fork_refresh_requests": c.fork_requests,
            "proxy_faults_injected": dict(c.proxy_faults),
            "details": c.details,
            "seconds": round(c.seconds, 1),
        }

    def render(self) -> str:
        """The table."""
        k = self.kills or KillFigures()
        rows: list[tuple[str, str, str]] = []

        def row(name: str, value: object, note: str = "") -> None:
            rows.append((name, str(value), note))

        injected = self.crashes_injected()
        rounds = Counter(o.point for o in self.crash_rounds)
        recovered = Counter(o.point for o in self.crash_rounds if o.recovered)
        for point in CRASH_POINTS:
            phase2 = k.crashes.get(point, 0)
            row(
                f"crashes injected at {point}",
                injected.get(point, 0),
                f"checked rounds {recovered[point]}/{rounds[point]} recovered"
                + (f", +{phase2} during random kills" if phase2 else ""),
            )
        row("random kills (SIGKILL)", k.kills, f"{k.aimed_kills} aimed into a refresh")
        row("restarts", k.restarts, f"{k.killed_before_first_200} killed before their first 200")
        row("authenticated requests answered 200", k.api_200)
        proxy = sum(k.proxy_faults.values())
        row(
            "network faults injected during kills",
            k.server_faults_applied + proxy,
            f"server answers {k.server_faults_applied}, proxy exchanges {proxy}",
        )
        row("sessions lost, recovery inside the grace window", k.lost_inside, "must be 0")
        row(
            "server rotations / committed refreshes",
            f"{k.rotations} / {k.committed}",
            f"{k.grace_replays} grace replays",
        )
        row("double rotations", k.double_rotations, "must be 0")
        row("family revocations", k.family_revocations, "must be 0")
        row("exceptions escaping the SDK", k.fatal, "must be 0")
        row("workers that exited unexpectedly", k.unexpected_exits, "must be 0")
        runs, clean = self.outside_window()
        row(
            "recoveries outside the window",
            runs,
            f"{clean} clean SessionEnded(token_expired); must be all",
        )
        s = self.sealed_kills or KillFigures()
        row(
            "random kills, sealed journals",
            s.kills,
            f"{s.aimed_kills} aimed; rotations / committed {s.rotations} / {s.committed}, "
            f"{s.grace_replays} grace replays",
        )
        for name, value in self.sealed_axes().items():
            row(name, value, "must be 0")
        net_ok = sum(o.ok for o in self.network if not o.outside_window)
        net_all = sum(1 for o in self.network if not o.outside_window)
        row("network fault scenarios passed", f"{net_ok}/{net_all}")
        self._render_new_axes(row)
        self._render_outbox(row)
        sdk_med, sdk_p99 = quantiles(k.recovery_sdk)
        rs_med, rs_p99 = quantiles(k.recovery_restart)
        row(
            "recovery time, worker start -> first 200 (median / p99)",
            f"{_ms(sdk_med)} / {_ms(sdk_p99)}",
            f"n={len(k.recovery_sdk)}, start = imports done",
        )
        row(
            "recovery time, spawn -> first 200 (median / p99)",
            f"{_ms(rs_med)} / {_ms(rs_p99)}",
            "includes interpreter start-up",
        )

        width = max(len(r[0]) for r in rows)
        vwidth = max(len(r[1]) for r in rows)
        lines = [
            f"tokenjournal torture run: {self.command}",
            f"seed {self.seed}, {self.seconds:.0f} s",
            "",
        ]
        lines += [f"{n:<{width}}  {v:>{vwidth}}  {note}".rstrip() for n, v, note in rows]
        failures = [f"  {name}: {value}" for name, value in self.must_be_zero().items() if value]
        c = self.cancel or CancelFigures()
        problems = (
            self.crash_failures()
            + [f"{o.name}: {'; '.join(o.problems)}" for o in self.network if not o.ok]
            + [f"{o.name}: {'; '.join(o.problems + o.raw)}" for o in self.time if not o.ok]
            + [str(d) for d in c.details[:10]]
            + [str(d) for d in k.lost_details + s.lost_details]
            + [str(d) for d in k.fatal_details[:5] + s.fatal_details[:5]]
            + list(k.final_check_failures)
            + list(s.final_check_failures)
            + (
                self.outbox.crash_failures + [str(d) for d in self.outbox.fatal_details[:5]]
                if self.outbox
                else []
            )
        )
        lines.append("")
        lines.append("PASSED" if not failures else "FAILED\n" + "\n".join(failures))
        if problems:
            lines.append("problems:")
            lines += [f"  {p}" for p in problems]
        return "\n".join(lines)

    def _render_new_axes(self, row: Any) -> None:
        """Phases 4 and 5: what they did, then their must-be-zero rows."""
        c = self.cancel or CancelFigures()
        clock = [o for o in self.time if o.kind == "clock"]
        idle = [o for o in self.time if o.kind == "idle"]
        rescues = [o.rescue_seconds for o in idle if o.rescue_seconds is not None]
        tries = [o.tries_in_window for o in idle if o.tries_in_window is not None]
        row(
            "time: clock scenarios / idle scenarios",
            f"{len(clock)} / {len(idle)}",
            f"{sum(o.calls for o in clock)} calls on skewed or stepped clocks",
        )
        row(
            "time: rescue after the network returned (max)",
            "-" if not rescues else f"{max(rescues):.1f} s",
            f"virtual s; tries while down, max {max(tries) if tries else '-'} a window",
        )
        row(
            "cancellation: calls under random timeouts",
            c.ops,
            f"{c.workers} workers, {c.locked_calls} under a held write lock, "
            f"{c.outcomes.get('timeout', 0)} timed out, {c.dropped} managers dropped",
        )
        row(
            "cancellation: fork rounds",
            c.fork_rounds,
            f"refresh requests per round {c.fork_requests}",
        )
        for name, value in self.new_axes().items():
            row(name, value, "must be 0")

    def _render_outbox(self, row: Any) -> None:
        """Phase 6: the durable outbox."""
        o = self.outbox
        if o is None:
            return
        for point in sorted(o.crashes):
            row(f"outbox: crashes injected at {point}", o.crashes[point])
        row(
            "outbox: crash rounds recovered",
            f"{o.crash_rounds - len({f.split(':')[0] for f in o.crash_failures})}/{o.crash_rounds}",
        )
        row(
            "outbox: random kills (SIGKILL)",
            o.kills,
            f"{o.starts} starts; faults: API {o.api_faults}, proxy {o.proxy_faults}",
        )
        row("outbox: readings enqueued (acknowledged)", o.enqueued)
        row("outbox: readings delivered", o.delivered, f"keys seen twice {o.keys_seen_twice}")
        row("outbox: readings lost", o.lost, "must be 0")
        row("outbox: readings applied twice", o.applied_twice, "must be 0")
        row(
            "outbox: dead letters",
            o.dead,
            f"the server refused {o.refused}; dead letters it did not refuse must be 0",
        )
        row("outbox: items left after the final drain", o.pending_after_drain, "must be 0")

    def dumps(self) -> str:
        """``as_json`` as text."""
        return json.dumps(self.as_json(), indent=2, default=str)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"
