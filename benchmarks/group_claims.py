"""Grants per second and claim latency in group mode, through the real Claimer
(spa.group.claims) on a real etcd: the path of commit bed3635 (4 round trips a
knock) beside today's (shared leases, one transaction a batch), in one run.

One etcd member (Debian 12's etcd 3.4.23) on a loopback port of its own, in a
temporary data directory removed afterwards, TLS with client certificates and
RBAC on as a group runs it (benchmarks/group_scale.py's set-up: a user with a
password whose role covers the group's prefix).  One EtcdStore, shared by the
claim threads, as in a member.

Paths, each with 1 and 4 claim threads:
- old: each knock on its own: an etcd lease grant, the create-if-absent of
  its claim, a lease grant, the put of its lease record (the code of commit
  bed3635, kept below as OldClaimer);
- one-by-one: today's Claimer with batches of one packet (a transaction of
  the claim and its lease record, on shared leases);
- batched: today's Claimer as a member runs it (up to 64 packets a
  transaction: whatever is queued when a claim thread is free).

Figures:
1. grants/s: --knocks knocks on the batched path, --slow-knocks on the
   others (a run of some seconds each; distinct clients and nonces, as the receive
   thread would hand them over, one submit() each, as fast as it can) until
   every one is granted; beside it the CPU this process (the member's side:
   records, JSON, TLS; not etcd's) spent a knock, and the wall time;
2. claim latency of a lone knock (an idle member): submit() to the grant
   (hooks.grant_claimed), --lone knocks one after another; p50 / p99.

    .venv/bin/python benchmarks/group_claims.py [--knocks 20000] [--slow-knocks 2000]
        [--lone 300] [--runs 2]

(root is not needed: etcd runs as the caller, on 127.0.0.1.)  Needs etcd,
etcdctl and openssl.  The machine is noisy (2 cores shared, etcd on them too):
the load average is printed with each figure; paths alternate within a run.
Figures: docs/benchmarks.md ("Claims in group mode") and docs/scale.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from etcd_clients import etcd, make_certs, need_tools  # noqa: E402
from group_scale import GROUP, MEMBER, Etcd, load, pct  # noqa: E402

from spa.core.errors import Reason  # noqa: E402
from spa.core.policy import DEFAULT_SERVICES, Decision  # noqa: E402
from spa.core.verify import Accepted  # noqa: E402
from spa.core.wire import Action, IPAddress, Request  # noqa: E402
from spa.group import layout  # noqa: E402
from spa.group.claims import Claimer  # noqa: E402
from spa.group.delta import ClientDelta  # noqa: E402
from spa.group.kv import KV, StoreError, StorePermissionError  # noqa: E402
from spa.group.policy import ClaimResult, OnStoreDown, Verdict, decide  # noqa: E402
from spa.group.records import (  # noqa: E402
    Claim,
    LeaseRecord,
    claim_ttl,
    encode_claim,
    encode_lease,
)

WINDOW = 30.0  # the default freshness window (seconds)


class Hooks:
    """The daemon's side, counting: when each knock was granted."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.granted = 0
        self.refused: dict[str, int] = {}
        self.last = 0.0

    def grant_claimed(self, results: list[Accepted], now: float) -> None:
        with self.cond:
            self.granted += len(results)
            self.last = time.perf_counter()
            self.cond.notify_all()

    def refuse_claimed(self, result: Accepted, reason: Reason, now: float) -> None:
        with self.cond:
            self.refused[reason.value] = self.refused.get(reason.value, 0) + 1
            self.cond.notify_all()

    def apply_client_delta(self, delta: ClientDelta, origin: str) -> None:
        pass

    def install_lease(self, lease: LeaseRecord) -> None:
        pass

    def remove_lease(self, client: str, address: IPAddress, service: str) -> None:
        pass

    def confirm_restored(self, live: Collection[tuple[str, IPAddress, str]]) -> None:
        pass

    def wait(self, count: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.granted + sum(self.refused.values()) < count:
                if not self.cond.wait(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"only {self.granted} granted, refused "
                                       f"{self.refused}, of {count}")


class OldClaimer(Claimer):
    """The claim and the share of commit bed3635, one knock at a time: a lease
    grant and a create, then a lease grant and a put."""

    def settle_batch(self, batch: Sequence[tuple[Accepted, bytes]], *,
                     queued: float | None = None) -> list[Verdict]:
        return [self._old_settle(result, nonce) for result, nonce in batch]

    def _old_settle(self, result: Accepted, nonce: bytes) -> Verdict:
        now = self.clock()
        key = layout.claim_key(self.group, result.client, nonce).encode()
        try:
            lease = self.kv.grant(claim_ttl(result.request.timestamp_ms / 1000, now,
                                            self.window))
            created = self.kv.create(key, encode_claim(Claim(self.member, now)), lease)
            claimed = ClaimResult.CREATED if created else ClaimResult.EXISTS
        except StorePermissionError:
            claimed = ClaimResult.UNREACHABLE
        except StoreError:
            claimed = ClaimResult.UNREACHABLE
        verdict = decide(claimed, self.on_store_down)
        now = self.clock()
        if not verdict.granted:
            assert verdict.reason is not None
            self.hooks.refuse_claimed(result, verdict.reason, now)
            return verdict
        self.hooks.grant_claimed([result], now)
        decision = result.decision
        record = LeaseRecord(result.client, decision.address, decision.service.name,
                             decision.service.protocol, decision.service.port,
                             now + decision.duration, self.member)
        try:
            share_lease = self.kv.grant(record.ttl(now))
            self.kv.put(layout.lease_key(self.group, result.client, decision.address,
                                         decision.service.name).encode(),
                        encode_lease(record), share_lease)
            self._bump("leases_shared")
        except StoreError:
            self._bump("leases_not_shared")
        return verdict


def knock(i: int, run: str, now: float) -> tuple[Accepted, bytes]:
    """An accepted open of client c<i> from its own address (distinct keys)."""
    service = DEFAULT_SERVICES["ssh"]
    address = ipaddress.ip_address(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}")
    request = Request(int(now * 1000), Action.OPEN, "ssh", 60)
    accepted = Accepted(f"{run}-c{i}", request, Decision(address, service, 60), address)
    return accepted, os.urandom(24)


def claimer(path: str, kv: KV, threads: int, hooks: Hooks) -> Claimer:
    kind = OldClaimer if path == "old" else Claimer
    return kind(kv, group=GROUP, member=MEMBER, window=WINDOW,
                on_store_down=OnStoreDown.FAIL_CLOSED, hooks=hooks, clock=time.time,
                log=lambda line: print(f"    log: {line}"),
                executor=ThreadPoolExecutor(threads), threads=threads,
                batch_max=64 if path == "batched" else 1)


def rate(path: str, kv: KV, threads: int, count: int, run: str) -> tuple[float, str]:
    """Grants/s for count knocks handed over as fast as possible."""
    hooks = Hooks()
    c = claimer(path, kv, threads, hooks)
    now = time.time()
    knocks = [knock(i, run, now) for i in range(count)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for accepted, nonce in knocks:
        c.submit([accepted], [nonce])
    hooks.wait(count)
    elapsed = hooks.last - t0
    cpu = time.process_time() - cpu0
    c.close()
    if hooks.refused or c.counts["leases_not_shared"]:
        raise RuntimeError(f"{path}: refused {hooks.refused}, counts {c.counts}")
    extra = (f"{c.batches} txns, {count / c.batches:.1f} knocks each; "
             f"{c.pool.granted} leases granted" if path != "old" else
             f"{2 * count} leases granted")
    extra += f"; this process's CPU {cpu * 1e6 / count:.0f} us a knock, wall {elapsed:.2f} s"
    return count / elapsed, extra


def latency(path: str, kv: KV, count: int, run: str) -> list[float]:
    """submit() to grant of a lone knock, one after another (an idle member)."""
    hooks = Hooks()
    c = claimer(path, kv, 4, hooks)
    now = time.time()
    samples = []
    for i in range(count):
        accepted, nonce = knock(i, run, now)
        t0 = time.perf_counter()
        c.submit([accepted], [nonce])
        hooks.wait(i + 1)
        samples.append(hooks.last - t0)
    c.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--knocks", type=int, default=20_000,
                        help="knocks per rate figure of the batched path")
    parser.add_argument("--slow-knocks", type=int, default=2000,
                        help="knocks per rate figure of the old and one-by-one paths")
    parser.add_argument("--lone", type=int, default=300, help="lone knocks per latency figure")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    need_tools("group_claims")
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="group-claims-")))
        make_certs(root / "certs")
        port = stack.enter_context(etcd(root / "etcd", tls=root / "certs"))
        e = Etcd(port, root / "certs")
        e.rbac()
        kv = e.store()
        kv.get(b"/spa/groups/" + GROUP.encode() + b"/meta")  # the token, once
        version = subprocess.run(["etcd", "--version"], capture_output=True, text=True,
                                 check=False).stdout.splitlines()[0]
        print(f"{version}; one member on loopback, TLS, RBAC; knocks {args.knocks:,} batched, "
              f"{args.slow_knocks:,} on the other paths {load()}")
        paths = ("old", "one-by-one", "batched")
        for run in range(1, args.runs + 1):
            print(f"run {run}: grants/s (every knock claimed and its lease shared)")
            for threads in (1, 4):
                for path in paths:
                    count = args.knocks if path == "batched" else args.slow_knocks
                    per_s, extra = rate(path, kv, threads, count, f"r{run}{path}{threads}")
                    print(f"  {path:10} {threads} thread{'s' if threads > 1 else ' '}: "
                          f"{per_s:7,.0f}/s  ({extra}) {load()}")
            print(f"run {run}: claim latency of a lone knock, submit to grant, ms")
            for path in paths:
                samples = latency(path, kv, args.lone, f"r{run}{path}lone")
                print(f"  {path:10}: p50 {statistics.median(samples) * 1e3:6.2f}  "
                      f"p99 {pct(samples, 0.99) * 1e3:6.2f} {load()}")


if __name__ == "__main__":
    main()
