"""Junk flood (issue 6, benchmark 1), spa-server beside fwknopd.

For each server: fresh namespaces (server, client, attacker); a TCP service
on port 22 behind the server's firewall.  The attacker namespace runs
benchmarks/flood.c (sendmmsg, one core) sending knock-shaped junk (161 random
bytes, version byte 1) at the knock port for --seconds, while the client
knocks every 100 ms, each knock from its own address.  Reported: packets
offered per second, knocks granted and their knock-to-open latency during
the flood, the server's CPU while idle and while flooded, and (udp modes) the
kernel's drops on the knock socket.  Needs root and gcc.

    .venv/bin/python benchmarks/bench_flood.py [--seconds 10] [--only spa-capture,...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_latency import (
    ATTACKER_SERVER,
    HERE,
    KNOCK_PORT,
    Site,
    percentile,
    start_fwknopd,
    start_spa,
)

from spa.netns import Namespace, can_make_namespaces

INTERVAL = 0.1  # seconds between legitimate knocks
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def udp_drops(ns: Namespace, port: int) -> int | None:
    """The kernel's drop counter for the socket bound to `port` (udp mode)."""
    hex_port = f":{port:04X}"
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        for line in ns.run("cat", name, check=False).stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[1].endswith(hex_port):
                return int(fields[-1])
    return None


def compile_flood(directory: Path) -> Path:
    """benchmarks/flood.c compiled into `directory`."""
    program = directory / "flood"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(program), str(HERE / "flood.c")],
                   check=True)
    return program


def starter(name: str) -> tuple[str, object]:
    kind, mode = name.split("-", 1)
    return mode, start_spa if kind == "spa" else start_fwknopd


def run_one(name: str, seconds: float, flood: Path) -> dict[str, object]:
    knocks_wanted = int((seconds - 2) / INTERVAL)
    root = Path(tempfile.mkdtemp(prefix="spa-flood-"))
    site = Site(root, knocks_wanted, attacker=True)
    try:
        mode, start = starter(name)
        server, knocks = start(site, knocks_wanted, mode)  # type: ignore[operator]
        assert isinstance(server, subprocess.Popen)
        idle_before = cpu_seconds(server.pid)
        time.sleep(3)
        idle = (cpu_seconds(server.pid) - idle_before) / 3
        drops_before = udp_drops(site.srv, KNOCK_PORT)
        sender = site.att.popen([str(flood), ATTACKER_SERVER, str(KNOCK_PORT), str(seconds)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        busy_before, t0 = cpu_seconds(server.pid), time.monotonic()
        time.sleep(1)  # let the flood reach full rate
        results = site.probe(knocks, interval=INTERVAL, timeout=1.0)
        out, _ = sender.communicate(timeout=seconds + 30)
        busy = (cpu_seconds(server.pid) - busy_before) / (time.monotonic() - t0)
        drops_after = udp_drops(site.srv, KNOCK_PORT)
        match = re.search(r"sent (\d+) packets in ([0-9.]+) s", out)
        offered = int(match.group(1)) / float(match.group(2)) if match else 0.0
        ok = [r for r in results if r is not None]
        return {
            "server": name, "offered_pps": offered, "knocks": len(results),
            "granted": len(ok), "p50": statistics.median(ok) if ok else None,
            "p99": percentile(ok, 0.99) if ok else None, "cpu_idle": idle, "cpu_flood": busy,
            "drops": None if drops_before is None or drops_after is None
            else drops_after - drops_before,
        }
    finally:
        site.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--only", default="spa-capture,spa-udp,fwknopd-udp,fwknopd-pcap")
    args = parser.parse_args()
    reason = can_make_namespaces()
    if reason is not None or shutil.which("gcc") is None:
        print(f"bench_flood: {reason or 'needs gcc'}", file=sys.stderr)
        return 2
    build = Path(tempfile.mkdtemp(prefix="spa-flood-bin-"))
    flood = compile_flood(build)
    chosen = [n for n in args.only.split(",") if n]
    if shutil.which("fwknopd") is None:
        chosen = [n for n in chosen if not n.startswith("fwknopd")]
    rows = [run_one(name, args.seconds, flood) for name in chosen]
    shutil.rmtree(build, ignore_errors=True)
    print(f"junk flood for {args.seconds:g} s, a legitimate knock every {INTERVAL * 1000:.0f} ms")
    print(f"{'server':<13} {'offered/s':>10} {'granted':>9} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'cpu idle':>8} {'cpu flood':>9} {'drops':>8}")
    for row in rows:
        def ms(value: object) -> str:
            return "-" if value is None else f"{value:.2f}"
        print(f"{row['server']:<13} {row['offered_pps']:>10,.0f} "
              f"{row['granted']:>4}/{row['knocks']:<4} {ms(row['p50']):>7} {ms(row['p99']):>7} "
              f"{row['cpu_idle']:>8.1%} {row['cpu_flood']:>9.1%} "
              f"{'-' if row['drops'] is None else row['drops']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
