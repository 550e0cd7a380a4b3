"""Knock-to-open latency (issue 6, benchmark 2), spa-server beside fwknopd.

For each server (spa-server in capture and udp mode, nftables backend;
fwknopd in udp-server and pcap mode, iptables) the script builds a fresh
pair of network namespaces, puts a TCP service on port 22 behind the
server's firewall (closed to all until a knock), and from the client
namespace sends N knocks, each from its own source address (so no knock
waits for the previous grant to end), timing from the knock leaving the
client to the first TCP connect that completes; `spa-fwknop-udp` is
spa-server's compat listener for fwknop's packets (issue 15), knocked by the
real fwknop client like fwknopd.  Needs root.

    .venv/bin/python benchmarks/bench_latency.py [--knocks 200] [--only spa-capture,...]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from spa.core.uri import parse
from spa.core.wire import NONCE_SIZE, Action
from spa.netns import Topology, can_make_namespaces
from spa.server import admin, admin_fwknop
from spa.server import config as config_mod
from spa.server.config import ClientEntry
from spa.store.clients import ClientStore
from spa_client import knock

HERE = Path(__file__).resolve().parent
SERVER = "10.201.0.1"
KNOCK_PORT = 62201
SERVICE = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 22)); s.listen(512)
while True:
    c, _ = s.accept(); c.close()
"""


def sources(count: int) -> list[str]:
    return [f"10.201.{1 + i // 250}.{1 + i % 250}" for i in range(count)]


ATTACKER_SERVER, ATTACKER = "10.202.0.1", "10.202.0.2"


class Site:
    def __init__(self, root: Path, count: int, *, attacker: bool = False) -> None:
        self.root = root
        self.topo = Topology()
        self.srv, self.cli = self.topo.ns("srv"), self.topo.ns("cli")
        self.srv_if, self.cli_if = self.topo.link(self.srv, [f"{SERVER}/16"], self.cli,
                                                  ["10.201.0.2/16"])
        if attacker:
            self.att = self.topo.ns("att")
            self.topo.link(self.srv, [f"{ATTACKER_SERVER}/24"], self.att, [f"{ATTACKER}/24"])
        for address in sources(count):
            self.cli.run("ip", "addr", "add", f"{address}/16", "dev", self.cli_if)
        self.procs: list[subprocess.Popen[str]] = [
            self.srv.popen([sys.executable, "-c", SERVICE])]
        self.spa_uri: str | None = None  # set by start_spa
        time.sleep(0.3)

    def probe(self, knocks: list[tuple[str, bytes]], *, interval: float = 0.0,
              timeout: float = 2.0, fresh: bool = False,
              until: float | None = None, duration: int = 60,
              reuse_after: float = 0.0, sent_at: list[float] | None = None
              ) -> list[float | None]:
        """Send the knocks from the client namespace, timing each to the first
        connect.  fresh=True: spa-server knocks are made just before sending
        (for runs longer than the 30 s window); `until` (Unix time): send
        nothing after it (a knock that timed out delays the next ones);
        `duration`: the lease fresh knocks ask for; `reuse_after`: a source
        knocks again only this long after its last knock; `sent_at`: if
        given, filled with the Unix time each knock was sent."""
        spec = self.root / "spec.json"
        spec.write_text(json.dumps({"server": SERVER, "knock_port": KNOCK_PORT,
                                    "service_port": 22, "timeout": timeout,
                                    "interval": interval,
                                    "uri": self.spa_uri if fresh else None, "until": until,
                                    "duration": duration, "reuse_after": reuse_after,
                                    "times": sent_at is not None,
                                    "knocks": [[s, p.hex()] for s, p in knocks]}))
        done = self.cli.run(sys.executable, str(HERE / "latency_probe.py"), str(spec),
                            timeout=600)
        output = json.loads(done.stdout)
        if sent_at is None:
            results: list[float | None] = output
            return results
        sent_at[:] = output["sent"]
        timed: list[float | None] = output["results"]
        return timed

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        self.topo.cleanup()


Started = tuple[subprocess.Popen[str], list[tuple[str, bytes]]]


def spa_run(site: Site, count: int, mode: str) -> list[float | None]:
    return site.probe(start_spa(site, count, mode)[1])


def populate(config: Path, count: int) -> None:
    """`count` clients more, written into the client store in one
    transaction (spa.store.clients; as `enroll` would make them, but
    without a process per client)."""
    state = config_mod.load(config).state_dir
    entries = (ClientEntry(f"c{i}", os.urandom(32), ("ssh",)) for i in range(count))
    with ClientStore.open(state, create=True) as store:
        store.add_many(entries, at=time.time())


def wait_for_line(path: Path, mark: str, timeout: float = 120) -> None:
    """Until the daemon's log holds `mark`."""
    deadline = time.time() + timeout
    while mark not in path.read_text():
        if time.time() > deadline:
            raise RuntimeError(f"no {mark!r} in {path} after {timeout:g} s")
        time.sleep(0.05)


def spa_config(site: Site, mode: str, *, fwknop: bool = False) -> Path:
    """A server.toml for the bench: nftables, `mode`; with `fwknop` the compat
    listener on KNOCK_PORT (our own port one above)."""
    config = site.root / "server.toml"
    admin.init(config, listen_port=KNOCK_PORT + 1 if fwknop else KNOCK_PORT,
               backend="nftables", state_dir=site.root / "state", force=True)
    text = config.read_text().replace('mode = "capture"', f'mode = "{mode}"')
    if fwknop:
        text = text.replace("[server]\n", f"[server]\nfwknop_port = {KNOCK_PORT}\n", 1)
    config.write_text(text)
    return config


def launch_spa(site: Site, config: Path) -> subprocess.Popen[str]:
    """spa-server run in the server namespace, once it says `started`."""
    program = Path(sys.executable).parent / "spa-server"
    log_path = site.root / "spa-server.log"
    with log_path.open("w") as log:
        server = site.srv.popen([str(program), "--config", str(config), "run"],
                                stdout=log, stderr=subprocess.STDOUT)
    site.procs.append(server)
    wait_for_line(log_path, "started port=")
    time.sleep(2.0)  # the other live steps' tags (a second), then a quiet daemon
    return server


def start_spa(site: Site, count: int, mode: str, others: int = 0) -> Started:
    """spa-server running in the server namespace (with `others` clients in
    its store beside the bench client), and `count` fresh knocks."""
    config = spa_config(site, mode)
    uri = site.spa_uri = admin.enroll(config, "bench", ["ssh"], SERVER)
    if others:
        populate(config, others)
    server = launch_spa(site, config)
    enrollment = parse(uri)
    knocks = [(source, knock.make_packet(enrollment, Action.OPEN, "ssh", duration=60,
                                         address=None, now=time.time(),
                                         nonce=os.urandom(NONCE_SIZE)))
              for source in sources(count)]
    return server, knocks


def start_spa_fwknop(site: Site, count: int, mode: str) -> Started:
    """spa-server's fwknop compat listener (issue 15) on the knock port, one
    compat client, and `count` knocks made by the real fwknop client."""
    config = spa_config(site, mode, fwknop=True)
    enrolled = admin_fwknop.enroll(config, "bench", ["ssh"], SERVER)
    keys = (base64.b64encode(enrolled.rijndael).decode(),
            base64.b64encode(enrolled.hmac).decode())
    server = launch_spa(site, config)
    addresses = sources(count)
    return server, list(zip(addresses, fwknop_packets(site, keys, addresses), strict=True))


def fwknopd_run(site: Site, count: int, mode: str) -> list[float | None]:
    return site.probe(start_fwknopd(site, count, mode)[1])


def start_fwknopd(site: Site, count: int, mode: str) -> Started:
    """fwknopd running in the server namespace, and `count` knocks made by
    the real fwknop client."""
    server, keys = launch_fwknopd(site, mode)
    addresses = sources(count)
    return server, list(zip(addresses, fwknop_packets(site, keys, addresses), strict=True))


FwknopKeys = tuple[str, str]  # base64 encryption key, base64 HMAC key


def launch_fwknopd(site: Site, mode: str) -> tuple[subprocess.Popen[str], FwknopKeys]:
    """fwknopd (udp server or pcap mode) in the server namespace, iptables
    dropping port 22 until it grants; returns the process and its keys."""
    key = base64.b64encode(os.urandom(32)).decode()
    hmac_key = base64.b64encode(os.urandom(64)).decode()
    conf, access = site.root / "fwknopd.conf", site.root / "access.conf"
    conf.write_text(f"PCAP_INTF {site.srv_if};\nUDP_SERVER_PORT {KNOCK_PORT};\n"
                    f"PCAP_FILTER udp port {KNOCK_PORT};\n")  # digest persistence on (its default):
    # without it fwknopd does not detect replays at all (spa-server always does)
    access.write_text(f"SOURCE ANY\nKEY_BASE64 {key}\nHMAC_KEY_BASE64 {hmac_key}\n"
                      "FW_ACCESS_TIMEOUT 60\nOPEN_PORTS tcp/22\n")
    for path in (conf, access):
        path.chmod(0o600)
    site.srv.run("iptables", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "DROP")
    argv = ["fwknopd", "-f", "-c", str(conf), "-a", str(access), "-d",
            str(site.root / "digest.cache"), "-p", str(site.root / "fwknopd.pid"),
            "-r", str(site.root / "run")]
    if mode == "udp":
        argv.append("-U")
    with (site.root / "fwknopd.log").open("w") as log:  # its messages, e.g. "Replay detected"
        server = site.srv.popen(argv, stdout=log, stderr=subprocess.STDOUT)
    site.procs.append(server)
    time.sleep(2.0)
    return server, (key, hmac_key)


def fwknop_packets(site: Site, keys: FwknopKeys, addresses: list[str]) -> list[bytes]:
    """One packet per address (the address it asks to open for), made by the
    real fwknop client (one process per packet)."""
    saved = site.root / "packets"
    saved.unlink(missing_ok=True)
    for address in addresses:
        site.cli.run("fwknop", "--no-rc-file", "-A", "tcp/22", "-a", address, "-D", SERVER,
                     "--key-base64-rijndael", keys[0], "--key-base64-hmac", keys[1],
                     "--use-hmac", "-T", "-B", str(saved), "-b")
    return [line.encode() for line in saved.read_text().split()]


SERVERS: dict[str, Callable[[Site, int], list[float | None]]] = {
    "spa-capture": lambda site, n: spa_run(site, n, "capture"),
    "spa-udp": lambda site, n: spa_run(site, n, "udp"),
    "spa-fwknop-udp": lambda site, n: site.probe(start_spa_fwknop(site, n, "udp")[1]),
    "fwknopd-udp": lambda site, n: fwknopd_run(site, n, "udp"),
    "fwknopd-pcap": lambda site, n: fwknopd_run(site, n, "pcap"),
}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--knocks", type=int, default=200)
    parser.add_argument("--only", default=",".join(SERVERS))
    args = parser.parse_args()
    reason = can_make_namespaces()
    if reason is not None:
        print(f"bench_latency: {reason}", file=sys.stderr)
        return 2
    chosen = [name for name in args.only.split(",") if name]
    missing = [n for n in chosen if "fwknop" in n and shutil.which("fwknop") is None]
    if missing:
        print("bench_latency: fwknopd is not installed (apt-get install fwknop-server "
              "fwknop-client); skipping " + ", ".join(missing), file=sys.stderr)
        chosen = [n for n in chosen if n not in missing]
    rows = {}
    for name in chosen:
        root = Path(tempfile.mkdtemp(prefix="spa-bench-"))
        root.chmod(0o711)  # the daemon runs as a service user: it must get through
        site = Site(root, args.knocks)
        try:
            rows[name] = SERVERS[name](site, args.knocks)
        finally:
            site.close()
            shutil.rmtree(root, ignore_errors=True)
    print(f"knock-to-open latency, {args.knocks} knocks each, one source address per knock")
    print(f"{'server':<14} {'opened':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    medians = {}
    for name, results in rows.items():
        ok = [r for r in results if r is not None]
        if not ok:
            print(f"{name:<14} {0:>7}")
            continue
        medians[name] = statistics.median(ok)
        print(f"{name:<14} {len(ok):>7} {percentile(ok, .5):>8.2f} {percentile(ok, .9):>8.2f} "
              f"{percentile(ok, .99):>8.2f} {max(ok):>8.2f}")
    for ours in ("spa-capture", "spa-udp"):
        for theirs in ("fwknopd-udp", "fwknopd-pcap"):
            if ours in medians and theirs in medians:
                print(f"p50 {theirs} / {ours}: {medians[theirs] / medians[ours]:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
