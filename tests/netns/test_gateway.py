"""Gateway mode: spa-server on the router, a real sshd on an internal host
behind it (spa/backends/nftgateway.py; docs/install.md, "Gateway").

    cli ---- gw (spa-server, forwarding) ---- int (sshd)
              |
            other (an address with no grant)

Three namespaces and a fourth for another client's address.  Leases are
4 s, so every test is short.
"""

from __future__ import annotations

import contextlib
import platform
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spa.netns import Namespace, Topology, start_sshd
from tests.integration.procs import command
from tests.netns.conftest import REASON, Spa, World, open_site

GW4, CLI4, INT4, GW_INT4 = "10.198.1.1", "10.198.1.2", "10.198.9.5", "10.198.9.1"
GW6, CLI6, INT6, GW_INT6 = "fd00:198:1::1", "fd00:198:1::2", "fd00:198:9::5", "fd00:198:9::1"
GW_OTHER4, OTHER4 = "10.198.2.1", "10.198.2.2"
GW_OTHER6, OTHER6 = "fd00:198:2::1", "fd00:198:2::2"
LEASE = 4  # seconds: each service's default and maximum
SERVICES = f"""
[services.db4]
protocol = "tcp"
port = 22
default_duration = {LEASE}
max_duration = {LEASE}
host = "{INT4}"
listen_port = 2222

[services.db6]
protocol = "tcp"
port = 22
default_duration = {LEASE}
max_duration = {LEASE}
host = "{INT6}"
listen_port = 2223
"""
# family -> (the gateway's address for the client, for the other address,
# the internal host, the client's address, the service, its published port)
FAMILIES = {
    "ipv4": (GW4, GW_OTHER4, INT4, CLI4, "db4", 2222),
    "ipv6": (GW6, GW_OTHER6, INT6, CLI6, "db6", 2223),
}


@contextlib.contextmanager
def gateway_world(root: Path) -> Iterator[World]:
    """cli, gw, int and other; forwarding on in gw (its own namespace's
    sysctl); a real sshd in int.  All removed afterwards."""
    root.mkdir(parents=True, exist_ok=True)
    topo = Topology()
    try:
        gw, cli, internal, other = (topo.ns(role) for role in ("gw", "cli", "int", "oth"))
        topo.link(gw, [f"{GW4}/24", f"{GW6}/64"], cli, [f"{CLI4}/24", f"{CLI6}/64"])
        topo.link(gw, [f"{GW_INT4}/24", f"{GW_INT6}/64"], internal,
                  [f"{INT4}/24", f"{INT6}/64"])
        topo.link(gw, [f"{GW_OTHER4}/24", f"{GW_OTHER6}/64"], other,
                  [f"{OTHER4}/24", f"{OTHER6}/64"])
        for ns, via4, via6 in ((cli, GW4, GW6), (internal, GW_INT4, GW_INT6),
                               (other, GW_OTHER4, GW_OTHER6)):
            ns.run("ip", "route", "add", "default", "via", via4)
            ns.run("ip", "-6", "route", "add", "default", "via", via6)
        gw.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        gw.run("sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
        # Spa runs in World.srv; the world's other roles are its client,
        # the other address (att) and the internal host
        world = World(topo, srv=gw, cli=cli, att=other, router=internal, nat1=internal,
                      nat2=internal, root=root)
        world.sshd = start_sshd(internal, root)
        world.procs.append(world.sshd.process)
        yield world
    finally:
        topo.cleanup()


@pytest.fixture(scope="module")
def gworld(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if REASON is not None:
        pytest.skip(REASON)
    with gateway_world(tmp_path_factory.mktemp("gateway")) as world:
        yield world


@pytest.fixture
def site(gworld: World, tmp_path: Path) -> Iterator[Spa]:
    with open_site(gworld, tmp_path) as spa:
        with spa.config.open("a") as config:
            config.write(SERVICES)
        yield spa


def tcp_open(ns: Namespace, host: str, port: int, timeout: float = 0.6) -> bool:
    code = (f"import socket,sys\ns=socket.socket(socket.AF_INET6 if ':' in {host!r} else "
            f"socket.AF_INET)\ns.settimeout({timeout})\n"
            f"sys.exit(s.connect_ex(({host!r},{port})))")
    return ns.run(sys.executable, "-c", code, check=False).returncode == 0


def ssh(world: World, host: str, port: int = 22) -> str:
    """A real key login from the client to the internal host's sshd
    (directly, or through the gateway's published port): what it printed."""
    argv = world.sshd_login(host, "echo in-$(hostname -I | cut -d' ' -f1)")
    argv[-2:-2] = ["-p", str(port)]
    done = world.cli.run(*argv, check=False, timeout=30)
    return done.stdout.strip() if done.returncode == 0 else f"failed: {done.stderr.strip()}"


def knock(spa: Spa, family: str) -> None:
    gw = FAMILIES[family][0]
    uri = spa.enroll("alice", f"[{gw}]" if ":" in gw else gw, "db4", "db6")
    assert spa.client(spa.world.cli, "alice", "enroll", uri, "--name", "gw").returncode == 0
    done = spa.client(spa.world.cli, "alice", "open", FAMILIES[family][4], "gw")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_only_the_knocking_address_reaches_the_internal_host_and_only_for_its_lease(
        site: Spa, family: str) -> None:
    gw, gw_other, internal, client, service, published = FAMILIES[family]
    world = site.world
    site.start()
    assert not tcp_open(world.cli, internal, 22), "the internal host hidden before the knock"
    assert not tcp_open(world.cli, gw, published), "the published port too"
    knock(site, family)
    opened = time.monotonic()
    assert ssh(world, internal) == f"in-{INT4}", "a real login through the gateway"
    assert ssh(world, gw, published) == f"in-{INT4}", "and through its published port"
    assert not tcp_open(world.att, internal, 22), "another address still cannot"
    assert not tcp_open(world.att, gw_other, published), "nor through the published port"
    assert site.elements() == [f"svc_{service}_v{family[-1]} {client}"]
    time.sleep(max(0.0, opened + LEASE + 1.2 - time.monotonic()))
    assert site.elements() == [], "the kernel expired the grant"
    assert not tcp_open(world.cli, internal, 22), "closed again when the lease ends"
    assert not tcp_open(world.cli, gw, published)


def test_kill_9_keeps_the_grant_and_its_expiry_and_a_session_outlives_it(site: Spa) -> None:
    world = site.world
    site.start()
    knock(site, "ipv4")
    opened = time.monotonic()
    session = world.cli.popen(world.sshd_login(INT4, "sleep 5.5; echo still-here"),
                              stdout=-1, stderr=-1)
    site.stop(signal.SIGKILL)
    assert tcp_open(world.cli, INT4, 22), "the grant outlives the daemon"
    assert not tcp_open(world.att, INT4, 22), "and stays the knocking address's only"
    time.sleep(max(0.0, opened + LEASE + 1.2 - time.monotonic()))
    assert not tcp_open(world.cli, INT4, 22), "the kernel ends it on time, no daemon needed"
    out, err = session.communicate(timeout=30)
    assert out.strip() == "still-here", err


def test_a_flushed_forward_chain_and_a_deleted_published_chain_are_put_back(
        site: Spa) -> None:
    world = site.world
    site.start()
    altered = "warning firewall: the chains, rules or sets of table inet spa were altered"
    world.srv.run("nft", "flush", "chain", "inet", "spa", "forward")
    assert site.wait_for(altered, 5), site.lines[-5:]
    assert not tcp_open(world.att, INT4, 22), "the gate is back"
    world.srv.run("nft", "delete", "chain", "inet", "spa", "published")
    deadline = time.monotonic() + 5
    while "chain published" not in world.srv.run("nft", "list", "table", "inet", "spa").stdout:
        assert time.monotonic() < deadline, site.lines[-5:]
        time.sleep(0.1)
    knock(site, "ipv4")
    assert ssh(world, GW4, 2222) == f"in-{INT4}"
    site.stop()
    done = site.admin("gate", "--remove", check=False)  # spa's shape, nat chain and all
    assert done.returncode == 0, done.stdout + done.stderr
    assert world.srv.run("nft", "list", "tables").stdout == "", "spa's table went"


def test_check_says_when_the_gateway_does_not_forward(site: Spa) -> None:
    world = site.world
    site.start()
    done = site.admin("check", check=False)
    assert (f"db4: tcp/22 of {INT4} (its other addresses and ports are not gated, nor "
            "connections that do not pass through this host), published on 2222") \
        in done.stdout, done.stdout
    assert "ok: no other firewall drops what spa lets in" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 0
    world.srv.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
    try:
        done = site.admin("check", check=False)
    finally:
        world.srv.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    assert "IPv4 forwarding is off (net.ipv4.ip_forward = 0)" in done.stdout, done.stdout
    assert "IPv6 forwarding is off" not in done.stdout
    assert done.returncode != 0


OWN_HOST = f"""
[services.web]
protocol = "tcp"
port = 8080
default_duration = {LEASE}
max_duration = {LEASE}
host = "{GW_INT4}"
listen_port = 2224
"""
OWN_LINE = (f"[services.web] host = {GW_INT4} is an address of this machine: a gateway "
            "service's DNAT to it reaches hook input, where it is not gated, so it would be "
            "open to everyone")


def test_a_host_that_is_the_gateways_own_address_is_refused_at_start_check_and_reload(
        gworld: World, tmp_path: Path) -> None:
    """The review's gw.py `own`: DNATed to the gateway's own address, the
    published port reached hook input, where gateway services are not gated."""
    with open_site(gworld, tmp_path) as spa:
        with spa.config.open("a") as config:
            config.write(OWN_HOST)
        for args in (("check",), ("gate",), ("run",)):
            done = spa.world.srv.run(*command("spa-server"), "--config", str(spa.config),
                                     *args, check=False, timeout=10)
            assert done.returncode == 2 and OWN_LINE in done.stderr, (args, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert spa.world.srv.run("nft", "list", "tables").stdout == "", "nothing installed"
    with open_site(gworld, tmp_path / "reload") as spa:
        spa.start()
        with spa.config.open("a") as config:
            config.write(OWN_HOST)
        assert spa.wait_for("error reload failed, keeping the running config", 5), spa.lines
        assert any(OWN_LINE in line for line in spa.lines), spa.lines
        listing = spa.world.srv.run("nft", "list", "table", "inet", "spa").stdout
        assert GW_INT4 not in listing, "the gate keeper kept the services it had"


BRIDGED4 = "10.197.0.5"  # behind a bridge of the gateway's: switched, not routed
BRIDGE_SYSCTL = "net.bridge.bridge-nf-call-iptables"


def kernel_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", platform.release())
    return found is not None and (int(found[1]), int(found[2])) >= (major, minor)


def test_check_says_when_a_host_is_bridged_past_the_forward_gate(site: Spa) -> None:
    """The review's br.py: with bridge-nf-call-iptables = 0 (or no
    br_netfilter) a host on the gateway's bridge is open to the bridge.  The
    sysctl is changed in the gateway's namespace only (per namespace since
    Linux 5.3)."""
    if not kernel_at_least(5, 3):
        pytest.skip("the bridge sysctls are per namespace from Linux 5.3")
    gw = site.world.srv
    with site.config.open("a") as config:
        config.write(f'\n[services.vm]\nport = 22\ndefault_duration = {LEASE}\n'
                     f'max_duration = {LEASE}\nhost = "{BRIDGED4}"\n')
    gw.run("ip", "link", "add", "spabr0", "type", "bridge")
    try:
        gw.run("ip", "addr", "add", "10.197.0.1/24", "dev", "spabr0")
        gw.run("ip", "link", "set", "spabr0", "up")
        line = (f"vm (tcp/22 to {BRIDGED4}): the route leaves through bridge spabr0 and "
                f"{BRIDGE_SYSCTL} is 0 or absent (br_netfilter)")
        has_sysctl = gw.run("sysctl", "-q", "-w", f"{BRIDGE_SYSCTL}=0",
                            check=False).returncode == 0
        done = site.admin("check", check=False)
        assert line in done.stdout and done.returncode == 1, done.stdout + done.stderr
        if has_sysctl:  # br_netfilter loaded: with the sysctl on, bridged frames are gated
            gw.run("sysctl", "-q", "-w", f"{BRIDGE_SYSCTL}=1")
            done = site.admin("check", check=False)
            assert "leaves through bridge" not in done.stdout, done.stdout
    finally:
        gw.run("ip", "link", "del", "spabr0", check=False)
