"""The eBPF tag map's growth after the privilege drop (as root; issue 14).

A UdpSource's map filter holds N tags in a map of room 2N; this process then
makes no map itself (the kernel's EPERM, as for the dropped daemon), and a
growth asks a gate keeper (MapGrants and serve in a thread, over a real
socketpair) for the kit.  Printed: the ask (request, the kit made, four
descriptors handed over: the time the daemon's end of the gate keeper is
busy, so a grant waits), and the whole growth (the ask, the new maps filled
from the daemon's copy, the program attached: housekeeping's time).

    sudo .venv/bin/python benchmarks/bench_map_growth.py [--tags 100000 500000 1000000]
"""

from __future__ import annotations

import argparse
import errno
import os
import time
from pathlib import Path

from spa.backends.memory import MemoryBackend
from spa.kernel import tagkit, tagmap
from spa.kernel.bpf import BpfError
from spa.kernel.tagkit import Kit
from spa.server.mapgrant import MapGrants
from spa.server.monitor import GateKeeper
from spa.server.remote import serving_here
from spa.server.sources import UdpSource


def denied(port: int | None, entries: int) -> Kit:
    raise BpfError(errno.EPERM, "bpf map create")


def grow(count: int) -> tuple[int, int, float, float]:
    """(room before, room after, ask seconds, whole growth seconds)."""
    tagmap.make_kit = tagkit.make
    source = UdpSource("127.0.0.1", 0)
    source.replace_tags([os.urandom(8) for _ in range(count)])  # room 2 x count
    room = source.map_room
    keeper = GateKeeper(MemoryBackend(), config_path=Path("/nonexistent"), services={},
                        clock=time.time, log=lambda line: None,
                        maps=MapGrants("udp", source.port, room))
    asked: list[float] = []
    with serving_here(keeper) as gate:

        def hand(entries: int) -> Kit:
            started = time.perf_counter()
            kit = gate.tag_map("udp", source.port, entries)
            asked.append(time.perf_counter() - started)
            return kit

        try:
            tagmap.make_kit = denied  # from here on, as the dropped daemon
            source.hand_maps(hand)
            started = time.perf_counter()
            source.make_room(count + 1)  # one more than the room: a growth
            whole = time.perf_counter() - started
            return room, source.map_room, asked[0], whole
        finally:
            source.close()
            tagmap.make_kit = tagkit.make


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tags", type=int, nargs="+", default=[100_000, 500_000, 1_000_000])
    args = parser.parse_args()
    print(f"{'tags':>9} {'room':>9} {'grown to':>9} {'ask ms':>8} {'growth ms':>10}")
    for count in args.tags:
        room, after, ask, whole = grow(count)
        print(f"{count:>9} {room:>9} {after:>9} {ask * 1000:>8.1f} {whole * 1000:>10.1f}")


if __name__ == "__main__":
    main()
