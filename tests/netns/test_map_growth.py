"""Issue 14 after the privilege drop: the eBPF tag map grows on the real
server with the gate keeper's maps.

The daemon holds no capability; its tag map was made before the drop with
room for twice the store's clients' tags (65,536 at least).  A server
started with one client, then 25,000 more enrolled into the store while it
runs (3 to 5 tags each: past that room), asks the gate keeper (which keeps
CAP_BPF for this) for a bigger map and its program, and moves the tags in:
the eBPF map filter still runs, junk is still dropped in the kernel, and a
client enrolled after the growth gets in.  Where the gate keeper refuses
(its most lowered by SPA_MAX_TAG_MAP), the daemon falls back to the classic
filter (port-only past its ~811 tags) and serves on.
"""

from __future__ import annotations

import sys
import time

import pytest

from spa.server.privsep import CAP_BPF, CAP_NET_ADMIN, capabilities
from tests.netns.conftest import SRV4, Spa, World
from tests.netns.test_privsep import children
from tests.netns.test_scale_steps import populate
from tests.netns.test_ssh_e2e import as_the_service_user, enroll_alice

MORE = 25_000  # clients enrolled while it runs: 75,000 tags or more, past the 65,536 room
JUNK = ("import os,socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"for _ in range(2000): s.sendto(b'\\x01'+os.urandom(160),({SRV4!r},62201))\n")


def enroll_many_while_it_runs(spa: Spa) -> None:
    populate(spa.root / "state", MORE)
    assert spa.wait_for(f"reloaded clients={MORE + 1} ", timeout=120), spa.lines[-10:]


def knock_as_a_new_client(spa: Spa) -> None:
    uri = spa.enroll("carol", SRV4, "ssh")
    assert spa.client(spa.world.cli, "carol", "enroll", uri, "--name", "srv").returncode == 0
    done = spa.client(spa.world.cli, "carol", "open", "ssh", "srv")
    assert done.returncode == 0, done.stdout + done.stderr + "\n".join(spa.lines[-20:])
    login = spa.world.ssh(spa.world.cli, SRV4, "echo as-carol")
    assert login.stdout.strip() == "as-carol", login.stderr


def test_the_dropped_daemon_grows_its_tag_map_with_the_gate_keepers_maps(spa: Spa) -> None:
    enroll_alice(spa)
    spa.start()
    assert spa.proc is not None
    assert capabilities(spa.proc.pid).effective == 0
    assert any("eBPF tag map reserved for 65536 tags" in line for line in spa.lines), spa.lines
    enroll_many_while_it_runs(spa)
    made = [line for line in spa.lines if "gate keeper made a tag map" in line]
    assert made == ["gate keeper made a tag map of 262144 entries and its program for the "
                    "daemon (capture on port 62201)"], spa.lines[-10:]
    grown = [line for line in spa.lines if "grown, its maps made by the gate keeper" in line]
    assert len(grown) == 1 and "(room for 262144;" in grown[0], spa.lines[-10:]
    status = spa.admin("status").stdout
    assert "eBPF map of every live knock tag" in status, status
    spa.world.cli.run(sys.executable, "-c", JUNK)
    knock_as_a_new_client(spa)
    assert not any(line.startswith("error") for line in spa.lines), spa.lines
    time.sleep(1.5)  # one events flush
    refused = [e for e in spa.events() if e["outcome"] == "refused"]
    assert refused == [], "2,000 junk packets, and not one reached the daemon"
    assert "eBPF map of every live knock tag" in spa.admin("status").stdout


def test_a_growth_the_gate_keeper_refuses_falls_back_to_the_classic_filter(spa: Spa) -> None:
    enroll_alice(spa)
    spa.start(prefix=("env", "SPA_MAX_TAG_MAP=65536"))  # nothing past the room made
    enroll_many_while_it_runs(spa)
    refusals = [line for line in spa.lines if line.startswith("error gate keeper refused")]
    assert refusals == ["error gate keeper refused a request: tagmap: 262144 entries are over "
                        "the most (65536)"], spa.lines[-10:]
    said = "\n".join(spa.lines)
    assert ("eBPF map filter cannot make room for 125000 more tags (no tag map of 262144 "
            "entries from the gate keeper: the gate keeper refused a request: tagmap: 262144 "
            "entries are over the most (65536)); the classic filter takes over") in said, said
    assert "port-only filter" in said.split("cannot take the change")[1], said
    status = spa.status_once_it_shows("none on tags")
    assert "none on tags (too many clients for a classic filter)" in status, status
    knock_as_a_new_client(spa)
    assert [line for line in spa.lines if line.startswith("error gate keeper refused")
            ] == refusals, "the gate keeper was asked once"


@pytest.mark.usefixtures("checkout_reachable_by_others")
def test_as_the_unit_runs_it_the_gate_keeper_keeps_cap_bpf_and_grows_the_map(
        world: World) -> None:
    """As contrib/systemd/spa-server.service runs it: not root, CAP_NET_ADMIN,
    CAP_NET_RAW and CAP_BPF ambient.  The daemon drops them all; the gate
    keeper keeps CAP_NET_ADMIN and CAP_BPF (not ambient: nft never gets it)
    and makes the grown map's kit."""
    with as_the_service_user(world, "+net_admin,+net_raw,+bpf") as spa:
        assert spa.proc is not None
        assert capabilities(spa.proc.pid).effective == 0
        (keeper,) = children(spa.proc.pid)
        held = capabilities(keeper)
        assert held.effective == held.permitted == 1 << CAP_NET_ADMIN | 1 << CAP_BPF, held
        assert held.ambient == 1 << CAP_NET_ADMIN
        enroll_many_while_it_runs(spa)
        assert any("grown, its maps made by the gate keeper" in line for line in spa.lines), (
            spa.lines[-10:])
        assert "eBPF map of every live knock tag" in spa.admin("status").stdout
        knock_as_a_new_client(spa)
