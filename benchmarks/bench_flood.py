"""Floods (issue 6, benchmarks 1, 4 and 6), spa-server beside fwknopd.

For each server: fresh namespaces (server, client, attacker); a TCP service
on port 22 behind the server's firewall.  The attacker namespace runs
benchmarks/flood.c (sendmmsg, one core) at the knock port for --seconds,
while the client knocks every 100 ms, each knock a new packet from its own
address.  What the attacker sends (--kind):
  junk    knock-shaped junk: 161 random bytes, version byte 1 (benchmark 1)
  replay  one valid knock the client sent (and was granted) before the
          flood, captured and replayed as it is (benchmark 4)
  forged  that knock's live tag with random bytes behind it: what someone
          who saw one knock can make the server check (spa-server only)
The client (--client): `new`, each knock from a new address of its
namespace (an address it never knocked from); `known`, 16 addresses it
authenticated from before the flood (one knock each, a 1 s lease), knocked
from in turn, each knock asking for a 1 s lease and an address knocking again
only 1.5 s after its last knock (so each knock needs a grant of its own).
For --kind forged the flood starts early enough in a 30 s tag step to end
inside it: the client's knocks carry the flooded tag throughout.  With
--recapture (--kind forged, --client known) the attacker captures every
step's tag instead: the flood runs for as long as --seconds asks, across tag
steps, and at each step boundary a new flood process (started ahead, waiting
for the boundary: flood -w) takes over with the new step's tag, made from the
client's enrollment, as an attacker who sees the client's first knock of each
step at once would have it.  Several kinds (--kind forged,junk) run one after
the other and print one table.
Reported: packets offered per second and in all, knocks granted during the
flood and their knock-to-open latency, the server's CPU idle and flooded
(the daemon's; with privilege separation the gate keeper's beside it),
its refusals per second (spa-server: from its event store; fwknopd: the
"Replay detected" lines it logs), the kernel's drops on the knock socket (udp
modes), and the server's resident memory before, at most during, and after
the flood (benchmark 6).  `spa-fwknop-udp` (and `-capture`) is spa-server's
compat listener for fwknop's packets (issue 15) on the knock port, knocked by
the real fwknop client, beside fwknopd.  Needs root and gcc.

    .venv/bin/python benchmarks/bench_flood.py [--kind junk[,forged]] [--seconds 10]
        [--client new|known] [--recapture] [--only spa-capture,...]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench_latency import (
    ATTACKER_SERVER,
    HERE,
    KNOCK_PORT,
    Site,
    percentile,
    start_fwknopd,
    start_spa,
    start_spa_fwknop,
)

from spa.core.knock import STEP_SECONDS, step_of, step_start
from spa.core.uri import parse
from spa.core.wire import NONCE_SIZE, Action
from spa.netns import Namespace, can_make_namespaces
from spa_client import knock

INTERVAL = 0.1  # seconds between legitimate knocks
CLIENT_PREFIX = "10.201."  # the client namespace's knock addresses (bench_latency.sources)
TICKS = os.sysconf("SC_CLK_TCK")
KNOWN_SOURCES = 16  # --client known: addresses (the limiter trusts a client's 16 most recent)
LEASE = 1  # seconds each knock asks for with --client known
REUSE = 1.5  # seconds before a known address knocks again (its last lease has ended)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def children(pid: int) -> list[int]:
    """The child processes of `pid` (spa-server's gate keeper)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def group_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def udp_drops(ns: Namespace, port: int) -> int | None:
    """The kernel's drop counter for the socket bound to `port` (udp mode)."""
    hex_port = f":{port:04X}"
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        for line in ns.run("cat", name, check=False).stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[1].endswith(hex_port):
                return int(fields[-1])
    return None


def servers_to_run(program: str, only: str, *, spa_only: bool = False) -> list[str] | None:
    """The servers named in `only` that can run here, or None (and why, on
    stderr) if nothing can: the benchmarks need namespaces and gcc."""
    reason = can_make_namespaces()
    if reason is not None or shutil.which("gcc") is None:
        print(f"{program}: {reason or 'needs gcc (bash benchmarks/setup.sh)'}", file=sys.stderr)
        return None
    chosen = [n for n in only.split(",") if n and not (spa_only and n.startswith("fwknopd"))]
    if shutil.which("fwknopd") is None and any(n.startswith("fwknopd") for n in chosen):
        print(f"{program}: fwknopd is not installed (bash benchmarks/setup.sh); "
              "measuring spa-server only", file=sys.stderr)
        chosen = [n for n in chosen if not n.startswith("fwknopd")]
    return chosen


def compile_flood(directory: Path) -> Path:
    """benchmarks/flood.c compiled into `directory`."""
    program = directory / "flood"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(program), str(HERE / "flood.c")],
                   check=True)
    return program


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    """The highest resident set size of a process, sampled every 0.1 s."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_mb(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


@dataclass
class Row:
    server: str
    kind: str
    sent: int
    offered_pps: float
    knocks: int
    granted: int
    p50: float | None
    p99: float | None
    cpu_idle: float
    cpu_flood: float
    gate_idle: float | None  # the gate keeper's (spa-server), beside the daemon's
    gate_flood: float | None
    refused_per_s: float | None
    drops: int | None
    rss_before: float
    rss_peak: float
    rss_after: float
    knocks_refused: dict[str, int]  # spa-server: its refusals of the client's knocks, by reason
    lost_at: list[float]  # each lost knock: seconds into its tag step when it was sent
    gate_rss: float | None


def refusals(site: Site, name: str, kind: str, since: float) -> int | None:
    """Refusals the server recorded since `since` (None: it does not say)."""
    if name.startswith("spa"):
        from spa.server.events import EVENTS_DB, read_events

        reasons = {"junk": {"unknown_tag", "bad_version", "bad_length", "malformed",
                            "unknown_sender", "hmac_budget", "gpg_mode"},
                   "replay": {"replay"}, "forged": {"bad_mac", "rate_limited"}}[kind]
        return sum(e.count for e in read_events(site.root / "state" / EVENTS_DB, since=since)
                   if e.outcome == "refused" and e.reason in reasons)
    if kind == "replay":
        return (site.root / "fwknopd.log").read_text(errors="replace").count("Replay detected")
    return None


def knocks_refused(site: Site, name: str, since: float) -> dict[str, int]:
    """spa-server's refusals of packets from the client namespace, by reason."""
    if not name.startswith("spa"):
        return {}
    from spa.server.events import EVENTS_DB, read_events

    found: dict[str, int] = {}
    for event in read_events(site.root / "state" / EVENTS_DB, since=since):
        if event.outcome == "refused" and (event.source or "").startswith(CLIENT_PREFIX):
            found[event.reason or "?"] = found.get(event.reason or "?", 0) + event.count
    return found


def attack_argv(flood: Path, kind: str, seconds: float,
                captured: Path | None) -> list[str]:
    argv = [str(flood)]
    if kind != "junk":
        assert captured is not None
        argv += ["-p", str(captured)] + (["-x", "9"] if kind == "forged" else [])
    return [*argv, ATTACKER_SERVER, str(KNOCK_PORT), str(seconds)]


class StepFlood:
    """--recapture: the forged flood at the current tag step's tag for
    `seconds`, one flood process per step, each started ahead of its step and
    waiting for the boundary (flood -w), so that the next takes over there
    within a few microseconds."""

    def __init__(self, site: Site, flood: Path, uri: str, seconds: float) -> None:
        self.site, self.flood, self.uri = site, flood, uri
        self.start = time.time() + 0.2
        self.end = self.start + seconds
        self.sent, self.steps = 0, 0
        self.outputs: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _template(self, step: int) -> Path:
        path = self.site.root / f"captured-{step}"
        path.write_bytes(knock.make_packet(
            parse(self.uri), Action.OPEN, "ssh", duration=LEASE, address=None,
            now=step_start(step) + 1, nonce=os.urandom(NONCE_SIZE)))
        return path

    def _launch(self, begin: float) -> subprocess.Popen[str]:
        step = step_of(begin)
        until = min(self.end, step_start(step + 1))
        self.steps += 1
        return self.site.att.popen(
            [str(self.flood), "-p", str(self._template(step)), "-x", "9",
             "-w", f"{begin:.6f}", ATTACKER_SERVER, str(KNOCK_PORT), f"{until - begin:.6f}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def _run(self) -> None:
        begin = self.start
        current = self._launch(begin)
        while True:
            begin = step_start(step_of(begin) + 1)
            if begin >= self.end:
                break
            time.sleep(max(0.0, begin - 1.0 - time.time()))  # launch the next 1 s ahead
            following = self._launch(begin)
            self._collect(current)
            current = following
        self._collect(current)

    def _collect(self, process: subprocess.Popen[str]) -> None:
        out, _ = process.communicate(timeout=STEP_SECONDS + 30)
        self.outputs.append(out)
        match = re.search(r"sent (\d+) packets", out)
        self.sent += int(match.group(1)) if match else 0

    def wait(self) -> str:
        """The flood's last line, "sent N packets in S s", over all its steps."""
        self._thread.join(timeout=self.end - time.time() + STEP_SECONDS + 30)
        return f"sent {self.sent} packets in {self.end - self.start:.2f} s"


def align_to_step(seconds: float) -> None:
    """Wait, if need be, for a tag step with room for the idle reading (3 s),
    the flood's ramp (1 s) and the flood."""
    left = STEP_SECONDS - time.time() % STEP_SECONDS
    if left < seconds + 6:
        time.sleep(left + 0.2)


def run_one(name: str, kind: str, seconds: float, flood: Path, client: str,
            recapture: bool = False, clients: int = 1) -> Row:
    knocks_wanted = int((seconds - 2) / INTERVAL)
    known = client == "known"
    recapture = recapture and kind == "forged"
    count = KNOWN_SOURCES if known else knocks_wanted + 1
    root = Path(tempfile.mkdtemp(prefix="spa-flood-"))
    root.chmod(0o711)  # the daemon runs as a service user: it must get through
    site = Site(root, count, attacker=True)
    try:
        mode, start = starter(name, clients)
        server, knocks = start(site, count, mode)
        captured = None
        if known:  # every address authenticates first (its 1 s lease ends before the flood)
            primed = site.probe(knocks, fresh=True, duration=LEASE, timeout=5.0)
            assert all(r is not None for r in primed), "a priming knock did not open"
            plan = [knocks[i % count] for i in range(knocks_wanted)]
            if kind == "forged" and not recapture:  # the packet of the step the flood runs in
                align_to_step(seconds)
                assert site.spa_uri is not None
                captured = root / "captured"
                captured.write_bytes(knock.make_packet(
                    parse(site.spa_uri), Action.OPEN, "ssh", duration=LEASE, address=None,
                    now=time.time(), nonce=os.urandom(NONCE_SIZE)))
        else:
            if kind != "junk":  # the client's knock, granted, then captured
                assert site.probe(knocks[-1:], timeout=5.0)[0] is not None, \
                    "the knock did not open"
                captured = root / "captured"
                captured.write_bytes(knocks[-1][1])
            plan = knocks[:-1]
        gate = children(server.pid) if name.startswith("spa") else []
        idle_before, gate_before = cpu_seconds(server.pid), group_cpu(gate)
        time.sleep(3)
        idle = (cpu_seconds(server.pid) - idle_before) / 3
        gate_idle = (group_cpu(gate) - gate_before) / 3
        rss_before = rss_mb(server.pid)
        drops_before = udp_drops(site.srv, KNOCK_PORT)
        sampler = RssSampler(server.pid)
        stepped: StepFlood | None = None
        if recapture:
            assert site.spa_uri is not None
            stepped = StepFlood(site, flood, site.spa_uri, seconds)
            flood_started = stepped.start
            time.sleep(max(0.0, flood_started - time.time()))
        else:
            flood_started = time.time()
            sender = site.att.popen(attack_argv(flood, kind, seconds, captured),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        busy_before, t0 = cpu_seconds(server.pid), time.monotonic()
        gate_busy_before = group_cpu(gate)
        time.sleep(1)  # let the flood reach full rate
        # only knocks sent while the flood lasts count (one that times out
        # delays the next by up to a second)
        sent_at: list[float] = []
        results = site.probe(plan, interval=INTERVAL, timeout=1.0,
                             fresh=name.startswith("spa") and "fwknop" not in name,
                             until=flood_started + seconds - 1,
                             duration=LEASE if known else 60,
                             reuse_after=REUSE if known else 0.0, sent_at=sent_at)
        if stepped is not None:
            out = stepped.wait()
        else:
            out, _ = sender.communicate(timeout=seconds + 30)
        took_cpu = time.monotonic() - t0
        busy = (cpu_seconds(server.pid) - busy_before) / took_cpu
        gate_busy = (group_cpu(gate) - gate_busy_before) / took_cpu
        rss_peak = sampler.stop()
        gate_rss = max((rss_mb(pid) for pid in gate), default=None)
        drops_after = udp_drops(site.srv, KNOCK_PORT)
        time.sleep(2)  # let the server write its events
        rss_after = rss_mb(server.pid)
        match = re.search(r"sent (\d+) packets in ([0-9.]+) s", out)
        sent, took = (int(match.group(1)), float(match.group(2))) if match else (0, 1.0)
        refused = refusals(site, name, kind, flood_started)
        ok = [r for r in results if r is not None]
        return Row(name, kind, sent, sent / took, len(results), len(ok),
                   statistics.median(ok) if ok else None,
                   percentile(ok, 0.99) if ok else None, idle, busy,
                   gate_idle if gate else None, gate_busy if gate else None,
                   None if refused is None else refused / took,
                   None if drops_before is None or drops_after is None
                   else drops_after - drops_before,
                   rss_before, max(rss_peak, rss_before), rss_after,
                   knocks_refused(site, name, flood_started),
                   [at % STEP_SECONDS for at, r in zip(sent_at, results, strict=True)
                    if r is None],
                   gate_rss)
    finally:
        site.close()
        shutil.rmtree(root, ignore_errors=True)


Starter = Callable[[Site, int, str], tuple[subprocess.Popen[str], list[tuple[str, bytes]]]]


def starter(name: str, clients: int = 1) -> tuple[str, Starter]:
    """The server's mode and its start; spa-server with `clients` enrolled
    in all (the bench client and clients - 1 others in its store)."""
    kind, mode = name.split("-", 1)
    if kind != "spa":
        return mode, start_fwknopd
    if mode.startswith("fwknop-"):  # our compat listener for fwknop's packets (issue 15)
        return mode.removeprefix("fwknop-"), start_spa_fwknop
    return mode, functools.partial(start_spa, others=clients - 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="junk",
                        help="junk, replay, forged, or several: forged,junk")
    parser.add_argument("--client", default="new", choices=["new", "known"])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--recapture", action="store_true",
                        help="--kind forged: flood each tag step's tag in turn, for the "
                             "whole of --seconds (needs --client known)")
    parser.add_argument("--only", default="spa-capture,spa-udp,fwknopd-udp,fwknopd-pcap")
    parser.add_argument("--clients", type=int, default=1,
                        help="clients enrolled on spa-server in all (issue 14: 100000); "
                             "the others go into its store before it starts")
    args = parser.parse_args()
    kinds = args.kind.split(",")
    if not set(kinds) <= {"junk", "replay", "forged"} or (
            args.client == "known" and "replay" in kinds):
        parser.error("--kind: junk, replay or forged, comma-separated (--client known: "
                     "junk and forged)")
    if args.recapture and (args.client != "known" or "forged" not in kinds):
        parser.error("--recapture: with --kind forged and --client known")
    chosen = servers_to_run("bench_flood", args.only,
                            spa_only=kinds == ["forged"])  # fwknopd has no tag: junk
    if chosen is None:
        return 2
    build = Path(tempfile.mkdtemp(prefix="spa-flood-bin-"))
    try:
        flood = compile_flood(build)
        rows = [run_one(name, kind, args.seconds, flood, args.client, args.recapture,
                        args.clients)
                for kind in kinds for name in chosen
                if not (kind == "forged" and name.startswith("fwknopd"))]
    finally:
        shutil.rmtree(build, ignore_errors=True)
    print(f"{args.kind} flood for {args.seconds:g} s, a legitimate knock every "
          f"{INTERVAL * 1000:.0f} ms, client from {args.client} addresses, "
          f"{args.clients:,} client(s) enrolled on spa-server"
          + (", forged tag recaptured every step" if args.recapture else ""))
    print(f"{'kind':<7} {'server':<13} {'sent':>10} {'offered/s':>10} {'granted':>11} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'cpu idle':>8} {'cpu flood':>9} {'refused/s':>9} "
          f"{'drops':>9} {'RSS MB before/peak/after':>24}")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for row in rows:
        refused = "-" if row.refused_per_s is None else f"{row.refused_per_s:,.0f}"
        rss = f"{row.rss_before:.1f}/{row.rss_peak:.1f}/{row.rss_after:.1f}"
        print(f"{row.kind:<7} {row.server:<13} {row.sent:>10,} {row.offered_pps:>10,.0f} "
              f"{row.granted:>5}/{row.knocks:<5} {ms(row.p50):>7} {ms(row.p99):>7} "
              f"{row.cpu_idle:>8.1%} {row.cpu_flood:>9.1%} {refused:>9} "
              f"{'-' if row.drops is None else f'{row.drops:,}':>9} {rss:>24}")
        if row.gate_idle is not None and row.gate_flood is not None:
            print(f"  {row.kind} {row.server}: gate keeper cpu idle {row.gate_idle:.1%}, "
                  f"flooded {row.gate_flood:.1%}, RSS {row.gate_rss or 0:.1f} MB")
        if row.knocks_refused:
            print(f"  {row.server}: the client's knocks refused: {row.knocks_refused}")
        if row.lost_at:
            print(f"  {row.kind} {row.server}: knocks lost, sent this many seconds into "
                  f"their tag step: {', '.join(f'{t:.2f}' for t in sorted(row.lost_at))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
