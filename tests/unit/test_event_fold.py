"""The EventSink's budget and its folds, time as an argument
(docs/threat-model.md, "Fill the disk or the log with a flood")."""

from __future__ import annotations

import ipaddress
import random
import re
from collections import Counter
from pathlib import Path

from spa.core.errors import FWKNOP_ONLY, Reason
from spa.server.daemon import TICK
from spa.server.events import (
    BAN_REASONS,
    EVENT_BUDGET,
    SOURCE_ROWS,
    Event,
    EventSink,
    Key,
    fold,
    prefix,
    read_events,
)
from tests.server_world import START
from tests.unit.test_event_budget import (
    ATTACKER,
    BUDGET,
    FILTER,
    SLOW_ATTACKER,
    ban_pattern,
    spoofed,
    spoofed6,
)

REASONS = [reason.value for reason in Reason]


class Lines(list[str]):
    """A log that remembers the second of the clock each line was written in."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.per_second: Counter[int] = Counter()

    def __call__(self, line: str) -> None:
        self.append(line)
        self.per_second[int(self.now)] += 1


def sink_at(tmp_path: Path) -> tuple[EventSink, Lines]:
    lines = Lines()
    return EventSink(tmp_path / "events.sqlite3", lines, retention_days=1), lines


def test_the_budget_is_the_documented_figure() -> None:
    assert EVENT_BUDGET == BUDGET
    # our listener's reasons (the compat listener's own share the budget: spa.core.errors)
    ours = len(Reason) - len(FWKNOP_ONLY)
    assert SOURCE_ROWS + ours + 2 <= EVENT_BUDGET, "room for one row per reason"


def test_no_second_has_more_rows_than_the_budget_and_no_count_is_lost(tmp_path: Path) -> None:
    """Many seconds, many flushes (some late, the clock once set back), every
    reason, many clients, IPv4 and IPv6 sources, drops and scans: never more
    than the budget in a second; the counts add up; a folded source is its
    /24 or /64."""
    sink, lines = sink_at(tmp_path)
    rng = random.Random(7)
    sent: Counter[tuple[str, str | None]] = Counter()
    sources: set[str] = set()
    now = real = START  # the clock, and the time that passes (the clock once set back)
    for step in range(300):  # 60 s of 0.2 s steps
        for _ in range(rng.choice([0, 3, 40, 600])):
            source = spoofed(rng) if rng.random() < 0.7 else spoofed6(rng)
            reason = rng.choice(REASONS)
            sink.refuse(now + rng.random() * TICK, reason, rng.choice([None, "alice", "bob",
                        f"c{rng.randrange(50)}"]), source)
            sent["refused", reason] += 1
            sources.add(source)
        if step % 25 == 0:
            for _ in range(700):
                source = spoofed(rng)
                sink.tally(Event(now, "dropped", source=source, service="ssh", count=3))
                sink.tally(Event(now, "scan", source=source, service="ssh,https", count=6))
                sent["dropped", None] += 3
                sent["scan", None] += 6
                sources.add(source)
        passed = TICK if step % 40 else 1.7  # a late housekeeping round now and then
        now, real = now + passed - (5.0 if step == 150 else 0.0), real + passed
        lines.now = real
        sink.flush(now)
    assert max(lines.per_second.values()) <= BUDGET, lines.per_second
    assert sum(lines.per_second.values()) > 40 * BUDGET, "the flood did fill the budget"
    sink.flush()  # closing: what waits is written
    events = read_events(sink.path)
    assert len(events) == len(lines)
    written: Counter[tuple[str, str | None]] = Counter()
    for event in events:
        written[event.outcome, event.reason] += event.count
        assert event.source is None or event.source in sources or _is_prefix(event.source)
    assert written == sent


def _is_prefix(source: str) -> bool:
    network = ipaddress.ip_network(source)
    return network.prefixlen == (24 if network.version == 4 else 64)


def test_a_real_sources_line_survives_a_spoofed_flood(tmp_path: Path) -> None:
    """Behind a live tag: 2,500 forgeries a second from spoofed sources (one
    packet each) and junk with no tag (any count); an attacker sending 5 a
    second, and one sending 1 a second, keep their lines every second."""
    sink, lines = sink_at(tmp_path)
    rng = random.Random(3)
    pattern = ban_pattern()
    now = START
    for second in range(30):
        for turn in range(5):
            sink.refuse(now, "bad_mac", "alice", ATTACKER)
            if turn == 2:
                sink.refuse(now, "rate_limited", "alice", SLOW_ATTACKER)
            for _ in range(500):
                sink.refuse(now, "rate_limited", "alice", spoofed(rng))
            for _ in range(100):  # junk: costs a spoofer nothing, never a ban line
                source = spoofed6(rng)
                for _ in range(20):
                    sink.refuse(now, "unknown_tag", None, source)
            now += TICK
            lines.now = now
            before = len(lines)
            written = sink.flush(now)
            assert len(lines) - before == len(written)
        if second:
            hosts = {m.group("host") for line in lines[-BUDGET:] if (m := pattern.match(line))}
            assert {ATTACKER, SLOW_ATTACKER} <= hosts, (second, lines[-BUDGET:])
    assert max(lines.per_second.values()) <= BUDGET


def test_quiet_refusals_are_written_at_the_next_flush(tmp_path: Path) -> None:
    sink, lines = sink_at(tmp_path)
    sink.refuse(START, "bad_mac", "alice", ATTACKER)
    sink.refuse(START + 0.1, "bad_mac", "alice", ATTACKER)
    assert [e.count for e in sink.flush(START + 0.2)] == [2]
    assert lines == [f"refused reason=bad_mac client=alice src={ATTACKER} count=2"]
    for i in range(BUDGET):  # a second's whole budget in one flush
        sink.refuse(START + 0.3, "unknown_tag", None, f"192.0.2.{i}")
    assert sink.flush(START + 0.4) == [], "more than is left of the second: held"
    assert sink.flush(START + 0.6) == [], "until the second is over"
    assert len(sink.flush(START + 1.0)) == BUDGET, "then with the next second's budget"


def test_folding_goes_by_prefix_then_by_reason() -> None:
    pending: dict[Key, tuple[float, int]] = {}
    for i in range(200):
        pending["refused", "bad_mac", "alice", f"198.51.{i % 4}.{i}", None, False] = (START, 1)
        pending["refused", "unknown_tag", None, f"2001:db8:0:{i % 3}::{i:x}", None, False] = (
            START, 2)
    events, waiting = fold(pending, BUDGET, ())
    assert waiting == {}
    assert len(events) <= BUDGET
    sources = Counter(e.source for e in events if e.source and "/" in e.source)
    assert set(sources) <= {f"198.51.{i}.0/24" for i in range(4)} | {
        str(ipaddress.ip_network(f"2001:db8:0:{i}::/64")) for i in range(3)}
    assert sum(e.count for e in events) == 200 + 400
    singles = sum(e.source is not None and "/" not in e.source for e in events)
    assert singles == BUDGET - 7, "as many as leave the rest room at the prefix level"
    rng = random.Random(5)
    spread: dict[Key, tuple[float, int]] = {
        ("refused", "bad_mac", "alice", spoofed(rng), None, False): (START, 1)
        for _ in range(900)}
    events, waiting = fold(spread, BUDGET, ())
    assert waiting == {}
    assert len(events) == BUDGET
    assert sum(e.source is not None and "/" not in e.source for e in events) == SOURCE_ROWS
    assert sum(e.count for e in events) == 900
    everything, _ = fold(pending, 7, ())
    assert {(e.reason, e.source) for e in everything} <= {("bad_mac", None), (
        "unknown_tag", None)} | {("bad_mac", f"198.51.{i}.0/24") for i in range(4)} | {
        ("unknown_tag", str(ipaddress.ip_network(f"2001:db8:0:{i}::/64"))) for i in range(3)}
    assert sum(e.count for e in everything) == 600


def test_the_ban_reasons_are_the_shipped_filters_and_no_fold_is_banned() -> None:
    text = FILTER.read_text()
    found = re.search(r"reason=\(\?:([a-z_|]+)\)", text)
    assert found is not None
    assert set(found.group(1).split("|")) == BAN_REASONS
    pattern = ban_pattern()
    for source in ("198.51.100.0/24", "2001:db8::/64"):
        assert prefix(source.split("/")[0].replace("::", "::7")) in (source, None)
        line = Event(START, "refused", reason="bad_mac", client="alice", source=source,
                     count=9).log_line()
        assert not pattern.match(line), line
    assert prefix("198.51.100.7") == "198.51.100.0/24"
    assert prefix("2001:db8::7") == "2001:db8::/64"
    assert prefix("::ffff:198.51.100.7") == "198.51.100.0/24"
    assert prefix(None) is None
