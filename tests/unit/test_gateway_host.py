"""Where a gateway service's host lives (spa/server/gwroute.py): refused when
it is this machine, one problem line when it is bridged past the forward
gate.  The kernel's answers come from a fake (STYLE principle 5)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from spa.core.policy import Service
from spa.server.coexist import closed_ports
from spa.server.errors import LocalError
from spa.server.gwroute import (
    FakeRoute,
    HostRoute,
    bridged_lines,
    own_host_problem,
    refuse_own_hosts,
)

WEB = Service("web", "tcp", 8080, 30, 300, ipaddress.ip_address("10.198.9.1"), 2222)
VM = Service("vm", "tcp", 22, 30, 300, ipaddress.ip_address("10.197.0.5"))
VM6 = Service("vm6", "tcp", 22, 30, 300, ipaddress.ip_address("fd00:197::5"))
SSH = Service("ssh", "tcp", 22, 30, 300)
OWN = FakeRoute({"10.198.9.1": HostRoute(local=True)})
BRIDGED = FakeRoute({"10.197.0.5": HostRoute(local=False, bridges=("br0",)),
                     "fd00:197::5": HostRoute(local=False, bridges=("br0",))})


def test_a_host_that_is_an_address_of_this_machine_is_refused_in_one_line() -> None:
    """The review's gw.py `own`: the DNAT to the gateway's own address reached
    hook input, where gateway services are not gated: open to everyone."""
    with pytest.raises(LocalError) as raised:
        refuse_own_hosts({"web": WEB, "ssh": SSH}, Path("/etc/spa/server.toml"), OWN)
    assert str(raised.value) == (
        "/etc/spa/server.toml: [services.web] host = 10.198.9.1 is an address of this "
        "machine: a gateway service's DNAT to it reaches hook input, where it is not gated, "
        "so it would be open to everyone; name the internal host, or leave host out to gate "
        "this machine's own port")
    assert own_host_problem({"vm": VM}, OWN) == "", "another machine's address is fine"
    assert own_host_problem({"vm": VM}, FakeRoute()) == "", "no route: not refused here"


def test_only_gateway_services_ask_the_kernel() -> None:
    routes = FakeRoute()
    refuse_own_hosts({"ssh": SSH}, "server.toml", routes)
    assert routes.asked == []
    refuse_own_hosts({"ssh": SSH, "vm": VM}, "server.toml", routes)
    assert routes.asked == [VM.host]


def test_a_bridged_host_is_one_line_when_bridged_frames_skip_the_forward_hook() -> None:
    """The review's br.py: without br_netfilter (or with bridge-nf-call-iptables
    = 0) a host on the gateway's bridge is open to the whole bridge."""
    services = {"vm": VM, "vm6": VM6, "ssh": SSH}
    assert bridged_lines(services, BRIDGED, lambda version: version == 6) == [
        "vm (tcp/22 to 10.197.0.5): the route leaves through bridge br0 and "
        "net.bridge.bridge-nf-call-iptables is 0 or absent (br_netfilter), so bridged frames "
        "skip the forward gate and every host on that bridge reaches it ungated; a gateway "
        "service needs a routed host (docs/install.md, section 11)"]
    assert "bridge-nf-call-ip6tables" in bridged_lines(services, BRIDGED, lambda v: False)[1]
    assert bridged_lines(services, BRIDGED, lambda version: True) == [], "br_netfilter on"
    routed = FakeRoute({"10.197.0.5": HostRoute(local=False)})
    assert bridged_lines({"vm": VM}, routed, lambda version: False) == [], "a routed host"
    assert bridged_lines({"vm": VM}, FakeRoute(), lambda version: False) == [], "no route"


def test_the_start_line_says_exactly_what_a_gateway_service_gates() -> None:
    """Not "closed to everyone, IPv4 and IPv6" (the review): only host's one
    address and port, on the way through this host."""
    assert closed_ports({"ssh": SSH, "web": WEB, "vm6": VM6}) == (
        "closed to everyone from the first run, IPv4 and IPv6, except to clients whose knock "
        "opens them: ssh (tcp/22); forwarded through this host only to clients whose knock "
        "opens them: web: tcp/8080 of 10.198.9.1 (its other addresses and ports are not "
        "gated, nor connections that do not pass through this host), published on 2222; "
        "vm6: tcp/22 of fd00:197::5 (its other addresses and ports are not gated, nor "
        "connections that do not pass through this host)")
    assert not closed_ports([VM]).startswith("closed to everyone"), "a gateway alone"
    assert closed_ports([SSH]) == ("closed to everyone from the first run, IPv4 and IPv6, "
                                   "except to clients whose knock opens them: ssh (tcp/22)")
