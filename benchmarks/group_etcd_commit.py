"""etcd's own commit latency under a group knock, with the members' data
directories on the disk and on a tmpfs, in one run (issue 18: where the time
between a standalone and a group knock goes).  Needs root, etcd and etcdctl.

    .venv/bin/python benchmarks/group_etcd_commit.py [--calls 200] [--etcd-data both|disk|tmpfs]

For each place of the data directories: tests/etcd_world.py's cluster (3
members in namespaces, TLS with client certificates, RBAC on; data under
/tmp, which is this machine's disk, or under /dev/shm), then from the client
namespace (on the bridge the group members use, one veth hop as theirs)
--calls calls of each kind, one after another, through

- EtcdStore (the member's client: etcd3gw over a kept-alive requests
  session, group a's user; its transactions over http.client, kept alive):
  a knock's transaction (its claim and its lease record, as
  spa.group.claims sends them), the same through requests and etcd3gw (the
  path before the lean one), a linearizable read (a raft ReadIndex, no
  disk write), a put, a create-if-absent transaction (a claim), a lease
  grant;
- http.client on one kept-alive TLS connection, the same JSON bodies (no
  requests, no etcd3gw): a read, a put; the difference from the lines above
  is the client's own share (requests/urllib3, etcd3gw), and so is the
  difference in CPU a call (this thread's CPU time, the last round's);
- etcdctl check perf is not used (60 s of load a run, its figures are rates).

A write is committed once 2 of the 3 members have written it to their log
and fsync'ed it; the read is not written, so "put - read" is about the
commit's disk share.  Printed: p50 / p90 / p99 ms per kind, and the load.
Figures: docs/benchmarks.md ("At a running member").
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import http.client
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_latency import percentile  # noqa: E402

from spa.group.etcd import EtcdStore  # noqa: E402
from spa.group.kv import Put  # noqa: E402
from tests.etcd_world import EtcdCluster, open_cluster, why_not  # noqa: E402

PREFIX = b"/spa/groups/a/claims/bench/"
PAUSE = 0.05  # seconds between calls in the sparse rows (a member's knocks in (a))


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f} / {five:.1f} / {fifteen:.1f}"


def row(name: str, ms: list[float]) -> str:
    return (f"  {name:<34} {percentile(ms, .5):>7.2f} {percentile(ms, .9):>7.2f} "
            f"{percentile(ms, .99):>7.2f}")


CPU: dict[str, float] = {}  # this process's CPU ms a call, by the row's name


def timed(count: int, fn: object, pause: float = 0.0, name: str = "") -> list[float]:
    out = []
    cpu = 0.0
    for i in range(count):
        time.sleep(pause)
        started, used = time.perf_counter(), time.thread_time()
        fn(i)  # type: ignore[operator]
        out.append((time.perf_counter() - started) * 1000)
        cpu += time.thread_time() - used
    if name:
        CPU[name] = cpu * 1000 / count
    return out


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class Raw:
    """One kept-alive TLS connection, etcd's JSON gateway, no library."""

    def __init__(self, store_access: object, host: str, port: int, token: str) -> None:
        access = store_access
        context = ssl.create_default_context(cafile=str(access.ca_file))  # type: ignore[attr-defined]
        context.load_cert_chain(str(access.cert_file), str(access.key_file))  # type: ignore[attr-defined]
        self.conn = http.client.HTTPSConnection(host, port, context=context, timeout=2.0)
        self.headers = {"Content-Type": "application/json", "Authorization": token}

    def post(self, path: str, body: dict[str, object]) -> dict[str, object]:
        self.conn.request("POST", path, json.dumps(body), self.headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {data[:200]!r}")
        answer: dict[str, object] = json.loads(data)
        return answer


def measure(where: str, count: int) -> None:
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="spa-ecommit-"))
        data = stack.enter_context(tempfile.TemporaryDirectory(
            prefix="spa-ecommit-", dir="/dev/shm" if where == "tmpfs" else None))
        cluster = stack.enter_context(open_cluster(Path(tmp) / "etcd", Path(data)))
        with cluster.inside():
            leader = cluster.ctl("endpoint", "status", "-w", "json")
            leaders = {s["Status"]["header"]["member_id"] for s in json.loads(leader)
                       if s["Status"]["leader"] == s["Status"]["header"]["member_id"]}
            store = EtcdStore(cluster.access("a"))
            store.get(PREFIX)  # logged in, connected
            value = b"x" * 60
            results: dict[str, list[float]] = {}
            record = b"y" * 120

            def knock_txn(i: int) -> None:  # a knock's: its claim and its lease record
                nonce = os.urandom(8).hex().encode()
                store.create_many([Put(PREFIX + nonce, value, claim_lease)],
                                  [Put(PREFIX + b"lease-" + nonce, record, share_lease)])

            old = EtcdStore(cluster.access("a"))  # the txn through requests and etcd3gw
            old._lean.clear()
            old.get(PREFIX)

            def old_txn(i: int) -> None:
                nonce = os.urandom(8).hex().encode()
                old.create_many([Put(PREFIX + nonce, value, claim_lease)],
                                [Put(PREFIX + b"lease-" + nonce, record, share_lease)])

            claim_lease, share_lease = store.grant(60), store.grant(90)
            for _ in range(2):  # two rounds, alternating kinds (the machine is noisy)
                for name, fn in (
                        ("EtcdStore knock txn (claim + lease)", knock_txn),
                        ("  the same, requests + etcd3gw", old_txn),
                        ("EtcdStore read (linearizable)", lambda i: store.get(PREFIX)),
                        ("EtcdStore put", lambda i: store.put(PREFIX + b"p", value)),
                        ("EtcdStore create (a claim txn)",
                         lambda i: store.create(PREFIX + os.urandom(8).hex().encode(), value)),
                        ("EtcdStore lease grant", lambda i: store.grant(60))):
                    results.setdefault(name, []).extend(timed(count // 2, fn, name=name))
            endpoint = cluster.members[0]
            token = store._clients[0].session.headers["Authorization"]
            raw = Raw(cluster.access("a"), endpoint.ip, 2379, str(token))
            raw.post("/v3/kv/range", {"key": b64(PREFIX)})
            for _ in range(2):
                for name, raw_fn in (
                        ("http.client read", lambda i: raw.post(
                            "/v3/kv/range", {"key": b64(PREFIX)})),
                        ("http.client put", lambda i: raw.post(
                            "/v3/kv/put", {"key": b64(PREFIX + b"p"), "value": b64(value)}))):
                    results.setdefault(name, []).extend(timed(count // 2, raw_fn, name=name))
            first = json.loads(leader)[0]["Status"]["header"]["member_id"]
            print(f"\netcd data on {where} ({data}); calls to e1, which is "
                  f"{'the leader' if first in leaders else 'a follower'}; {count} calls "
                  f"each ({load()})")
            print(f"  {'':<34} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'CPU ms':>7}")
            for name, ms in results.items():
                print(f"{row(name, ms)} {CPU.get(name, 0.0):>7.2f}")
            watchers = [watcher(cluster, store, token) for _ in range(2)]
            try:
                time.sleep(0.5)
                ms = timed(count, knock_txn)
            finally:
                for proc in watchers:
                    proc.terminate()
                    proc.wait()
            print(row("knock txn, 2 watchers of the prefix", ms))
            print(row(f"knock txn, one each {PAUSE * 1000:g} ms", timed(count, knock_txn, PAUSE)))
            print(row(f"read, one each {PAUSE * 1000:g} ms",
                      timed(count, lambda i: store.get(PREFIX), PAUSE)))
            statuses = json.loads(leader)
            by_role: dict[str, str] = {}
            for status in statuses:
                header = status["Status"]["header"]
                role = "leader" if status["Status"]["leader"] == header["member_id"] \
                    else "follower"
                by_role.setdefault(role, status["Endpoint"])
            access = cluster.access("a")
            stores = {role: EtcdStore(dataclasses.replace(access, endpoints=(url,)))
                      for role, url in by_role.items()}
            rows: dict[str, list[float]] = {}
            for one in stores.values():
                one.get(PREFIX)
            for _ in range(2):
                for role, one in stores.items():
                    lease_c, lease_s = one.grant(60), one.grant(90)

                    def txn(i: int, one: EtcdStore = one, lc: int = lease_c,
                            ls: int = lease_s) -> None:
                        nonce = os.urandom(8).hex().encode()
                        one.create_many([Put(PREFIX + nonce, value, lc)],
                                        [Put(PREFIX + b"lease-" + nonce, record, ls)])
                    rows.setdefault(role, []).extend(timed(count // 2, txn))
            for role, ms in rows.items():
                print(row(f"knock txn to the {role} ({by_role[role].split('//')[1]})", ms))
            put = percentile(results["EtcdStore put"], .5)
            read = percentile(results["EtcdStore read (linearizable)"], .5)
            print(f"  put - read (the commit's write, p50): {put - read:.2f} ms; client share "
                  f"of a put (EtcdStore - http.client, p50): "
                  f"{put - percentile(results['http.client put'], .5):.2f} ms")


def watcher(cluster: EtcdCluster, store: EtcdStore, token: object) -> subprocess.Popen[str]:
    """A watch of the group's prefix through the gateway, as a member keeps
    one (curl in the client namespace: the gateway's work, not ours)."""
    access = cluster.access("a")
    body = json.dumps({"create_request": {"key": b64(b"/spa/groups/a/"),
                                          "range_end": b64(b"/spa/groups/a0")}})
    return cluster.client.popen(
        ["curl", "-sN", "--cacert", str(access.ca_file), "--cert", str(access.cert_file),
         "--key", str(access.key_file), "-H", f"Authorization: {token}", "-d", body,
         "-o", "/dev/null", f"{cluster.members[0].endpoint}/v3/watch"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--etcd-data", choices=("both", "disk", "tmpfs"), default="both")
    args = parser.parse_args()
    reason = why_not()
    if reason is not None:
        print(f"group_etcd_commit: {reason}", file=sys.stderr)
        return 2
    places = ("disk", "tmpfs") if args.etcd_data == "both" else (args.etcd_data,)
    for where in places:
        measure(where, args.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
