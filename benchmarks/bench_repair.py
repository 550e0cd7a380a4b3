"""How long the gate is away when another program takes it (issue 12).

For each backend, in a fresh network namespace: a real `spa-server run`
holding one live lease, then ROUNDS times another program removes the gate
and we time until it is back, from a measuring process in the same
namespace:

- nftables: a flush of the ruleset (by libnftables in a process, or by the
  `nft` program as `systemctl restart nftables` runs it), timed
  from the flush's commit to the daemon's commit that brings `inet spa`
  back (the kernel names the committing thread), both seen on the kernel's
  notification socket.  Also checked at
  every round: the daemon's owned hold table `inet spa_hold` was never gone
  (so the ports were never open, whatever the window).
- iptables (legacy): `iptables-legacy -F`, timed from the flush to the jump
  from INPUT to SPA being back (read with python-iptables every 2 ms).

Needs root.  Prints p50, p90, p99 and max per backend.

    .venv/bin/python benchmarks/bench_repair.py [--rounds 100] [--only nftables,iptables]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spa.core.uri import parse
from spa.core.wire import NONCE_SIZE, Action
from spa.netns import Topology, can_make_namespaces
from spa.server import admin
from spa.server.logline import event_of
from spa_client import knock

SERVER, CLIENT = "10.203.0.1", "10.203.0.2"
KNOCK_PORT = 62201

MEASURE = r"""
import json, os, subprocess, sys, time
rounds, backend, pid = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
out = []
if backend.startswith("nftables"):
    from spa.backends.libnft import LibNft
    from spa.backends.nftwatch import NftWatch
    nft, watch = LibNft(), NftWatch()
    for _ in range(rounds):
        flusher = None
        if backend == "nftables-program":  # what `nft -f /etc/nftables.conf` does
            flusher = subprocess.Popen(["nft", "flush", "ruleset"])
        else:
            nft.run({"nftables": [{"flush": {"ruleset": None}}]})
        flushed = restored = None
        while restored is None:
            for commit in watch.wait(5) or []:
                now = time.perf_counter()
                if flushed is None and any(c.what == "table" and c.deleted and
                                           c.table == "spa" for c in commit.changes):
                    flushed = now
                elif os.path.isdir(f"/proc/{pid}/task/{commit.pid}") and any(
                        c.what == "table" and not c.deleted and c.table == "spa"
                        for c in commit.changes):
                    restored = now
        if flusher is not None:
            flusher.wait()
        # text, not JSON: nft before 1.0.9 prints an owned table's flags from freed memory
        names = {line.split()[2] for line in nft.list_text("list tables").splitlines()
                 if line.startswith("table ")}
        out.append({"ms": (restored - flushed) * 1000, "hold": "spa_hold" in names})
        time.sleep(0.05)
else:
    import iptc
    def jumped():
        table = iptc.Table(iptc.Table.FILTER); table.refresh()
        return any(r.target.name == "SPA" for r in iptc.Chain(table, "INPUT").rules)
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run(["iptables-legacy", "-F"], check=True)
        flushed = time.perf_counter()
        while not jumped():
            time.sleep(0.002)
        out.append({"ms": (time.perf_counter() - flushed) * 1000, "hold": False})
        time.sleep(0.05)
print(json.dumps(out))
"""


def run_backend(backend: str, rounds: int, root: Path) -> list[dict[str, object]]:
    topo = Topology()
    try:
        srv, cli = topo.ns("srv"), topo.ns("cli")
        topo.link(srv, [f"{SERVER}/24"], cli, [f"{CLIENT}/24"])
        config = root / f"{backend}.toml"
        admin.init(config, listen_port=KNOCK_PORT, backend=backend.partition("-")[0],
                   state_dir=root / f"state-{backend}", force=True)
        config.write_text(config.read_text().replace('mode = "capture"', 'mode = "udp"'))
        uri = admin.enroll(config, "bench", ["ssh"], SERVER)
        prefix: list[str] = []
        if backend == "iptables":  # as on a legacy host (tests/netns/test_iptables_e2e.py)
            bindir = root / "legacy-bin"
            bindir.mkdir(exist_ok=True)
            if not (bindir / "iptables").exists():
                (bindir / "iptables").symlink_to(shutil.which("iptables-legacy") or "")
            prefix = ["env", f"PATH={bindir}{os.pathsep}{os.environ['PATH']}"]
        program = Path(sys.executable).parent / "spa-server"
        with (root / f"{backend}.log").open("w") as log:
            server = srv.popen([*prefix, str(program), "--config", str(config), "run"],
                               stdout=log, stderr=subprocess.STDOUT)
        time.sleep(2.0)
        enrollment = parse(uri)
        packet = knock.make_packet(enrollment, Action.OPEN, "ssh", duration=3600, address=None,
                                   now=time.time(), nonce=os.urandom(NONCE_SIZE))
        cli.run(sys.executable, "-c", "import socket,sys; socket.socket(socket.AF_INET, "
                "socket.SOCK_DGRAM).sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], "
                f"{KNOCK_PORT}))", packet.hex(), SERVER)
        time.sleep(0.5)
        try:
            done = srv.run(sys.executable, "-c", MEASURE, str(rounds), backend,
                           str(server.pid), timeout=rounds * 10 + 60)
        except (subprocess.TimeoutExpired, RuntimeError):
            print((root / f"{backend}.log").read_text()[-2000:])
            raise
        server.terminate()
        server.wait(timeout=15)
        lines = [event_of(line) for line in (root / f"{backend}.log").read_text().splitlines()]
        said = [line for line in lines if line.startswith("warning firewall:") and
                "restored with" in line]
        # one line a second at most: "(and N more repairs ...)" and "N more repair(s)
        # in the last 1 s" count the rest
        restored = len(said) + sum(int(m.group(1)) for line in lines
                                   if (m := re.search(r"(\d+) more repair", line)))
        if restored != rounds:
            print(f"  note: the daemon reported {restored} repairs for {rounds} flushes")
        results: list[dict[str, object]] = json.loads(done.stdout)
        return results
    finally:
        topo.cleanup()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--only", default="nftables,nftables-program,iptables",
                        help="nftables: flushed by libnftables in a process; nftables-program: "
                        "by the nft program; iptables: iptables-legacy -F")
    args = parser.parse_args()
    reason = can_make_namespaces()
    if reason is not None:
        sys.exit(f"bench_repair: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.only.split(","):
            results = run_backend(backend, args.rounds, Path(tmp))
            ms = [float(r["ms"]) for r in results]  # type: ignore[arg-type]
            held = sum(1 for r in results if r["hold"])
            print(f"{backend:9} {len(ms)} flushes: window to restored table p50 "
                  f"{percentile(ms, 0.5):.1f} ms, p90 {percentile(ms, 0.9):.1f}, p99 "
                  f"{percentile(ms, 0.99):.1f}, max {max(ms):.1f}"
                  + (f"; hold table present after {held}/{len(ms)} flushes"
                     if backend.startswith("nftables") else ""))


if __name__ == "__main__":
    main()
