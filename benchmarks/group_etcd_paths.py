"""Where a group knock's etcd round trip goes, path by path (issue 18: the
gap between a group and a standalone knock is one etcd transaction).  Needs
root, etcd and etcdctl; for the gRPC rows, grpcio and grpcio-tools
importable (not the product's dependencies: a scratch venv on PYTHONPATH).

    .venv/bin/python benchmarks/group_etcd_paths.py [--calls 300] [--rounds 6]
        [--etcd-data disk|tmpfs] [--grpc] [--capture] [--curve]

tests/etcd_world.py's cluster (3 members in namespaces, TLS with client
certificates, RBAC on), calls from the client namespace (the members'
bridge, one veth hop as a group member's), each call a knock's transaction
(its claim, create-if-absent on an etcd lease, and its lease record on a
second lease: what spa.group.claims sends), to the leader unless the row
says otherwise.  Rows, alternated in `--rounds` rounds (the machine is
noisy), each `--calls` calls in all:

- gateway, EtcdStore: the member's own path (http.client kept alive, the
  leader first);
- gateway, raw http.client, headers and body in two send() calls (what
  http.client does in Python 3.11) or in one;
- gateway, to a follower (EtcdStore held to that one endpoint);
- gRPC (`--grpc`): etcd's KV.Txn directly on one kept-alive channel, the
  same transaction (stubs generated at run time in a temporary directory
  from the few messages below, the field numbers of etcd's rpc.proto);
- each of those again one every 50 ms (a member whose knocks come one at a
  time) and, for the gateway, one every 50 ms with a keep-warm: a thread
  asking the leader for a serializable read (no raft, no disk) every 5 ms;
- with `--curve`, instead: EtcdStore's transaction after 0, 0.5, 1, 2, 5,
  10, 20 and 50 ms of quiet (when the wake-up cost appears).

Printed per row: p50 / p90 / p99 ms and this process's CPU ms a call (all
threads: gRPC's C core works on threads of its own).  `--capture` also runs
tcpdump on the client namespace's bridge during 20 calls each of http.client
(two sends), EtcdStore and gRPC, and prints, per call, the segments each way
and the time from our last request segment to the answer's first (a delayed
ACK would show as a 40 ms gap).  Figures: docs/benchmarks.md ("Where a group knock's time goes").
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import http.client
import importlib
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_latency import percentile  # noqa: E402

from spa.group.etcd import EtcdAccess, EtcdStore  # noqa: E402
from spa.group.kv import Put  # noqa: E402
from tests.etcd_world import EtcdCluster, open_cluster, why_not  # noqa: E402

PREFIX = b"/spa/groups/a/claims/bench/"
PAUSE = 0.05  # seconds between calls in the paced rows
WARM_EVERY = 0.005  # seconds between the keep-warm thread's reads
CURVE = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)  # --curve's pauses, seconds
VALUE, RECORD = b"x" * 60, b"y" * 120  # a claim's value, a lease record (their sizes)

PROTO = """
syntax = "proto3";
package etcdserverpb;
message ResponseHeader { uint64 cluster_id = 1; uint64 member_id = 2; int64 revision = 3;
  uint64 raft_term = 4; }
message KeyValue { bytes key = 1; int64 create_revision = 2; int64 mod_revision = 3;
  int64 version = 4; bytes value = 5; int64 lease = 6; }
message RangeRequest { bytes key = 1; bytes range_end = 2; int64 limit = 3; int64 revision = 4;
  int32 sort_order = 5; int32 sort_target = 6; bool serializable = 7; }
message RangeResponse { ResponseHeader header = 1; repeated KeyValue kvs = 2; bool more = 3;
  int64 count = 4; }
message PutRequest { bytes key = 1; bytes value = 2; int64 lease = 3; }
message PutResponse { ResponseHeader header = 1; KeyValue prev_kv = 2; }
message DeleteRangeRequest { bytes key = 1; bytes range_end = 2; }
message DeleteRangeResponse { ResponseHeader header = 1; int64 deleted = 2; }
message RequestOp { oneof request { RangeRequest request_range = 1; PutRequest request_put = 2;
  DeleteRangeRequest request_delete_range = 3; } }
message ResponseOp { oneof response { RangeResponse response_range = 1;
  PutResponse response_put = 2; DeleteRangeResponse response_delete_range = 3; } }
message Compare {
  enum CompareResult { EQUAL = 0; GREATER = 1; LESS = 2; NOT_EQUAL = 3; }
  enum CompareTarget { VERSION = 0; CREATE = 1; MOD = 2; VALUE = 3; LEASE = 4; }
  CompareResult result = 1; CompareTarget target = 2; bytes key = 3;
  oneof target_union { int64 version = 4; int64 create_revision = 5; int64 mod_revision = 6;
    bytes value = 7; int64 lease = 8; }
}
message TxnRequest { repeated Compare compare = 1; repeated RequestOp success = 2;
  repeated RequestOp failure = 3; }
message TxnResponse { ResponseHeader header = 1; bool succeeded = 2;
  repeated ResponseOp responses = 3; }
message AuthenticateRequest { string name = 1; string password = 2; }
message AuthenticateResponse { ResponseHeader header = 1; string token = 2; }
service KV { rpc Range(RangeRequest) returns (RangeResponse);
  rpc Txn(TxnRequest) returns (TxnResponse); }
service Auth { rpc Authenticate(AuthenticateRequest) returns (AuthenticateResponse); }
"""


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def nonce() -> bytes:
    return os.urandom(8).hex().encode()


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f} / {five:.1f} / {fifteen:.1f}"


def knock_body(key: bytes, claim_lease: int, share_lease: int) -> dict[str, Any]:
    """A knock's transaction as spa.group.etcd sends it (create_many)."""
    return {"compare": [{"key": b64(key), "result": "EQUAL", "target": "CREATE",
                         "create_revision": "0"}],
            "success": [{"request_put": {"key": b64(key), "value": b64(VALUE),
                                         "lease": str(claim_lease)}},
                        {"request_put": {"key": b64(key + b"-lease"), "value": b64(RECORD),
                                         "lease": str(share_lease)}}],
            "failure": [{"request_range": {"key": b64(key)}}]}


class Raw:
    """One kept-alive TLS connection to the gateway, http.client, and the
    request's headers and body in one send() or in two (http.client's)."""

    def __init__(self, access: EtcdAccess, url: str, token: str, *, one_send: bool) -> None:
        context = ssl.create_default_context(cafile=str(access.ca_file))
        context.load_cert_chain(str(access.cert_file), str(access.key_file))
        host, _, port = url.partition("://")[2].rpartition(":")
        self.conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=2.0)
        self.token = token
        self.one_send = one_send

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        if self.one_send:
            conn = self.conn
            if conn.sock is None:
                conn.connect()
            head = (f"POST {path} HTTP/1.1\r\nHost: {conn.host}:{conn.port}\r\n"
                    f"Accept-Encoding: identity\r\nContent-Type: application/json\r\n"
                    f"Authorization: {self.token}\r\nContent-Length: {len(data)}\r\n\r\n")
            conn.sock.sendall(head.encode() + data)
            conn._HTTPConnection__state = http.client._CS_REQ_SENT  # type: ignore[attr-defined]
        else:
            self.conn.request("POST", path, data, {"Content-Type": "application/json",
                                                   "Authorization": self.token})
        response = self.conn.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {answer[:200]!r}")
        parsed: dict[str, Any] = json.loads(answer)
        return parsed

    def nodelay(self) -> int:
        sock = self.conn.sock
        if sock is None:
            self.post("/v3/kv/range", {"key": b64(PREFIX), "serializable": True})
            sock = self.conn.sock
            assert sock is not None
        return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


class Grpc:
    """etcd's KV.Txn over one gRPC channel (TLS, our certificate, the same
    user's token)."""

    def __init__(self, access: EtcdAccess, url: str, stubs: Path) -> None:
        grpc = importlib.import_module("grpc")
        sys.path.insert(0, str(stubs))
        self.pb = importlib.import_module("etcd_min_pb2")
        rpc = importlib.import_module("etcd_min_pb2_grpc")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=access.ca_file.read_bytes(),
            private_key=access.key_file.read_bytes(),
            certificate_chain=access.cert_file.read_bytes())
        self.channel = grpc.secure_channel(url.partition("://")[2], credentials)
        self.kv = rpc.KVStub(self.channel)
        auth = rpc.AuthStub(self.channel).Authenticate(
            self.pb.AuthenticateRequest(name=access.user, password=access.password or ""),
            timeout=2.0)
        self.metadata = (("token", auth.token),)

    def txn(self, key: bytes, claim_lease: int, share_lease: int) -> Any:
        pb = self.pb
        request = pb.TxnRequest(
            compare=[pb.Compare(key=key, result=pb.Compare.EQUAL, target=pb.Compare.CREATE,
                                create_revision=0)],
            success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=VALUE,
                                                            lease=claim_lease)),
                     pb.RequestOp(request_put=pb.PutRequest(key=key + b"-lease", value=RECORD,
                                                            lease=share_lease))],
            failure=[pb.RequestOp(request_range=pb.RangeRequest(key=key))])
        answer = self.kv.Txn(request, timeout=2.0, metadata=self.metadata)
        if not answer.succeeded:
            raise RuntimeError("the claim was taken")
        return answer


def make_stubs(into: Path) -> Path:
    (into / "etcd_min.proto").write_text(PROTO)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{into}",
                    f"--python_out={into}", f"--grpc_python_out={into}", "etcd_min.proto"],
                   check=True, cwd=into)
    return into


class KeepWarm:
    """A thread that asks the leader for a serializable read every
    WARM_EVERY seconds (no raft, no disk: etcd's leader answers alone)."""

    def __init__(self, raw: Raw) -> None:
        self.raw = raw
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(WARM_EVERY):
            self.raw.post("/v3/kv/range", {"key": b64(PREFIX), "serializable": True})

    def __enter__(self) -> KeepWarm:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


Row = tuple[str, Callable[[], object], float, Callable[[], Any] | None]


def timed(count: int, fn: Callable[[], object], pause: float) -> tuple[list[float], float]:
    out = []
    cpu = 0.0
    for _ in range(count):
        if pause:
            time.sleep(pause)
        started, used = time.perf_counter(), time.process_time()
        fn()
        out.append((time.perf_counter() - started) * 1000)
        cpu += time.process_time() - used
    return out, cpu * 1000 / count


def leader_url(cluster: EtcdCluster) -> tuple[str, str]:
    """(the leader's endpoint, a follower's) as etcdctl sees them."""
    statuses = json.loads(cluster.ctl("endpoint", "status", "-w", "json"))
    leader = follower = ""
    for status in statuses:
        header = status["Status"]["header"]
        if status["Status"]["leader"] == header["member_id"]:
            leader = status["Endpoint"]
        else:
            follower = follower or status["Endpoint"]
    return leader, follower


def measure(cluster: EtcdCluster, args: argparse.Namespace, stubs: Path | None) -> None:
    access = cluster.access("a")
    leader, follower = leader_url(cluster)
    store = EtcdStore(access)
    store._spawn = lambda fn: fn()  # learn the leader now, not on a thread
    claim_lease, share_lease = store.grant(600), store.grant(600)
    store.create_many([Put(PREFIX + nonce(), VALUE, claim_lease)])
    assert store._leader.index is not None
    assert access.endpoints[store._leader.index] == leader, (store._leader.index, leader)
    to_follower = EtcdStore(dataclasses.replace(access, endpoints=(follower,)))
    to_follower.grant(600)
    token = str(store._clients[store._leader.index].session.headers["Authorization"])
    two, one = (Raw(access, leader, token, one_send=flag) for flag in (False, True))
    warm = Raw(access, leader, token, one_send=False)

    def gw_store() -> object:
        key = PREFIX + nonce()
        return store.create_many([Put(key, VALUE, claim_lease)],
                                 [Put(key + b"-lease", RECORD, share_lease)])

    def gw_follower() -> object:
        key = PREFIX + nonce()
        return to_follower.create_many([Put(key, VALUE, claim_lease)],
                                       [Put(key + b"-lease", RECORD, share_lease)])

    def raw(conn: Raw) -> Callable[[], object]:
        return lambda: conn.post("/v3/kv/txn", knock_body(PREFIX + nonce(), claim_lease,
                                                          share_lease))

    rows: list[Row] = [
        ("gateway, EtcdStore (the member's path)", gw_store, 0.0, None),
        ("gateway, http.client, 2 sends", raw(two), 0.0, None),
        ("gateway, raw, 1 send", raw(one), 0.0, None),
        ("gateway, EtcdStore, to a follower", gw_follower, 0.0, None),
    ]
    if stubs is not None:
        rpc = Grpc(access, leader, stubs)
        rows.append(("gRPC KV.Txn", lambda: rpc.txn(PREFIX + nonce(), claim_lease,
                                                    share_lease), 0.0, None))
    rows += [(f"{name}, one each {PAUSE * 1000:g} ms", fn, PAUSE, None)
             for name, fn, _, _ in list(rows) if "follower" not in name]
    rows.append((f"gateway, EtcdStore, one each {PAUSE * 1000:g} ms, keep-warm "
                 f"{WARM_EVERY * 1000:g} ms", gw_store, PAUSE, lambda: KeepWarm(warm)))
    if args.curve:  # how soon after the last call the wake-up cost appears
        rows = [(f"gateway, EtcdStore, after {pause * 1000:g} ms quiet", gw_store, pause, None)
                for pause in CURVE]
    for _, fn, _, _ in rows:  # connected, warmed once
        fn()
    results: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    per_round = max(1, args.calls // args.rounds)
    for r in range(args.rounds):
        order = rows[r % len(rows):] + rows[:r % len(rows)]
        for name, fn, pause, around in order:
            with ExitStack() as stack:
                if around is not None:
                    stack.enter_context(around())
                ms, cpu = timed(per_round, fn, pause)
            results.setdefault(name, []).extend(ms)
            cpus.setdefault(name, []).append(cpu)
    print(f"\netcd data on {args.etcd_data}; leader {leader}, follower {follower}; "
          f"{per_round * args.rounds} calls a row in {args.rounds} rounds ({load()}); "
          f"TCP_NODELAY on http.client's socket: {two.nodelay()}")
    print(f"  {'':<62} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'CPU ms':>7}")
    for name, ms in results.items():
        cpu = sorted(cpus[name])[len(cpus[name]) // 2]
        print(f"  {name:<62} {percentile(ms, .5):>7.2f} {percentile(ms, .9):>7.2f} "
              f"{percentile(ms, .99):>7.2f} {cpu:>7.2f}")
    if args.capture:
        grpc_call = None if stubs is None or args.curve else rows[4][1]
        capture(cluster, leader, {"gateway, http.client (2 sends)": raw(two),
                                  "gateway, EtcdStore": gw_store, "gRPC": grpc_call})


def capture(cluster: EtcdCluster, leader: str,
            calls: dict[str, Callable[[], object] | None]) -> None:
    """tcpdump on the client namespace during 20 calls of each path, spaced
    100 ms apart; per call: segments out and in (with data), and the time
    from our last data segment to the answer's first."""
    ip = leader.partition("://")[2].rpartition(":")[0]
    for name, fn in calls.items():
        if fn is None:
            continue
        with tempfile.NamedTemporaryFile(suffix=".txt") as out:
            bridge = f"br{cluster.topo.tag}"[:15]  # tests/etcd_world.py's: each packet once
            dump = cluster.client.popen(["tcpdump", "-i", bridge, "-n", "-tt", "-l", "-q",
                                         f"host {ip} and tcp port 2379"],
                                        stdout=out, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            marks = []
            for _ in range(20):
                time.sleep(0.1)
                marks.append(time.time())
                fn()
            time.sleep(0.5)
            dump.terminate()
            dump.wait()
            lines = Path(out.name).read_text().splitlines()
        print(f"  {name}: {summarize(lines, ip, marks)}")


def summarize(lines: list[str], ip: str, marks: list[float]) -> str:
    """Per call: data segments out / in, pure ACKs, gap (ms) from our last
    data segment to the first answer's; medians over the calls."""
    packets = []
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or not parts[0].replace(".", "").isdigit():
            continue
        try:
            length = int(parts[-1])
        except ValueError:
            continue
        src = parts[parts.index("IP") + 1] if "IP" in parts else ""
        packets.append((float(parts[0]), src.startswith(ip + "."), length))
    outs, ins, acks, gaps = [], [], [], []
    for i, start in enumerate(marks):
        end = marks[i + 1] if i + 1 < len(marks) else start + 0.1
        mine = [p for p in packets if start <= p[0] < end]
        sent = [p for p in mine if not p[1] and p[2] > 0]
        got = [p for p in mine if p[1] and p[2] > 0]
        outs.append(len(sent))
        ins.append(len(got))
        acks.append(sum(1 for p in mine if p[2] == 0))
        if sent and got:
            gaps.append((got[0][0] - sent[-1][0]) * 1000)
    def med(xs: list[float] | list[int]) -> float:
        return float(sorted(xs)[len(xs) // 2]) if xs else float("nan")
    return (f"{len(marks)} calls: data segments out {med(outs):g}, in {med(ins):g}, pure ACKs "
            f"{med(acks):g} (median a call); our last segment to the answer's first: "
            f"p50 {med(gaps):.2f} ms, max {max(gaps, default=float('nan')):.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--etcd-data", choices=("disk", "tmpfs"), default="disk")
    parser.add_argument("--grpc", action="store_true")
    parser.add_argument("--capture", action="store_true")
    parser.add_argument("--curve", action="store_true",
                        help="only EtcdStore's transaction after 0 to 50 ms of quiet")
    args = parser.parse_args()
    reason = why_not()
    if reason is not None:
        print(f"group_etcd_paths: {reason}", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="spa-epaths-")))
        data = stack.enter_context(tempfile.TemporaryDirectory(
            prefix="spa-epaths-", dir="/dev/shm" if args.etcd_data == "tmpfs" else None))
        stubs = make_stubs(tmp) if args.grpc else None
        cluster = stack.enter_context(open_cluster(tmp / "etcd", Path(data)))
        with cluster.inside():  # every thread and socket made from here on is there
            measure(cluster, args, stubs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
