"""Per-client source networks with the real spa-server, spa-client, nftables
and sshd: a client enrolled --from its own network opens ssh; its secret,
copied to the attacker's namespace, is refused there `source_not_allowed`."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace

from spa.core.uri import parse, render
from tests.netns.conftest import ATT4, CLI4, SRV4, SRV_ATT4, Spa
from tests.netns.test_ssh_e2e import tcp_open

CLI_NETS = ("--from", "10.199.1.0/24", "--from", "fd00:199:1::/64")  # the client's links


def test_a_stolen_secret_is_refused_from_outside_the_clients_networks(spa: Spa) -> None:
    world = spa.world
    spa.start()
    uri = spa.enroll("alice", SRV4, "ssh", options=CLI_NETS)
    assert spa.client(world.cli, "alice", "enroll", uri, "--name", "srv").returncode == 0
    done = spa.client(world.cli, "alice", "open", "ssh", "srv")
    assert done.returncode == 0, done.stdout + done.stderr
    login = world.ssh(world.cli, SRV4, "echo in-from-home")
    assert login.stdout.strip() == "in-from-home", login.stderr
    # the thief has alice's whole config dir (her keys), and knocks the
    # server at the address it reaches it by
    shutil.copytree(spa.root / "c-alice", spa.root / "c-thief")
    there = render(replace(parse(uri), host=SRV_ATT4))
    assert spa.client(world.att, "thief", "enroll", there, "--name", "srv").returncode == 0
    stolen = spa.client(world.att, "thief", "open", "ssh", "srv", "--timeout", "2")
    assert stolen.returncode == 1, stolen.stdout + stolen.stderr
    assert not tcp_open(world, "att", SRV_ATT4, 22)
    assert spa.elements() == [f"svc_ssh_v4 {CLI4}"], "nothing opened for the thief"
    assert spa.wait_for(f"refused reason=source_not_allowed client=alice src={ATT4}"), \
        spa.lines[-10:]
    deadline = time.monotonic() + 5
    while not (refused := [e for e in spa.events() if e["outcome"] == "refused"]):
        assert time.monotonic() < deadline, "the refusal reaches the event store"
        time.sleep(0.2)
    assert {(e["reason"], e["client"], e["source"]) for e in refused} == {
        ("source_not_allowed", "alice", ATT4)}
    assert not any(e["outcome"] == "accepted" and e["source"] == ATT4 for e in spa.events())
