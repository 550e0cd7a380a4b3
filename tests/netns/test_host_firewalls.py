"""Issue 12: spa beside the host's own firewall, for real.

Each test loads a real ruleset into the server namespace (Debian's default
/etc/nftables.conf, a `policy drop` table, ufw's generated rules, firewalld's
table, Docker's chains for a published port; where each came from:
tests/hostfw/README.md), runs `spa-server check`, adds the line it names
when it names one, and shows a real knock opening the port (and strangers
still kept out).  The rulesets are removed afterwards.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from spa.backends.hostcheck import Outcome, Target, check
from tests.netns.conftest import CLI4, SRV4, SRV_ATT4, Spa, World
from tests.netns.test_ssh_e2e import enroll_alice, tcp_open

FIXTURES = Path(__file__).resolve().parent.parent / "hostfw"
SERVICES = [Target("tcp", 22, "ssh"), Target("tcp", 443, "https")]


@pytest.fixture
def host(spa: Spa) -> Iterator[Spa]:
    """The spa site; whatever host ruleset the test loads goes afterwards."""
    try:
        yield spa
    finally:
        spa.world.srv.run("nft", "flush", "ruleset", check=False)


def load(world: World, *names: str) -> None:
    for name in names:
        path = FIXTURES / name
        if path.suffix == ".nft":
            world.srv.run("nft", "-f", str(path))
        else:
            tool = "ip6tables-nft-restore" if ".v6." in path.name else "iptables-nft-restore"
            world.srv.run("sh", "-c", f"{tool} < {shlex.quote(str(path))}")


def ruleset(world: World) -> dict[str, list[object]]:
    """`nft -j list ruleset`, table by table, leaving out spa's owned hold
    table (nft before 1.0.9 prints a one-flag table's flags from freed memory
    in JSON: garbage, or a crash)."""
    items: list[object] = []
    for line in world.srv.run("nft", "list", "tables").stdout.splitlines():
        family, name = line.split()[1:3]
        if name != "spa_hold":
            items += json.loads(world.srv.run("nft", "-j", "list", "table", family, name
                                              ).stdout)["nftables"]
    return {"nftables": items}


def fixes(world: World) -> list[str]:
    """The lines `check` names for the live ruleset (ssh and https)."""
    found = [f.fix for f in check(ruleset(world), SERVICES)
             if f.outcome in (Outcome.DROPS, Outcome.MAY_DROP) and f.fix]
    return list(dict.fromkeys(found))


def spa_check(spa: Spa) -> subprocess.CompletedProcess[str]:
    return spa.admin("check", check=False)


def knock_opens(spa: Spa, service: str = "ssh") -> bool:
    return spa.client(spa.world.cli, "alice", "open", service, "srv", "--timeout", "3"
                      ).returncode == 0


def test_debians_default_ruleset_needs_nothing(host: Spa) -> None:
    world = host.world
    host.start()
    enroll_alice(host)
    load(world, "debian-default.nft")  # its `flush ruleset` takes our table: it comes back
    assert host.wait_for("warning firewall: table inet spa was removed")
    done = spa_check(host)
    assert done.returncode == 0, done.stdout
    assert "ssh (tcp/22): ok" in done.stdout and "closed to everyone" in done.stdout
    assert knock_opens(host)
    assert world.ssh(world.cli, SRV4, "echo in").stdout.strip() == "in"
    assert not tcp_open(world, "att", SRV_ATT4, 22)


def test_a_policy_drop_table_is_named_with_the_line_that_lets_grants_in(host: Spa) -> None:
    """Issue 12: with a host table that drops by default, `accepted` and
    `lease_start` were logged and ssh never opened.  Now `check` (and the
    daemon's log) names the chain and the line; with it added, the knock
    opens ssh, and only for the knocking client."""
    world = host.world
    load(world, "policy-drop.nft")
    host.start()
    enroll_alice(host)
    assert any(line.startswith("warning check: ssh (tcp/22)") and "policy drop" in line
               for line in host.lines), host.lines
    done = spa_check(host)
    assert done.returncode == 1
    lines = fixes(world)
    assert lines == ["nft insert rule inet filter input meta mark and 0x10000000 == "
                     "0x10000000 accept"], lines
    assert lines[0] in done.stdout
    assert not knock_opens(host), "the host table drops what spa let in"
    for line in lines:
        world.srv.run(*shlex.split(line))
    assert spa_check(host).returncode == 0
    assert knock_opens(host)
    assert world.ssh(world.cli, SRV4, "echo in").stdout.strip() == "in"
    assert not tcp_open(world, "att", SRV_ATT4, 22), "the mark is only on spa's grants"


def test_ufw_default_deny_with_the_iptables_line(host: Spa) -> None:
    world = host.world
    load(world, "ufw-default.v4.rules", "ufw-default.v6.rules")
    host.start()
    enroll_alice(host)
    done = spa_check(host)
    assert done.returncode == 1 and "ufw" in done.stdout, done.stdout
    lines = fixes(world)
    assert "iptables -I INPUT 1 -m mark --mark 0x10000000/0x10000000 -j ACCEPT" in lines
    assert not knock_opens(host)
    for line in lines:
        world.srv.run(*shlex.split(line))
    assert spa_check(host).returncode == 0
    assert knock_opens(host)
    assert world.ssh(world.cli, SRV4, "echo in").stdout.strip() == "in"
    assert not tcp_open(world, "att", SRV_ATT4, 22)


def test_firewalld_lets_ssh_through_and_https_needs_its_line(host: Spa) -> None:
    """firewalld's default zone allows ssh and rejects the rest: spa's gate
    still keeps ssh from strangers (it runs first), https needs a line."""
    world = host.world
    load(world, "firewalld.nft")
    host.start()
    enroll_alice(host)
    done = spa_check(host)
    assert done.returncode == 1
    assert "ssh (tcp/22): ok" in done.stdout and "https (tcp/443)" in done.stdout
    assert "firewall-cmd" in done.stdout, "the firewalld hint"
    assert not tcp_open(world, "att", SRV_ATT4, 22), "spa still hides ssh"
    assert knock_opens(host)
    assert world.ssh(world.cli, SRV4, "echo in").stdout.strip() == "in"
    assert not knock_opens(host, "https")
    for line in fixes(world):
        world.srv.run(*shlex.split(line))
    assert spa_check(host).returncode == 0
    assert knock_opens(host, "https")
    assert not tcp_open(world, "att", SRV_ATT4, 443)


CONTAINER = "172.17.0.2"
LISTEN = ("import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, "
          "socket.SO_REUSEADDR, 1)\ns.bind(('0.0.0.0', 80)); s.listen(16); print('up', "
          "flush=True)\nwhile True:\n    c, _ = s.accept(); c.sendall(b'from-container'); "
          "c.close()\n")


@pytest.fixture
def container(host: Spa) -> Iterator[Spa]:
    """A 'container' namespace on a docker0 bridge-like link behind the
    server, serving tcp/80, published as the server's tcp/8080 by Docker's
    own rules (iptables-nft), as `docker run -p 8080:80` makes them."""
    world = host.world
    ctr = world.topo.ns("ctr")
    proc: subprocess.Popen[str] | None = None
    try:
        world.srv.run("ip", "link", "add", "docker0", "type", "veth", "peer", "name", "ctr0")
        world.srv.run("ip", "link", "set", "ctr0", "netns", ctr.name)
        world.srv.run("ip", "addr", "add", "172.17.0.1/16", "dev", "docker0")
        world.srv.run("ip", "link", "set", "docker0", "up")
        ctr.run("ip", "addr", "add", f"{CONTAINER}/16", "dev", "ctr0")
        ctr.run("ip", "link", "set", "ctr0", "up")
        ctr.run("ip", "route", "add", "default", "via", "172.17.0.1")
        world.srv.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        for ns, gateway in ((world.cli, SRV4), (world.att, SRV_ATT4)):
            ns.run("ip", "route", "replace", "172.17.0.0/16", "via", gateway)
        proc = ctr.popen([sys.executable, "-c", LISTEN], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        yield host
    finally:
        if proc is not None:
            proc.kill()
        world.srv.run("ip", "link", "del", "docker0", check=False)
        world.srv.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
        for ns in (world.cli, world.att):
            ns.run("ip", "route", "del", "172.17.0.0/16", check=False)
        world.topo.remove(ctr)


def reach(world: World, ns: str, host: str) -> str:
    code = ("import socket,sys\ntry:\n    s=socket.create_connection((sys.argv[1], 8080), "
            "timeout=1.5); print(s.recv(64).decode())\nexcept OSError as e: print('no:', e)\n")
    return str(getattr(world, ns).run(sys.executable, "-c", code, host).stdout.strip())


def test_a_port_docker_publishes_is_gated_in_forward(container: Spa) -> None:
    """Docker DNATs the published port in prerouting and accepts it in its
    FORWARD chains: such connections never reach hook input, where most
    gates look.  spa's forward chain gates them: strangers are dropped,
    a knock lets the client reach the container."""
    spa = container
    world = spa.world
    load(world, "docker.v4.rules")
    assert reach(world, "att", SRV_ATT4) == "from-container", "published, as Docker does it"
    with spa.config.open("a") as config:  # no client yet: [services] ends the file
        config.write('\n[services.web]\nprotocol = "tcp"\nport = 8080\n'
                     'default_duration = 60\nmax_duration = 300\n')
    spa.start()
    uri = spa.enroll("alice", SRV4, "web")
    assert spa.client(world.cli, "alice", "enroll", uri, "--name", "srv").returncode == 0
    assert reach(world, "att", SRV_ATT4).startswith("no:"), "a stranger is dropped"
    assert reach(world, "cli", SRV4).startswith("no:"), "before the knock"
    done = spa_check(spa)
    assert "web (tcp/8080)" in done.stdout and "gated by a forward chain" in done.stdout
    assert spa.client(world.cli, "alice", "open", "web", "srv", "--timeout", "3"
                      ).returncode == 0
    assert reach(world, "cli", SRV4) == "from-container"
    assert reach(world, "att", SRV_ATT4).startswith("no:"), "only the knocking client"
    assert any(e["outcome"] == "accepted" and e["source"] == CLI4 for e in spa.events())
