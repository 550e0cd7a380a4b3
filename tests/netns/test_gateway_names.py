"""Gateway mode with the internal host named by a DNS name (issue 17), with
the real server, nftables, sshd and ssh: the name resolves only inside the
gateway's namespace, through its own hosts file (/etc/netns/NS/hosts, which
`ip netns exec` bind-mounts over /etc/hosts for the server's processes
alone; made and removed by the test).

    cli ---- gw (spa-server, forwarding) ---- int (sshd, db.spa.test)
              |
            other (an address with no grant)
"""

from __future__ import annotations

import contextlib
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
