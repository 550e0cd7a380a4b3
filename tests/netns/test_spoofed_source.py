"""A knock sent in another address's name (issue 13, finding 2).

A client without `allow_other_address` may only open for the address it
knocks from.  Before the reverse-path check, it could name any address by
forging the source: the ordinary knock (no address in the body) sent from a
raw socket with source X opened the port for X.  Capture mode reads frames
before the IP stack, and the kernel's own reverse-path filter is off in a new
namespace (loose mode, what most hosts set, passes X too): nothing stopped it.

X is the router's address, which the server reaches by its third interface;
the forged knock arrives on the client's link, so the route back to X does
not leave by the interface it came in on: `spoofed_source`.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from spa.core.uri import parse
from spa.core.wire import NONCE_SIZE, Action
from spa_client.knock import make_packet
from tests.netns.conftest import CLI4, KNOCK_PORT, ROUTER4, SRV4, SRV_NAT4, Spa
from tests.netns.test_ssh_e2e import tcp_open

X = ROUTER4  # behind the server's interface toward the router, not the client's

SEND = ("from scapy.all import IP, UDP, Raw, send\nimport sys\n"
        "send(IP(src=sys.argv[1], dst=sys.argv[2]) / UDP(sport=40001, dport=int(sys.argv[3]))"
        " / Raw(bytes.fromhex(sys.argv[4])), verbose=0)\n")


def send_forged_knock(spa: Spa, uri: str, source: str) -> None:
    """alice's ordinary open knock (no address inside), sent from the
    client's namespace through a raw socket with `source` as its source."""
    packet = make_packet(parse(uri), Action.OPEN, "ssh", duration=60, address=None,
                         now=time.time(), nonce=os.urandom(NONCE_SIZE))
    spa.world.cli.run(sys.executable, "-c", SEND, source, SRV4, str(KNOCK_PORT), packet.hex(),
                      timeout=60)


@pytest.mark.parametrize("mode", ["capture", "udp"])
def test_a_forged_source_is_refused_and_the_honest_knock_is_granted(spa: Spa,
                                                                    mode: str) -> None:
    world = spa.world
    spa.start("--mode", mode)
    uri = spa.enroll("alice", SRV4, "ssh")
    assert spa.client(world.cli, "alice", "enroll", uri, "--name", "srv").returncode == 0
    # the honest way to ask for X is refused: alice may not name another address
    asked = spa.client(world.cli, "alice", "open", "ssh", "srv", "--allow-ip", X,
                       "--timeout", "1")
    assert asked.returncode == 1, asked.stdout + asked.stderr
    assert spa.wait_for(f"refused reason=address_not_allowed client=alice src={CLI4}")
    send_forged_knock(spa, uri, X)
    assert spa.wait_for(f"refused reason=spoofed_source client=alice src={X}"), [
        line for line in spa.lines if X in line]
    assert spa.elements() == [], "no lease for X"
    assert not tcp_open(world, "router", SRV_NAT4, 22), "the firewall does not let X in"
    # the same client's honest knock, from its own address, is granted
    done = spa.client(world.cli, "alice", "open", "ssh", "srv")
    assert done.returncode == 0, done.stdout + done.stderr
    assert spa.elements() == [f"svc_ssh_v4 {CLI4}"]
    assert not any("spoofed_source" in line and CLI4 in line for line in spa.lines)


ASK = """import json, socket, sys
from spa.server.capture import arrival_index
from spa.server.routes import KernelRoutes
routes, index = KernelRoutes(), socket.if_nametoindex
answers = {f"{s} {i}": routes.leaves_by(s, index(i), 0.0) for s, i in
           (q.split() for q in sys.argv[1:])}
answers["arrival"] = [arrival_index(n) for n in ("port", "sbr0", "gone")]
answers["index"] = [index(n) for n in ("lo", "uplink", "sbr0")]
print(json.dumps(answers))
"""


def test_the_kernels_route_back_local_multipath_blackhole_and_bridge_ports() -> None:
    """KernelRoutes against a real routing table: a namespace with links
    `uplink` (10.198.1.1/24, fd00:198:1::1/64) and `sbr0` (a bridge over `port`,
    10.198.2.1/24), a multipath route over both, a blackhole, no default."""
    from spa.netns import Topology, can_make_namespaces

    reason = can_make_namespaces()
    if reason is not None:
        pytest.skip(reason)
    topo = Topology()
    try:
        ns, peer = topo.ns("rt"), topo.ns("peer")
        a, _ = topo.link(ns, ["10.198.1.1/24"], peer, ["10.198.1.2/24"])
        b, _ = topo.link(ns, [], peer, ["10.198.2.2/24"])
        ns.run("ip", "link", "set", a, "down")
        ns.run("ip", "link", "set", a, "name", "uplink")
        ns.run("ip", "link", "set", "uplink", "up")
        ns.run("ip", "addr", "add", "fd00:198:1::1/64", "dev", "uplink", "nodad")
        ns.run("ip", "link", "set", b, "down")
        ns.run("ip", "link", "set", b, "name", "port")
        ns.run("ip", "link", "add", "name", "sbr0", "type", "bridge")
        ns.run("ip", "link", "set", "port", "master", "sbr0", "up")
        ns.run("ip", "addr", "add", "10.198.2.1/24", "dev", "sbr0")
        ns.run("ip", "link", "set", "sbr0", "up")
        ns.run("ip", "route", "add", "10.198.9.0/24", "nexthop", "via", "10.198.1.2", "dev",
               "uplink", "nexthop", "via", "10.198.2.2", "dev", "sbr0")
        ns.run("ip", "route", "add", "blackhole", "10.198.8.0/24")
        questions = [
            "10.198.1.2 uplink", "10.198.1.2 sbr0", "10.198.2.2 sbr0", "10.198.2.2 uplink",
            "fd00:198:1::2 uplink", "fd00:198:1::2 sbr0",
            "127.0.0.1 lo", "127.0.0.1 uplink", "::1 lo", "::1 uplink",
            "10.198.1.1 lo", "10.198.1.1 uplink", "10.198.2.1 lo", "10.198.2.1 sbr0",
            "10.198.9.5 uplink", "10.198.9.5 sbr0", "10.198.8.5 uplink", "10.198.7.5 uplink",
            "fe80::1 uplink",
        ]
        done = ns.run(sys.executable, "-c", ASK, *questions)
        import json

        got = json.loads(done.stdout)
        _, _, br = got.pop("index")
        assert got.pop("arrival") == [br, br, 0], "a bridge port counts as its bridge"
        assert got == {
            "10.198.1.2 uplink": True, "10.198.1.2 sbr0": False,  # its route leaves by `uplink`
            "10.198.2.2 sbr0": True, "10.198.2.2 uplink": False,
            "fd00:198:1::2 uplink": True, "fd00:198:1::2 sbr0": False,
            # the host's own addresses and loopback: only as they arrive, on lo
            "127.0.0.1 lo": True, "127.0.0.1 uplink": False, "::1 lo": True, "::1 uplink": False,
            "10.198.1.1 lo": True, "10.198.1.1 uplink": False,
            "10.198.2.1 lo": True, "10.198.2.1 sbr0": False,
            "10.198.9.5 uplink": True, "10.198.9.5 sbr0": True,  # either nexthop
            "10.198.8.5 uplink": False,  # blackhole
            "10.198.7.5 uplink": False,  # no route at all (no default)
            "fe80::1 uplink": True,  # link-local: on the link it came in on
        }
    finally:
        topo.cleanup()
