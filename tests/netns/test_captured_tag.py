"""Issue 13, finding 7: a captured tag flooded costs its client no knock.

The attacker saw one of alice's knocks and floods its live tag with random
bytes behind it (benchmarks/flood.c, sendmmsg: as fast as one core sends)
from its own namespace, while alice knocks from the address she knocked
from before.  Real spa-server, both modes, nftables.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns.conftest import ATT4, CLI4, KNOCK_PORT, SRV4, SRV_ATT4, Spa
from tests.netns.test_nat_replay_crash import capture_one_knock

FLOOD = Path(__file__).resolve().parents[2] / "benchmarks" / "flood.c"
SECONDS = 60  # of flood at most: it is stopped once alice's knocks are all sent
KNOCKS = 30  # alice's, one every 0.2 s while it lasts
SENDER = """
import os, socket, sys, time
from spa.core.uri import parse
from spa.core.wire import NONCE_SIZE, Action
from spa_client.knock import make_packet
enrollment, count, gap = parse(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
    udp.bind((sys.argv[4], 0))
    for _ in range(count):
        udp.sendto(make_packet(enrollment, Action.OPEN, "ssh", duration=60, address=None,
                               now=time.time(), nonce=os.urandom(NONCE_SIZE)),
                   (sys.argv[5], int(sys.argv[6])))
        time.sleep(gap)
"""


def counted(spa: Spa, outcome: str, source: str, since: float) -> int:
    return sum(int(str(e["count"])) for e in spa.events()
               if e["outcome"] == outcome and e["source"] == source
               and float(str(e["time"])) >= since)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc for benchmarks/flood.c")
@pytest.mark.parametrize("mode", ["capture", "udp"])
def test_a_flood_of_a_captured_tag_costs_its_client_no_knock(spa: Spa, tmp_path: Path,
                                                             mode: str) -> None:
    """Every one of alice's 30 knocks from her known address is granted
    while the attacker floods her captured tag; the kernel drops the flood
    but one copy in SHUT_SAMPLE, and lifts the shut tag after it ends."""
    world = spa.world
    flood = tmp_path / "flood"
    subprocess.run(["gcc", "-O2", "-o", str(flood), str(FLOOD)], check=True)
    spa.start("--mode", mode)
    uri = spa.enroll("alice", SRV4, "ssh")
    assert spa.client(world.cli, "alice", "enroll", uri, "--name", "srv").returncode == 0
    (tmp_path / "captured").write_bytes(capture_one_knock(world, spa, tmp_path))
    started = time.time()
    sender = world.att.popen([str(flood), "-p", str(tmp_path / "captured"), "-x", "9",
                              SRV_ATT4, str(KNOCK_PORT), str(SECONDS)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(1)  # the flood at full rate, and the tag shut
    world.cli.run(sys.executable, "-c", SENDER, uri, str(KNOCKS), "0.2", CLI4, SRV4,
                  str(KNOCK_PORT), timeout=60)
    assert sender.poll() is None, "the flood lasted as long as alice's knocks"
    sender.send_signal(signal.SIGTERM)  # it stops sending, and says how much it sent
    out, _ = sender.communicate(timeout=30)
    sent = int(out.split()[1])
    assert sent > 100_000, out
    time.sleep(3)  # the hold ends; an events flush
    assert counted(spa, "accepted", CLI4, started) == KNOCKS, "every knock of alice's"
    reached = counted(spa, "refused", ATT4, started)
    assert reached < sent / 20, f"{reached:,} of {sent:,} forgeries reached Python"
    shut = [line for line in spa.lines if "flooded tags shut" in line]
    assert len(shut) == 1, shut  # shut once: not rebuilt round after round
    # (the eBPF map filter's line ends with its room: "... (room for 65536)")
    assert re.search(r"tags, 1 flooded tags shut but from 1 known sources( \(room for \d+\))?$",
                     shut[0]), shut
    assert "known sources" not in spa.lines[-1], "the shut tag lifted after the flood"
