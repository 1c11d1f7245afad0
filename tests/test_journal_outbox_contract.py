"""The outbox half of the Journal contract, on SQLite and in memory alike.

Each test pins what a caller of the outbox methods sees (exact figures after each step,
the place in line, the lease at the instant it ends, settle outcomes, the room a full
outbox makes, dead letters), through the ``journal`` fixture of the contract tests, so
that :class:`tokenjournal.SQLiteJournal` and :class:`tokenjournal.MemoryJournal` keep
the same rules (docs/architecture.md section 8).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest

import tokenjournal as tj
from tokenjournal._journal import Holder
from tokenjournal._outbox import OutboxItem, OutboxLimits, Settle

from .test_journal_contract import DEAD_PID, ME, NOW, OTHER, pair
from .test_journal_contract import journal as journal  # the fixture: sqlite and memory

URL = "https://api.example.com/orders"
THIRD = Holder("host:3:third", ME.pid, "host")  # live too
GONE = Holder("host:4:gone", DEAD_PID, "host")  # a dead process on this host
TTL = 30.0
NO_LIMIT = OutboxLimits()


def item(n: int, *, body: bytes = b"0123456789", at: float = NOW) -> OutboxItem:
    return OutboxItem(f"id-{n}", "POST", URL, (("content-type", "application/json"),), body, at)


SIZE = item(0).size  # every item() is this big


def stats(
    pending: int = 0,
    in_flight: int = 0,
    delivered: int = 0,
    dead: int = 0,
    dropped: int = 0,
    oldest_age: float | None = None,
    *,
    account: str = "a",
    name: str = "box",
) -> tj.OutboxStats:
    return tj.OutboxStats(account, name, pending, in_flight, delivered, dead, dropped, oldest_age)


def ids(items: list[OutboxItem]) -> list[str]:
    return [i.id for i in items]


async def fill(journal: tj.Journal, *ns: int, account: str = "a", outbox: str = "box") -> None:
    for n in ns:
        assert await journal.outbox_add(account, outbox, item(n), NO_LIMIT) == 0


async def claim(
    journal: tj.Journal,
    holder: Holder = ME,
    now: float = NOW,
    *,
    limit: int = 10,
    ordered: bool = False,
    account: str = "a",
    outbox: str = "box",
) -> list[OutboxItem]:
    return await journal.outbox_claim(account, outbox, holder, now, TTL, limit, ordered)


# --------------------------------------------------------------------------- add and claim


async def test_claimed_items_come_whole_in_line_with_one_try_counted(journal: tj.Journal) -> None:
    before = journal.durable_commits
    await fill(journal, 1, 2, 3)
    assert journal.durable_commits == before + 3  # one durable commit per add
    taken = await claim(journal)
    assert taken == [dataclasses.replace(item(n), seq=n, attempts=1) for n in (1, 2, 3)]
    assert journal.durable_commits == before + 4


async def test_claim_takes_at_most_limit_then_the_rest(journal: tj.Journal) -> None:
    await fill(journal, 1, 2, 3)
    assert ids(await claim(journal, limit=2)) == ["id-1", "id-2"]
    assert ids(await claim(journal, limit=2)) == ["id-3"]  # ours in flight are skipped
    assert await claim(journal, limit=2) == []


async def test_a_place_in_line_is_never_reused(journal: tj.Journal) -> None:
    await fill(journal, 1, 2)
    await claim(journal)
    assert await journal.outbox_settle("a", "box", [Settle("id-2", 200)]) == [True]
    await fill(journal, 3)  # the last place was freed: the new item still goes after it
    assert await journal.outbox_clear("a", "box") == 2
    await fill(journal, 4)
    assert [(i.id, i.seq) for i in await claim(journal, ME, NOW + TTL)] == [("id-4", 4)]


async def test_items_of_other_outboxes_are_not_in_this_line(journal: tj.Journal) -> None:
    await fill(journal, 1, account="b")
    await fill(journal, 2, outbox="other")
    await fill(journal, 3)
    assert ids(await claim(journal)) == ["id-3"]
    assert ids(await claim(journal, account="b")) == ["id-1"]
    assert await journal.outbox_waiting("a", "box", None) == (1, 3)  # in flight: pending


async def test_a_lease_holds_until_the_instant_it_ends(journal: tj.Journal) -> None:
    await fill(journal, 1)
    assert ids(await claim(journal, ME, NOW)) == ["id-1"]
    assert await claim(journal, ME, NOW + TTL - 0.25) == []  # our own, still in flight
    assert await claim(journal, OTHER, NOW + TTL - 0.25) == []  # a live holder's
    assert await journal.outbox_stats("a", "box", NOW + TTL - 0.25) == stats(
        1, 1, oldest_age=TTL - 0.25
    )
    assert await journal.outbox_stats("a", "box", NOW + TTL) == stats(1, 0, oldest_age=TTL)
    again = await claim(journal, OTHER, NOW + TTL)  # it ended: taken over
    assert [(i.id, i.attempts) for i in again] == [("id-1", 2)]
    assert await claim(journal, ME, NOW + 2 * TTL - 0.25) == []
    assert [(i.id, i.attempts) for i in await claim(journal, ME, NOW + 2 * TTL)] == [("id-1", 3)]


async def test_our_own_expired_lease_is_claimed_again(journal: tj.Journal) -> None:
    await fill(journal, 1)
    await claim(journal, ME, NOW)
    assert [(i.id, i.attempts) for i in await claim(journal, ME, NOW + TTL)] == [("id-1", 2)]


async def test_a_dead_holders_lease_is_taken_over_at_once(journal: tj.Journal) -> None:
    await fill(journal, 1)
    assert ids(await claim(journal, GONE, NOW)) == ["id-1"]
    assert ids(await claim(journal, OTHER, NOW + 1)) == ["id-1"]


async def test_free_items_behind_many_held_ones_are_still_claimed(journal: tj.Journal) -> None:
    """Regression: SQLite read only the first ``limit * 4 + 16`` items of the line, so a
    claim behind that many items others held came back empty; memory gave the free ones."""
    adds = [journal.outbox_add("a", "box", item(n), NO_LIMIT) for n in range(1, 24)]
    assert await asyncio.gather(*adds) == [0] * 23  # one group commit
    assert ids(await claim(journal, OTHER, limit=21)) == [f"id-{n}" for n in range(1, 22)]
    assert ids(await claim(journal, ME, limit=1)) == ["id-22"]  # past a full page of 20
    assert ids(await claim(journal, ME, limit=2)) == ["id-23"]
    assert await claim(journal, ME, limit=2) == []


async def test_a_claim_over_several_pages_takes_each_free_item_once(
    journal: tj.Journal,
) -> None:
    adds = [journal.outbox_add("a", "box", item(n), NO_LIMIT) for n in range(1, 27)]
    assert await asyncio.gather(*adds) == [0] * 26
    assert len(await claim(journal, OTHER, limit=26)) == 26
    await journal.outbox_release("a", "box", OTHER, ["id-23", "id-26"])
    taken = await claim(journal, ME, NOW + 1, limit=2)  # a page holds 24: id-26 is on the next
    assert [(i.id, i.attempts) for i in taken] == [("id-23", 2), ("id-26", 2)]


async def test_a_holder_never_claims_what_it_has_in_flight(journal: tj.Journal) -> None:
    """Even when its pid looks dead from here (another pid namespace on this host): the
    lease is its own, so only its end frees the item."""
    await fill(journal, 1)
    assert ids(await claim(journal, GONE, NOW)) == ["id-1"]
    assert await claim(journal, GONE, NOW + TTL - 0.25) == []
    assert ids(await claim(journal, GONE, NOW + TTL)) == ["id-1"]


async def test_unordered_claims_skip_what_others_hold_ordered_ones_wait(
    journal: tj.Journal,
) -> None:
    await fill(journal, 1, 2, 3)
    assert ids(await claim(journal, OTHER, limit=1)) == ["id-1"]
    assert await claim(journal, ME, NOW + 1, ordered=True) == []  # FIFO: the head is out
    assert ids(await claim(journal, ME, NOW + 1, limit=1)) == ["id-2"]
    assert ids(await claim(journal, THIRD, NOW + 1)) == ["id-3"]


async def test_an_ordered_claim_never_passes_a_held_head(journal: tj.Journal) -> None:
    await fill(journal, 1, 2, 3)
    assert ids(await claim(journal, OTHER, limit=1)) == ["id-1"]
    assert await claim(journal, ME, NOW + 1, limit=2, ordered=True) == []  # a full page


async def test_ordered_claims_take_the_head_up_to_limit(journal: tj.Journal) -> None:
    await fill(journal, 1, 2, 3)
    assert ids(await claim(journal, ordered=True, limit=2)) == ["id-1", "id-2"]
    assert ids(await claim(journal, OTHER, ordered=True)) == []  # the head is ours
    assert ids(await claim(journal, ordered=True)) == []  # in flight here: FIFO waits too
    assert ids(await claim(journal)) == ["id-3"]


async def test_dead_letters_are_not_in_line(journal: tj.Journal) -> None:
    await fill(journal, 1, 2, 3)
    await claim(journal)
    await journal.outbox_settle("a", "box", [Settle("id-1", 400, dead=True, reason="bad")])
    await journal.outbox_release("a", "box", ME, None)
    assert ids(await claim(journal, OTHER)) == ["id-2", "id-3"]
    assert await journal.outbox_waiting("a", "box", None) == (2, 3)
    assert await journal.outbox_waiting("a", "box", 2) == (1, 2)
    assert await journal.outbox_waiting("a", "box", 1) == (0, 1)


async def test_waiting_counts_items_up_to_a_place_in_line(journal: tj.Journal) -> None:
    assert await journal.outbox_waiting("a", "box", None) == (0, 0)
    await fill(journal, 1, 2, 3)
    assert await journal.outbox_waiting("a", "box", None) == (3, 3)
    assert await journal.outbox_waiting("a", "box", 2) == (2, 2)
    await fill(journal, 4)
    assert await journal.outbox_waiting("a", "box", 3) == (3, 3)  # later items not counted


# --------------------------------------------------------------------------- renew and release


async def test_renew_extends_only_the_holders_own_leases(journal: tj.Journal) -> None:
    await fill(journal, 1, 2, 3)
    await fill(journal, 4, account="b")
    assert ids(await claim(journal, ME, NOW, limit=2)) == ["id-1", "id-2"]
    assert ids(await claim(journal, OTHER, NOW)) == ["id-3"]
    assert ids(await claim(journal, ME, NOW, account="b")) == ["id-4"]
    assert await journal.outbox_renew("a", "box", ME, NOW + 20, TTL) == {"id-1", "id-2"}
    assert await journal.outbox_renew("a", "box", THIRD, NOW + 20, TTL) == set()
    # id-3 (OTHER's, not renewed) ended at NOW + 30; ours hold until NOW + 50.
    assert await journal.outbox_stats("a", "box", NOW + 49) == stats(3, 2, oldest_age=49)
    assert ids(await claim(journal, THIRD, NOW + 49)) == ["id-3"]
    assert await claim(journal, OTHER, NOW + 49.75) == []
    assert ids(await claim(journal, OTHER, NOW + 50)) == ["id-1", "id-2"]
    # b's lease was not renewed by a's: it ended at NOW + 30.
    assert ids(await claim(journal, OTHER, NOW + 30, account="b")) == ["id-4"]


async def test_renew_skips_dead_letters(journal: tj.Journal) -> None:
    await fill(journal, 1, 2, 3)
    await claim(journal, limit=2)
    await journal.outbox_settle("a", "box", [Settle("id-1", 400, dead=True, reason="no")])
    assert await journal.outbox_renew("a", "box", ME, NOW + 1, TTL) == {"id-2"}


async def test_release_gives_back_the_named_leases(journal: tj.Journal) -> None:
    await fill(journal, 1, 2, 3)
    await fill(journal, 4, outbox="other")
    await claim(journal)
    await claim(journal, outbox="other")
    await journal.outbox_release("a", "box", ME, [])
    assert await claim(journal, OTHER, NOW + 1) == []
    await journal.outbox_release("a", "box", ME, ["id-2"])
    assert await journal.outbox_stats("a", "box", NOW + 1) == stats(3, 2, oldest_age=1)
    assert ids(await claim(journal, OTHER, NOW + 1)) == ["id-2"]
    await journal.outbox_release("a", "box", ME, None)  # the rest; OTHER's stays
    assert ids(await claim(journal, THIRD, NOW + 1)) == ["id-1", "id-3"]
    assert await claim(journal, OTHER, NOW + 2, outbox="other") == []  # not released


async def attempts_after_release(journal: tj.Journal) -> dict[str, int]:
    """Each pending item's ``attempts`` before the claim that reads them (which counts one)."""
    await journal.outbox_release("a", "box", ME, None)
    return {i.id: i.attempts - 1 for i in await claim(journal, THIRD, NOW + 2)}


async def test_a_retry_counts_its_try_when_the_lease_is_renewed(journal: tj.Journal) -> None:
    """An item tried three times under one lease and given back shows 3: a retry's try is
    counted durably as its lease is renewed (once, and only on the item named, only for its
    holder), so a release or a crash does not lose it."""
    await fill(journal, 1, 2, 3)
    assert ids(await claim(journal, ME, limit=2)) == ["id-1", "id-2"]
    assert ids(await claim(journal, OTHER)) == ["id-3"]
    assert await journal.outbox_renew("a", "box", ME, NOW + 1, TTL, tried="id-1") == {
        "id-1",
        "id-2",
    }
    await journal.outbox_renew("a", "box", ME, NOW + 1, TTL, tried="id-1")
    await journal.outbox_renew("a", "box", ME, NOW + 1, TTL, tried="id-3")  # OTHER's: no
    await journal.outbox_renew("a", "box", ME, NOW + 1, TTL)
    await journal.outbox_renew("a", "box", OTHER, NOW + 1, TTL, tried="id-2")  # mine: no
    await journal.outbox_release("a", "box", OTHER, None)
    assert await attempts_after_release(journal) == {"id-1": 3, "id-2": 1, "id-3": 1}


async def test_a_release_of_untried_items_takes_back_their_claims_try(
    journal: tj.Journal,
) -> None:
    """Items claimed and given back before they were sent (a close, a pause) count no try;
    items sent and given back keep theirs."""
    await fill(journal, 1, 2, 3)
    await claim(journal, ME)
    await journal.outbox_release("a", "box", ME, ["id-1", "id-2"], untried=True)
    await journal.outbox_release("a", "box", ME, ["id-1"], untried=True)  # not held: no
    await journal.outbox_release("a", "box", OTHER, ["id-3"], untried=True)  # not OTHER's
    assert await attempts_after_release(journal) == {"id-1": 0, "id-2": 0, "id-3": 1}
    await journal.outbox_release("a", "box", THIRD, None, untried=True)
    await journal.outbox_release("a", "box", THIRD, None)  # nothing held: nothing changes
    assert await attempts_after_release(journal) == {"id-1": 0, "id-2": 0, "id-3": 1}


async def test_release_by_another_holder_changes_nothing(journal: tj.Journal) -> None:
    await fill(journal, 1)
    await claim(journal)
    await journal.outbox_release("a", "box", OTHER, None)
    await journal.outbox_release("a", "box", OTHER, ["id-1"])
    assert await claim(journal, OTHER, NOW + 1) == []
    assert await journal.outbox_stats("a", "box", NOW + 1) == stats(1, 1, oldest_age=1)


# --------------------------------------------------------------------------- settle


async def test_settle_deletes_delivered_and_keeps_dead_letters(journal: tj.Journal) -> None:
    await fill(journal, 1, 2, 3)
    await claim(journal)
    await claim(journal, ME, NOW + TTL)  # a second try: attempts 2
    before = journal.durable_commits
    settled = await journal.outbox_settle(
        "a",
        "box",
        [
            Settle("id-1", 200),
            Settle("id-2", 400, dead=True, reason="HTTP 400 Bad Request", attempts=5),
            Settle("id-3", 410, dead=True, reason="HTTP 410 Gone", attempts=1),
        ],
    )
    assert settled == [True, True, True]
    assert journal.durable_commits == before + 1
    assert await journal.outbox_dead("a", "box") == [
        tj.DeadLetter("id-2", 400, "HTTP 400 Bad Request", "POST", URL, 5, NOW),
        tj.DeadLetter("id-3", 410, "HTTP 410 Gone", "POST", URL, 2, NOW),  # the most tries
    ]
    assert await journal.outbox_stats("a", "box", NOW + 1) == stats(0, 0, 1, 2)
    assert await claim(journal, OTHER, NOW + 2 * TTL) == []


async def test_settling_twice_or_unknown_is_false_and_changes_nothing(
    journal: tj.Journal,
) -> None:
    await fill(journal, 1, 2)
    await claim(journal)
    assert await journal.outbox_settle(
        "a", "box", [Settle("id-1", 200), Settle("id-2", 400, dead=True, reason="no")]
    ) == [True, True]
    again = [
        Settle("id-1", 200),
        Settle("id-2", 410, dead=True, reason="gone", attempts=9),
        Settle("id-2", 200),
        Settle("nobody", 200),
        Settle("nobody", 500, dead=True, reason="x"),
    ]
    assert await journal.outbox_settle("a", "box", again) == [False] * 5
    assert await journal.outbox_dead("a", "box") == [
        tj.DeadLetter("id-2", 400, "no", "POST", URL, 1, NOW)
    ]
    assert await journal.outbox_stats("a", "box", NOW) == stats(0, 0, 1, 1)


async def test_an_id_twice_in_one_settle_counts_once(journal: tj.Journal) -> None:
    await fill(journal, 1, 2)
    await claim(journal)
    settled = await journal.outbox_settle(
        "a",
        "box",
        [Settle("id-1", 200), Settle("id-1", 200), Settle("id-2", 400, dead=True, reason="no")],
    )
    assert settled == [True, False, True]
    assert await journal.outbox_stats("a", "box", NOW) == stats(0, 0, 1, 1)


async def test_a_large_settle_reaches_every_item(journal: tj.Journal) -> None:
    """More ids than SQLite binds in one statement: the 501st and the 1001st still count."""
    await fill(journal, 1, 2)
    await claim(journal)
    unknown = [Settle(f"unknown-{n}", 200) for n in range(1000)]
    settles = [*unknown[:500], Settle("id-1", 200), *unknown[500:], Settle("id-2", 200)]
    settled = await journal.outbox_settle("a", "box", settles)
    assert [i for i, ok in enumerate(settled) if ok] == [500, 1001]
    assert await journal.outbox_stats("a", "box", NOW) == stats(0, 0, 2, 0)


# --------------------------------------------------------------------------- stats and summary


async def test_stats_of_an_unknown_outbox_are_zero(journal: tj.Journal) -> None:
    assert await journal.outbox_stats("a", "box", NOW) == stats()
    assert await journal.outbox_summary(NOW) == []


async def test_stats_count_each_state_exactly(journal: tj.Journal) -> None:
    tight = OutboxLimits(max_items=6, when_full="drop_oldest")
    for n in range(1, 9):  # 8 items into 6 places: two dropped
        expected = 0 if n <= 6 else 1
        assert await journal.outbox_add("a", "box", item(n, at=NOW + n / 4), tight) == expected
    await claim(journal, limit=5)  # id-3 .. id-7
    await journal.outbox_release("a", "box", ME, ["id-4"])
    await journal.outbox_settle(
        "a",
        "box",
        [Settle("id-5", 200), Settle("id-6", 400, dead=True, reason="no"), Settle("id-7", 201)],
    )
    # pending id-3 (in flight), id-4, id-8; two delivered, one dead, two dropped
    assert await journal.outbox_stats("a", "box", NOW) == stats(3, 1, 2, 1, 2, 0.0)
    assert await journal.outbox_stats("a", "box", NOW + 1) == stats(3, 1, 2, 1, 2, 0.25)
    assert await journal.outbox_stats("a", "box", NOW + TTL) == stats(3, 0, 2, 1, 2, 29.25)
    assert await journal.outbox_stats("b", "box", NOW) == stats(account="b")
    assert await journal.outbox_stats("a", "other", NOW) == stats(name="other")


async def test_summary_lists_every_outbox_in_order(journal: tj.Journal) -> None:
    await fill(journal, 1, account="b")
    await fill(journal, 2, 3, outbox="z")
    await fill(journal, 4, 5)
    await claim(journal, outbox="z", limit=1)
    await journal.outbox_settle("a", "z", [Settle("id-2", 200)])
    await claim(journal, account="b")
    await journal.outbox_settle("b", "box", [Settle("id-1", 200)])  # counters only, now
    assert await journal.outbox_summary(NOW + 2) == [
        stats(2, 0, 0, 0, 0, 2.0),
        stats(1, 0, 1, 0, 0, 2.0, name="z"),
        stats(0, 0, 1, 0, 0, None, account="b"),
    ]
    assert await journal.outbox_clear("b", "box") == 0
    assert await journal.outbox_clear("a", "z") == 1
    assert await journal.outbox_summary(NOW) == [stats(2, 0, 0, 0, 0, 0.0)]


# --------------------------------------------------------------------------- room


async def test_a_full_outbox_refuses_and_stores_nothing(journal: tj.Journal) -> None:
    await fill(journal, 1, 2)
    full = OutboxLimits(max_items=2)
    assert await journal.outbox_add("a", "box", item(3), full) is None
    assert await journal.outbox_add("a", "box", item(3), OutboxLimits(max_items=3)) == 0
    assert await journal.outbox_stats("a", "box", NOW) == stats(3, oldest_age=0.0)
    assert ids(await claim(journal)) == ["id-1", "id-2", "id-3"]


async def test_max_bytes_takes_an_exact_fit_and_refuses_one_byte_more(
    journal: tj.Journal,
) -> None:
    assert await journal.outbox_add("a", "box", item(1), OutboxLimits(max_bytes=SIZE - 1)) is None
    assert await journal.outbox_add("a", "box", item(1), OutboxLimits(max_bytes=SIZE)) == 0
    assert (
        await journal.outbox_add("a", "box", item(2), OutboxLimits(max_bytes=2 * SIZE - 1)) is None
    )
    assert await journal.outbox_add("a", "box", item(2), OutboxLimits(max_bytes=2 * SIZE)) == 0
    assert await journal.outbox_stats("a", "box", NOW) == stats(2, oldest_age=0.0)


async def test_drop_oldest_drops_just_enough_and_counts_it(journal: tj.Journal) -> None:
    await fill(journal, 1, 2, 3)
    by_bytes = OutboxLimits(max_bytes=3 * SIZE, when_full="drop_oldest")
    assert await journal.outbox_add("a", "box", item(4), by_bytes) == 1
    assert await journal.outbox_add("a", "box", item(5), by_bytes) == 1
    assert await journal.outbox_stats("a", "box", NOW) == stats(3, dropped=2, oldest_age=0.0)
    assert ids(await claim(journal)) == ["id-3", "id-4", "id-5"]


async def test_a_lowered_limit_drops_down_to_it(journal: tj.Journal) -> None:
    await fill(journal, 1, 2, 3, 4)
    assert (
        await journal.outbox_add(
            "a", "box", item(5), OutboxLimits(max_items=2, when_full="drop_oldest")
        )
        == 3
    )
    assert ids(await claim(journal)) == ["id-4", "id-5"]
    assert await journal.outbox_stats("a", "box", NOW) == stats(2, 2, dropped=3, oldest_age=0.0)


async def test_an_item_bigger_than_the_outbox_is_refused_even_when_dropping(
    journal: tj.Journal,
) -> None:
    await fill(journal, 1)
    limits = OutboxLimits(max_bytes=SIZE + 5, when_full="drop_oldest")
    assert await journal.outbox_add("a", "box", item(2, body=b"x" * 20), limits) is None
    assert ids(await claim(journal)) == ["id-1"]  # nothing was dropped for it
    assert await journal.outbox_stats("a", "box", NOW) == stats(1, 1, oldest_age=0.0)


async def test_dead_letters_and_other_lines_take_no_room(journal: tj.Journal) -> None:
    await fill(journal, 1, 2)
    await fill(journal, 3, account="b")
    await claim(journal)
    await journal.outbox_settle(
        "a", "box", [Settle(f"id-{n}", 400, dead=True, reason="no") for n in (1, 2)]
    )
    one = OutboxLimits(max_items=1, when_full="drop_oldest")
    assert await journal.outbox_add("a", "box", item(4), one) == 0
    assert await journal.outbox_add("a", "box", item(5), one) == 1  # id-4, not a dead letter
    assert ids(await claim(journal)) == ["id-5"]
    assert [d.id for d in await journal.outbox_dead("a", "box")] == ["id-1", "id-2"]
    assert await journal.outbox_stats("b", "box", NOW) == stats(1, 0, oldest_age=0.0, account="b")


# --------------------------------------------------------------------------- dead letters


async def test_dead_letters_are_listed_per_outbox_oldest_first(journal: tj.Journal) -> None:
    await fill(journal, 1, 2, 3)
    await fill(journal, 4, account="b")
    await fill(journal, 5, outbox="other")
    for account, outbox in (("a", "box"), ("b", "box"), ("a", "other")):
        await claim(journal, account=account, outbox=outbox)
    await journal.outbox_settle(
        "a",
        "box",
        [Settle("id-3", 409, dead=True, reason="r3"), Settle("id-1", 422, dead=True, reason="r1")],
    )
    await journal.outbox_settle("b", "box", [Settle("id-4", 404, dead=True, reason="r4")])
    assert await journal.outbox_dead("a", "box") == [
        tj.DeadLetter("id-1", 422, "r1", "POST", URL, 1, NOW),
        tj.DeadLetter("id-3", 409, "r3", "POST", URL, 1, NOW),
    ]
    assert await journal.outbox_dead("b", "box") == [
        tj.DeadLetter("id-4", 404, "r4", "POST", URL, 1, NOW)
    ]
    assert await journal.outbox_dead("a", "other") == []


async def test_a_dead_letter_keeps_a_zero_status_and_an_empty_reason(journal: tj.Journal) -> None:
    """A call that never got an answer has no status: 0 and "" read back as they were."""
    await fill(journal, 1)
    await claim(journal)
    assert await journal.outbox_settle("a", "box", [Settle("id-1", 0, dead=True)]) == [True]
    assert await journal.outbox_dead("a", "box") == [
        tj.DeadLetter("id-1", 0, "", "POST", URL, 1, NOW)
    ]


async def test_retry_dead_puts_them_back_in_line_with_their_tries(journal: tj.Journal) -> None:
    await fill(journal, 1, 2, 3)
    await fill(journal, 4, account="b")
    await claim(journal)
    await claim(journal, account="b")
    dead = [Settle(f"id-{n}", 400, dead=True, reason="no") for n in (1, 3)]
    await journal.outbox_settle("a", "box", dead)
    await journal.outbox_settle("b", "box", [Settle("id-4", 400, dead=True, reason="no")])
    assert await journal.outbox_retry_dead("a", "other") == 0
    assert await journal.outbox_retry_dead("a", "box") == 2
    assert await journal.outbox_dead("a", "box") == []
    assert await journal.outbox_retry_dead("a", "box") == 0
    assert await journal.outbox_stats("a", "box", NOW) == stats(3, 1, oldest_age=0.0)
    taken = await claim(journal, OTHER, NOW)
    assert [(i.id, i.attempts) for i in taken] == [("id-1", 2), ("id-3", 2)]
    assert len(await journal.outbox_dead("b", "box")) == 1  # another account's stay dead


async def test_clear_forgets_items_and_counters_of_one_outbox(journal: tj.Journal) -> None:
    await fill(journal, 1, 2, 3)
    await fill(journal, 4, account="b")
    await fill(journal, 5, outbox="other")
    await claim(journal)
    await journal.outbox_settle(
        "a", "box", [Settle("id-1", 200), Settle("id-2", 400, dead=True, reason="no")]
    )
    assert await journal.outbox_clear("a", "box") == 2  # the dead letter and id-3
    assert await journal.outbox_stats("a", "box", NOW) == stats()
    assert await journal.outbox_dead("a", "box") == []
    assert await journal.outbox_summary(NOW) == [
        stats(1, 0, oldest_age=0.0, name="other"),
        stats(1, 0, oldest_age=0.0, account="b"),
    ]
    assert await journal.outbox_clear("a", "box") == 0


# --------------------------------------------------------------------------- metadata


async def test_metadata_is_kept_per_issuer_latest_wins(journal: tj.Journal) -> None:
    assert await journal.load_metadata("https://a") is None
    before = journal.durable_commits
    await journal.save_metadata("https://a", '{"issuer": "https://a"}', NOW)
    await journal.save_metadata("https://b", "{}", NOW + 1)
    await journal.save_metadata("https://a", '{"v": 2}', NOW + 2)
    assert journal.durable_commits == before + 3
    assert await journal.load_metadata("https://a") == ('{"v": 2}', NOW + 2)
    assert await journal.load_metadata("https://b") == ("{}", NOW + 1)


@pytest.mark.parametrize(
    "kept",
    [
        {"document": 5, "fetched_at": 1.0},
        {"document": "{}", "fetched_at": "soon"},
        {"document": "{}"},
        "not json",
    ],
)
async def test_an_unreadable_kept_document_is_none(tmp_path: Path, kept: object) -> None:
    path = tmp_path / "tokens.db"
    journal = tj.SQLiteJournal(path)
    await journal.open()
    await journal.save_metadata("https://a", "{}", NOW)
    await journal.close()
    with sqlite3.connect(path) as conn:
        value = kept if isinstance(kept, str) else json.dumps(kept)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'discovery https://a'", (value,))
    conn.close()
    journal = tj.SQLiteJournal(path)
    await journal.open()
    assert await journal.load_metadata("https://a") is None
    await journal.close()


# --------------------------------------------------------------------------- sealing


async def test_sealed_by_names_the_key(tmp_path: Path) -> None:
    plain = tj.SQLiteJournal(tmp_path / "plain.db")
    await plain.open()
    assert await plain.sealed_by() is None
    await plain.close()
    seal = tj.Seal(bytes(range(32)))
    sealed = tj.SQLiteJournal(tmp_path / "sealed.db", seal=seal)
    await sealed.open()
    assert await sealed.sealed_by() == seal.key_id
    await sealed.close()


async def test_reseal_needs_a_seal(tmp_path: Path) -> None:
    plain = tj.SQLiteJournal(tmp_path / "plain.db")
    await plain.open()
    with pytest.raises(ValueError, match=r"^reseal needs a journal opened with a seal$"):
        await plain.reseal()
    await plain.close()


async def test_reseal_reseals_rows_an_older_key_wrote_since_this_one_opened(
    tmp_path: Path,
) -> None:
    """Open re-seals at the start; a process still on the older key may write after it (or
    re-seal to its key, as here): ``reseal`` brings every such row under this key again."""
    older, newer = bytes(range(32)), bytes(range(100, 132))
    path = tmp_path / "tokens.db"
    journal = tj.SQLiteJournal(path, seal=tj.Seal(newer, previous=[tj.Seal(older)]))
    await journal.open()
    await journal.store_tokens("a", pair(1), NOW)
    lagging = tj.SQLiteJournal(path, seal=tj.Seal(older, previous=[tj.Seal(newer)]))
    await lagging.open()  # re-seals every row under its own key
    await lagging.close()
    assert await journal.sealed_by() == tj.Seal(older).key_id
    assert await journal.reseal() == 1
    assert await journal.sealed_by() == tj.Seal(newer).key_id
    record = await journal.load("a")
    assert record.sealed is not None and record.sealed.key_id == tj.Seal(newer).key_id
    assert record.tokens == pair(1)
    assert await journal.reseal() == 0
    await journal.close()


async def test_a_sealed_item_in_a_journal_without_a_key_is_refused_by_name(
    tmp_path: Path,
) -> None:
    """An item sealed under a key (another tool wrote it, or ``meta`` lost the key's mark)
    in a journal opened without a seal: the claim is a JournalError naming the item and the
    column, and the row is left as it was (no try counted, no lease)."""
    path = tmp_path / "tokens.db"
    journal = tj.SQLiteJournal(path)
    await journal.open()
    seal, body = tj.Seal(bytes(range(32))), b'{"n": 1}'
    sealed = {
        column: seal.seal(value, account="id-1", column=f"outbox.{column}", generation=1)
        for column, value in (("headers", "[]"), ("body", base64.b64encode(body).decode()))
    }
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "INSERT INTO outbox (seq, id, account, name, method, url, headers, body, size, "
            "created_at, sealed_by) VALUES (1, 'id-1', 'a', 'box', 'POST', ?, ?, ?, ?, ?, ?)",
            (URL, sealed["headers"], sealed["body"], len(body), NOW, seal.key_id),
        )
    try:
        with pytest.raises(tj.JournalError) as err:
            await claim(journal)
        assert await journal.outbox_stats("a", "box", NOW) == stats(pending=1, oldest_age=0.0)
    finally:
        await journal.close()
    assert str(err.value) == (
        "journal outbox item 'id-1': column outbox.body is sealed and this journal has no key "
        "to open it; fix or delete the row (the file was left untouched)"
    )
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT attempts, holder FROM outbox").fetchall() == [(0, None)]
