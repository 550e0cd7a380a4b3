"""What a refusal flood costs the event store and the log (issue 13, finding 3).

Drives the real EventSink (SQLite in WAL mode, in a temporary directory) as
the daemon does: the receive path counts refusals, housekeeping flushes
every TICK with the clock.  The clock is simulated (time is an argument),
so N seconds of flood take less than N seconds; what is measured is what
the sink writes for them:

- rows/s and log lines/s (the mean, and the worst second of the clock);
- bytes/s of the database (its file after a WAL checkpoint, so the WAL is
  counted once) and bytes per row, and from those a day's growth and the
  size at the default retention;
- the housekeeping thread's time per flush (p50, max).

The flood: `--rate` refusals a second (default 2,500) behind one live tag
from as many spoofed sources (rate_limited once the tag is over its limit,
bad_mac before), a fifth of them junk without a tag, and two real sources
(5/s and 1/s) whose fail2ban lines are counted.  `--ipv6`: the spoofed
sources are full-length IPv6 addresses (the longest rows).

    .venv/bin/python benchmarks/bench_events.py [--seconds 60] [--rate 2500] [--ipv6]

Runs against the code before the budget too (its flush takes no clock).
"""

from __future__ import annotations

import argparse
import inspect
import random
import sqlite3
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from spa.server import events as events_mod
from spa.server.config import DEFAULT_RETENTION_DAYS
from spa.server.daemon import TICK
from spa.server.events import EventSink

START = 1_800_000_000.0
REAL = ("198.51.100.7", "198.51.100.9")  # 5 a second, 1 a second
TAG_LIMIT = 200  # forged packets a second per tag before rate_limited (spa/core/limits.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--rate", type=int, default=2500, help="refusals a second")
    parser.add_argument("--ipv6", action="store_true",
                        help="spoofed IPv6 sources (longer rows) instead of IPv4")
    args = parser.parse_args()
    rng = random.Random(13)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.sqlite3"
        lines: list[tuple[int, str]] = []
        clock = [START]
        sink = EventSink(path, lambda line: lines.append((int(clock[0]), line)),
                         retention_days=DEFAULT_RETENTION_DAYS)
        takes_now = "now" in inspect.signature(sink.flush).parameters
        empty = path.stat().st_size
        rounds = round(1 / TICK)
        per_round = args.rate // rounds
        flushes: list[float] = []  # the flushes that wrote rows
        refused = 0
        began = time.perf_counter()
        for _ in range(args.seconds):
            forged = 0
            for turn in range(rounds):
                now = clock[0]
                sink.refuse(now, "bad_mac", "alice", REAL[0])
                if turn == 2:
                    sink.refuse(now, "rate_limited", "alice", REAL[1])
                for i in range(per_round - 2):
                    source = spoofed(rng, args.ipv6)
                    if i % 5 == 4:
                        sink.refuse(now, "unknown_tag", None, source)
                    else:
                        forged += 1
                        reason = "bad_mac" if forged <= TAG_LIMIT else "rate_limited"
                        sink.refuse(now, reason, "alice", source)
                refused += per_round - 1 + (turn == 2)  # the spoofed ones and the real
                clock[0] = now + TICK
                t0 = time.perf_counter()
                # the code before the budget had no clock to give
                written = sink.flush(clock[0]) if takes_now else sink.flush()
                if written:
                    flushes.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - began
        sink.close()
        db = sqlite3.connect(path)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows, counted = db.execute("SELECT COUNT(*), SUM(count) FROM events").fetchone()
        db.close()
        size = path.stat().st_size - empty
    per_second = Counter(second for second, _ in lines)
    real_lines = Counter(src for _, line in lines for src in REAL
                         if f" src={src}" in line and line.split()[1].split("=")[1]
                         in ("bad_mac", "rate_limited"))
    seconds = args.seconds
    per_row = size / rows
    budget = getattr(events_mod, "EVENT_BUDGET", None)
    print(f"{seconds} s of {args.rate:,} refusals/s from IPv{6 if args.ipv6 else 4} sources "
          f"({refused:,} refused, {counted:,} counted in the store), EVENT_BUDGET={budget}, "
          f"{elapsed:.1f} s of real time")
    print(f"rows/s        {rows / seconds:8.1f}   (worst second of the log: "
          f"{max(per_second.values())} lines)")
    print(f"log lines/s   {len(lines) / seconds:8.1f}   "
          f"({sum(len(line) + 1 for _, line in lines) / seconds:,.0f} bytes/s of log text)")
    print(f"db bytes/s    {size / seconds:8,.0f}   ({per_row:.1f} bytes a row, "
          f"{size / seconds * 86400 / 1e9:.2f} GB a day, "
          f"{size / seconds * 86400 * DEFAULT_RETENTION_DAYS / 1e9:.1f} GB at "
          f"{DEFAULT_RETENTION_DAYS} days' retention)")
    print(f"flush ms      p50 {statistics.median(flushes) * 1000:.2f}, "
          f"max {max(flushes) * 1000:.2f} ({len(flushes)} flushes wrote rows; the others "
          "held or had nothing)")
    print(f"real sources' ban lines in {seconds} s: {REAL[0]} (5/s) {real_lines[REAL[0]]}, "
          f"{REAL[1]} (1/s) {real_lines[REAL[1]]}")


def spoofed(rng: random.Random, ipv6: bool) -> str:
    if ipv6:
        return "2001:db8:" + ":".join(f"{rng.randrange(1, 65536):x}" for _ in range(6))
    return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"


if __name__ == "__main__":
    main()
