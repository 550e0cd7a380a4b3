"""Packets per second through the protocol core's verifier, in process.

Measures `spa.core.verify.Verifier.verify(packet, source, now)` on one thread,
with no sockets and no firewall, for four kinds of traffic:

- ``junk``: random bytes of exactly PACKET_SIZE; almost all are refused at the
  version byte (1 in 256 reaches the tag lookup);
- ``junk-v1``: random bytes with the right version byte, so every packet pays
  for the knock-tag lookup (the honest worst case for junk);
- ``valid``: distinct valid packets from many enrolled clients, every one
  fully verified and accepted;
- ``replay``: one valid packet accepted once, then the same bytes again and
  again, every copy refused ``replay``.

This is an edge, not the core: it reads the clock once (``now`` is then fixed
for the whole run, as the core takes time as an argument) and draws every
packet from the CSPRNG before any timing starts.  Every result is checked
(accepted, or refused for the expected reason), so a run that prints figures
is also a run in which the verifier gave the right verdicts.  A wrong verdict
exits with status 1.  Goals are reported, never asserted (STYLE principle 14).

Each case runs a few rounds; the table gives the median and the best round.
As with `timeit`, the garbage collector is off inside a timed loop.

    .venv/bin/python benchmarks/bench_core.py            # full run
    .venv/bin/python benchmarks/bench_core.py --quick    # smoke run, < 3 s
    taskset -c 0 .venv/bin/python benchmarks/bench_core.py --json
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# Measure the checkout this file lives in, whatever the current directory.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from spa.core.errors import Reason  # noqa: E402
from spa.core.keys import MASTER_SECRET_SIZE, SERVER_ID_SIZE, derive_keys  # noqa: E402
from spa.core.policy import DEFAULT_SERVICES, ClientPolicy, Policy  # noqa: E402
from spa.core.replay import DEFAULT_CAP, ReplayCache  # noqa: E402
from spa.core.verify import DEFAULT_WINDOW, Accepted, Refused, Verifier  # noqa: E402
from spa.core.wire import (  # noqa: E402
    NONCE_OFFSET,
    NONCE_SIZE,
    PACKET_SIZE,
    VERSION_BYTE,
    Action,
    Request,
    build_packet,
)

Result = Accepted | Refused

JUNK_GOAL = 1_000_000  # packets/s refused, one core (docs/threat-model.md, "Junk at high rate")
VALID_GOAL = 50_000  # packets/s fully verified and accepted, one core
CLIENTS = 50  # enrolled clients the valid packets come from
SOURCE = "203.0.113.5"  # the packet's source as a UDP socket reports it (a str)
SERVICES = frozenset({"ssh", "https"})
WARMUP = 2_000  # packets verified untimed before each case (specialising interpreter)


@dataclass(frozen=True, slots=True)
class Sizes:
    junk: int  # packets in each junk pool
    valid: int  # distinct valid packets
    replay: int  # copies of the replayed packet
    rounds: int


FULL = Sizes(junk=200_000, valid=50_000, replay=50_000, rounds=5)
QUICK = Sizes(junk=20_000, valid=2_000, replay=5_000, rounds=3)


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: str
    packets: int  # per round
    rounds: int
    median_seconds: float
    best_seconds: float
    median_pps: float
    best_pps: float
    goal_pps: int | None
    met: str  # "yes" (median meets it), "best only", "no", or "-" without a goal


class VerdictError(Exception):
    """The verifier gave a verdict the protocol does not allow."""


@dataclass(frozen=True, slots=True)
class World:
    server_id: bytes
    secrets: dict[str, bytes]
    policy: Policy
    now: float

    def verifier(self, replay: ReplayCache | None = None) -> Verifier:
        return Verifier(self.server_id, self.secrets, self.policy, now=self.now, replay=replay)


def make_world(now: float) -> World:
    names = [f"client-{i:02d}" for i in range(CLIENTS)]
    secrets = {name: os.urandom(MASTER_SECRET_SIZE) for name in names}
    policy = Policy(
        dict(DEFAULT_SERVICES), {name: ClientPolicy(name, SERVICES) for name in names}
    )
    return World(os.urandom(SERVER_ID_SIZE), secrets, policy, now)


def junk_pool(count: int, *, version_byte: bool) -> list[bytes]:
    if version_byte:
        return [VERSION_BYTE + os.urandom(PACKET_SIZE - 1) for _ in range(count)]
    return [os.urandom(PACKET_SIZE) for _ in range(count)]


def valid_packets(world: World, count: int) -> list[bytes]:
    """`count` valid packets, round-robin over the clients, each with its own nonce."""
    keys = [(name, derive_keys(secret, world.server_id)) for name, secret in world.secrets.items()]
    now_ms = int(world.now * 1000)
    packets = []
    for i in range(count):
        _, client_keys = keys[i % len(keys)]
        # Sent up to a second before `now`: well inside the window.
        request = Request(now_ms - i % 1000, Action.OPEN, "ssh", duration=60)
        packets.append(
            build_packet(request, client_keys, world.server_id, nonce=os.urandom(NONCE_SIZE))
        )
    nonces = {p[NONCE_OFFSET : NONCE_OFFSET + NONCE_SIZE] for p in packets}
    if len(nonces) != count:
        raise VerdictError("two valid packets share a nonce")
    return packets


def timed(verifier: Verifier, packets: Sequence[bytes], now: float) -> tuple[float, list[Result]]:
    """Verify every packet in a tight loop; return the seconds and the verdicts."""
    verify = verifier.verify
    source = SOURCE
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        results = [verify(packet, source, now) for packet in packets]
        seconds = time.perf_counter() - start
    finally:
        if gc_was_on:
            gc.enable()
    return seconds, results


def expect_refused(results: Sequence[Result], allowed: frozenset[Reason], case: str) -> None:
    for result in results:
        if not isinstance(result, Refused) or result.reason not in allowed:
            raise VerdictError(f"{case}: expected a refusal in {sorted(map(str, allowed))}, "
                               f"got {result!r}")


def expect_accepted(results: Sequence[Result], world: World, case: str) -> None:
    source = ipaddress.ip_address(SOURCE)
    for i, result in enumerate(results):
        if not isinstance(result, Accepted):
            raise VerdictError(f"{case}: packet {i} refused {result.reason}")
        if result.decision.address != source or result.decision.service.name != "ssh":
            raise VerdictError(f"{case}: packet {i} accepted with the wrong decision")
    clients = {result.client for result in results if isinstance(result, Accepted)}
    if len(results) >= CLIENTS and clients != set(world.secrets):
        raise VerdictError(f"{case}: accepted packets came from {len(clients)} clients")


def summarize(case: str, packets: int, seconds: list[float], goal: int | None) -> CaseResult:
    median = statistics.median(seconds)
    best = min(seconds)
    median_pps, best_pps = packets / median, packets / best
    if goal is None:
        met = "-"
    elif median_pps >= goal:
        met = "yes"
    elif best_pps >= goal:
        met = "best only"
    else:
        met = "no"
    return CaseResult(case, packets, len(seconds), median, best, median_pps, best_pps, goal, met)


def run_refusals(
    world: World,
    case: str,
    packets: list[bytes],
    allowed: frozenset[Reason],
    rounds: int,
    goal: int | None,
    verifier: Verifier,
) -> CaseResult:
    """A case whose packets the verifier refuses without changing its state."""
    timed(verifier, packets[:WARMUP], world.now)
    seconds = []
    for _ in range(rounds):
        elapsed, results = timed(verifier, packets, world.now)
        expect_refused(results, allowed, case)
        seconds.append(elapsed)
        del results
    return summarize(case, len(packets), seconds, goal)


def run_valid(world: World, packets: list[bytes], rounds: int) -> CaseResult:
    """Every round gets a fresh replay cache, big enough never to be full."""

    def fresh() -> Verifier:
        cache = ReplayCache(
            DEFAULT_WINDOW, cap=max(DEFAULT_CAP, len(packets)), per_client_cap=len(packets)
        )
        return world.verifier(cache)

    expect_accepted(timed(fresh(), packets[:WARMUP], world.now)[1], world, "valid warm-up")
    seconds = []
    for _ in range(rounds):
        elapsed, results = timed(fresh(), packets, world.now)
        expect_accepted(results, world, "valid")
        seconds.append(elapsed)
        del results
    return summarize("valid", len(packets), seconds, VALID_GOAL)


def run_replay(world: World, copies: int, rounds: int) -> CaseResult:
    verifier = world.verifier()
    (packet,) = valid_packets(world, 1)
    first = verifier.verify(packet, SOURCE, world.now)
    if not isinstance(first, Accepted):
        raise VerdictError(f"replay: the original packet was refused {first.reason}")
    packets = [packet] * copies
    return run_refusals(
        world, "replay", packets, frozenset({Reason.REPLAY}), rounds, None, verifier
    )


def machine() -> dict[str, object]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_model": model,
        "nproc": os.cpu_count(),
        "affinity": affinity,
    }


def run(sizes: Sizes, progress: Callable[[str], None]) -> list[CaseResult]:
    now = time.time()  # read once; the core takes time as an argument
    world = make_world(now)
    refusing = world.verifier()
    cases: list[CaseResult] = []

    progress(f"junk: {sizes.junk} random packets")
    pool = junk_pool(sizes.junk, version_byte=False)
    early = frozenset({Reason.BAD_VERSION, Reason.UNKNOWN_TAG})
    cases.append(run_refusals(world, "junk", pool, early, sizes.rounds, JUNK_GOAL, refusing))

    progress(f"junk-v1: {sizes.junk} random packets with version byte 0x01")
    pool = junk_pool(sizes.junk, version_byte=True)
    unknown = frozenset({Reason.UNKNOWN_TAG})
    cases.append(run_refusals(world, "junk-v1", pool, unknown, sizes.rounds, JUNK_GOAL, refusing))
    del pool

    progress(f"valid: building {sizes.valid} packets from {CLIENTS} clients")
    cases.append(run_valid(world, valid_packets(world, sizes.valid), sizes.rounds))

    progress(f"replay: {sizes.replay} copies of one accepted packet")
    cases.append(run_replay(world, sizes.replay, sizes.rounds))
    return cases


def render_table(cases: Sequence[CaseResult]) -> str:
    header = ("case", "packets", "seconds", "packets/s", "best pkt/s", "goal", "met")
    rows = [header]
    for c in cases:
        goal = f">= {c.goal_pps:,}" if c.goal_pps is not None else "-"
        rows.append((c.case, f"{c.packets:,}", f"{c.median_seconds:.4f}",
                     f"{c.median_pps:,.0f}", f"{c.best_pps:,.0f}", goal, c.met))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer packets: a smoke run, < 3 s")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per case (default 5)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            print("--rounds must be at least 1", file=sys.stderr)
            return 2
        sizes = Sizes(sizes.junk, sizes.valid, sizes.replay, args.rounds)

    def progress(message: str) -> None:
        if not args.json:
            print(f"  {message}", file=sys.stderr, flush=True)

    info = machine()
    try:
        cases = run(sizes, progress)
    except VerdictError as exc:
        print(f"WRONG VERDICT: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"machine": info, "sizes": asdict(sizes),
                          "results": [asdict(c) for c in cases]}, indent=2))
        return 0
    print(f"Verifier.verify, in process, one thread: Python {info['python']}, "
          f"{info['cpu_model']}, nproc {info['nproc']}, affinity {info['affinity']}")
    print(f"median and best of {sizes.rounds} rounds; 'met' judges the median\n")
    print(render_table(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
