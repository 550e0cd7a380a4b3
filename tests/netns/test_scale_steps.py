"""Issue 14: the eBPF tag map on the real server at scale.  (The real-time
step test, 2,001 clients knocked on just past a step boundary after a silent
step, is in test_silence.py: it waits through issue 12's silence.)

A server with 100,000 clients starts with its whole gate: the daemon takes
seconds to ask for it, and the gate keeper's guard, polling meanwhile, once
put our table back for no service and made the start fail (no drop rule in
`inet spa`: only the hold table kept the ports closed, and it goes with the
daemon).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from spa.server.config import ClientEntry
from spa.store.clients import ClientStore
from tests.netns.conftest import SRV4, SRV_ATT4, Spa
from tests.netns.test_ssh_e2e import enroll_alice, tcp_open


def populate(state_dir: Path, count: int) -> None:
    """`count` more clients in the store, as the state directory's owner."""
    entries = (ClientEntry(f"c{i}", os.urandom(32), ("ssh",)) for i in range(count))
    with ClientStore.open_as_owner(state_dir, create=True) as store:
        store.add_many(entries, at=time.time())


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
