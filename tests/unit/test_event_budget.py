"""The event store's budget: rows and log lines a second, whatever the flood
(docs/threat-model.md, "Fill the disk or the log with a flood").

Drives the real Server with a controlled clock over many seconds and many
housekeeping rounds, through the API the daemon had before the budget (so
that this test runs, and fails, on the code before it);
tests/unit/test_event_fold.py tests the EventSink with time as an argument.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spa.core.verify import Refused
from spa.server.daemon import TICK
from spa.server.sources import Datagram
from tests.server_world import World

BUDGET = 50  # rows (and log lines) a second, as docs/threat-model.md states
FILTER = Path(__file__).resolve().parents[2] / "contrib/fail2ban/filter.d/spa-server.conf"
ATTACKER = "198.51.100.7"  # forges behind alice's tag, 5 packets a second
SLOW_ATTACKER = "198.51.100.9"  # the same, one packet a second
BUDGETED = ("refused", "dropped", "scan")  # what a sender without a key can cause


def ban_pattern() -> re.Pattern[str]:
    """The shipped jail's failregex, <HOST> as fail2ban's IPv4/IPv6 address."""
    text = FILTER.read_text()
    found = re.search(r"^failregex = (.+)$", text, re.MULTILINE)
    assert found is not None
    return re.compile(found.group(1).replace("<HOST>", r"(?P<host>[0-9a-fA-F.:]+)"))


@dataclass
class Flood:
    """What a flood made the daemon write, per second of the clock."""
    lines: dict[int, list[str]] = field(default_factory=dict)
    refused: int = 0  # packets the verifier refused
    dropped: int = 0  # attempts the firewall's counters reported

    def budgeted(self) -> dict[int, int]:
        return {second: sum(line.startswith(BUDGETED) for line in lines)
                for second, lines in self.lines.items()}


def spoofed(rng: random.Random) -> str:
    return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def spoofed6(rng: random.Random) -> str:
    a, b, c = rng.randrange(65536), rng.randrange(65536), rng.randrange(1, 65536)
    return f"2001:db8:{a:x}:{b:x}::{c:x}"


def flood(world: World, seconds: int, *, rate: int = 2500, drops: bool = True) -> Flood:
    """`rate` refusals a second from many sources (behind alice's and bob's
    live tags, junk, bad lengths), two real attackers, and (every 5 s
    reading) firewall drop counters of 3,000 spoofed sources on two ports;
    housekeeping every TICK."""
    server = world.server
    assert server is not None
    rng = random.Random(13)
    alice, bob = world.packet("alice"), world.packet("bob", "https")
    counters: dict[tuple[str, int], int] = {}
    drop_sources = [spoofed(rng) for _ in range(3000)]
    result = Flood()

    def read_counters() -> dict[tuple[str, int], int]:
        for source in drop_sources:
            for port in (22, 443):
                counters[source, port] = counters.get((source, port), 0) + 3
                result.dropped += 3
        return dict(counters)

    if drops:
        world.backend.drops = read_counters  # type: ignore[attr-defined]
    rounds = round(1 / TICK)
    per_round = rate // rounds
    forge: Callable[[bytes], bytes] = lambda valid: valid[:9] + rng.randbytes(152)  # noqa: E731
    for second in range(seconds):
        for turn in range(rounds):
            batch: list[Datagram] = [(forge(alice), ATTACKER, 0)]
            if turn == 0:
                batch.append((forge(alice), SLOW_ATTACKER, 0))
            batch += [(forge(alice), spoofed(rng), 0) for _ in range(per_round * 6 // 10)]
            batch += [(forge(bob), spoofed6(rng), 0) for _ in range(per_round * 2 // 10)]
            batch += [(b"\x01" + rng.randbytes(160), spoofed(rng), 0)
                      for _ in range(per_round - len(batch) - 5)]
            batch += [(rng.randbytes(20), spoofed6(rng), 0) for _ in range(5)]
            result.refused += sum(isinstance(r, Refused) for r in server.handle_batch(batch))
            world.clock.advance(TICK)
            before = len(world.logs)
            server.housekeeping()
            now = int(world.clock.now)
            result.lines.setdefault(now, []).extend(world.logs[before:])
        del second
    return result


def started(root: Path) -> World:
    """A server with two clients: alice (ssh, https) and bob (https)."""
    world = World(root)
    world.init()
    for name, services in (("alice", ()), ("bob", ("https",))):
        world.enroll(name, *services)
    world.start()
    return world


@pytest.fixture
def world(tmp_path: Path) -> World:
    return started(tmp_path)


def test_a_flood_from_many_sources_never_writes_more_than_the_budget(world: World) -> None:
    """2,500 refusals a second from many sources, many reasons, two clients'
    tags, and a drop reading of 6,000 (source, port) counters every 5 s:
    never more than BUDGET rows and log lines in any second, over 12 s
    and 60 flushes; nothing is lost from the totals; the attackers' lines
    are there every second."""
    found = flood(world, 12)
    per_second = found.budgeted()
    assert max(per_second.values()) <= BUDGET, per_second
    events = world.events()  # writes what is still pending
    refused = [e for e in events if e.outcome == "refused"]
    assert sum(e.count for e in refused) == found.refused, "every refused packet is counted"
    assert sum(e.count for e in events if e.outcome == "dropped") == found.dropped
    written = sum(len(lines) for lines in found.lines.values())
    assert len([e for e in events if e.outcome in BUDGETED]) <= written + BUDGET
    # fail2ban's lines for the real sources, in every second of the flood
    pattern = ban_pattern()
    for second, lines in sorted(found.lines.items())[1:]:
        hosts = {m.group("host") for line in lines if (m := pattern.match(line))}
        assert ATTACKER in hosts, (second, lines)
        assert SLOW_ATTACKER in hosts, (second, lines)


def test_the_flood_helper_sends_what_it_says(world: World) -> None:
    """The test above cannot pass by sending nothing."""
    found = flood(world, 2, drops=False)
    assert found.refused == 2 * 2500
    assert sum(e.count for e in world.events() if e.outcome == "refused") == 2 * 2500
