"""A group on etcd against the real server (issue 18's benchmarks): knock to
open in group mode beside standalone, revocation to every member's firewall,
and grants/s at one member.  Needs root, etcd, etcdctl, nft and gcc.

    .venv/bin/python benchmarks/group_knock.py [--knocks 200] [--revocations 50]
        [--grant-knocks 6000] [--rate 3000] [--window 10] [--mode capture|udp]
        [--etcd-data disk|tmpfs] [--leader any|e1|e2|e3]

--etcd-data: where the etcd members keep their data directories: under the
run's directory in /tmp (the disk here; the default: what a user of this
machine gets) or in /dev/shm (a tmpfs: etcd's fsyncs cost nothing).
--revocations 0 and --grant-knocks 0 leave (b) and (c) out.
--leader: etcd's leadership moved to that member before the daemons start
(the members list e1, e2, e3 in that order: with e3 leading, a member that
sends its claims to the leader first and one that sends them in the
configured order differ).

About 100 s with the defaults on a 2-core machine.

Everything runs in network namespaces the script makes and removes:

    etcd e1, e2, e3 --veth--+
    member m1 -------veth---+-- bridge in the client namespace (10.218.0.0/24)
    member m2 -------veth---+
    client --veth-- standalone s0 (10.201.0.1), --veth-- m1 (10.202.0.1),
           --veth-- m2 (10.203.0.1): knocks on these links, etcd on the bridge

The site (benchmarks/group_site.py): tests/etcd_world.py's cluster (3 members,
TLS with client certificates, RBAC on); the group `bench` made as an admin
makes one (roles, `group init`, `group join` per member); three `spa-server
run` daemons as installed (privilege split, nftables, capture mode unless
--mode udp): s0 standalone, m1 and m2 members, each with a TCP service on
port 22 behind its firewall.  Clients are enrolled before the daemons start
(the group's by spa.server.admin_group.enroll, as `spa-server enroll` on a
member).

The members run with SPA_LOG_CLAIM_TIMES set: each claim batch logs where
its time went (spa.group.claims), and after (a) the benchmark prints those
figures' p50/p90 at the members (queued until a claim thread takes it, etcd
lease grants, the transaction, the grant's firewall commit).

(a) Knock to open: from the knock leaving the client until a TCP connect from
    the knock's source address to port 22 completes (bench_latency.py's
    method: non-blocking connects polled every 0.2 ms), one source address per
    knock, each knock made just before it is sent by spa_client.knock (the
    library, not the CLI: no process start is timed).  Knocks alternate
    standalone, group, standalone, group...; group knocks alternate m1 and m2.
    A group knock is claimed in etcd (a lease grant and a create-if-absent)
    before the member grants; its lease is then shared with the other member.
    Then --set-knocks knocks a mode timed to the element in the server's set
    (`nft monitor` in its namespace) with no connect polled meanwhile (the
    server's part, without the connect attempts the gate drops and the daemon
    counts), and --claims claims timed alone (the same two calls through
    EtcdStore from the client namespace): the floor etcd puts under a group
    knock.
(b) Revocation: each of --revocations clients of the group knocks m1 (its
    grant at m1; the shared lease installed at m2 through etcd's watch, seen
    in m2's `nft monitor`), then spa.server.admin.revoke(close=True, login=the
    group admin's), the function `spa-server revoke --close` calls (it logs in
    to etcd, as the command does); timed from that call until `nft monitor`
    in each member's namespace prints the lease's element deleted.  Also
    printed: the call's own time, and the members' part alone, from the
    moment a watcher of revoked/ (the admin's login, in the client namespace)
    saw the write until the element left each member's set.
(c) Grants/s: --grant-knocks valid knocks from --grant-clients distinct
    clients, each from its own source address (benchmarks/flood.c, raw socket,
    sources in 10.208.0.0/12), offered at --rate to s0, then the same to m1
    (last: a member's backlog of claims slows nothing after it); grants
    counted in each server's event store (its lease_start events, time
    stamped by the server) for --window seconds from the first knock sent:
    how many, and their rate from the first to the last of them.  Before
    them, the floor etcd puts under a member's rate: as many threads as a
    member's claim pool, on one EtcdStore, making the four calls of a grant
    (claim: lease grant + create; shared lease: lease grant + put) for 5 s.

Figures are printed with the machine's load average; nothing is asserted
(the goals, p50 <= 3 ms and p99 <= 1 s, are printed beside the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests.etcd_world: the cluster the group tests use

from bench_flood import compile_flood  # noqa: E402
from bench_latency import KNOCK_PORT, percentile  # noqa: E402
from bench_throughput import SPOOFED, per_second, write_records  # noqa: E402
from group_site import (  # noqa: E402
    GROUP,
    Group,
    Host,
    NftMonitor,
    element,
    enroll_group,
    join,
    launch,
    make_group,
    running,
    standalone_config,
    wait_started,
    wire,
)
from latency_probe import opened  # noqa: E402

from spa.core.uri import Enrollment, parse  # noqa: E402
from spa.core.wire import NONCE_SIZE, Action  # noqa: E402
from spa.group import layout  # noqa: E402
from spa.group.claims import TIMES_VARIABLE  # noqa: E402
from spa.group.kv import Event  # noqa: E402
from spa.group.records import Claim, encode_claim  # noqa: E402
from spa.netns import Namespace, sh  # noqa: E402
from spa.server import admin, groupstore  # noqa: E402
from spa.server.events import EVENTS_DB, read_events  # noqa: E402
from spa_client import knock  # noqa: E402
from tests.etcd_world import EtcdCluster, open_cluster, why_not  # noqa: E402

SERVICE_PORT = 22


def lead(cluster: EtcdCluster, wanted: str) -> str:
    """Move etcd's leadership to member `wanted` (unless "any"); which one leads."""
    members = json.loads(cluster.ctl("member", "list", "-w", "json"))["members"]
    if wanted != "any":
        cluster.ctl("move-leader", f"{next(m['ID'] for m in members if m['name'] == wanted):x}")
    for status in json.loads(cluster.ctl("endpoint", "status", "-w", "json")):
        if status["Status"]["leader"] == status["Status"]["header"]["member_id"]:
            return (f"etcd's leader: {status['Endpoint']} (the members' endpoints: "
                    f"{', '.join(cluster.endpoints)}, in this order)")
    return "etcd has no leader"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f}, {os.cpu_count()} cores"


# -- measuring ----------------------------------------------------------------------


def knock_to_open(enrollment: Enrollment, source: str, server: str,
                  timeout: float = 3.0) -> float | None:
    """Milliseconds from the knock leaving `source` until a TCP connect from
    it to the service completes (None: not within `timeout`)."""
    started = send_knock(enrollment, source, server)
    deadline = started + timeout
    while time.perf_counter() < deadline:
        if opened(source, server, SERVICE_PORT):
            return (time.perf_counter() - started) * 1000
    return None


def summary(values: list[float | None]) -> str:
    ok = [v for v in values if v is not None]
    if not ok:
        return f"{0:>4}/{len(values):<4}"
    return (f"{len(ok):>4}/{len(values):<4} {percentile(ok, .5):>8.2f} {percentile(ok, .9):>8.2f}"
            f" {percentile(ok, .99):>8.2f} {max(ok):>8.2f}")


def p50(values: list[float | None]) -> float | None:
    ok = [v for v in values if v is not None]
    return percentile(ok, .5) if ok else None


def bench_knocks(standalone: Host, members: list[Host], alone: Enrollment,
                 grouped: Enrollment, count: int, pause: float) -> None:
    rows: dict[str, list[float | None]] = {"standalone": [], "m1": [], "m2": []}
    for i in range(count):
        rows["standalone"].append(knock_to_open(alone, standalone.source(i),
                                                standalone.address))
        time.sleep(pause)
        member = members[i % 2]
        rows[member.name].append(knock_to_open(grouped, member.source(i // 2), member.address))
        time.sleep(pause)
    group = [v for pair in zip(rows["m1"], rows["m2"], strict=False) for v in pair]
    print(f"\n(a) knock to open, {count} knocks each, alternating; one source address a "
          f"knock ({load()})")
    print(f"{'':<20} {'opened':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    print(f"{'standalone':<20} {summary(rows['standalone'])}")
    print(f"{'group (m1 and m2)':<20} {summary(group)}")
    for name in ("m1", "m2"):
        print(f"{'  member ' + name:<20} {summary(rows[name])}")
    alone_p50, group_p50 = p50(rows["standalone"]), p50(group)
    if alone_p50 and group_p50:
        met = "met" if group_p50 <= 3.0 else "NOT met"
        print(f"p50 group / standalone: {group_p50 / alone_p50:.1f}x; goal p50 <= 3 ms in "
              f"group mode: {met}")


TIMES = ("queued_ms", "leases_ms", "txn_ms", "other_ms", "grant_ms", "total_ms")


def claim_times(members: list[Host], marks: dict[str, int]) -> None:
    """The members' claim times lines (SPA_LOG_CLAIM_TIMES) since `marks`
    (each log's size then): p50 / p90 of each part, over the batches."""
    rows: dict[str, list[float]] = {name: [] for name in TIMES}
    batches = grants = 0
    for member in members:
        text = member.log.read_bytes()[marks[member.name]:].decode(errors="replace")
        for line in text.splitlines():
            if "claim times " not in line:
                continue
            fields = dict(f.split("=", 1) for f in line.split("claim times ", 1)[1].split()
                          if "=" in f)
            batches += 1
            grants += int(fields.get("lease_grants", 0))
            for name in TIMES:
                rows[name].append(float(fields[name]))
    if not batches:
        print("at the members: no claim times lines (SPA_LOG_CLAIM_TIMES not passed on?)")
        return
    print(f"at the members, {batches} claim batches ({grants} etcd lease grants among them), "
          "ms:")
    print("  " + " ".join(f"{n[:-3]:>9}" for n in TIMES) + "   (p50, then p90)")
    print("  " + " ".join(f"{percentile(rows[n], .5):>9.2f}" for n in TIMES))
    print("  " + " ".join(f"{percentile(rows[n], .9):>9.2f}" for n in TIMES))


def send_knock(enrollment: Enrollment, source: str, server: str) -> float:
    """Send one fresh knock from `source`; the perf_counter time it left."""
    data = knock.make_packet(enrollment, Action.OPEN, "ssh", duration=60, address=None,
                             now=time.time(), nonce=os.urandom(NONCE_SIZE))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((source, 0))
        started = time.perf_counter()
        udp.sendto(data, (server, KNOCK_PORT))
    return started


def bench_set_times(standalone: Host, members: list[Host], alone: Enrollment,
                    grouped: Enrollment, count: int, offset: int, pause: float) -> None:
    """Knock to the element in the server's nft set (its `nft monitor`), with
    no connect polled meanwhile: the server's part alone, without the
    client's connect attempts that the gate drops (and the daemon counts)."""
    hosts = [standalone, *members]
    monitors = {h.name: NftMonitor(h.ns) for h in hosts}
    rows: dict[str, list[float | None]] = {"standalone": [], "group": []}
    try:
        time.sleep(0.5)  # the monitors listening
        for i in range(count):
            member = members[i % 2]
            for row, host, enrollment in (("standalone", standalone, alone),
                                          ("group", member, grouped)):
                source = host.source(offset + i)
                mark = monitors[host.name].mark()
                sent = send_knock(enrollment, source, host.address)
                at = monitors[host.name].first(element("add", source), mark, 3.0)
                rows[row].append(None if at is None else (at - sent) * 1000)
                time.sleep(pause)
    finally:
        for monitor in monitors.values():
            monitor.close()
    print(f"knock to the element in the set (nft monitor at the server), no connect "
          f"polled, {count} knocks each ({load()}):")
    print(f"{'  standalone':<20} {summary(rows['standalone'])}")
    print(f"{'  group':<20} {summary(rows['group'])}")


def claim_floor(group: Group, count: int) -> None:
    """What the claim on a group knock's path costs alone: a lease grant and a
    create-if-absent on it, as spa.group.claims makes them, through one
    EtcdStore from the client namespace (the admin's login; same cluster,
    same TLS, same gateway as a member's)."""
    kv = groupstore.connect(group.settings, group.login)
    kv.get(layout.meta_key(GROUP).encode())  # logged in and connected first
    pairs: list[float | None] = []
    creates: list[float | None] = []
    for _ in range(count):
        started = time.perf_counter()
        lease = kv.grant(60)
        between = time.perf_counter()
        key = layout.claim_key(GROUP, "lat", os.urandom(NONCE_SIZE)).encode()
        kv.create(key, encode_claim(Claim("floor", time.time())), lease)
        done = time.perf_counter()
        pairs.append((done - started) * 1000)
        creates.append((done - between) * 1000)
    print(f"the claim alone, {count} made one after another ({load()}):")
    print(f"{'  grant + create':<20} {summary(pairs)}")
    print(f"{'  create alone':<20} {summary(creates)}")


def etcd_floor(group: Group, threads: int, seconds: float) -> str:
    """What etcd alone gives a member's claim pool: `threads` threads on one
    EtcdStore (as the claimer's pool shares its member's), each making a
    grant's four calls in a loop (the claim: lease grant + create; the shared
    lease: lease grant + put; both under claims/, which no member installs)."""
    kv = groupstore.connect(group.settings, group.login)
    kv.get(layout.meta_key(GROUP).encode())  # logged in and connected first
    value = encode_claim(Claim("floor", time.time()))
    done = [0] * threads
    failed: list[BaseException] = []
    end = time.monotonic() + seconds

    def run(index: int) -> None:
        try:
            while time.monotonic() < end:
                key = layout.claim_key(GROUP, "lat", os.urandom(NONCE_SIZE)).encode()
                kv.create(key, value, kv.grant(60))
                key = layout.claim_key(GROUP, "lat", os.urandom(NONCE_SIZE)).encode()
                kv.put(key, value, kv.grant(60))
                done[index] += 1
        except BaseException as exc:  # said below, never lost in a thread
            failed.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if failed:
        return f"etcd alone: failed: {type(failed[0]).__name__}: {failed[0]}"
    return (f"etcd alone, {threads} threads on one store making a grant's 4 calls (lease "
            f"grant + create, lease grant + put) for {seconds:g} s: "
            f"{sum(done) / seconds:,.0f}/s")


class Written:
    """When each revocation's put reached a watcher of revoked/ (the admin's
    own login, from the client namespace): the write seen in etcd."""

    def __init__(self, group: Group) -> None:
        self.at: dict[str, float] = {}
        self.seen = threading.Condition()
        kv = groupstore.connect(group.settings, group.login)
        prefix = layout.kind_prefix(GROUP, layout.Kind.REVOKED).encode()
        revision = kv.get_prefix(prefix)[1]
        self.watch = kv.watch_prefix(prefix, revision + 1, self._event)

    def _event(self, event: Event) -> None:
        now = time.perf_counter()
        name = event.key.decode().rsplit("/", 1)[-1]
        with self.seen:
            self.at.setdefault(name, now)
            self.seen.notify_all()

    def when(self, name: str, timeout: float) -> float | None:
        with self.seen:
            self.seen.wait_for(lambda: name in self.at, timeout)
            return self.at.get(name)


def bench_revocations(group: Group, members: list[Host], count: int, offset: int) -> None:
    m1 = members[0]  # every client knocks m1; m2 has its leases through etcd
    monitors = {m.name: NftMonitor(m.ns) for m in members}
    written = Written(group)
    delays: dict[str, list[float | None]] = {"m1": [], "m2": []}
    after_write: dict[str, list[float | None]] = {"m1": [], "m2": []}
    calls: list[float | None] = []
    lost: Counter[str] = Counter()
    try:
        time.sleep(1.0)  # the monitors and the watch listening
        for k in range(count):
            name, source = f"rev{k}", m1.source(offset + k)
            shared_from = monitors["m2"].mark()
            if knock_to_open(group.uris[name], source, m1.address) is None:
                lost["not granted at m1 within 3 s"] += 1
                continue
            if monitors["m2"].first(element("add", source), shared_from, 10.0) is None:
                lost["shared lease not installed at m2 within 10 s"] += 1
                continue
            marks = {m: monitor.mark() for m, monitor in monitors.items()}
            started = time.perf_counter()
            admin.revoke(m1.config, name, now=time.time(), close=True, login=group.login)
            calls.append((time.perf_counter() - started) * 1000)
            put = written.when(name, 10.0)
            for member, monitor in monitors.items():
                at = monitor.first(element("delete", source), marks[member], 10.0)
                delays[member].append(None if at is None else (at - started) * 1000)
                after_write[member].append(None if at is None or put is None
                                           else (at - put) * 1000)
            time.sleep(0.05)
    finally:
        written.watch.cancel()
        for monitor in monitors.values():
            monitor.close()
    print(f"\n(b) revoke --close until the lease's element is gone from each member's nft "
          f"set, {count} clients, ms ({load()})")
    print(f"{'from the call':<26} {'removed':>9} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    print(f"{'  m1 (granted it)':<26} {summary(delays['m1'])}")
    print(f"{'  m2 (its shared lease)':<26} {summary(delays['m2'])}")
    worst = [None if a is None or b is None else max(a, b)
             for a, b in zip(delays["m1"], delays["m2"], strict=True)]
    print(f"{'  max over members':<26} {summary(worst)}")
    print(f"{'the revoke call itself':<26} {summary(calls)}")
    print("from the put seen by a watcher of revoked/ (the members' part: watch, receive "
          "thread, firewall)")
    print(f"{'  m1':<26} {summary(after_write['m1'])}")
    print(f"{'  m2':<26} {summary(after_write['m2'])}")
    for why, n in lost.items():
        print(f"  left out: {n} ({why})")
    ok = [w for w in worst if w is not None]
    if ok:
        met = "met" if percentile(ok, .99) <= 1000 else "NOT met"
        print(f"goal p99 <= 1 s at every member, from the call: {met}")


def grant_rate(client: Namespace, flood: Path, host: Host, uris: list[Enrollment],
               count: int, rate: int, window: float, root: Path,
               spaces: dict[str, str] | None = None) -> str:
    """Offer `count` valid knocks at `rate` to `host`; the grants it made in
    `window` seconds from the first knock sent, and their rate (with
    `spaces`, label -> namespace: the CPU each spent on them)."""
    now = time.time()
    base = int(SPOOFED.network_address) + 256
    packets = [((base + i).to_bytes(4, "big"),
                knock.make_packet(uris[i % len(uris)], Action.OPEN, "ssh", duration=60,
                                  address=None, now=now, nonce=os.urandom(NONCE_SIZE)))
               for i in range(count)]
    records = root / f"records-{host.name}"
    write_records(records, packets)
    before = cpu_ticks(spaces) if spaces else {}
    started = time.time()
    seconds = count / rate
    done = client.run(str(flood), "-f", str(records), "-r", str(rate), "-1", host.address,
                      str(KNOCK_PORT), str(seconds * 10 + 10), timeout=seconds * 10 + 60)
    sent, took = int(done.stdout.split()[1]), float(done.stdout.split()[4])
    leases, refused = wait_for_grants(host.state / EVENTS_DB, started, count, window)
    within = [t for t in leases if t <= started + window]
    per = per_second(within) or 0.0
    backlog = f"; {len(leases) - len(within)} more after it" if len(leases) > len(within) else ""
    if len(within) == sent and per >= 0.8 * sent / took:
        backlog += "; kept up with the offered rate (raise --rate for its limit)"
    line = (f"{host.name:<3} {sent:>6} {sent / took:>9,.0f} {len(within):>7} {per:>9,.0f}   "
            f"{dict(refused) or 'none'}{backlog}")
    if spaces:
        line += "\n" + cpu_report(before, cpu_ticks(spaces), len(leases))
    return line


def cpu_ticks(spaces: dict[str, str]) -> dict[str, Counter[str]]:
    """CPU time (clock ticks, user + system) of every process in each
    namespace (label -> namespace name), by the process's name."""
    taken: dict[str, Counter[str]] = {}
    for label, name in spaces.items():
        ticks: Counter[str] = Counter()
        for pid in sh("ip", "netns", "pids", name).stdout.split():
            try:
                raw = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue  # gone meanwhile
            comm = raw[raw.index("(") + 1:raw.rindex(")")]
            fields = raw[raw.rindex(")") + 2:].split()
            ticks[comm] += int(fields[11]) + int(fields[12])  # utime, stime
        taken[label] = ticks
    return taken


def cpu_report(before: dict[str, Counter[str]], after: dict[str, Counter[str]],
               grants: int) -> str:
    """CPU milliseconds per 1,000 grants, per namespace and process name."""
    hertz = os.sysconf("SC_CLK_TCK")
    lines = [f"CPU while (c) ran at the member, ms per 1,000 grants ({grants} grants; "
             "a process's ticks in the window, by namespace)"]
    total = 0.0
    for label, ticks in after.items():
        used = ticks - before.get(label, Counter())
        spent = sum(used.values()) / hertz * 1000
        total += spent
        parts = ", ".join(f"{comm} {n / hertz * 1000 * 1000 / max(grants, 1):,.0f}"
                          for comm, n in used.most_common(3) if n)
        lines.append(f"  {label:<8} {spent * 1000 / max(grants, 1):>7,.0f}   {parts}")
    lines.append(f"  {'all':<8} {total * 1000 / max(grants, 1):>7,.0f}   (2 cores give 2,000 "
                 "ms a second: at this cost the machine's ceiling is "
                 f"{2_000_000 / max(total * 1000 / max(grants, 1), 1):,.0f} grants/s)")
    return "\n".join(lines)


def wait_for_grants(path: Path, since: float, expected: int,
                    window: float) -> tuple[list[float], Counter[str]]:
    """lease_start times and refusals since `since`, once all came, or they
    stopped growing for 3 s, or `window` (+1 s) passed."""
    last, stable_since = -1, time.monotonic()
    while True:
        time.sleep(0.5)
        events = read_events(path, since=since)
        leases = sorted(e.time for e in events if e.outcome == "lease_start")
        refused: Counter[str] = Counter()
        for event in events:
            if event.outcome == "refused" and event.reason:
                refused[event.reason] += event.count
        done = len(leases) + sum(refused.values())
        if done != last:
            last, stable_since = done, time.monotonic()
        elif done >= expected or time.monotonic() - stable_since > 3:
            return leases, refused
        if time.time() > since + window + 1:
            return leases, refused


# -- the run ----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--knocks", type=int, default=200, help="knock-to-open, per mode")
    parser.add_argument("--pause", type=float, default=0.02,
                        help="seconds between knocks in (a)")
    parser.add_argument("--set-knocks", type=int, default=50,
                        help="knocks a mode timed to the set's element, no connect polled")
    parser.add_argument("--claims", type=int, default=100,
                        help="claims timed alone after (a), the floor under a group knock")
    parser.add_argument("--revocations", type=int, default=50)
    parser.add_argument("--grant-knocks", type=int, default=6000, help="knocks offered in (c)")
    parser.add_argument("--grant-clients", type=int, default=100)
    parser.add_argument("--rate", type=int, default=3000, help="knocks/s offered in (c)")
    parser.add_argument("--window", type=float, default=10.0,
                        help="seconds from the first knock in which (c) counts grants")
    parser.add_argument("--floor-threads", type=int, default=4,
                        help="threads of (c)'s etcd-alone line (a member's claim pool: 4)")
    parser.add_argument("--mode", choices=("capture", "udp"), default="capture")
    parser.add_argument("--leader", choices=("any", "e1", "e2", "e3"), default="any",
                        help="move etcd's leadership there first (e1: the members' first "
                             "endpoint; another: where leader-first claims differ)")
    parser.add_argument("--etcd-data", choices=("disk", "tmpfs"), default="disk",
                        help="etcd's data directories: under /tmp (the disk) or /dev/shm")
    args = parser.parse_args()
    reason = why_not() or (None if shutil.which("gcc") else "needs gcc (flood.c)")
    if reason is not None:
        print(f"group_knock: {reason}", file=sys.stderr)
        return 2
    began = time.monotonic()
    version = sh("etcd", "--version").stdout.splitlines()[0]
    print(f"group_knock: {version}, 3 members (TLS, RBAC, data on {args.etcd_data}); "
          f"spa-server {args.mode} mode, nftables; {load()}")
    os.environ[TIMES_VARIABLE] = "1"  # the daemons' claim times lines (after (a))
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="spa-gknock-")))
        root.chmod(0o711)  # the daemons run as a service user: they must get through
        data = None
        if args.etcd_data == "tmpfs":
            data = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="spa-gknock-", dir="/dev/shm")))
        cluster = stack.enter_context(open_cluster(root / "etcd", data))
        stack.enter_context(cluster.inside())  # this thread: the client (and admin) namespace
        hosts = []
        for name, net in (("s0", 201), ("m1", 202), ("m2", 203)):
            (root / name).mkdir(mode=0o711)
            hosts.append(Host(name, cluster.topo.ns(name), net, root / name))
        standalone, members = hosts[0], hosts[1:]
        wire(cluster, hosts, members, args.knocks + args.revocations + args.set_knocks)
        flood = compile_flood(root)
        standalone_config(standalone, args.mode)
        alone = parse(admin.enroll(standalone.config, "lat", ["ssh"], standalone.address))
        grant_names = [f"g{i}" for i in range(args.grant_clients)]
        alone_grants = [parse(admin.enroll(standalone.config, n, ["ssh"], standalone.address))
                        for n in grant_names]
        group = make_group(cluster, root)
        for member in members:
            join(cluster, member, args.mode, root)
        enroll_group(group, members[0],
                     ["lat", *grant_names, *(f"rev{k}" for k in range(args.revocations))])
        print(f"set up in {time.monotonic() - began:.0f} s: group {GROUP} with "
              f"{len(group.uris)} clients; starting the daemons; {lead(cluster, args.leader)}")
        stack.enter_context(running(hosts))
        for host in hosts:
            launch(host)
        for host in hosts:
            wait_started(host)
        for member in members:  # the group read at start (the line GroupLink.start logs)
            mark = f"group {GROUP} member={member.name} clients={len(group.uris)}"
            if not wait_started(member, mark, timeout=15.0, required=False):
                print(f"warning: {member.name}'s log has no {mark!r} after 15 s (the line "
                      "changed?); going on", file=sys.stderr)
        time.sleep(2.0)  # the other live steps' tags (a second), then quiet daemons
        marks = {m.name: m.log.stat().st_size for m in members}
        bench_knocks(standalone, members, alone, group.uris["lat"], args.knocks, args.pause)
        claim_times(members, marks)
        bench_set_times(standalone, members, alone, group.uris["lat"], args.set_knocks,
                        args.knocks + args.revocations, args.pause)
        claim_floor(group, args.claims)
        if args.revocations:
            bench_revocations(group, members, args.revocations, args.knocks)
        if not args.grant_knocks:
            print(f"\ngroup_knock: done in {time.monotonic() - began:.0f} s (no (c))")
            return 0
        print(f"\n(c) grants/s: {args.grant_knocks} valid knocks from {args.grant_clients} "
              f"clients, one source address each, offered at {args.rate}/s; grants counted "
              f"in the server's events for {args.window:g} s from the first knock ({load()})")
        print(etcd_floor(group, args.floor_threads, 5.0))
        print(f"{'':<3} {'sent':>6} {'offered/s':>9} {'granted':>7} {'grants/s':>9}   refused")
        print(grant_rate(cluster.client, flood, standalone, alone_grants, args.grant_knocks,
                         args.rate, args.window, root))
        spaces = {m.name: m.ns.name for m in members}
        spaces.update({m.name: m.ns.name for m in cluster.members})
        spaces["client"] = cluster.client.name  # the flood, and this script
        print(grant_rate(cluster.client, flood, members[0],
                         [group.uris[n] for n in grant_names], args.grant_knocks, args.rate,
                         args.window, root, spaces))  # last: its backlog slows nothing after
        print(f"(grants/s: first to last grant in the window; {load()})")
    print(f"\ngroup_knock: done in {time.monotonic() - began:.0f} s; namespaces removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
