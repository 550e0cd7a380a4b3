"""The idle server, in real time: issues 12 and 14's silences, waited through
once.  Anything that moves with the clock gets a real-time test that waits
longer than the longest step before it knocks; these two waits overlap.

Three servers in three worlds start together and get no packet:

- Issue 12, the idle lock-out.  The kernel tag filter once stayed on the step
  of the last packet Python saw, so after a quiet minute every knock died in
  the kernel.  Both modes (capture in one world, udp in a second), each
  enrolled before its start like a freshly booted server, then 100 s with no
  packet, then a real knock and a real ssh login.
- Issue 14, the sliced tag rotation and the eBPF tag map.  A server with more
  clients than the classic kernel filter holds (2,001: up to 5 steps of tags
  each while a rotation runs, 10,005 tags, against its ~811), silent for
  longer than a step, then knocked on 0.3 s after a step boundary: the new
  step's tag is already in the kernel's map and in the daemon's table, and the
  knock opens ssh; junk sent meanwhile never reaches the daemon.

The third world's knock falls 35-65 s after its start, inside the first two's
100 s (other worlds, other namespaces: their silence is untouched), so the
three cost one 100 s wait instead of 100 s plus up to 65.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from spa.core.knock import STEP_SECONDS
from tests.netns.conftest import SRV4, Spa, open_site, open_world
from tests.netns.test_scale_steps import populate
from tests.netns.test_ssh_e2e import enroll_alice, tcp_open

IDLE = 100  # seconds of silence before the knock: more than three tag steps (30 s each)
OTHERS = 2000  # clients beside alice: past the classic filter's ~200


def test_knocks_open_after_100_s_of_silence_and_just_past_a_step_boundary(
        spa: Spa, tmp_path: Path) -> None:
    """Capture (`spa`) and udp mode open after 100 s of silence; a server of
    2,001 clients with the eBPF map filter opens to a knock 0.3 s into a new
    step after more than a step of silence, and drops junk in the kernel."""
    with (open_world(tmp_path / "w2") as other, open_site(other, tmp_path / "s2") as udp,
          open_world(tmp_path / "w3") as third, open_site(third, tmp_path / "s3") as many):
        for site in (spa, udp, many):
            enroll_alice(site)
        populate(many.root / "state", OTHERS)
        spa.start()
        udp.start("--mode", "udp")
        quiet_since = time.monotonic()
        many.start()
        knock_just_past_a_step_boundary(many)
        time.sleep(max(0.0, quiet_since + IDLE - time.monotonic()))
        for site in (spa, udp):
            done = site.client(site.world.cli, "alice", "open", "ssh", "srv")
            assert done.returncode == 0, done.stdout + done.stderr + "\n".join(site.lines)
            login = site.world.ssh(site.world.cli, SRV4, "echo after-silence")
            assert login.stdout.strip() == "after-silence", login.stderr


def knock_just_past_a_step_boundary(spa: Spa) -> None:
    """Issue 14's half: `spa` just started with many clients; silent for more
    than a step, then junk and alice's knock 0.3 s into a new step."""
    assert any("eBPF map filter on" in line for line in spa.lines), spa.lines
    status = spa.status_once_it_shows("kernel filter: eBPF map")
    assert "kernel filter: eBPF map" in status, status
    silent_until = time.time() + STEP_SECONDS + 5  # longer than a step, no packet at all
    time.sleep(silent_until - time.time())
    time.sleep(STEP_SECONDS - time.time() % STEP_SECONDS + 0.3)  # 0.3 s into a new step
    assert not tcp_open(spa.world, "cli", SRV4, 22), "ssh hidden before the knock"
    junk = ("import os,socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"for _ in range(2000): s.sendto(b'\\x01'+os.urandom(160),({SRV4!r},62201))\n")
    spa.world.cli.run(sys.executable, "-c", junk)
    done = spa.client(spa.world.cli, "alice", "open", "ssh", "srv")
    assert done.returncode == 0, done.stdout + done.stderr + "\n".join(spa.lines)
    login = spa.world.ssh(spa.world.cli, SRV4, "echo after-a-step")
    assert login.stdout.strip() == "after-a-step", login.stderr
    assert not any(line.startswith("error") for line in spa.lines), spa.lines
    time.sleep(1.5)  # one events flush
    refused = [e for e in spa.events() if e["outcome"] == "refused"]
    assert refused == [], "2,000 junk packets, and not one reached the daemon"
