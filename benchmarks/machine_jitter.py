"""How late a sleeping thread wakes on this machine, with nothing of ours
running: the floor under every pause figure (benchmarks/bench_scale.py's
gauges).  A thread sleeps 1 ms, 10,000 times; printed: how much later than
1 ms it woke, p50, p99, p99.9 and max (ms).  Shared virtual machines stall
now and then for tens of milliseconds whatever runs in them.

    .venv/bin/python benchmarks/machine_jitter.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import sys
import time

NAP = 0.001  # seconds each sleep asks for


def lateness(seconds: float) -> list[float]:
    """Milliseconds each 1 ms sleep overran, for `seconds`."""
    late: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.perf_counter()
        time.sleep(NAP)
        late.append((time.perf_counter() - began - NAP) * 1000)
    return sorted(late)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    late = lateness(args.seconds)

    def at(q: float) -> float:
        return late[min(len(late) - 1, int(len(late) * q))]

    print(f"{len(late)} sleeps of {NAP * 1000:g} ms: woke late by p50 {at(0.5):.2f} ms, "
          f"p99 {at(0.99):.2f}, p99.9 {at(0.999):.2f}, max {late[-1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
