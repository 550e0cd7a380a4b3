"""What fwknop's packets cost the compat listener (issue 15): fwknop has no
tag, so a packet's client is found by the HMAC under each compat client's key
in turn.  Prints, per number of compat clients, the cost of a junk packet (an
HMAC under every key: the worst case, what a flood costs), of a valid knock
(found half-way on average, then decrypted and parsed), and the junk packets
a second one core verifies, against MAX_HMACS (the budget) and MAX_CLIENTS.

    .venv/bin/python benchmarks/bench_fwknop.py [--clients 10,100,1000]
"""

from __future__ import annotations

import argparse
import time

from spa.core.fwknop import FwknopKeys
from spa.core.fwknop_verify import (
    DIAGNOSES_PER_SECOND,
    MAX_CLIENTS,
    MAX_HMACS,
    CompatVerifier,
    HmacBudget,
)
from spa.core.policy import DEFAULT_SERVICES, ClientPolicy, Policy
from tests.fwknop_world import packet

NOW = 1_800_000_000
UNLIMITED = dict(max_hmacs=10**12, per_source=10**12, per_trusted=10**12)


def verifier(n: int) -> tuple[CompatVerifier, list[FwknopKeys]]:
    keys = [FwknopKeys(i.to_bytes(4, "big") * 8, i.to_bytes(4, "big") * 16) for i in range(n)]
    policy = Policy(dict(DEFAULT_SERVICES),
                    {f"c{i}": ClientPolicy(f"c{i}", frozenset({"ssh"})) for i in range(n)})
    return CompatVerifier({f"c{i}": k for i, k in enumerate(keys)}, policy,
                          budget=HmacBudget(**UNLIMITED)), keys


def per_packet(run: object, count: int) -> float:
    began = time.perf_counter()
    for _ in range(count):
        run()  # type: ignore[operator]
    return (time.perf_counter() - began) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,100,1000")
    args = parser.parse_args()
    print(f"{'clients':>8} {'junk us':>9} {'junk/s':>9} {'knock us':>9} {'diagnosis ms':>13}"
          f"  (budget {MAX_HMACS} HMACs/s, cap {MAX_CLIENTS} clients, "
          f"{DIAGNOSES_PER_SECOND} diagnoses/s)")
    for n in (int(x) for x in args.clients.split(",")):
        check, keys = verifier(n)
        junk = packet(FwknopKeys(b"j" * 32, b"j" * 64), now=NOW)  # an HMAC no key made
        began = time.perf_counter()
        for _ in range(DIAGNOSES_PER_SECOND):  # the second's diagnoses, spent first
            check.verify(junk, "198.51.100.7", NOW)
        diagnosis = (time.perf_counter() - began) / DIAGNOSES_PER_SECOND
        rounds = max(50, 20_000 // n)
        junk_cost = per_packet(lambda j=junk, c=check: c.verify(j, "198.51.100.7", NOW), rounds)
        knocks = [packet(keys[(i * 7919) % n], now=NOW) for i in range(200)]
        it = iter(knocks)
        knock_cost = per_packet(lambda c=check, k=it: c.verify(next(k), "198.51.100.7", NOW),
                                len(knocks))
        print(f"{n:>8} {junk_cost * 1e6:>9.1f} {1 / junk_cost:>9.0f} {knock_cost * 1e6:>9.1f} "
              f"{diagnosis * 1e3:>13.2f}")


if __name__ == "__main__":
    main()
