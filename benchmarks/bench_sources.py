"""What per-client source networks cost: Policy.decide per call, and the
rules of 100,000 clients in memory, without and with networks.

decide is timed in process (timeit, best of 5 rounds; the garbage collector
off, as timeit does) for a client with no networks (today's path), one, ten
with the match last, and the 64 allowed with no match (the longest walk).
Memory is what tracemalloc counts for 10^5 ClientPolicy values built by
spa.server.config.client_policy: no networks, one list shared by all (as an
office's clients would be: network_set interns it), a /32 of its own each.
Figures are printed, never asserted (STYLE principle 14).

    .venv/bin/python benchmarks/bench_sources.py
"""

from __future__ import annotations

import ipaddress
import sys
import timeit
import tracemalloc
from collections.abc import Callable
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from spa.core.policy import DEFAULT_SERVICES, ClientPolicy, Policy  # noqa: E402
from spa.core.sources import MAX_SOURCES  # noqa: E402
from spa.core.wire import Action, Request  # noqa: E402
from spa.server import config as config_mod  # noqa: E402
from spa.server.config import ClientEntry  # noqa: E402

CLIENTS = 100_000
CALLS = 200_000
SOURCE = ipaddress.ip_address("192.0.2.10")
HOME = "192.0.2.0/24"
LISTS: dict[str, tuple[str, ...]] = {
    "no networks": (),
    "1 network": (HOME,),
    "10 networks, the match last": (*(f"10.{i}.0.0/16" for i in range(9)), HOME),
    f"{MAX_SOURCES} networks, no match": tuple(f"10.{i}.0.0/16" for i in range(MAX_SOURCES)),
}
MEMORY: dict[str, Callable[[int], tuple[str, ...]]] = {
    "no networks": lambda i: (),
    "one list shared by all": lambda i: (HOME,),
    "a /32 each": lambda i: (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32",),
}


def decide_ns(sources: tuple[str, ...]) -> float:
    rules = ClientPolicy("a", frozenset({"ssh"}), sources=config_mod.network_set(sources))
    policy = Policy(dict(DEFAULT_SERVICES), {"a": rules})
    request = Request(0, Action.OPEN, "ssh")
    best = min(timeit.repeat(lambda: policy.decide("a", request, SOURCE), number=CALLS,
                             repeat=5))
    return best / CALLS * 1e9


def policies_mb(sources_of: Callable[[int], tuple[str, ...]]) -> float:
    entries = [ClientEntry(f"c{i}", bytes(32), ("ssh",), sources=sources_of(i))
               for i in range(CLIENTS)]
    config_mod.network_set.cache_clear()
    tracemalloc.start()
    policies = [config_mod.client_policy(entry) for entry in entries]
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del policies
    return size / 1e6


def main() -> int:
    print(f"Policy.decide, best of 5 x {CALLS:,} calls")
    for label, sources in LISTS.items():
        print(f"  {label:<32} {decide_ns(sources):7.0f} ns")
    print(f"{CLIENTS:,} clients' rules (ClientPolicy), tracemalloc")
    for label, sources_of in MEMORY.items():
        print(f"  {label:<32} {policies_mb(sources_of):7.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
