"""What a group costs etcd, measured with our records and our EtcdStore (issue 18).

One etcd member (Debian 12's etcd 3.4.23) on loopback ports of its own, in a
temporary data directory removed afterwards, TLS with client certificates and
RBAC on as a group runs it (a user with a password whose role covers the
group's prefix: spa.group.etcd's way through the JSON gateway).  Then:

1. sizes: encoded bytes of a client record (random ClientEntry values,
   realistic names), a lease, a claim, a revocation, an activation; their
   keys' lengths;
2. database: etcd's dbSize and dbSizeInUse (after a compaction and a defrag)
   empty, with 10^4 and 10^5 client records (more with --clients), then with
   10^4 leases and 10^4 claims, each on an etcd lease of its own: bytes per
   record in etcd;
3. write rates: client records put one by one (EtcdStore.put), a claim as
   members made it before the claimer's batches (a lease grant, then
   EtcdStore.create), a claim on a shared lease (create alone), each from 1
   and from --threads threads (each thread its own EtcdStore, as separate
   members would); claims as a member makes them now, through the claimer:
   benchmarks/group_claims.py;
4. a member's start (GroupMember.load into a real Verifier), at 10^4 and
   10^5 clients, before and after in turn: the whole prefix read, each
   client's keys made three times, every live step's tags at once (before);
   the kinds a member applies at one revision, keys made once, the current
   step's tags first and the rest sliced in (after); then the first knock of
   a group client judged by that verifier (the member's start figure: until
   it is accepted), and the warm-up's slices.  --claims N puts N nonce
   claims in the group first (a busy group's claims/);
5. history: 5,000 claims on 2 s leases, come and gone: what their puts and
   the deletes of their expiries leave in the database until a compaction;
6. watch fan-out: N watchers (one EtcdStore each, as N members) on the
   group's revoked/ prefix; the delay from the start of a revocation's put
   until each watcher's callback has the event;
7. a member's watch of other members' grants: --writers threads (each an
   EtcdStore, as other members) grant --grants times, each grant a claim
   and a lease record as spa.group.claims writes them (each on an etcd
   lease of its own, 3 s: then the deletes of their expiry); two members
   watch meanwhile, one the whole group prefix (as before KV.watch_range),
   one as spa.group.member does now (every key but claims/): the events
   each is given per grant and its watch threads' CPU per 1,000 grants
   (/proc/self/task/<tid>/stat).  --watch-only runs this phase alone.

    .venv/bin/python benchmarks/group_scale.py [--clients 100000] [--threads 4]
    .venv/bin/python benchmarks/group_scale.py --watch-only [--grants 4000] [--writers 4]
    .venv/bin/python benchmarks/group_scale.py --clients 100000 --start-only [--claims 240000]

(root is not needed: etcd runs as the caller, on 127.0.0.1.)  Needs etcd, etcdctl and
openssl.  The machine is noisy (2 cores shared): the load average is printed
with each phase; run it twice.  Figures: docs/scale.md.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from ipaddress import ip_address
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from etcd_clients import etcd, make_certs, need_tools  # noqa: E402

import spa.group.clients as clients_mod  # noqa: E402
import spa.group.member as member_mod  # noqa: E402
from spa.core.keys import derive_keys  # noqa: E402
from spa.core.knock import SLICE  # noqa: E402
from spa.core.policy import Policy  # noqa: E402
from spa.core.sources import canonical_sources  # noqa: E402
from spa.core.verify import Accepted, Verifier  # noqa: E402
from spa.core.wire import Action, IPAddress, Request, build_packet  # noqa: E402
from spa.group import layout  # noqa: E402
from spa.group.clients import client_record, decode_client  # noqa: E402
from spa.group.delta import (  # noqa: E402
    ClientDelta,
    ClientView,
    group_delta,
    switch_verifier,
)
from spa.group.etcd import PAGE_KEYS, EtcdAccess, EtcdStore  # noqa: E402
from spa.group.kv import Event, Item, PageCallback  # noqa: E402
from spa.group.layout import GroupNameError, Kind  # noqa: E402
from spa.group.member import GroupMember  # noqa: E402
from spa.group.records import (  # noqa: E402
    Activation,
    Claim,
    GroupMeta,
    LeaseRecord,
    Revocation,
    claim_ttl,
    encode_activation,
    encode_claim,
    encode_lease,
    encode_meta,
    encode_revocation,
)
from spa.server.config import ClientEntry  # noqa: E402
from spa.server.daemon import WARM_LATER_KEYS, WARM_ROUNDS  # noqa: E402

GROUP = "office-eu"  # a realistic group name (9 characters)
MEMBER = "spa-fra-03.example.net"  # a realistic member name (a host name)
PASSWORD = "bench-password"  # the member user's, throwaway (this etcd lives minutes)
WATCH_TTL = 3  # seconds: the claims' and lease records' etcd leases in phase 7
TXN_OPS = 128  # etcd's default --max-txn-ops: puts per bulk transaction
WORDS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")
DEVICES = ("laptop", "phone", "desktop", "tablet")
SERVICES = ("ssh", "https", "rdp", "vpn", "git")
UTC = "%Y-%m-%dT%H:%M:%SZ"


# -- records -------------------------------------------------------------------

def client_name(i: int) -> str:
    """alice.m004217-laptop@example.org: 30 characters, unique per i."""
    return f"{WORDS[i % len(WORDS)]}.m{i:06d}-{DEVICES[i % len(DEVICES)]}@example.org"


def random_entry(i: int, rng: random.Random, now: float) -> ClientEntry:
    """A client as enrollment makes it: a secret, 1-3 services, half with an
    authenticator code, a fifth with source networks, 5% mid-rotation."""
    services = tuple(rng.sample(SERVICES, rng.randint(1, 3)))
    otp = "".join(rng.choice(string.ascii_uppercase + "234567") for _ in range(32)) \
        if rng.random() < 0.5 else ""
    sources: tuple[str, ...] = ()
    if rng.random() < 0.2:
        sources = canonical_sources([f"198.51.{rng.randint(0, 255)}.0/24",
                                     f"2001:db8:{rng.randint(0, 65535):x}::/48"])
    old, old_until = b"", ""
    if rng.random() < 0.05:
        old, old_until = rng.randbytes(32), time.strftime(UTC, time.gmtime(now + 86400))
    return ClientEntry(name=client_name(i), secret=rng.randbytes(32), services=services,
                       enrolled=time.strftime(UTC, time.gmtime(now - rng.randint(0, 10**7))),
                       otp_secret=otp, sources=sources, old_secret=old, old_until=old_until)


def lease_record(i: int, now: float) -> tuple[str, bytes]:
    address = ip_address(f"2001:db8:{i % 65536:x}:{i // 65536:x}::{i % 9973 + 1:x}")
    record = LeaseRecord(client_name(i), address, "https", "tcp", 443, now + 3600.25, MEMBER)
    return layout.lease_key(GROUP, client_name(i), address, "https"), encode_lease(record)


def claim(i: int, rng: random.Random, now: float) -> tuple[str, bytes]:
    key = layout.claim_key(GROUP, client_name(i), rng.randbytes(24))
    return key, encode_claim(Claim(MEMBER, now + rng.random()))


# -- etcd ------------------------------------------------------------------------

class Etcd:
    """etcdctl as root (CN=root) and stores as the group's member user."""

    def __init__(self, port: int, certs: Path) -> None:
        self.port, self.certs = port, certs
        self.url = f"https://127.0.0.1:{port}"
        self.compacted = 0

    def ctl(self, *args: str, stdin: str | None = None) -> str:
        c = self.certs
        done = subprocess.run(["etcdctl", f"--endpoints={self.url}", f"--cacert={c / 'ca.crt'}",
                               f"--cert={c / 'root.crt'}", f"--key={c / 'root.key'}",
                               "--command-timeout=120s", *args],
                              input=stdin, capture_output=True, text=True, check=False,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def rbac(self) -> None:
        """root by certificate; user member with a password, its role
        read-write on the group's prefix (docs/groups.md)."""
        self.ctl("user", "add", "root", "--no-password")
        self.ctl("user", "grant-role", "root", "root")
        self.ctl("role", "add", f"group-{GROUP}")
        self.ctl("role", "grant-permission", f"group-{GROUP}", "--prefix=true", "readwrite",
                 layout.group_prefix(GROUP))
        self.ctl("user", "add", "member", "--interactive=true", stdin=f"{PASSWORD}\n{PASSWORD}\n")
        self.ctl("user", "grant-role", "member", f"group-{GROUP}")
        self.ctl("auth", "enable")

    def store(self, page_keys: int = PAGE_KEYS) -> EtcdStore:
        c = self.certs
        return EtcdStore(EtcdAccess((self.url,), c / "ca.crt", c / "member-nocn.crt",
                                    c / "member-nocn.key", user="member", password=PASSWORD,
                                    timeout=120.0, watch_idle=60.0), page_keys=page_keys)

    def status(self) -> dict[str, int]:
        found = json.loads(self.ctl("endpoint", "status", "-w", "json"))[0]["Status"]
        return {"revision": int(found["header"]["revision"]), "db": int(found["dbSize"]),
                "in_use": int(found.get("dbSizeInUse", found["dbSize"]))}

    def settled(self) -> dict[str, int]:
        """Status after compacting every old revision away and a defrag."""
        revision = self.status()["revision"]
        if revision > self.compacted:  # etcd refuses the same revision twice
            self.ctl("compact", str(revision), "--physical")
            self.compacted = revision
        self.ctl("defrag")
        return self.status()


def etcd_rss(root: Path) -> int:
    """The resident memory (bytes) of the etcd whose data directory is under root."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"etcd") and any(str(root).encode() in a for a in argv):
                for line in (proc / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            continue
    return 0


def bulk_put(store: EtcdStore, items: list[tuple[str, bytes]], lease: int = 0) -> None:
    """Puts TXN_OPS at a time (etcd's default --max-txn-ops), as an import
    would load a group (`lease`: each key on it)."""
    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()
    on = {"lease": str(lease)} if lease else {}
    for start in range(0, len(items), TXN_OPS):
        txn = {"success": [{"request_put": {"key": b64(k.encode()), "value": b64(v), **on}}
                           for k, v in items[start:start + TXN_OPS]]}
        store._call("load", lambda c, t=txn: c.post(c.get_url("/kv/txn"), json=t))  # type: ignore[misc]


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"(load average {one:.1f} / {five:.1f}, {os.cpu_count()} cores)"


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# -- the phases ----------------------------------------------------------------

def sizes(rng: random.Random, now: float, server_id: bytes) -> None:
    records = [client_record(random_entry(i, rng, now), server_id) for i in range(2000)]
    lengths = [len(r) for r in records]
    keys = [len(layout.client_key(GROUP, client_name(i))) for i in range(2000)]
    print("record sizes (bytes), 2,000 random clients:")
    print(f"  client record   mean {statistics.mean(lengths):6.0f}  min {min(lengths)}  "
          f"max {max(lengths)}   key {statistics.mean(keys):.0f}")
    rotating = [len(r) for r in records if b'"old":{' in r]
    plain = [len(r) for r in records if b'"old":null' in r and b'"otp_secret":""' in r
             and b'"sources":[]' in r]
    print(f"    plain (no code, no sources, no rotation) mean {statistics.mean(plain):.0f}; "
          f"mid-rotation mean {statistics.mean(rotating):.0f}")
    lease_key, lease = lease_record(12345, now)
    claim_key, value = claim(12345, rng, now)
    name = client_name(12345)
    revocation = encode_revocation(Revocation(name, int(now), True))
    activation = encode_activation(Activation(name, int(now)))
    for what, key, data in (("lease", lease_key, lease), ("claim", claim_key, value),
                            ("revocation", layout.revoked_key(GROUP, name), revocation),
                            ("activation", layout.activated_key(GROUP, name), activation)):
        print(f"  {what:15} {len(data):6}   key {len(key)}")
    print(f"  e.g. {records[0][:160].decode()}...")
    with_sources = [r for r in records if b'"sources":[]' not in r]
    without = [r for r in records if b'"sources":[]' in r]
    for what, group in (("without sources", without), ("with sources", with_sources)):
        t0 = time.perf_counter()
        for r in group:
            decode_client(r, server_id)
        each = (time.perf_counter() - t0) / len(group)
        print(f"  decode_client {what}: {each * 1e6:.0f} us a record ({len(group)} records) "
              f"{load()}")


def timed_ops(stores: list[EtcdStore], per_thread: int,
              op: Callable[[EtcdStore, int, int], object]) -> float:
    """Operations per second, len(stores) threads, per_thread each."""
    barrier = threading.Barrier(len(stores) + 1)
    errors: list[BaseException] = []

    def run(t: int, store: EtcdStore) -> None:
        barrier.wait()
        try:
            for i in range(per_thread):
                op(store, t, i)
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=run, args=(t, s)) for t, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    barrier.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return len(stores) * per_thread / elapsed


def write_rates(e: Etcd, rng: random.Random, now: float, server_id: bytes, threads: int,
                ops: int, base: int) -> None:
    print(f"write rates (operations/s), {ops} per thread {load()}:")
    records = [client_record(random_entry(base + i, rng, now), server_id)
               for i in range(ops * threads)]
    ttl = claim_ttl(now, now, 30.0)
    for n in (1, threads):
        stores = [e.store() for _ in range(n)]
        for s in stores:
            s.get(b"/spa/groups/" + GROUP.encode() + b"/meta")  # authenticated, connected
        offset = base + (0 if n == 1 else ops)

        def put(s: EtcdStore, t: int, i: int, offset: int = offset) -> None:
            j = t * ops + i
            s.put(layout.client_key(GROUP, client_name(offset + j)).encode(),
                  records[j % len(records)])

        def make_claim(s: EtcdStore, t: int, i: int) -> None:
            key, value = claim(t * ops + i, rng, now)
            lease = s.grant(ttl)
            assert s.create(key.encode(), value, lease)

        shared = stores[0].grant(ttl)

        def shared_claim(s: EtcdStore, t: int, i: int, shared: int = shared) -> None:
            key, value = claim(t * ops + i, rng, now)
            assert s.create(key.encode(), value, shared)

        def taken(s: EtcdStore, t: int, i: int, shared: int = shared) -> None:
            key = layout.claim_key(GROUP, client_name(0), bytes(24))
            s.create(key.encode(), b"x", shared)

        print(f"  {n} thread(s): client put {timed_ops(stores, ops, put):7.0f}   "
              f"claim (grant + create) {timed_ops(stores, ops, make_claim):7.0f}   "
              f"claim on a shared lease {timed_ops(stores, ops, shared_claim):7.0f}   "
              f"claim already taken {timed_ops(stores, ops, taken):7.0f}")


class _Hooks:
    """The daemon's side of a member's start as far as Python goes: the
    receive thread's switch (spa.group.delta.switch_verifier, which the
    daemon's apply_client_delta calls) into a real Verifier (each key's live
    knock tags into its tag table, the rules, the codes), timed; leases and
    claims are not in this group."""

    def __init__(self, server_id: bytes, now: float, later: bool) -> None:
        self.verifier = Verifier(server_id, {}, Policy(clients={}), now=now)
        self.later = later  # as the daemon: a big delta's current step first
        self.seconds = self.cpu = 0.0
        self.deltas = 0

    def apply_client_delta(self, delta: ClientDelta, origin: str) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        self.verifier.refresh(time.time())  # the daemon's housekeeping moves it at each boundary
        switch_verifier(self.verifier, delta,
                        later=self.later and len(delta.keys) > WARM_LATER_KEYS)
        self.seconds += time.perf_counter() - t0
        self.cpu += time.thread_time() - c0
        self.deltas += 1

    def install_lease(self, lease: LeaseRecord) -> None:
        pass

    def remove_lease(self, client: str, address: object, service: str) -> None:
        pass

    def confirm_restored(self, live: object) -> None:
        pass

    def grant_claimed(self, result: object, now: float) -> None:
        pass

    def refuse_claimed(self, result: object, reason: object, now: float) -> None:
        pass


class _TimedRead:
    """The member's store with its reads timed (the watch's set-up is the
    rest of load's I/O: a thread); `whole`: the group's whole prefix read
    (claims/ and members/ too), as a member did before it read by kind."""

    def __init__(self, store: EtcdStore, whole: bool) -> None:
        self.store, self.whole = store, whole
        self.seconds = self.cpu = 0.0
        self.keys = 0

    def get_prefixes(self, prefixes: list[bytes], on_page: PageCallback | None = None
                     ) -> tuple[list[Item], int]:
        t0, c0 = time.perf_counter(), time.thread_time()
        found = self.store.get_prefix(layout.group_prefix(GROUP).encode(), on_page) \
            if self.whole else self.store.get_prefixes(prefixes, on_page)
        self.seconds += time.perf_counter() - t0
        self.cpu += time.thread_time() - c0
        self.keys += len(found[0])
        return found

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


def _old_apply(self: GroupMember, names: set[str]) -> None:
    """GroupMember._apply before: each client's live keys made three times
    (the check, group_delta, the held copy)."""
    now = self.clock()
    after: dict[str, ClientView | None] = {}
    for name in sorted(names):
        view = self._view(name)
        held = self._held.get(name, {})
        live = view.keys(now) if view is not None else {}
        if view == self._views.get(name) and held == live:
            continue
        after[name] = view
    if not after:
        return
    before = {n: self._views.get(n) for n in after}
    delta = group_delta(before, after, self._held, now)
    for name, view in after.items():
        if view is None:
            self._views.pop(name, None)
            self._held.pop(name, None)
        else:
            self._views[name] = view
            self._held[name] = view.keys(now)
    self.hooks.apply_client_delta(delta, f"group {self.group}")


def _old_live_leases(group: str, keys: set[str]) -> set[tuple[str, IPAddress, str]]:
    """member._live_leases before: every key read parsed, clients' too."""
    live = set()
    for key in keys:
        try:
            ref = layout.parse_key(group, key)
        except GroupNameError:
            continue
        if ref.kind is Kind.LEASE:
            live.add((ref.parts[0], layout.check_address(ref.parts[1]), ref.parts[2]))
    return live


# a client of the group that knocks once its member has loaded: (name, secret,
# service), one without an authenticator code or source networks
PROBE: list[tuple[str, bytes, str]] = []


def first_knock(verifier: Verifier, server_id: bytes) -> None:
    """The probe client's knock of this moment, judged by the member's
    verifier; raises unless it is accepted."""
    name, secret, service = PROBE[0]
    request = Request(int(time.time() * 1000), Action.OPEN, service, 0, None, "")
    packet = build_packet(request, derive_keys(secret, server_id), server_id,
                          nonce=os.urandom(24))
    result = verifier.verify(packet, "192.0.2.10", time.time())
    if not isinstance(result, Accepted) or result.client != name:
        raise RuntimeError(f"the first knock of {name} was not accepted: {result}")


def one_start(e: Etcd, server_id: bytes, count: int, old: bool, page: int
              ) -> dict[str, float]:
    """GroupMember.load of the group, timed in parts, then the first knock
    of a group client accepted, then the warm-up the daemon slices in;
    `old`: as before this version (the whole prefix read, each client's keys
    made three times, every read key parsed for the leases, every live
    step's tags at once)."""
    store = _TimedRead(e.store(page), whole=old)
    hooks = _Hooks(server_id, time.time(), later=not old)
    names: tuple[tuple[object, str, object], ...] = (
        (GroupMember, "_apply", _old_apply), (member_mod, "_live_leases", _old_live_leases))
    saved = [vars(owner)[name] for owner, name, _ in names]
    if old:
        for owner, name, value in names:
            setattr(owner, name, value)
    clients_mod._canonical_network.cache_clear()
    gc.collect()
    member = GroupMember(store, group=GROUP, member=MEMBER, server_id=server_id,  # type: ignore[arg-type]
                         hooks=hooks, clock=time.time, log=lambda line: None)
    try:
        t0, c0 = time.perf_counter(), time.thread_time()
        member.load()
        t1, c1 = time.perf_counter(), time.thread_time()
        first_knock(hooks.verifier, server_id)
        t2 = time.perf_counter()
        table = hooks.verifier.tags
        while table.warming():  # the daemon: within WARM_ROUNDS rounds, in slices
            table.slice(min(SLICE, table.warming()))
        t3 = time.perf_counter()
        tags = table.start_journal()  # the set a kernel filter is given
        t4 = time.perf_counter()
    finally:
        member.close()
        for (owner, name, _), value in zip(names, saved, strict=True):
            setattr(owner, name, value)
    assert len(member.clients) == count, (len(member.clients), count)
    assert hooks.deltas == 1
    return {"read": store.seconds, "decode": t1 - t0 - store.seconds - hooks.seconds,
            "verifier": hooks.seconds, "load": t1 - t0, "knock": t2 - t0, "warm": t3 - t2,
            "tags": t4 - t3, "count": len(tags), "keys": store.keys,
            "read_cpu": store.cpu, "decode_cpu": c1 - c0 - store.cpu - hooks.cpu,
            "verifier_cpu": hooks.cpu, "load_cpu": c1 - c0}


def member_start(e: Etcd, server_id: bytes, count: int, page: int) -> None:
    """Before (the whole prefix, keys made thrice, every step's tags at
    once) and after (the kinds a member applies at one revision, keys made
    once, the current step's tags first) in turn, twice each, in one run.
    *: the read includes the decoding of the records (on_page)."""
    print(f"  {count:>7} clients, GroupMember.load, wall seconds (this thread's CPU seconds): "
          f"read* / deltas / the verifier's tag table and rules = load; the first knock of "
          f"a group client accepted (from load's start); the tags left to slice in (the "
          f"daemon: in {WARM_ROUNDS} housekeeping rounds); the tag list a kernel filter gets "
          f"{load()}:")
    for _ in range(2):
        for old in (True, False):
            r = one_start(e, server_id, count, old, page)
            what = "before: whole prefix" if old else "after: kinds, once"
            parts = "  ".join(f"{k} {r[k]:5.2f} ({r[k + '_cpu']:5.2f})"
                              for k in ("read", "decode", "verifier"))
            print(f"    {what:20} {r['keys']:>7,.0f} keys  {parts}  = load {r['load']:5.2f} "
                  f"({r['load_cpu']:5.2f}) s;  knock accepted {r['knock']:5.2f} s;  warm-up "
                  f"{r['warm']:4.2f} s;  {r['count']:,.0f} tags listed {r['tags']:4.2f} s "
                  f"{load()}")


def claims_in(e: Etcd, store: EtcdStore, rng: random.Random, now: float, clients: int,
              count: int) -> None:
    """`count` nonce claims of the group's clients, on one etcd lease that
    outlives the run, as a busy group's claims/ holds them (a member's read
    before this version took them all)."""
    lease = store.grant(3600)
    batch = [claim(i % clients, rng, now) for i in range(count)]
    t0 = time.perf_counter()
    bulk_put(store, batch, lease)
    rate = count / (time.perf_counter() - t0)
    after = e.settled()
    print(f"  + {count:,} claims in claims/ (loaded at {rate:,.0f}/s): dbSize {after['db']:,}"
          f"  in use {after['in_use']:,} {load()}")


def fan_out(e: Etcd, watchers: int, puts: int) -> list[float]:
    """Delays (s) from the start of each put to each watcher having it."""
    prefix = layout.kind_prefix(GROUP, layout.Kind.REVOKED).encode()
    writer = e.store()
    revision = writer.get_prefix(prefix)[1]
    seen: list[dict[bytes, float]] = [{} for _ in range(watchers)]
    done = threading.Event()
    lock = threading.Lock()
    remaining = [watchers * puts]

    def callback_for(w: int) -> Callable[[Event], None]:
        def callback(event: Event) -> None:
            seen[w][event.key] = time.perf_counter()
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()
        return callback
    stores = [e.store() for _ in range(watchers)]
    watches = [s.watch_prefix(prefix, revision + 1, callback_for(w))
               for w, s in enumerate(stores)]
    time.sleep(1.0 + watchers * 0.05)  # every stream open
    started: dict[bytes, float] = {}
    name = client_name(7)
    try:
        for i in range(puts):
            key = layout.revoked_key(GROUP, f"{name}.{watchers}.{i}").encode()
            value = encode_revocation(Revocation(name, int(time.time()), False))
            started[key] = time.perf_counter()
            writer.put(key, value)
            time.sleep(0.05)
        if not done.wait(60):
            raise RuntimeError(f"watchers missed {remaining[0]} events in 60 s")
    finally:
        for w in watches:
            w.cancel()
    return [seen[w][k] - t for w in range(watchers) for k, t in started.items()]


class _Counted(GroupMember):
    """A member that counts the watch events it is given."""

    events = 0

    def _on_event(self, event: Event) -> None:
        self.events += 1
        super()._on_event(event)


class _WholePrefix(_Counted):
    """The member as it was before KV.watch_range: one watch of the whole
    group prefix, claims included."""

    def _watch_from(self, revision: int) -> None:
        self._watches.append(self.kv.watch_prefix(self._prefix.encode(), revision,
                                                  self._on_event))


def _thread_cpu(tids: list[int]) -> float:
    """CPU seconds (user + system) the threads have used (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for tid in tids:
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / tick


def _watch_threads(member: GroupMember) -> list[int]:
    tids = [w._thread.native_id for w in member._watches]  # type: ignore[attr-defined]
    assert all(t is not None for t in tids)
    return [t for t in tids if t is not None]


def member_watch(e: Etcd, server_id: bytes, grants: int, writers: int) -> dict[str, float]:
    """Two members watch the group while `writers` other members grant:
    each grant a claim (create-if-absent) and a lease record, each on an
    etcd lease of its own (WATCH_TTL s) as spa.group.claims writes them, and
    their deletes when etcd's lessor expires them.  One member watches the
    whole prefix (before), the other as spa.group.member does now (after),
    side by side on the same writes; the events each is given per grant and
    its watch threads' CPU."""
    members = {}
    for name, kind in (("before", _WholePrefix), ("after", _Counted)):
        member = kind(e.store(), group=GROUP, member=f"watcher-{name}", server_id=server_id,
                      hooks=_Hooks(server_id, time.time(), later=True), clock=time.time,
                      log=lambda line: None)
        member.load()
        members[name] = member
    time.sleep(1.0)  # every stream open
    tids = {name: _watch_threads(m) for name, m in members.items()}
    cpu0 = {name: _thread_cpu(t) for name, t in tids.items()}
    counts0 = {name: m.events for name, m in members.items()}
    per_writer = grants // writers

    def write(w: int) -> None:
        store, rng, now = e.store(), random.Random(w), time.time()
        for j in range(per_writer):
            i = 500_000 + w * per_writer + j
            key = layout.claim_key(GROUP, client_name(i), rng.randbytes(24))
            store.create(key.encode(), encode_claim(Claim(f"writer-{w}", now)),
                         store.grant(WATCH_TTL))
            address = ip_address(f"2001:db8:{i % 65536:x}:{i // 65536:x}::1")
            record = LeaseRecord(client_name(i), address, "https", "tcp", 443,
                                 now + WATCH_TTL, f"writer-{w}")
            store.put(layout.lease_key(GROUP, client_name(i), address, "https").encode(),
                      encode_lease(record), store.grant(WATCH_TTL))
    t0 = time.perf_counter()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wrote = time.perf_counter() - t0
    done = per_writer * writers
    deadline = time.monotonic() + 180
    while (members["before"].events - counts0["before"] < 4 * done
           or members["after"].events - counts0["after"] < 2 * done):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # anything more would have come by now
    result = {"grants": float(done), "rate": done / wrote}
    for name, member in members.items():
        result[f"{name}_events"] = (member.events - counts0[name]) / done
        result[f"{name}_cpu"] = (_thread_cpu(tids[name]) - cpu0[name]) * 1000 / done
        result[f"{name}_leases"] = float(len(member.remote_leases))
        member.close()
    return result


def history(e: Etcd, store: EtcdStore, rng: random.Random, now: float) -> None:
    """What claims that came and went leave in the database until a
    compaction: each one's put, and the delete its lease's expiry makes."""
    count = 5000
    before = e.settled()
    prefix = layout.client_claims_prefix(GROUP, client_name(999_999)).encode()
    for _ in range(count):
        key, value = claim(999_999, rng, now)
        store.put(key.encode(), value, store.grant(2))
    deadline = time.monotonic() + 180
    while store.get_prefix(prefix)[0]:
        if time.monotonic() > deadline:
            raise RuntimeError("claims still there 120 s after their 2 s leases")
        time.sleep(1)
    after = e.status()
    print(f"  {count:,} claims come and gone (2 s leases), before any compaction: in use "
          f"{after['in_use']:,}  -> {(after['in_use'] - before['in_use']) / count:.0f} bytes "
          f"per claim of history; revisions +{after['revision'] - before['revision']:,} "
          f"{load()}")
    compacted = e.settled()
    print(f"    after compaction and defrag: in use {compacted['in_use']:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--ops", type=int, default=500, help="operations per thread and rate")
    parser.add_argument("--page", type=int, default=PAGE_KEYS, help="keys per paged range")
    parser.add_argument("--fan-out", default="1,10,50", help="watcher counts")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--claims", type=int, default=0,
                        help="nonce claims in the group before the start at --clients (a busy "
                             "group: 2,000 grants/s x a 2-minute window = 240,000)")
    parser.add_argument("--start-only", action="store_true",
                        help="phase 4 alone (with the loads it needs)")
    parser.add_argument("--watch-only", action="store_true",
                        help="phase 7 alone (an empty group)")
    parser.add_argument("--grants", type=int, default=4000, help="grants in phase 7")
    parser.add_argument("--writers", type=int, default=4, help="granting members in phase 7")
    args = parser.parse_args()
    need_tools("group_scale")
    rng = random.Random(args.seed)
    now = time.time()
    server_id = rng.randbytes(16)
    version = subprocess.run(["etcd", "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[0]
    print(f"{version}; one member on loopback, TLS, RBAC on {load()}")
    if not args.start_only and not args.watch_only:
        sizes(rng, now, server_id)
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="group-scale-")))
        make_certs(root / "certs")
        port = stack.enter_context(etcd(root / "etcd", tls=root / "certs"))
        e = Etcd(port, root / "certs")
        e.rbac()
        store = e.store()
        store.put(layout.meta_key(GROUP).encode(),
                  encode_meta(GroupMeta(GROUP, server_id, int(now))))
        if args.watch_only:
            watch_cost(e, server_id, args.grants, args.writers)
            return
        empty = e.settled()
        print(f"database (bytes; after compaction and defrag) {load()}:")
        print(f"  empty: dbSize {empty['db']:,}  in use {empty['in_use']:,}; etcd RSS "
              f"{etcd_rss(root) / 2**20:.0f} MiB")
        steps = [c for c in (10_000, args.clients) if c <= args.clients]
        loaded, before = 0, empty
        print("member start (read the group's prefix, decode every client record):")
        for count in dict.fromkeys(steps):
            entries = [random_entry(i, rng, now) for i in range(loaded, count)]
            batch = [(layout.client_key(GROUP, entry.name), client_record(entry, server_id))
                     for entry in entries]
            if not PROBE:
                probe = next(entry for entry in entries
                             if not (entry.otp_secret or entry.sources or entry.old_secret))
                PROBE.append((probe.name, probe.secret, probe.services[0]))
            t0 = time.perf_counter()
            bulk_put(store, batch)
            rate = len(batch) / (time.perf_counter() - t0)
            loaded = count
            after = e.settled()
            per = (after["in_use"] - empty["in_use"]) / count
            print(f"  {count:>7} clients: dbSize {after['db']:,}  in use {after['in_use']:,}"
                  f"  -> {per:.0f} bytes per client  (loaded at {rate:,.0f} records/s in "
                  f"transactions of {TXN_OPS}); etcd RSS {etcd_rss(root) / 2**20:.0f} MiB")
            before = after
            if count == args.clients and args.claims:
                claims_in(e, store, rng, now, count, args.claims)
            member_start(e, server_id, count, args.page)
        if args.start_only:
            return
        per_kind = 10_000
        for what in ("lease", "claim"):
            t0 = time.perf_counter()
            for i in range(per_kind):
                lease = store.grant(600)
                if what == "lease":
                    key, value = lease_record(i, now)
                else:
                    key, value = claim(i, rng, now)
                store.put(key.encode(), value, lease)
            rate = per_kind / (time.perf_counter() - t0)
            after = e.settled()
            print(f"  + {per_kind:,} {what}s (each its own etcd lease): in use "
                  f"{after['in_use']:,}  -> {(after['in_use'] - before['in_use']) / per_kind:.0f}"
                  f" bytes per {what}  (grant + put, one thread: {rate:.0f}/s) {load()}")
            before = after
        history(e, store, rng, now)
        write_rates(e, rng, now, server_id, args.threads, args.ops, args.clients)
        print(f"watch fan-out: delay from put to each watcher's callback, ms {load()}")
        for n in (int(x) for x in args.fan_out.split(",")):
            delays = fan_out(e, n, 40)
            print(f"  {n:3} watchers x 40 puts: p50 {statistics.median(delays) * 1e3:7.1f}  "
                  f"p99 {pct(delays, 0.99) * 1e3:7.1f}  max {max(delays) * 1e3:7.1f} {load()}")
        watch_cost(e, server_id, args.grants, args.writers)


def watch_cost(e: Etcd, server_id: bytes, grants: int, writers: int) -> None:
    print(f"a member's watch of other members' grants ({writers} members granting, each "
          f"grant a claim and a lease, then their deletes), twice {load()}:")
    for _ in range(2):
        r = member_watch(e, server_id, grants, writers)
        print(f"  {r['grants']:,.0f} grants at {r['rate']:,.0f}/s:  events per grant "
              f"before (the whole prefix) {r['before_events']:.2f}, after (but claims/) "
              f"{r['after_events']:.2f};  watch threads' CPU per 1,000 grants before "
              f"{r['before_cpu']:.2f} s, after {r['after_cpu']:.2f} s "
              f"(x{r['after_cpu'] / max(r['before_cpu'], 1e-9):.2f}) {load()}")


if __name__ == "__main__":
    main()
