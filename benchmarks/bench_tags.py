"""The tag table at 10^5 clients, in process (issue 14).

1. One dict against SHARDS dicts: each step 10^5 new tags in (in slices of
   1,000) and the expired step's out; the longest slice, i.e. the stall a
   rehash in one C call (holding the GIL) causes every thread.
2. The verifier at N clients: memory traced, build time, one step's slices,
   `advance` at the boundary once sliced.

    .venv/bin/python benchmarks/bench_tags.py [--clients 100000]
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import tracemalloc

from spa.core.knock import SHARDS, SLICE
from spa.core.policy import DEFAULT_SERVICES, ClientPolicy, Policy
from spa.core.verify import Verifier

STEPS = 30  # rotations measured in part 1


def longest_slice(count: int, shards: int) -> float:
    """Seconds of the longest slice over STEPS rotations of 3 live steps."""
    tables: list[dict[bytes, tuple[str, int]]] = [{} for _ in range(shards)]
    live = []
    for step in range(3):
        tags = [os.urandom(8) for _ in range(count)]
        live.append(tags)
        for tag in tags:
            tables[tag[0] % shards][tag] = ("c", step)
    worst = 0.0
    for step in range(STEPS):
        new = [os.urandom(8) for _ in range(count)]
        old = live.pop(0)
        for at in range(0, count, SLICE):
            began = time.perf_counter()
            for tag in new[at:at + SLICE]:
                tables[tag[0] % shards][tag] = ("c", step)
            for tag in old[at:at + SLICE]:
                del tables[tag[0] % shards][tag]
            worst = max(worst, time.perf_counter() - began)
        live.append(new)
    return worst


def verifier_figures(count: int) -> None:
    secrets = {f"c{i}": os.urandom(32) for i in range(count)}
    policy = Policy(dict(DEFAULT_SERVICES),
                    {name: ClientPolicy(name, frozenset({"ssh"})) for name in secrets})
    gc.collect()
    began = time.perf_counter()
    verifier = Verifier(bytes(range(16)), secrets, policy, now=1_800_000_000.0)
    built = time.perf_counter() - began
    began = time.perf_counter()
    while verifier.tags.slice():
        pass
    sliced = time.perf_counter() - began
    began = time.perf_counter()
    verifier.tags.advance(verifier.tags.step + 1)
    advanced = time.perf_counter() - began
    del verifier
    gc.collect()
    tracemalloc.start()
    verifier = Verifier(bytes(range(16)), secrets, policy, now=1_800_000_000.0)
    while verifier.tags.slice():
        pass
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"verifier at {count:,} clients: built in {built:.2f} s, one step's slices "
          f"{sliced:.2f} s of CPU, advance at the boundary {advanced * 1000:.3f} ms, "
          f"{traced / 2**20:.1f} MB traced ({traced / count:.0f} B a client, "
          f"{len(verifier.tags):,} tags)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100_000)
    args = parser.parse_args()
    for shards in (1, SHARDS):
        worst = longest_slice(args.clients, shards)
        print(f"{shards:>3} dict(s), {args.clients:,} tags a step, slices of {SLICE}: "
              f"longest slice {worst * 1000:.1f} ms over {STEPS} steps")
    verifier_figures(args.clients)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
