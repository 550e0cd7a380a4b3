"""Fuzz the live server (issue 13): mutated packets against the real
`spa-server run`, nftables backend, in namespaces this script makes.

For each mode (capture, then udp; or --mode): fresh namespaces (server,
client, attacker), a config made with the CLI (init, enroll, rotate, revoke;
allow_other_address set through clients export/import), six clients: `plain`, `coded`
(--otp), `anywhere` (allow_other_address), `rotated` (its old secret kept by
the attacker), `revoked`, `expired` (--expires 1s, never used).  The client
namespace sends the ledger's knocks (benchmarks/fuzz_packets.py: fresh,
unmutated, each once from the client's own address; first one from every
address before the flood, then one per client per chunk during it); the
attacker namespace sends the fuzz, in chunks of --rate x 1 s, from a raw
socket so that each datagram has its own source address, forged ones
included (benchmarks/fuzz_send.c, compiled here with gcc; sendmmsg).  Every
mutation class of fuzz_packets is in the mix: random bytes, bit flips in
every region, cuts and extensions, a live tag before random bytes, stale and
future times, step mismatches, another server's id (keys, or AAD), bodies
that do not parse, a rotated-out key, revoked and expired clients, forbidden
services and addresses, missing, wrong and used codes, replays of knocks the
server accepted (from their own address and from elsewhere), fresh knocks
from forged sources.  The run stops at --count datagrams or after --seconds,
whichever comes first (the report says which).

Read afterwards, through public behaviour only: the event store
(`spa-server events --json`) and the server's log (its standard output).
Reported per mode: datagrams sent and the rate, what the process judged (its
refusals by reason), accepted against the ledger, every acceptance the ledger
does not hold (a failure, printed), every `error` line of the log, the
resident memory (VmRSS) of both processes (the daemon and its child, the gate
keeper) before the fuzz, at most during it (sampled every 0.1 s) and after it.
Exit 0 only if, in every mode, nothing was wrongly accepted, the log has no
error, the server kept running and stopped cleanly, every knock of the
warm-up was accepted (a server that refuses everything proves nothing), and
memory stayed flat: after <= before + 10 MB for each process (--rss-margin;
the daemon's bounded tables fill under this mix, about 4 MB at 10^6
datagrams: a leak of 6 bytes per datagram on top would still pass it at
10^6, 7 would not).  "mid" is the highest RSS in the fuzz's first half:
after - mid is how much the second half added.
Needs root and gcc.

    .venv/bin/python benchmarks/fuzz_live.py [--mode both] [--count 1000000] [--seconds 300]
        [--rate 50000] [--seed N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from bench_flood import udp_drops
from fuzz_packets import Cast, Client, Datagram, Fuzzer, Grant, Knock, client

from spa.core.uri import parse
from spa.netns import Namespace, Topology, can_make_namespaces
from spa.server.logline import event_of

HERE = Path(__file__).resolve().parent
KNOCK_PORT = 62201
SERVER, CLIENT = "10.203.0.1", "10.203.0.2"  # the client's link (a /16)
SERVER_ATT = "10.204.0.1"  # the attacker's link (a /24)
ATTACKER = tuple(f"10.204.0.{i}" for i in range(2, 18))  # assigned in the attacker ns
SAME_LINK = tuple(f"10.204.0.{i}" for i in range(100, 200))  # unassigned, forged
OFF_PATH = tuple(f"198.51.100.{i}" for i in range(1, 255))  # no route back, forged
SPARE = tuple(f"10.203.9.{i}" for i in range(1, 33))  # the client ns's, never knocking
CHUNK_SECONDS = 1.0  # a chunk is what --rate sends in this time
UNPACED_CHUNK = 50_000  # datagrams per chunk with --rate 0
REPLAYABLE = 64  # the most recent accepted ledger knocks kept for replays
SETTLE = 3.0  # seconds after the fuzz before reading memory and events
RSS_MARGIN_MB = 10.0  # flat: after <= before + this, for each process (the daemon's
# tables are bounded, not small: the limiter's trusted pairs, up to 65,536, alone can
# hold about 10 MB; docs/benchmarks.md, "Live fuzz")
SERVICES = ("ssh", "https")  # the server's; clients may open ssh only


def program() -> list[str]:
    script = Path(sys.executable).parent / "spa-server"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from spa.cli import main; main()"]


def cli(config: Path, *args: str) -> str:
    """Run one spa-server command; its output.  Raises RuntimeError."""
    done = subprocess.run([*program(), "--config", str(config), *args], capture_output=True,
                          text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"spa-server {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


# ---- the place ----------------------------------------------------------------


class Site:
    """Server, client and attacker namespaces, removed by close()."""

    def __init__(self, addresses: list[str]) -> None:
        self.topo = Topology()
        try:
            self.srv, self.cli, self.att = (self.topo.ns(r) for r in ("srv", "cli", "att"))
            _, cli_if = self.topo.link(self.srv, [f"{SERVER}/16"], self.cli, [f"{CLIENT}/16"])
            _, att_if = self.topo.link(self.srv, [f"{SERVER_ATT}/24"], self.att,
                                       [f"{ATTACKER[0]}/24"])
            add_addresses(self.cli, cli_if, [*addresses, *SPARE], 16)
            add_addresses(self.att, att_if, list(ATTACKER[1:]), 24)
        except BaseException:
            self.topo.cleanup()
            raise

    def close(self) -> None:
        self.topo.cleanup()


def add_addresses(ns: Namespace, ifname: str, addresses: list[str], prefix: int) -> None:
    batch = "".join(f"addr add {a}/{prefix} dev {ifname}\n" for a in addresses)
    subprocess.run(ns.argv("ip", "-batch", "-"), input=batch, text=True, check=True,
                   capture_output=True, timeout=60)


# ---- the server -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    config: Path
    cast: Cast


def configure(root: Path, mode: str) -> Setup:
    """The config, made with the CLI, and who is who."""
    config = root / "server.toml"
    cli(config, "init", "--listen-port", str(KNOCK_PORT), "--backend", "nftables",
        "--state-dir", str(root / "state"),
        *(a for s in SERVICES for a in ("--service", s)))
    text = config.read_text()
    config.write_text(re.sub(r'(?m)^mode = "\w+"', f'mode = "{mode}"', text))

    def enroll(name: str, *extra: str) -> str:
        return cli(config, "enroll", name, "--service", "ssh", "--endpoint", SERVER, *extra)

    uris = {name: first_uri(enroll(name, *extra)) for name, extra in (
        ("plain", ()), ("anywhere", ()), ("rotated", ()), ("revoked", ()),
        ("expired", ("--expires", "1s")))}
    coded_out = enroll("coded", "--otp")
    uris["coded"] = first_uri(coded_out)
    otp_secret = parse_qs(urlparse(re.findall(r"otpauth://\S+", coded_out)[0]).query
                          )["secret"][0]
    old = uris["rotated"]
    uris["rotated"] = first_uri(cli(config, "rotate", "rotated"))
    cli(config, "revoke", "revoked")
    allow_other(config, "anywhere")
    window = float(tomllib.loads(config.read_text())["server"].get("window", 30))
    e = {name: parse(uri) for name, uri in uris.items()}
    server_id = e["plain"].server_id
    other_id = bytes(b ^ 0x5A for b in server_id)
    addresses = client_addresses()

    def make(name: str, addresses: tuple[str, ...] = (), otp_secret: str = "",
             allow_other: bool = False) -> Client:
        return client(name, e[name].secret, server_id, "ssh", addresses=addresses,
                      otp_secret=otp_secret, allow_other=allow_other)

    live = (make("plain", addresses=addresses["plain"]),
            make("coded", addresses=addresses["coded"], otp_secret=otp_secret),
            make("anywhere", addresses=addresses["anywhere"], allow_other=True),
            make("rotated", addresses=addresses["rotated"]))
    cast = Cast(server_id, live, make("revoked"), make("expired"),
                client("rotated", parse(old).secret, server_id, "ssh"),
                client("plain", e["plain"].secret, other_id, "ssh"), other_id,
                forbidden_service="https", attacker=ATTACKER, same_link=SAME_LINK,
                off_path=OFF_PATH, spare=SPARE, window=window)
    return Setup(config, cast)


def client_addresses() -> dict[str, tuple[str, ...]]:
    """Each live client's own addresses in the client namespace (the coded
    client knocks once per 30 s code step: one address, trusted at warm-up)."""
    sizes = {"plain": 4, "coded": 1, "anywhere": 4, "rotated": 4}
    return {name: tuple(f"10.203.{1 + i}.{j}" for j in range(1, size + 1))
            for i, (name, size) in enumerate(sizes.items())}


def first_uri(output: str) -> str:
    """The first enrollment URI in a command's output.  Raises RuntimeError."""
    match = re.search(r"spa1://\S+", output)
    if match is None:
        raise RuntimeError(f"no enrollment URI in: {output[:200]}")
    return match.group(0)


def allow_other(config: Path, name: str) -> None:
    """allow_other_address = true for one client, as an operator sets it
    (the CLI has no flag for it): `clients export` to a file, the entry
    edited there, `clients import` of the file."""
    exported = config.with_name("clients.toml")
    exported.unlink(missing_ok=True)
    cli(config, "clients", "export", "--format", "toml", str(exported))
    head, marker, rest = exported.read_text().partition(f"[clients.{name}]\n")
    section, nxt, tail = rest.partition("\n[")
    if "allow_other_address" in section:
        section = re.sub(r"(?m)^allow_other_address = \w+", "allow_other_address = true",
                         section)
    else:
        section = "allow_other_address = true\n" + section
    exported.write_text(head + marker + section + nxt + tail)
    cli(config, "clients", "import", str(exported))
    exported.unlink()


class Server:
    """`spa-server run` in the server namespace; its log, read as it comes."""

    def __init__(self, ns: Namespace, config: Path, log: Path) -> None:
        self.lines: list[str] = []
        self.accepted: Counter[Grant] = Counter()  # from the log's accepted lines
        self._lock = threading.Lock()
        self._log = log.open("w")
        self.proc = ns.popen([*program(), "--config", str(config), "run"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = event_of(raw.rstrip("\n"))  # the time in front goes
            self._log.write(raw)
            grant = accepted_grant(line)
            with self._lock:
                self.lines.append(line)
                if grant is not None:
                    self.accepted[grant] += 1

    def wait_for(self, prefix: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(line.startswith(prefix) for line in list(self.lines)):
                return True
            time.sleep(0.05)
        return False

    def accepted_now(self) -> Counter[Grant]:
        with self._lock:
            return Counter(self.accepted)

    def pids(self) -> dict[str, int]:
        """The daemon (the process started) and its child, the gate keeper."""
        found = {"daemon": self.proc.pid}
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        children = path.read_text().split() if path.exists() else []
        if children:
            found["gate keeper"] = int(children[0])
        return found

    def stop(self) -> int | None:
        """SIGTERM, then its exit status (None: it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        self._reader.join(timeout=5)
        self._log.close()
        return code


def fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)


def accepted_grant(line: str) -> Grant | None:
    """The grant of an `accepted` log line (open knocks; a close is kept
    with service "close:NAME" so it can never match the ledger)."""
    if not line.startswith("accepted "):
        return None
    f = fields(line)
    service = f.get("service", "?")
    return Grant(f.get("client", "?"), f.get("src", "?"),
                 service if f.get("action") == "open" else f"close:{service}")


# ---- memory ---------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssSampler:
    """The VmRSS of each process, sampled every 0.1 s: the highest, and the
    series (seconds since the start, MB)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = {name: rss_mb(pid) for name, pid in pids.items()}
        self.series: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(0.1):
            for name, pid in self.pids.items():
                rss = rss_mb(pid)
                self.peak[name] = max(self.peak[name], rss)
                self.series[name].append((round(time.monotonic() - started, 2), rss))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return dict(self.peak)


# ---- sending -------------------------------------------------------------------------


def compile_sender(directory: Path) -> Path:
    binary = directory / "fuzz_send"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(HERE / "fuzz_send.c")],
                   check=True)
    return binary


def records(datagrams: list[Datagram]) -> bytes:
    """fuzz_send.c's file format: source, port, length, payload."""
    return b"".join(socket.inet_aton(d.source) + struct.pack(">HH", d.sport, len(d.payload))
                    + d.payload for d in datagrams)


class Send:
    """One run of the sender in a namespace, over a file of records."""

    def __init__(self, ns: Namespace, sender: Path, path: Path, datagrams: list[Datagram],
                 dst: str, rate: float) -> None:
        path.write_bytes(records(datagrams))
        argv = [str(sender), *(["-r", f"{rate:g}"] if rate > 0 else []), dst,
                str(KNOCK_PORT), str(path)]
        self.proc = ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def wait(self) -> tuple[int, float]:
        """(datagrams sent, seconds it took).  Raises RuntimeError."""
        out, _ = self.proc.communicate(timeout=600)
        match = re.search(r"sent (\d+) packets in ([0-9.]+) s", out)
        if self.proc.returncode != 0 or match is None:
            raise RuntimeError(f"fuzz_send failed: {out.strip()}")
        return int(match.group(1)), float(match.group(2))


def confirmed(knocks: list[Knock], accepted: Counter[Grant]) -> list[Knock]:
    """Ledger knocks the server surely judged: every knock sent with that
    grant was accepted (only those are replayed: a replay of a knock the
    server never saw would be a first copy, not a replay)."""
    sent = Counter(k.grant for k in knocks)
    return [k for k in knocks if accepted[k.grant] >= sent[k.grant]]


def otp_steps(knocks: list[Knock]) -> dict[str, int]:
    used: dict[str, int] = {}
    for knock in knocks:
        if knock.otp_step is not None:
            used[knock.grant.client] = max(used.get(knock.grant.client, -1), knock.otp_step)
    return used


@dataclass
class Flood:
    sent: int = 0
    ledger: int = 0
    sender_seconds: float = 0.0
    wall_seconds: float = 0.0
    stopped_by: str = "count"
    kinds: Counter[str] = field(default_factory=Counter)


def fuzz(site: Site, server: Server, fuzzer: Fuzzer, sender: Path, work: Path,
         args: argparse.Namespace) -> Flood:
    """Chunks until --count or --seconds; the next chunk is made while the
    current one is being sent."""
    per_chunk = int(args.rate * CHUNK_SECONDS) if args.rate > 0 else UNPACED_CHUNK
    flood = Flood()
    started = time.monotonic()
    deadline = started + args.seconds

    def build(count: int) -> tuple[list[Knock], list[Datagram]]:
        now = time.time()
        judged = confirmed(fuzzer.sent_ledger, server.accepted_now())
        ledger = fuzzer.ledger(now)
        data, kinds = fuzzer.chunk(now, count, judged[-REPLAYABLE:], otp_steps(judged))
        flood.kinds.update(kinds)
        return ledger, data

    queued = min(per_chunk, args.count)
    pending: tuple[list[Knock], list[Datagram]] | None = build(queued)
    while pending is not None:
        ledger, data = pending
        attack = Send(site.att, sender, work / "fuzz.bin", data, SERVER_ATT, args.rate)
        knocks = Send(site.cli, sender, work / "ledger.bin", [k.datagram for k in ledger],
                      SERVER, len(ledger) / CHUNK_SECONDS if args.rate > 0 else 0)
        left = args.count - queued
        pending = None
        if left > 0 and time.monotonic() < deadline:
            queued += min(per_chunk, left)
            pending = build(min(per_chunk, left))
        count, took = attack.wait()
        flood.ledger += knocks.wait()[0]
        flood.sent += count
        flood.sender_seconds += took
    flood.wall_seconds = time.monotonic() - started
    flood.stopped_by = "count" if flood.sent >= args.count else "seconds"
    return flood


def warm_up(site: Site, server: Server, fuzzer: Fuzzer, sender: Path, work: Path) -> int:
    """A first knock from every address of every live client, before the
    fuzz (so the forged-packet limits trust them); how many were accepted."""
    longest = max(len(c.addresses) for c in fuzzer.cast.live)
    knocks = [k for _ in range(longest) for k in fuzzer.ledger(time.time())]
    Send(site.cli, sender, work / "warm.bin", [k.datagram for k in knocks], SERVER, 0).wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sum(server.accepted_now().values()) >= len(knocks):
            break
        time.sleep(0.1)
    return min(sum(server.accepted_now().values()), len(knocks))


# ---- judging ----------------------------------------------------------------------------


def unledgered(accepted: Counter[Grant], ledger: Counter[Grant]) -> list[dict[str, object]]:
    """Acceptances beyond the ledger's: each a failure."""
    return [{"client": g.client, "address": g.address, "service": g.service,
             "accepted": n, "in_ledger": ledger[g]}
            for g, n in sorted(accepted.items(), key=str) if n > ledger[g]]


def judge(setup: Setup, server: Server, fuzzer: Fuzzer) -> dict[str, Any]:
    """What the event store and the log say, against the ledger."""
    rows = json.loads(cli(setup.config, "events", "--json"))
    ledger = Counter(k.grant for k in fuzzer.sent_ledger)
    accepted: Counter[Grant] = Counter()
    refused: Counter[str] = Counter()
    opened: set[str] = set()
    for row in rows:
        if row["outcome"] == "accepted":
            service = row["service"] if row["action"] == "open" else f"close:{row['service']}"
            accepted[Grant(row["client"], row["source"], service)] += 1
        elif row["outcome"] == "refused":
            refused[row["reason"]] += int(row["count"])
        elif row["outcome"] == "lease_start":
            opened.add(row["source"])
    ledger_addresses = {g.address for g in ledger}
    errors = [line for line in server.lines
              if line.split(" ", 1)[0].rstrip(":") == "error" or "Traceback" in line]
    return {
        "expected": sum(ledger.values()),
        "accepted": sum(accepted.values()),
        "accepted_in_log": sum(server.accepted_now().values()),
        "missed": sum(max(0, n - accepted[g]) for g, n in ledger.items()),
        "wrongly_accepted": unledgered(accepted, ledger),
        "wrongly_accepted_in_log": unledgered(server.accepted_now(), ledger),
        "leases_not_in_ledger": sorted(opened - ledger_addresses),
        "refused": dict(refused.most_common()),
        "errors": errors,
    }


def run_mode(mode: str, args: argparse.Namespace, sender: Path) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"spa-fuzz-{mode}-"))
    root.chmod(0o711)  # the daemon runs as a service user: it must get through
    setup = configure(root, mode)
    fuzzer = Fuzzer(setup.cast, random.Random(f"{args.seed}-{mode}"))
    site = Site([a for c in setup.cast.live for a in c.addresses])
    server: Server | None = None
    try:
        server = Server(site.srv, setup.config, root / "spa-server.log")
        if not server.wait_for("started ", 20):
            raise RuntimeError("spa-server did not start: " + " | ".join(server.lines[-5:]))
        time.sleep(0.5)  # the gate keeper is forked before "started"; let it settle
        pids = server.pids()
        warm = warm_up(site, server, fuzzer, sender, root)
        warm_expected = len(fuzzer.sent_ledger)
        time.sleep(1.0)
        before = {name: rss_mb(pid) for name, pid in pids.items()}
        drops_before = udp_drops(site.srv, KNOCK_PORT)
        sampler = RssSampler(pids)
        flood = fuzz(site, server, fuzzer, sender, root, args)
        time.sleep(SETTLE)  # the last refusals flushed, the receive queue empty
        peak = sampler.stop()
        after = {name: rss_mb(pid) for name, pid in pids.items()}
        drops_after = udp_drops(site.srv, KNOCK_PORT)
        running = server.proc.poll() is None
        verdict = judge(setup, server, fuzzer)
        code = server.stop()
        if not running:
            verdict["errors"].append(f"the server died during the fuzz (exit {code})")
        elif code != 0:
            verdict["errors"].append(f"the server did not stop cleanly (exit {code})")
        memory = {name: {"before": round(before[name], 1),
                         "mid": round(max([before[name]] + [r for t, r in sampler.series[name]
                                                            if t <= flood.wall_seconds / 2]), 1),
                         "peak": round(peak[name], 1), "after": round(after[name], 1),
                         "series": sampler.series[name][::10]} for name in pids}
        flat = all(m["after"] <= m["before"] + args.rss_margin for m in memory.values())
        return {
            "mode": mode, "sent": flood.sent, "stopped_by": flood.stopped_by,
            "count": args.count, "seconds": args.seconds,
            "ledger_sent": warm_expected + flood.ledger,
            "sender_rate": flood.sent / flood.sender_seconds if flood.sender_seconds else 0,
            "rate": flood.sent / flood.wall_seconds if flood.wall_seconds else 0,
            "wall_seconds": round(flood.wall_seconds, 1),
            "warm_up": {"sent": warm_expected, "accepted": warm},
            "kernel_drops": None if drops_before is None or drops_after is None
            else drops_after - drops_before,
            "kinds": dict(sorted(flood.kinds.items())), "memory": memory, "flat": flat,
            **verdict,
            "log": str(root / "spa-server.log") if args.keep else None,
        }
    finally:
        if server is not None and server.proc.poll() is None:
            server.proc.kill()
        site.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def passed(result: dict[str, Any]) -> bool:
    return (not result["wrongly_accepted"] and not result["wrongly_accepted_in_log"]
            and not result["leases_not_in_ledger"] and not result["errors"] and result["flat"]
            and result["warm_up"]["accepted"] == result["warm_up"]["sent"] > 0)


# ---- the report -------------------------------------------------------------------------


def report(results: list[dict[str, Any]], margin: float) -> None:
    print("| mode | sent | stopped by | sender /s | overall /s | judged in the process | "
          "accepted / ledger | wrongly accepted | error lines | RSS MB daemon "
          "before / mid / peak / after | gate keeper | flat |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|---|")
    for r in results:
        judged = sum(r["refused"].values()) + r["accepted"]
        mem = [f"{m['before']} / {m['mid']} / {m['peak']} / {m['after']}"
               for m in r["memory"].values()]
        print(f"| {r['mode']} | {r['sent']:,} | {r['stopped_by']} | {r['sender_rate']:,.0f} | "
              f"{r['rate']:,.0f} | {judged:,} | {r['accepted']} / {r['expected']} | "
              f"{len(r['wrongly_accepted']) + len(r['leases_not_in_ledger'])} | "
              f"{len(r['errors'])} | {' | '.join(mem)} | {'yes' if r['flat'] else 'NO'} |")
    print(f"\nmid: the highest RSS in the fuzz's first half; flat: after <= before + "
          f"{margin:g} MB, for each process")
    reasons = sorted({k for r in results for k in r["refused"]},
                     key=lambda k: -max(r["refused"].get(k, 0) for r in results))
    print("\n| refused by the process, by reason | " + " | ".join(r["mode"] for r in results)
          + " |")
    print("|---|" + "---:|" * len(results))
    for reason in reasons:
        print(f"| {reason} | " + " | ".join(f"{r['refused'].get(reason, 0):,}" for r in results)
              + " |")
    print("\n| datagrams sent, by mutation | " + " | ".join(r["mode"] for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    for kind in sorted({k for r in results for k in r["kinds"]}):
        print(f"| {kind} | " + " | ".join(f"{r['kinds'].get(kind, 0):,}" for r in results)
              + " |")
    for r in results:
        drops = "-" if r["kernel_drops"] is None else f"{r['kernel_drops']:,}"
        print(f"\n{r['mode']}: {r['sent']:,} datagrams in {r['wall_seconds']} s (stopped by "
              f"{r['stopped_by']}: --count {r['count']:,}, --seconds {r['seconds']:g}); "
              f"ledger knocks {r['ledger_sent']} (warm-up {r['warm_up']['accepted']} / "
              f"{r['warm_up']['sent']} accepted), missed {r['missed']}; kernel drops on the "
              f"knock socket {drops}")
        for wrong in r["wrongly_accepted"] + r["wrongly_accepted_in_log"]:
            print(f"  WRONGLY ACCEPTED: {wrong}")
        for address in r["leases_not_in_ledger"]:
            print(f"  LEASE FOR AN ADDRESS NOT IN THE LEDGER: {address}")
        for line in r["errors"]:
            print(f"  ERROR: {line}")
        print(f"  {'PASS' if passed(r) else 'FAIL'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="both", choices=["both", "capture", "udp"])
    parser.add_argument("--count", type=int, default=1_000_000,
                        help="datagrams to send per mode (default 1,000,000)")
    parser.add_argument("--seconds", type=float, default=300.0,
                        help="stop sending after this long per mode, whichever comes first")
    parser.add_argument("--rate", type=float, default=50_000,
                        help="datagrams per second (0: as fast as one core sends)")
    parser.add_argument("--seed", default="0")
    parser.add_argument("--rss-margin", type=float, default=RSS_MARGIN_MB)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the config and the log")
    args = parser.parse_args()
    reason = can_make_namespaces()
    if reason is not None or shutil.which("gcc") is None:
        print(f"fuzz_live: {reason or 'needs gcc (bash benchmarks/setup.sh)'}", file=sys.stderr)
        return 2
    modes = ["capture", "udp"] if args.mode == "both" else [args.mode]
    build = Path(tempfile.mkdtemp(prefix="spa-fuzz-bin-"))
    try:
        sender = compile_sender(build)
        results = [run_mode(mode, args, sender) for mode in modes]
    finally:
        shutil.rmtree(build, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps({r["mode"]: r for r in results}, indent=1))
    report(results, args.rss_margin)
    return 0 if all(passed(r) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
