"""Valid-packet throughput (issue 6, benchmark 3), spa-server beside fwknopd.

For each server and each offered rate: a fresh pair of namespaces, the server
with a TCP service on port 22 behind its firewall, and from the client
namespace a burst of freshly made valid knocks (every one with its own nonce,
from --clients enrolled clients, every one from its own source address so
that each is a new grant), sent at the offered rate by benchmarks/flood.c
(raw socket, one source address per packet, sources in 10.208.0.0/12).

Reported per rate: packets offered per second (what the sender reached),
packets the server accepted and the rate at which it accepted them
(verifications/s, from first to last acceptance), the grants that reached the
kernel's firewall and their rate (grants/s), refusals by reason, and the
kernel's drops on the knock socket (udp modes).  spa-server's figures come
from its event store (one row per acceptance and per lease start, time-stamped
by the server) and are checked against the elements in its nftables sets;
fwknopd's from polling its iptables chain (it logs nothing countable), so
its rate is the grants it made per second.  Needs root, gcc, fwknop.

    .venv/bin/python benchmarks/bench_throughput.py [--rates 1000,5000,...] [--seconds 2]
    .venv/bin/python benchmarks/bench_throughput.py --close   # verification without grants
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_flood import compile_flood, servers_to_run, udp_drops
from bench_latency import KNOCK_PORT, SERVER, Site, fwknop_packets, launch_fwknopd

from spa.core.uri import parse
from spa.core.wire import NONCE_SIZE, Action
from spa.server import admin
from spa.server.events import EVENTS_DB, Event, read_events
from spa_client import knock

SPOOFED = ipaddress.ip_network("10.208.0.0/12")  # one source per packet
FWKNOP_MAX = 400  # fwknop makes one packet per process: bounded by the time it takes


@dataclass
class Point:
    server: str
    rate: int  # asked of the sender, packets/s
    sent: int
    offered: float  # what the sender reached, packets/s
    accepted: int | None  # knocks the server verified and accepted
    verify_rate: float | None  # acceptances per second, first to last
    granted: int  # grants in the kernel's firewall afterwards
    grant_rate: float | None  # grants per second, first to last
    refused: dict[str, int]
    drops: int | None  # the knock socket's kernel drops (udp modes)


def drops_between(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


def sources(count: int) -> list[bytes]:
    base = int(SPOOFED.network_address) + 256
    return [(base + i).to_bytes(4, "big") for i in range(count)]


def write_records(path: Path, packets: list[tuple[bytes, bytes]]) -> None:
    path.write_bytes(b"".join(source + payload for source, payload in packets))


def send(site: Site, flood: Path, records: Path, rate: float, seconds: float) -> float:
    """Send every record once at `rate`; the offered rate the sender reached."""
    done = site.cli.run(str(flood), "-f", str(records), "-r", str(rate), "-1",
                        SERVER, str(KNOCK_PORT), str(seconds * 10 + 10), timeout=seconds * 10 + 60)
    count, took = done.stdout.split()[1], done.stdout.split()[4]
    return int(count) / float(took)


def prepare_site(root: Path) -> Site:
    site = Site(root, 0)
    site.srv.run("ip", "route", "add", str(SPOOFED), "dev", site.srv_if)
    return site


def spa_point(root: Path, flood: Path, mode: str, clients: int, rate: int,
              seconds: float, action: Action = Action.OPEN) -> Point:
    count = int(rate * seconds)
    site = prepare_site(root)
    try:
        config = root / "server.toml"
        admin.init(config, listen_port=KNOCK_PORT, backend="nftables",
                   state_dir=root / "state", force=True)
        config.write_text(config.read_text().replace('mode = "capture"', f'mode = "{mode}"'))
        uris = [parse(admin.enroll(config, f"c{i}", ["ssh"], SERVER)) for i in range(clients)]
        program = Path(sys.executable).parent / "spa-server"
        server = site.srv.popen([str(program), "--config", str(config), "run"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        site.procs.append(server)
        time.sleep(2.0)
        now = time.time()
        packets = [(source, knock.make_packet(uris[i % clients], action, "ssh",
                                              duration=60 if action is Action.OPEN else 0,
                                              address=None, now=now,
                                              nonce=os.urandom(NONCE_SIZE)))
                   for i, source in enumerate(sources(count))]
        records = root / "records"
        write_records(records, packets)
        drops_before = udp_drops(site.srv, KNOCK_PORT)
        started = time.time()
        offered = send(site, flood, records, rate, seconds)
        events = wait_for_events(root / "state" / EVENTS_DB, started, count)
        drops_after = udp_drops(site.srv, KNOCK_PORT)
        accepted = sorted(e.time for e in events if e.outcome == "accepted")
        leases = sorted(e.time for e in events if e.outcome == "lease_start")
        refused = Counter[str]()
        for event in events:
            if event.outcome == "refused" and event.reason:
                refused[event.reason] += event.count
        granted = nft_elements(site)
        assert granted == len(leases), f"{granted} set elements for {len(leases)} lease starts"
        name = f"spa-{mode}" + ("" if action is Action.OPEN else " (close)")
        return Point(name, rate, count, offered, len(accepted), per_second(accepted),
                     granted, per_second(leases), dict(refused),
                     drops_between(drops_before, drops_after))
    finally:
        site.close()


def wait_for_events(path: Path, since: float, expected: int) -> list[Event]:
    """The server's events since `since`, once the accepted count stops growing."""
    last, stable_since = -1, time.monotonic()
    while True:
        time.sleep(0.5)
        events = read_events(path, since=since)
        done = sum(1 for e in events if e.outcome in ("accepted", "refused"))
        if done != last:
            last, stable_since = done, time.monotonic()
        elif done >= expected or time.monotonic() - stable_since > 3:
            return events


def per_second(times: list[float]) -> float | None:
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def nft_elements(site: Site) -> int:
    done = site.srv.run("nft", "-j", "list", "set", "inet", "spa", "svc_ssh_v4")
    for item in json.loads(done.stdout)["nftables"]:
        if "set" in item:
            return len(item["set"].get("elem", []))
    return 0


def fwknop_point(root: Path, mode: str, rate: int,
                 seconds: float) -> Point:
    count = min(int(rate * seconds), FWKNOP_MAX)
    site = prepare_site(root)
    try:
        _, keys = launch_fwknopd(site, mode)
        chosen = sources(count)
        packets = list(zip(chosen, fwknop_packets(
            site, keys, [str(ipaddress.IPv4Address(s)) for s in chosen]), strict=True))
        # fwknop's packets are base64 text of varying length, which flood.c
        # (fixed 161-byte payloads) does not send: a paced Python sender does
        drops_before = udp_drops(site.srv, KNOCK_PORT)
        started = time.monotonic()
        offered = send_python(site, root, packets, rate)
        grants, took = wait_for_rules(site, count, started)
        drops_after = udp_drops(site.srv, KNOCK_PORT)
        return Point(f"fwknopd-{mode}", rate, count, offered, None, None, grants,
                     grants / took if grants and took else None, {},
                     drops_between(drops_before, drops_after))
    finally:
        site.close()


SENDER = """
import json, socket, sys, time
spec = json.load(open(sys.argv[1]))
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
start = time.perf_counter()
for i, (src, payload) in enumerate(spec["packets"]):
    due = start + i / spec["rate"]
    while time.perf_counter() < due:
        pass
    body = bytes.fromhex(payload)
    udp = (40000 + i).to_bytes(2, "big") + spec["port"].to_bytes(2, "big") + \\
        (8 + len(body)).to_bytes(2, "big") + bytes(2)
    ip = bytes([0x45, 0]) + (28 + len(body)).to_bytes(2, "big") + bytes(4) + bytes([64, 17]) + \\
        bytes(2) + socket.inet_aton(src) + socket.inet_aton(spec["server"])
    raw.sendto(ip + udp + body, (spec["server"], 0))
print(len(spec["packets"]) / (time.perf_counter() - start))
"""


def send_python(site: Site, root: Path, packets: list[tuple[bytes, bytes]], rate: int) -> float:
    spec = root / "send.json"
    spec.write_text(json.dumps({"server": SERVER, "port": KNOCK_PORT, "rate": rate, "packets": [
        [str(ipaddress.IPv4Address(s)), p.hex()] for s, p in packets]}))
    done = site.cli.run(sys.executable, "-c", SENDER, str(spec), timeout=120)
    return float(done.stdout)


def wait_for_rules(site: Site, expected: int, started: float) -> tuple[int, float]:
    """Poll fwknopd's chain until its ACCEPT count stops growing."""
    last, last_change = 0, started
    while True:
        rules = site.srv.run("iptables", "-S", "FWKNOP_INPUT", check=False).stdout
        count = rules.count("-j ACCEPT")
        now = time.monotonic()
        if count != last:
            last, last_change = count, now
        elif count >= expected or now - last_change > 5:
            return last, last_change - started
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="1000,5000,10000,20000,40000")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each burst")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--close", action="store_true",
                        help="spa-server only: valid 'close' knocks for leases nobody holds, "
                        "so the server verifies and records each but changes no firewall "
                        "state (its verification rate without grants)")
    parser.add_argument("--fwknop-rates", default="100,1000")
    parser.add_argument("--only", default="spa-capture,spa-udp,fwknopd-udp,fwknopd-pcap")
    args = parser.parse_args()
    chosen = servers_to_run("bench_throughput", args.only, spa_only=args.close)
    if chosen is None:
        return 2
    build = Path(tempfile.mkdtemp(prefix="spa-bench-bin-"))
    flood = compile_flood(build)
    rows = []
    try:
        for name in chosen:
            kind, mode = name.split("-", 1)
            rates = args.rates if kind == "spa" else args.fwknop_rates
            for rate in (int(r) for r in rates.split(",") if r):
                root = Path(tempfile.mkdtemp(prefix="spa-bench-"))
                root.chmod(0o711)  # the daemon runs as a service user: it must get through
                try:
                    if kind == "spa":
                        rows.append(spa_point(root, flood, mode, args.clients, rate,
                                              args.seconds,
                                              Action.CLOSE if args.close else Action.OPEN))
                    else:
                        rows.append(fwknop_point(root, mode, rate, args.seconds))
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                print(json.dumps(asdict(rows[-1])), file=sys.stderr)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    print(f"valid knocks, each a new grant, bursts of {args.seconds:g} s per rate")
    print(f"{'server':<13} {'rate':>6} {'offered/s':>9} {'sent':>6} {'accepted':>8} "
          f"{'verif/s':>8} {'granted':>7} {'grants/s':>8} {'drops':>6}  refused")
    for row in rows:
        def num(value: object) -> str:
            return "-" if value is None else f"{value:,.0f}"
        refused = ", ".join(f"{k} {v}" for k, v in row.refused.items()) or "-"
        print(f"{row.server:<13} {row.rate:>6} {num(row.offered):>9} {row.sent:>6} "
              f"{num(row.accepted):>8} {num(row.verify_rate):>8} {num(row.granted):>7} "
              f"{num(row.grant_rate):>8} {num(row.drops):>6}  {refused}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
