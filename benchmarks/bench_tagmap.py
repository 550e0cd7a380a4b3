"""eBPF tag map (issue 14): what the map filter costs and what it saves.

1. Map cost: for 10^2..10^5 clients (4 live tags each), `replace_tags` of the
   whole set, then one tag step's change (N tags added, N removed: one
   `update_tags` batch), median of --repeat; kernel memory (fdinfo memlock).
2. Junk flood at 10^5 clients' tags: benchmarks/flood.c (knock-shaped junk,
   sendmmsg, one core) from a namespace of its own into the server's, for
   --seconds, at a real source in each mode with the eBPF map filter, and
   with SPA_NO_EBPF=1 (the classic filter: past ~811 tags, port-only): junk
   reaching Python, the receiver's CPU, the machine's softirq CPU.
3. The program's own cost per packet (BPF_PROG_TEST_RUN): junk, a live tag,
   a shut tag from elsewhere, at 10^2 and 10^5 clients.
Needs root and gcc.
    .venv/bin/python benchmarks/bench_tagmap.py [--seconds 5] [--repeat 5] [--no-flood]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from spa.kernel.tagmap import TagMapFilter  # noqa: E402
from spa.netns import Namespace, Topology  # noqa: E402

TAGS_PER_CLIENT = 4  # live tags per client (steps around now)
PORT = 62230
SRV, ATT = "10.198.1.1", "10.198.1.2"
RECEIVER = """
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[4])
from spa.server.capture import CaptureSource
from spa.server.sources import UdpSource
mode, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
source = CaptureSource(port) if mode == "capture" else UdpSource("0.0.0.0", port)
tags = [os.urandom(8) for _ in range(count)]
note = source.replace_tags(tags)
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
print(json.dumps({"note": note, "kind": source.filter_kind()}), flush=True)
seen, end, start = 0, time.monotonic() + float(sys.argv[5]), cpu()
while time.monotonic() < end:
    seen += len(source.receive(0.05))
print(json.dumps({"seen": seen, "cpu": cpu() - start}), flush=True)
"""


def median_seconds(action: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def map_cost(repeat: int) -> None:
    print("clients  tags     replace ms  step add+remove ms  per tag us  memlock MiB  B/tag")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        for clients in (100, 1000, 10_000, 100_000):
            n = clients * TAGS_PER_CLIENT
            filt = TagMapFilter(sock, None)
            tags = [os.urandom(8) for _ in range(n)]
            replace = median_seconds(functools.partial(filt.replace, tags), repeat)
            steps = []
            for _ in range(repeat):
                added = [os.urandom(8) for _ in range(clients)]  # a step: one new tag each
                removed = list(filt.tags)[:clients]                # and one gone
                started = time.perf_counter()
                filt.update(added, removed)
                steps.append(time.perf_counter() - started)
            step = statistics.median(steps)
            memlock = filt.memlock()
            print(f"{clients:>7}  {n:>7}  {replace * 1e3:>10.1f}  {step * 1e3:>18.2f}  "
                  f"{step / (2 * clients) * 1e6:>10.2f}  {memlock / 2**20:>11.1f}  "
                  f"{memlock / n:>5.0f}")
            filt.close()


def program_cost(repeat: int) -> None:
    """ns per packet of the capture program (BPF_PROG_TEST_RUN, 100,000 runs)."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    from spa.kernel import ebpf
    from spa.kernel.bpf import HashMap, load_program, test_run

    def frame(tag: bytes, source: str = "10.0.0.2") -> bytes:
        return bytes(Ether(dst="00:00:00:00:00:00") / IP(src=source, dst="10.0.0.1")
                     / UDP(sport=1, dport=PORT) / Raw(b"\x01" + tag + bytes(152)))

    print("\nprogram cost (capture program, BPF_PROG_TEST_RUN, ns per packet, median)")
    print("clients  junk  live  shut tag from elsewhere")
    for clients in (100, 100_000):
        tags = [os.urandom(8) for _ in range(clients * TAGS_PER_CLIENT)]
        maps = [HashMap(8, 4, 2 * len(tags)), HashMap(8, 4, 8192), HashMap(24, 4, 131072)]
        maps[0].update_batch(tags, [bytes(4)] * (len(tags) - 1) + [(1).to_bytes(4, "little")])
        fd = load_program(ebpf.encode(ebpf.capture_program(PORT, ebpf.Maps(*(m.fd for m in maps)))))
        cost = [statistics.median(test_run(fd, frame(t), 100_000)[1] for _ in range(repeat))
                for t in (os.urandom(8), tags[0], tags[-1])]
        print(f"{clients:>7}  {cost[0]:>4.0f}  {cost[1]:>4.0f}  {cost[2]:>23.0f}")
        os.close(fd)
        for m in maps:
            m.close()


def softirq_seconds() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return (int(fields[6]) + int(fields[7])) / os.sysconf("SC_CLK_TCK")  # irq + softirq


def flood(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / "flood"
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(program), str(HERE / "flood.c")],
                       check=True)
        topo = Topology()
        try:
            srv, att = topo.ns("srv"), topo.ns("att")
            topo.link(srv, [f"{SRV}/24"], att, [f"{ATT}/24"])
            print(f"\njunk flood, {seconds:.0f} s, 100,000 clients x {TAGS_PER_CLIENT} tags")
            print("mode     filter      sent pps  reached Python  receiver CPU s  irq+softirq s")
            for mode in ("capture", "udp"):
                for env in ({}, {"SPA_NO_EBPF": "1"}):
                    one(srv, att, program, mode, env, seconds)
        finally:
            topo.cleanup()


def one(srv: Namespace, att: Namespace, program: Path, mode: str, env: dict[str, str],
        seconds: float) -> None:
    receiver = srv.popen([sys.executable, "-c", RECEIVER, mode, str(PORT),
                          str(100_000 * TAGS_PER_CLIENT), str(HERE.parent), str(seconds + 3)],
                         stdout=subprocess.PIPE, env={**os.environ, **env})
    assert receiver.stdout is not None
    ready = json.loads(receiver.stdout.readline())
    time.sleep(0.5)
    before = softirq_seconds()
    sent = att.run(str(program), SRV, str(PORT), str(seconds), timeout=seconds + 30).stdout
    irq = softirq_seconds() - before
    done = json.loads(receiver.stdout.readline())
    receiver.wait(timeout=30)
    count = int(sent.split()[1])
    print(f"{mode:<8} {ready['kind']:<10} {count / seconds:>9.0f}  {done['seen']:>14}  "
          f"{done['cpu']:>14.2f}  {irq:>13.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-flood", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_tagmap: needs root (bpf maps need CAP_BPF; namespaces)")
    map_cost(args.repeat)
    program_cost(args.repeat)
    if not args.no_flood:
        flood(args.seconds)


if __name__ == "__main__":
    main()
