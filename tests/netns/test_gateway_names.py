"""Gateway mode with the internal host named by a DNS name (issue 17), with
the real server, nftables, sshd and ssh: the name resolves only inside the
gateway's namespace, through its own hosts file (/etc/netns/NS/hosts, which
`ip netns exec` bind-mounts over /etc/hosts for the server's processes
alone; made and removed by the test).

    cli ---- gw (spa-server, forwarding) ---- int (sshd, db.spa.test)
              |
            other (an address with no grant)

A published port of a named service (`listen_port`) is DNATed per lease:
each source to the address its own lease resolved (the map pub_NAME_v4/v6).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spa.netns import Namespace
from tests.netns.conftest import REASON, Spa, World, open_site
from tests.netns.test_gateway import (
    CLI4,
    CLI6,
    GW4,
    GW6,
    GW_OTHER4,
    GW_OTHER6,
    INT4,
    INT6,
    LEASE,
    gateway_world,
    ssh,
    tcp_open,
)

NAME = "db.spa.test"  # in no resolver but the gateway namespace's hosts file
MISSING = "gone.spa.test"  # in none at all
SERVICES = """
[services.dbn]
protocol = "tcp"
port = 22
default_duration = {lease}
max_duration = {lease}
host = "{name}"

[services.gone]
protocol = "tcp"
port = 2200
default_duration = {lease}
max_duration = {lease}
host = "{missing}"
"""
GATED = [f"dst_dbn_v4 {INT4}", f"dst_dbn_v6 {INT6}"]  # what the name gives at start
LONG = 30  # seconds: the restart test's leases (a stop and a start fit in them)


@pytest.fixture(scope="module")
def gworld(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if REASON is not None:
        pytest.skip(REASON)
    with (gateway_world(tmp_path_factory.mktemp("gwnames")) as world,
          hosts_file(world.srv, f"{INT4} {NAME}\n{INT6} {NAME}\n")):
        yield world


@contextlib.contextmanager
def hosts_file(ns: Namespace, entries: str) -> Iterator[Path]:
    """/etc/netns/NS/hosts for namespace `ns` (its processes' /etc/hosts);
    removed afterwards, and /etc/netns with it when nothing else is in it."""
    directory = Path("/etc/netns") / ns.name
    directory.mkdir(parents=True, exist_ok=False)
    try:
        path = directory / "hosts"
        path.write_text(f"127.0.0.1 localhost\n::1 localhost\n{entries}")
        path.chmod(0o644)
        directory.chmod(0o755)
        yield path
    finally:
        (directory / "hosts").unlink(missing_ok=True)
        directory.rmdir()
        with contextlib.suppress(OSError):
            directory.parent.rmdir()  # only when empty (another test's may be there)


@contextlib.contextmanager
def named_site(world: World, root: Path, lease: int) -> Iterator[Spa]:
    with open_site(world, root) as spa:
        with spa.config.open("a") as config:
            config.write(SERVICES.format(lease=lease, name=NAME, missing=MISSING))
        yield spa


@pytest.fixture
def site(gworld: World, tmp_path: Path) -> Iterator[Spa]:
    with named_site(gworld, tmp_path, LEASE) as spa:
        yield spa


def knock(spa: Spa, service: str, endpoint: str = GW4) -> None:
    uri = spa.enroll("alice", f"[{endpoint}]" if ":" in endpoint else endpoint, "dbn", "gone")
    assert spa.client(spa.world.cli, "alice", "enroll", uri, "--name", "gw").returncode == 0
    # --no-wait: the client would wait on the gateway's own port 22 (no published port)
    done = spa.client(spa.world.cli, "alice", "open", service, "gw", "--no-wait")
    assert done.returncode == 0, done.stdout + done.stderr


def wait_for_elements(spa: Spa, count: int, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(found := spa.elements()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_a_knock_reaches_the_host_its_name_resolves_to_and_only_for_its_lease(
        site: Spa) -> None:
    world = site.world
    assert world.srv.run("getent", "hosts", NAME).stdout.split()[0] in (INT4, INT6), \
        "the gateway's namespace resolves the name (its own hosts file)"
    assert world.cli.run("getent", "hosts", NAME, check=False).returncode != 0, \
        "and nobody else does"
    site.start()
    assert site.elements() == GATED, "what the name gives is gated from the start"
    assert not tcp_open(world.cli, INT4, 22), "the internal host hidden before the knock"
    assert not tcp_open(world.att, INT6, 22)
    knock(site, "dbn")
    opened = time.monotonic()
    assert wait_for_elements(site, 3) == [*GATED, f"svc_dbn_v4 {CLI4} . {INT4}"]
    assert ssh(world, INT4) == f"in-{INT4}", "a real login to the host the name gave"
    assert not tcp_open(world.att, INT4, 22), "another address cannot"
    time.sleep(max(0.0, opened + LEASE + 1.2 - time.monotonic()))
    assert site.elements() == GATED, "the kernel expired the grant"
    assert not tcp_open(world.cli, INT4, 22), "closed again when the lease ends"
    assert not tcp_open(world.att, INT4, 22)


def test_an_ipv6_knock_gets_the_names_ipv6_address(site: Spa) -> None:
    site.start()
    knock(site, "dbn", "fd00:198:1::1")
    assert wait_for_elements(site, 3) == [*GATED, f"svc_dbn_v6 {CLI6} . {INT6}"]
    assert ssh(site.world, INT6) == f"in-{INT4}"
    assert not tcp_open(site.world.att, INT6, 22)


def test_a_name_that_does_not_resolve_refuses_the_grant(site: Spa) -> None:
    site.start()
    knock(site, "gone")
    deadline = time.monotonic() + 10
    while not any("host_unresolved" in line for line in site.lines):
        assert time.monotonic() < deadline, site.lines[-8:]
        time.sleep(0.05)
    assert any(f"host {MISSING} gave no usable IPv4 address" in line for line in site.lines)
    assert site.elements() == GATED, "nothing opened"
    assert any(f"warning gateway gone: host {MISSING} gives no usable address now" in line
               for line in site.lines)


def test_a_restart_reinstalls_the_leases_destination_when_the_name_no_longer_resolves(
        gworld: World, tmp_path: Path) -> None:
    """The hosts file loses the name after the grant: the boot gate
    (`spa-server gate`) and the restarted daemon put back exactly the grant
    it saved (the pair with its address)."""
    with named_site(gworld, tmp_path, LONG) as site:
        restart_keeps_the_destination(site, gworld)


def restart_keeps_the_destination(site: Spa, gworld: World) -> None:
    site.start()
    knock(site, "dbn")
    assert wait_for_elements(site, 3) == [*GATED, f"svc_dbn_v4 {CLI4} . {INT4}"]
    hosts = Path("/etc/netns") / gworld.srv.name / "hosts"
    kept = hosts.read_text()
    hosts.write_text("127.0.0.1 localhost\n")
    try:
        site.stop()
        pair = [f"dst_dbn_v4 {INT4}", f"svc_dbn_v4 {CLI4} . {INT4}"]
        site.world.srv.run("nft", "delete", "table", "inet", "spa")  # as after a reboot
        assert "1 saved lease(s) kept open" in site.admin("gate").stdout
        assert site.elements() == pair, "the boot gate: the saved pair, nothing resolved"
        assert not tcp_open(site.world.att, INT4, 22)
        site.world.srv.run("nft", "delete", "table", "inet", "spa")
        site.start()
        # the name gives nothing now: only the lease's own address is gated
        assert wait_for_elements(site, 2) == pair
        assert not tcp_open(site.world.att, INT4, 22)
        assert ssh(site.world, INT4) == f"in-{INT4}"
    finally:
        hosts.write_text(kept)


PUBLISHED = """
[services.dbp]
protocol = "tcp"
port = 22
default_duration = {lease}
max_duration = {lease}
host = "{name}"
listen_port = {listen}
"""
LISTEN = 2230  # the gateway's published port for dbp
GATED_P = [f"dst_dbp_v4 {INT4}", f"dst_dbp_v6 {INT6}"]


@contextlib.contextmanager
def published_site(world: World, root: Path, lease: int) -> Iterator[Spa]:
    with open_site(world, root) as spa:
        with spa.config.open("a") as config:
            config.write(PUBLISHED.format(lease=lease, name=NAME, listen=LISTEN))
        yield spa


def knock_published(spa: Spa, endpoint: str = GW4, who: str = "alice") -> None:
    uri = spa.enroll(who, f"[{endpoint}]" if ":" in endpoint else endpoint, "dbp")
    assert spa.client(spa.world.cli, who, "enroll", uri, "--name", "gw").returncode == 0
    done = spa.client(spa.world.cli, who, "open", "dbp", "gw", "--no-wait")
    assert done.returncode == 0, done.stdout + done.stderr


def mapped(spa: Spa) -> list[str]:
    """The published port's DNAT map: `source -> destination` per element."""
    found = []
    for version in (4, 6):
        done = spa.world.srv.run("nft", "-j", "list", "map", "inet", "spa",
                                 f"pub_dbp_v{version}", check=False)
        if done.returncode != 0:
            continue
        for item in json.loads(done.stdout)["nftables"]:
            for key, destination in item.get("map", {}).get("elem", []):
                source = key["elem"]["val"] if isinstance(key, dict) else key
                found.append(f"{source} -> {destination}")
    return sorted(found)


OWN = "gw-own"  # what the gateway's own listener on LISTEN answers


@contextlib.contextmanager
def own_listener(ns: Namespace, port: int) -> Iterator[None]:
    """A listener of the gateway's own on `port` (both IP versions) that
    answers OWN: what a connection to the port meets when it is not DNATed."""
    code = (f"import socket\ns=socket.create_server(('::', {port}), family=socket.AF_INET6, "
            "dualstack_ipv6=True)\nprint('up', flush=True)\nwhile True:\n"
            f"    c, _ = s.accept()\n    c.sendall(b'{OWN}\\n')\n    c.close()\n")
    process = ns.popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "up"
        yield
    finally:
        process.kill()
        process.wait()


def banner(ns: Namespace, host: str, port: int) -> str:
    """The first line a TCP connection from `ns` to host:port is sent."""
    code = (f"import socket\ns=socket.create_connection(({host!r},{port}),timeout=3)\n"
            "print(s.makefile().readline().strip())")
    done = ns.run(sys.executable, "-c", code, check=False)
    return done.stdout.strip() if done.returncode == 0 else "closed"


def test_a_published_port_dnats_each_lease_to_the_address_its_name_gave(
        gworld: World, tmp_path: Path) -> None:
    """A knock opens gw:LISTEN for its own source only, to the address the
    gateway's hosts file gives the name; a source without a lease is not
    DNATed (it meets the gateway's own port: here a listener of its own); the
    kernel ends it with the lease; IPv6 alike."""
    with (published_site(gworld, tmp_path, LEASE) as site,
          own_listener(gworld.srv, LISTEN)):
        world = site.world
        site.start()
        assert site.elements() == GATED_P and mapped(site) == []
        assert banner(world.cli, GW4, LISTEN) == OWN, "before the knock: the gateway's own"
        knock_published(site)
        opened = time.monotonic()
        assert wait_for_elements(site, 3) == [*GATED_P, f"svc_dbp_v4 {CLI4} . {INT4}"]
        assert mapped(site) == [f"{CLI4} -> {INT4}"]
        assert ssh(world, GW4, LISTEN) == f"in-{INT4}", "a real login through the port"
        assert banner(world.cli, GW4, LISTEN).startswith("SSH-")
        assert banner(world.att, GW_OTHER4, LISTEN) == OWN, "another source is not DNATed"
        assert banner(world.att, GW4, LISTEN) == OWN
        assert not tcp_open(world.att, INT4, 22), "nor let through to the host"
        time.sleep(max(0.0, opened + LEASE + 1.2 - time.monotonic()))
        assert mapped(site) == [] and site.elements() == GATED_P, "the kernel expired both"
        assert banner(world.cli, GW4, LISTEN) == OWN, "not DNATed once the lease ends"
        knock_published(site, GW6, "carol")
        assert wait_for_elements(site, 3) == [*GATED_P, f"svc_dbp_v6 {CLI6} . {INT6}"]
        assert mapped(site) == [f"{CLI6} -> {INT6}"]
        assert ssh(world, GW6, LISTEN) == f"in-{INT4}", "IPv6: to the name's IPv6 address"
        assert banner(world.att, GW_OTHER6, LISTEN) == OWN


def test_a_restart_puts_back_the_published_ports_dnat_for_the_saved_lease(
        gworld: World, tmp_path: Path) -> None:
    """The name gone from the hosts file after the grant: the boot gate and
    the restarted daemon put back the lease's map element with its grant."""
    with published_site(gworld, tmp_path, LONG) as site:
        world = site.world
        site.start()
        knock_published(site)
        assert wait_for_elements(site, 3) == [*GATED_P, f"svc_dbp_v4 {CLI4} . {INT4}"]
        hosts = Path("/etc/netns") / gworld.srv.name / "hosts"
        kept = hosts.read_text()
        hosts.write_text("127.0.0.1 localhost\n")
        try:
            site.stop()
            world.srv.run("nft", "delete", "table", "inet", "spa")  # as after a reboot
            assert "1 saved lease(s) kept open" in site.admin("gate").stdout
            assert mapped(site) == [f"{CLI4} -> {INT4}"], "the boot gate"
            assert ssh(world, GW4, LISTEN) == f"in-{INT4}"
            world.srv.run("nft", "delete", "table", "inet", "spa")
            site.start()
            assert wait_for_elements(site, 2) == [f"dst_dbp_v4 {INT4}",
                                                  f"svc_dbp_v4 {CLI4} . {INT4}"]
            assert mapped(site) == [f"{CLI4} -> {INT4}"], "the restarted daemon"
            assert ssh(world, GW4, LISTEN) == f"in-{INT4}"
            assert not tcp_open(world.att, GW_OTHER4, LISTEN)
            world.srv.run("nft", "flush", "map", "inet", "spa", "pub_dbp_v4")
            deadline = time.monotonic() + 10
            while mapped(site) != [f"{CLI4} -> {INT4}"]:
                assert time.monotonic() < deadline, site.lines[-5:]
                time.sleep(0.1)
            assert any("published-port mapping(s)" in line for line in site.lines), \
                "the guard saw the map element go and put it back"
            site.stop()
            done = site.admin("gate", "--remove", check=False)  # maps and all
            assert done.returncode == 0, done.stdout + done.stderr
            assert world.srv.run("nft", "list", "tables").stdout == ""
        finally:
            hosts.write_text(kept)
