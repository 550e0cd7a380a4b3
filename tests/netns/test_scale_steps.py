"""Issue 14: the sliced tag rotation and the eBPF tag map on the real server,
in real time.

A server with more clients than the classic kernel filter holds (2,001: up to
5 steps of tags each while a rotation runs, 10,005 tags, against its ~811),
silent for longer than a step, then knocked on 0.3 s after a step boundary:
the new step's tag is already in the kernel's map and in the daemon's table,
and the knock opens ssh; junk sent meanwhile never reaches the daemon.

A server with 100,000 clients starts with its whole gate: the daemon takes
seconds to ask for it, and the gate keeper's guard, polling meanwhile, once
put our table back for no service and made the start fail (no drop rule in
`inet spa`: only the hold table kept the ports closed, and it goes with the
daemon).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from spa.core.knock import STEP_SECONDS
from spa.server.config import ClientEntry
from spa.store.clients import ClientStore
from tests.netns.conftest import SRV4, SRV_ATT4, Spa
from tests.netns.test_ssh_e2e import enroll_alice, tcp_open

OTHERS = 2000  # clients beside alice: past the classic filter's ~200


def populate(state_dir: Path, count: int) -> None:
    """`count` more clients in the store, as the state directory's owner."""
    entries = (ClientEntry(f"c{i}", os.urandom(32), ("ssh",)) for i in range(count))
    with ClientStore.open_as_owner(state_dir, create=True) as store:
        store.add_many(entries, at=time.time())


def test_after_a_silent_step_a_knock_just_past_the_boundary_opens(spa: Spa) -> None:
    enroll_alice(spa)
    populate(spa.root / "state", OTHERS)
    spa.start()
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


MANY = 100_000  # clients in all: the goal


def test_a_server_with_100000_clients_starts_with_its_whole_gate(spa: Spa) -> None:
    enroll_alice(spa)
    populate(spa.root / "state", MANY - 1)
    spa.start(timeout=60)
    assert f"clients={MANY} " in spa.lines[-1], spa.lines
    assert not any(line.startswith("error") or "by another program" in line
                   for line in spa.lines), spa.lines
    rules = spa.world.srv.run("nft", "list", "chain", "inet", "spa", "input").stdout
    assert "tcp dport 22 drop" in rules and "@drops_v4" in rules, rules
    done = spa.client(spa.world.cli, "alice", "open", "ssh", "srv")
    assert done.returncode == 0, done.stdout + done.stderr + "\n".join(spa.lines[-20:])
    login = spa.world.ssh(spa.world.cli, SRV4, "echo at-100000")
    assert login.stdout.strip() == "at-100000", login.stderr
    assert not tcp_open(spa.world, "att", SRV_ATT4, 22), "open to alice only"
    spa.stop(signal.SIGKILL)  # the hold table goes with the daemon: our table alone gates
    assert not tcp_open(spa.world, "att", SRV_ATT4, 22), "closed without the daemon"
