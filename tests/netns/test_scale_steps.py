"""Issue 14: the sliced tag rotation on the real server, in real time.

A server with as many clients as the classic kernel filter holds (task A's
eBPF map filter is not on this branch: 141 clients, 5 steps of tags at most
while a rotation runs, under its ~811), silent for longer than a step, then
knocked on 0.3 s after a step boundary: the new step's tag is already in the
kernel and in the daemon's table, and the knock opens ssh.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

from spa.core.knock import STEP_SECONDS
from tests.netns.conftest import SRV4, Spa
from tests.netns.test_ssh_e2e import enroll_alice, tcp_open

OTHERS = 140  # clients beside alice: 141 x 5 steps of tags fit the classic filter


def populate(config: Path, count: int) -> None:
    """`count` more clients, written into the TOML directly (as bench_scale)."""
    blocks = []
    for i in range(count):
        secret = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
        blocks.append(f'\n[clients.c{i}]\nsecret = "{secret}"\nservices = ["ssh"]\n')
    with config.open("a") as out:
        out.write("".join(blocks))


def test_after_a_silent_step_a_knock_just_past_the_boundary_opens(spa: Spa) -> None:
    enroll_alice(spa)
    populate(spa.config, OTHERS)
    spa.start()
    assert any("kernel filter on" in line for line in spa.lines), spa.lines
    assert "kernel filter: classic" in spa.status_once_it_shows("kernel filter: classic")
    silent_until = time.time() + STEP_SECONDS + 5  # longer than a step, no packet at all
    time.sleep(silent_until - time.time())
    time.sleep(STEP_SECONDS - time.time() % STEP_SECONDS + 0.3)  # 0.3 s into a new step
    assert not tcp_open(spa.world, "cli", SRV4, 22), "ssh hidden before the knock"
    done = spa.client(spa.world.cli, "alice", "open", "ssh", "srv")
    assert done.returncode == 0, done.stdout + done.stderr + "\n".join(spa.lines)
    login = spa.world.ssh(spa.world.cli, SRV4, "echo after-a-step")
    assert login.stdout.strip() == "after-a-step", login.stderr
    assert not any(line.startswith("error") for line in spa.lines), spa.lines
