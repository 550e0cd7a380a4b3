"""The server at 10^2..10^5 clients (issue 14): start, memory, step changes.

For each client count the script builds a fresh pair of namespaces (as
bench_latency.py does), writes a config with that many clients, starts the
real spa-server (nftables backend, udp or capture mode) and measures:

- start: from launching the daemon to the first knock it judged, timed in
  the client namespace as launch to the first TCP connect that completes
  once the gate is up (port 22 answers until the daemon installs it; then
  a knock every 20 ms, each new, until port 22 opens);
- RSS of the daemon process (/proc/PID/status VmRSS) once started, and after
  the step changes below;
- the receive thread's pauses over each step, which holds one boundary
  and its rotation, while a probe client sends a knock every millisecond
  (each sealed anew and refused by policy after the MAC: it asks for another
  address; the sender never bursts to catch up), from the daemon's own
  gauges (SPA_LOG_RECEIVE_PAUSE): the longest batch handled (with the
  commands queued for the receive thread that ran before it), and the
  largest backlog (datagrams waiting at once: at 1 kHz, about the ms the
  thread could not receive, GIL waits included); each also as its 99.9th
  percentile over the step's batches (in parentheses), which one hiccup of
  a shared machine does not set;
- knock-to-open p50 over 50 knocks (bench_latency.Site.probe), each from
  its own source address.

Needs root.

    .venv/bin/python benchmarks/bench_scale.py [--counts 100,1000,10000,100000]
        [--steps 2] [--mode udp]
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
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency import KNOCK_PORT, SERVER, Site, populate, sources

from spa.core.knock import STEP_SECONDS
from spa.core.uri import parse
from spa.core.wire import NONCE_SIZE, Action
from spa.netns import can_make_namespaces
from spa.server import admin
from spa.server.daemon import PAUSE_LOG_VARIABLE
from spa_client import knock

PROBES = 50  # knock-to-open samples per client count
PROBE_RATE = 1000  # probe knocks a second during the step changes

FIRST_OPEN = """
import os, socket, sys, time
from spa.core.uri import parse
from spa.core.wire import NONCE_SIZE, Action
from spa_client import knock
uri, host, port, launched = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
enrollment = parse(uri)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
deadline = time.time() + 120


def reachable():
    tcp = socket.socket()
    tcp.settimeout(0.02)
    try:
        tcp.connect((host, 22))
        return True
    except OSError:
        return False
    finally:
        tcp.close()


while reachable() and time.time() < deadline:  # until the gate is up (the port is open before)
    time.sleep(0.005)
while time.time() < deadline:
    udp.sendto(knock.make_packet(enrollment, Action.OPEN, "ssh", duration=60, address=None,
                                 now=time.time(), nonce=os.urandom(NONCE_SIZE)), (host, port))
    if reachable():
        print(time.time() - launched)
        sys.exit(0)
print("none")
"""

PROBE_STREAM = """
import ipaddress, os, socket, sys, time
from spa.core.uri import parse
from spa.core.wire import NONCE_SIZE, Action
from spa_client import knock
uri, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
rate, seconds = int(sys.argv[4]), float(sys.argv[5])
enrollment = parse(uri)
other = ipaddress.ip_address("10.9.9.9")  # not its source: refused by policy after the MAC
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
start = time.time()
sent = 0
while time.time() - start < seconds:
    now = time.time()
    udp.sendto(knock.make_packet(enrollment, Action.OPEN, "ssh", duration=60, address=other,
                                 now=now, nonce=os.urandom(NONCE_SIZE)), (host, port))
    sent += 1
    time.sleep(max(0.0, 1 / rate - (time.time() - now)))  # never a burst to catch up
print(sent)
"""


def watch_log(path: Path, launched: float, seen: dict[str, float]) -> None:
    """Seconds from launch to the daemon's `started` line and to its first
    judged knock of the bench client (its event line, written within a
    housekeeping round, 0.2 s, of the judgement)."""
    wanted = {"started": "started port=", "judged": " client=bench "}
    deadline = time.time() + 300
    while wanted and time.time() < deadline:
        text = path.read_text()
        for key, mark in list(wanted.items()):
            if mark in text:
                seen[key] = time.time() - launched
                del wanted[key]
        time.sleep(0.005)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(count: int, steps: int, mode: str, server_path: str = "") -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="spa-scale-"))
    root.chmod(0o711)  # the daemon runs as a service user: it must get through
    site = Site(root, PROBES)
    try:
        config = root / "server.toml"
        admin.init(config, listen_port=KNOCK_PORT, backend="nftables",
                   state_dir=root / "state", force=True)
        config.write_text(config.read_text().replace('mode = "capture"', f'mode = "{mode}"'))
        uri = site.spa_uri = admin.enroll(config, "bench", ["ssh"], SERVER)
        probe_uri = admin.enroll(config, "probe", ["ssh"], SERVER)
        populate(config, count - 2)
        program = Path(sys.executable).parent / "spa-server"
        log_path = root / "spa-server.log"
        env = {**os.environ, PAUSE_LOG_VARIABLE: "1"}
        if server_path:  # another checkout's server (e.g. main, to compare)
            env["PYTHONPATH"] = server_path
        launched = time.time()
        with log_path.open("w") as log:
            server = site.srv.popen([str(program), "--config", str(config), "run"],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
        site.procs.append(server)
        seen: dict[str, float] = {}
        watcher = threading.Thread(target=watch_log, args=(log_path, launched, seen),
                                   daemon=True)
        watcher.start()
        first = site.cli.run(sys.executable, "-c", FIRST_OPEN, uri, SERVER, str(KNOCK_PORT),
                             str(launched), timeout=200).stdout.strip()
        started = float(first) if first != "none" else None
        time.sleep(1)
        rss_start = rss_mb(server.pid)
        # from the start of the next step, through `steps` boundaries
        now = time.time()
        wait = STEP_SECONDS - now % STEP_SECONDS + 0.5
        time.sleep(wait)
        seconds = steps * STEP_SECONDS + 2
        stream = site.cli.popen([sys.executable, "-c", PROBE_STREAM, probe_uri, SERVER,
                                 str(KNOCK_PORT), str(PROBE_RATE), str(seconds)],
                                stdout=subprocess.PIPE)
        out, _ = stream.communicate(timeout=seconds + 60)
        time.sleep(STEP_SECONDS - time.time() % STEP_SECONDS + 1)  # the last step's line
        rss_after = rss_mb(server.pid)
        text = log_path.read_text()
        kept = Path(tempfile.gettempdir()) / f"bench_scale-{count}.log"
        shutil.copy(log_path, kept)  # the daemon's log, for a second look
        found = re.findall(r"receive pause max ([\d.]+) ms, backlog max (\d+) .*? p99\.9 "
                           r"([\d.]+) ms backlog (\d+)", text)
        pauses = [(float(ms), int(backlog), float(ms999), int(backlog999))
                  for ms, backlog, ms999, backlog999 in found]
        knocks = [(s, knock.make_packet(parse(uri), Action.OPEN, "ssh", duration=60,
                                        address=None, now=time.time(),
                                        nonce=os.urandom(NONCE_SIZE)))
                  for s in sources(PROBES)]
        opened = [r for r in site.probe(knocks) if r is not None]
        filters = re.findall(r"^(?:udp|capture) ([^\n]*)$", text, re.M)
        return {"clients": count, "start_s": started, "started_s": seen.get("started"),
                "judged_s": seen.get("judged"), "rss_start": rss_start,
                "rss_after": rss_after, "pauses_ms": pauses[-(steps + 1):],
                "probes_sent": int(out.strip() or 0), "open_p50_ms":
                statistics.median(opened) if opened else None, "opened": len(opened),
                "filter": filters[0] if filters else "?"}
    finally:
        site.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="10,100,1000,10000,100000")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--mode", default="udp", choices=["udp", "capture"])
    parser.add_argument("--server-path", default="",
                        help="run the server from this checkout (PYTHONPATH), e.g. /work/main")
    args = parser.parse_args()
    reason = can_make_namespaces()
    if reason is not None:
        print(f"bench_scale: {reason}", file=sys.stderr)
        return 2
    print(f"spa-server at scale, {args.mode} mode, nftables; pauses: the daemon's gauge over "
          f"each step with a probe knock every {1000 / PROBE_RATE:g} ms")
    print(f"{'clients':>8} {'start s':>8} {'RSS MB start/after':>19} "
          f"{'batch ms/backlog per step: max (p99.9)':>28} {'open p50 ms':>12}  filter")
    for count in [int(c) for c in args.counts.split(",") if c]:
        row = measure(count, args.steps, args.mode, args.server_path)
        start = row["start_s"]
        pauses = " ".join(f"{ms:.1f}/{backlog} ({ms999:.1f}/{backlog999})"
                          for ms, backlog, ms999, backlog999
                          in row["pauses_ms"])  # type: ignore[attr-defined]
        p50 = row["open_p50_ms"]
        marks = " ".join(f"{key} {row[key]:.2f} s" for key in ("started_s", "judged_s")
                         if isinstance(row[key], float))
        print(f"{count:>8,} {'-' if start is None else f'{start:.2f}':>8} "
              f"{row['rss_start']:>9.1f}/{row['rss_after']:<9.1f} {pauses:>28} "
              f"{'-' if p50 is None else f'{p50:.2f}':>12}  {row['filter']}; {marks}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
