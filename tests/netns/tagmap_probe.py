"""Run inside a fresh network namespace (tests/netns/test_tagmap.py): a real
CaptureSource (on lo) or UdpSource with many tags, knocks sent over the
loopback from chosen source addresses, and what reached Python counted.
Prints one JSON object of counts.  argv: mode (capture|udp), scenario."""

from __future__ import annotations

import json
import os
import pwd
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from spa.backends.memory import MemoryBackend
from spa.core.wire import NONCE_OFFSET, PACKET_SIZE
from spa.kernel.tagmap import Hand
from spa.server import monitor
from spa.server.capture import CaptureSource
from spa.server.mapgrant import MapGrants
from spa.server.monitor import GateKeeper
from spa.server.privsep import drop_to_daemon, drop_to_gate_keeper
from spa.server.remote import RemoteGate
from spa.server.sources import UdpSource

PORT = 62210
V4, V4_KNOWN, V4_OTHER = "127.0.0.1", "127.0.0.2", "127.0.0.3"
V6, V6_KNOWN, V6_OTHER = "fd00:77::1", "fd00:77::2", "fd00:77::3"
CLIENTS = 5000  # x 4 tags: past the classic program's ~811
rng = random.Random(7)


def tag() -> bytes:
    return rng.randbytes(8)


def knock(t: bytes, nonce: bytes | None = None, size: int = PACKET_SIZE) -> bytes:
    nonce = nonce or rng.randbytes(8)
    body = b"\x01" + t + rng.randbytes(NONCE_OFFSET - 9) + nonce
    return (body + rng.randbytes(size))[:size]


class Probe:
    def __init__(self, mode: str) -> None:
        for address in (V6, V6_KNOWN, V6_OTHER):
            subprocess.run(["ip", "addr", "add", f"{address}/128", "dev", "lo", "nodad"],
                           check=False)
        self.source: CaptureSource | UdpSource = (
            CaptureSource(PORT, "lo") if mode == "capture" else UdpSource("::", PORT))
        self.senders: dict[str, socket.socket] = {}

    def sent(self, packets: list[bytes], source: str = V4) -> int:
        """Send; how many of them reached Python."""
        if source not in self.senders:
            family = socket.AF_INET6 if ":" in source else socket.AF_INET
            self.senders[source] = s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((source, 0))
        sock, target = self.senders[source], V6 if ":" in source else V4
        wanted, seen = set(packets), 0
        for start in range(0, len(packets), 500):
            for p in packets[start:start + 500]:
                sock.sendto(p, (target, PORT))
            seen += self.drain(wanted)
        return seen + self.drain(wanted, 0.2)

    def drain(self, wanted: set[bytes], timeout: float = 0.02) -> int:
        seen = 0
        while True:
            items = self.source.receive(timeout)
            if not items:
                return seen
            seen += sum(1 for data, _, _ in items if data in wanted)


def gate_keeper(src: CaptureSource | UdpSource, mode: str) -> Hand:
    """Fork a gate keeper as spa.server.runner does (its drop, its MapGrants
    for this mode, port and the map's room; a memory backend: no firewall
    here); the hand that asks it for tag maps."""
    ours, theirs = socket.socketpair()
    config = Path(tempfile.mkdtemp()) / "server.toml"
    config.write_text("")
    if os.fork() == 0:
        ours.close()
        src.close()
        drop_to_gate_keeper(config, "memory", bpf=True)
        keeper = GateKeeper(MemoryBackend(), config_path=config, services={},
                            clock=time.time, log=lambda line: None,
                            maps=MapGrants(mode, PORT, src.map_room))
        monitor.serve(keeper, theirs, threading.Event())
        os._exit(0)
    theirs.close()
    return partial(RemoteGate(ours).tag_map, mode, PORT)


def main(mode: str, scenario: str) -> dict[str, object]:
    probe, out = Probe(mode), dict[str, object]()
    src = probe.source
    tags = [tag() for _ in range(800 if scenario == "classic" else 4 * CLIENTS)]
    out["note"] = src.replace_tags(tags)
    out["kind"] = src.filter_kind()
    out["kernel_map"] = src.kernel_map
    sample = tags[:100] + tags[-100:] + rng.sample(tags, 100)
    out["live"] = probe.sent([knock(t) for t in sample])
    out["live6"] = probe.sent([knock(t) for t in sample], V6_KNOWN)
    out["junk"] = probe.sent([knock(tag()) for _ in range(2000)])
    out["junk6"] = probe.sent([knock(tag()) for _ in range(2000)], V6_KNOWN)
    out["short"] = probe.sent([knock(t, size=PACKET_SIZE - 1) for t in sample])
    if scenario == "all":
        out["every_live"] = probe.sent([knock(t) for t in tags])
    if scenario == "handed":  # a real gate keeper (CAP_NET_ADMIN and CAP_BPF) makes the maps
        src.hand_maps(gate_keeper(src, mode))
    if scenario in ("dropped", "handed"):
        drop_to_daemon(pwd.getpwnam("nobody"))  # as the daemon after its start: no capability
        out["caps_dropped"] = True
    if not src.kernel_map:
        return out
    added = [tag() for _ in range(1000)]
    out["update_note"] = src.update_tags(added, tags[:1000])
    out["removed"] = probe.sent([knock(t) for t in tags[:1000]])
    out["added"] = probe.sent([knock(t) for t in added])
    live = tags[1000:] + added
    blocked = rng.randbytes(8)
    src.update_tags([], [], nonces=[blocked])
    out["nonce_blocked"] = probe.sent([knock(live[0], blocked), knock(live[1], blocked)])
    out["nonce_other"] = probe.sent([knock(live[0]), knock(live[1])])
    shut = {live[2]: [V4_KNOWN, V6_KNOWN], live[3]: [V4_KNOWN]}
    out["shut_note"] = src.update_tags([], [], nonces=[blocked], shut=shut)
    for name, t, source in (("shut_known", live[2], V4_KNOWN), ("shut_known6", live[2], V6_KNOWN),
                            ("shut_other", live[2], V4_OTHER), ("shut_other6", live[2], V6_OTHER),
                            ("shut2_other6", live[3], V6_OTHER), ("unshut", live[4], V4_OTHER)):
        out[name] = probe.sent([knock(t) for _ in range(2560)], source)
    src.update_tags([], [], nonces=[])
    out["unshut_after"] = probe.sent([knock(live[2]) for _ in range(100)], V4_OTHER)
    out["nonce_after"] = probe.sent([knock(live[0], blocked)])
    fresh = [tag() for _ in range(4 * CLIENTS)]
    out["replace_note"] = src.replace_tags(fresh)
    out["replaced_old"] = probe.sent([knock(t) for t in live[:300]])
    out["replaced_new"] = probe.sent([knock(t) for t in fresh[:300]])
    grow = [tag() for _ in range(60000)]  # past MIN_ENTRIES: a growth
    started = time.perf_counter()
    out["grow_note"] = src.update_tags(grow, [])
    out["grow_seconds"] = round(time.perf_counter() - started, 3)
    out["grow_kind"] = src.filter_kind()
    out["grown_live"] = probe.sent([knock(t) for t in grow[-300:] + fresh[:300]])
    out["grown_junk"] = probe.sent([knock(tag()) for _ in range(1000)])
    return out


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
