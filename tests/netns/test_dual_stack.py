"""Dual stack the way ssh connects (issue 15, part 3), with the real server,
nftables, sshd and ssh: a server name with A and AAAA records that only the
client's processes resolve (a hosts file bind-mounted in a mount namespace
of their own: tests/netns/with_hosts.py), and an IPv6 endpoint enrolled bare.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.procs import command
from tests.netns.conftest import CLI4, CLI6, HERE, KNOCK_PORT, SRV4, SRV6, Spa, World
from tests.netns.test_ssh_e2e import tcp_open

NAME = "dual.spa.test"  # in no resolver but the one these tests give the client


@pytest.fixture
def hosts(tmp_path: Path) -> Path:
    path = tmp_path / "hosts"
    path.write_text(f"127.0.0.1 localhost\n::1 localhost\n{SRV4} {NAME}\n{SRV6} {NAME}\n")
    path.chmod(0o644)
    return path


def with_hosts(hosts: Path, *argv: str) -> list[str]:
    """argv, run with `hosts` as its /etc/hosts (and nobody else's)."""
    return ["unshare", "--mount", "--propagation", "private", "--", sys.executable,
            str(HERE / "with_hosts.py"), os.readlink("/proc/self/ns/mnt"), str(hosts), *argv]


def client(spa: Spa, hosts: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return spa.world.cli.run(*with_hosts(hosts, *command("spa-client"), "--config-dir",
                                         str(spa.root / "c-alice"), *args),
                             check=False, timeout=60)


def ssh_config(spa: Spa, host: str, tmp_path: Path, *extra: str) -> Path:
    """`spa-client ssh-config HOST` with the lines a test's ssh needs."""
    done = spa.world.cli.run(*command("spa-client"), "--config-dir", str(spa.root / "c-alice"),
                             "ssh-config", host, *extra, check=False)
    assert done.returncode == 0, done.stderr
    assert spa.world.sshd is not None
    config = tmp_path / "ssh_config"
    config.write_text(done.stdout + f"    IdentityFile {spa.world.sshd.client_key}\n"
                      "    BatchMode yes\n    StrictHostKeyChecking no\n"
                      "    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n")
    return config


def resolver_order(world: World, hosts: Path) -> list[str]:
    """The client's addresses for NAME in the order its resolver (and ssh) gives them."""
    code = (f"import socket\nfor i in socket.getaddrinfo({NAME!r}, 22, "
            "type=socket.SOCK_STREAM): print(i[4][0])")
    done = world.cli.run(*with_hosts(hosts, sys.executable, "-c", code))
    return done.stdout.split()


@pytest.fixture
def knocks_lost_to(world: World) -> Iterator[list[str]]:
    """Server addresses whose knocks the client's own namespace drops (a
    table of this test's in the client namespace, removed afterwards)."""
    addresses: list[str] = []
    world.cli.run("nft", "add table inet dualtest; add chain inet dualtest out { type filter "
                  "hook output priority 0; }")
    try:
        yield addresses
    finally:
        world.cli.run("nft", "delete", "table", "inet", "dualtest", check=False)


def drop_knocks_to(world: World, address: str) -> None:
    family = "ip6" if ":" in address else "ip"
    world.cli.run("nft", f"add rule inet dualtest out {family} daddr {address} udp dport "
                  f"{KNOCK_PORT} drop")


def test_a_name_with_a_and_aaaa_records_is_open_over_both_and_ssh_logs_in_over_each(
        spa: Spa, hosts: Path) -> None:
    world = spa.world
    spa.start()
    uri = spa.enroll("alice", NAME, "ssh")
    assert uri.startswith(f"spa1://{NAME}:{KNOCK_PORT}/alice?")
    assert client(spa, hosts, "enroll", uri).returncode == 0
    assert sorted(resolver_order(world, hosts)) == sorted([SRV4, SRV6])
    done = client(spa, hosts, "open", "ssh", NAME)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "port 22 accept connections" in done.stdout
    assert SRV4 in done.stdout and SRV6 in done.stdout, done.stdout
    assert spa.elements() == [f"svc_ssh_v4 {CLI4}", f"svc_ssh_v6 {CLI6}"]
    for flag, source in (("-4", CLI4), ("-6", CLI6)):
        argv = world.sshd_login(NAME, "echo in-over-$SSH_CONNECTION")
        login = world.cli.run(*with_hosts(hosts, argv[0], flag, *argv[1:]), check=False,
                              timeout=40)
        assert login.returncode == 0, login.stderr
        assert login.stdout.startswith(f"in-over-{source} "), login.stdout
    accepted = [e for e in spa.events() if e["outcome"] == "accepted"]
    assert sorted(str(e["source"]) for e in accepted) == sorted([CLI4, CLI6])
    done = client(spa, hosts, "close", "ssh", NAME)
    assert done.returncode == 0, done.stderr
    assert SRV4 in done.stdout and SRV6 in done.stdout
    deadline = time.monotonic() + 5
    while spa.elements():
        assert time.monotonic() < deadline, spa.elements()
        time.sleep(0.1)


def test_connect_relays_to_the_family_that_opened(spa: Spa, hosts: Path, tmp_path: Path,
                                                  knocks_lost_to: list[str]) -> None:
    """The knock of the family ssh would try first is lost on the way;
    ssh through spa-client (ProxyCommand) logs in over the other."""
    world = spa.world
    spa.start()
    assert client(spa, hosts, "enroll", spa.enroll("alice", NAME, "ssh")).returncode == 0
    first, second = resolver_order(world, hosts)
    drop_knocks_to(world, first)
    config = ssh_config(spa, NAME, tmp_path)
    assert f"Host {NAME}" in config.read_text()
    login = world.cli.run(*with_hosts(hosts, "ssh", "-F", str(config), f"root@{NAME}",
                                      "echo in-over-$SSH_CONNECTION"), check=False, timeout=60)
    assert login.returncode == 0, login.stderr
    source = CLI6 if ":" in second else CLI4
    assert login.stdout.startswith(f"in-over-{source} "), login.stdout
    family = "v6" if ":" in second else "v4"
    assert spa.elements() == [f"svc_ssh_{family} {source}"], "the lost family opened nothing"


def test_an_ipv6_endpoint_enrolled_bare_opens_ssh_over_ipv6(spa: Spa, tmp_path: Path) -> None:
    """`enroll --endpoint fd00:199:1::1` (no brackets), the client's default
    profile name, then open, ssh, close, ssh-config and doctor with the address."""
    world = spa.world
    spa.start()
    uri = spa.enroll("alice", SRV6, "ssh")
    assert uri.startswith(f"spa1://[{SRV6}]:{KNOCK_PORT}/alice?")
    done = spa.client(world.cli, "alice", "enroll", uri)
    assert done.returncode == 0, done.stderr
    profile = SRV6.replace(":", "-")
    assert f"profile {profile!r} saved" in done.stdout
    assert not tcp_open(world, "cli", SRV6, 22)
    done = spa.client(world.cli, "alice", "open", "ssh", f"[{SRV6}]")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"ssh is open: {SRV6} port 22 accepts connections")
    login = world.ssh(world.cli, SRV6, "echo v6-ok")
    assert login.stdout.strip() == "v6-ok", login.stderr
    assert spa.elements() == [f"svc_ssh_v6 {CLI6}"]
    done = spa.client(world.cli, "alice", "close", "ssh", SRV6)
    assert done.stdout.strip() == f"close sent: ssh at {SRV6}", done.stderr
    deadline = time.monotonic() + 5
    while spa.elements():
        assert time.monotonic() < deadline, spa.elements()
        time.sleep(0.1)
    assert not tcp_open(world, "cli", SRV6, 22)
    config = ssh_config(spa, SRV6, tmp_path)
    assert f"Host {SRV6}\n" in config.read_text()
    login = world.cli.run("ssh", "-F", str(config), f"root@{SRV6}", "echo proxied-v6",
                          check=False, timeout=60)
    assert login.returncode == 0, login.stderr
    assert login.stdout.strip() == "proxied-v6"
    done = spa.client(world.cli, "alice", "close", "ssh", profile)
    deadline = time.monotonic() + 5
    while spa.elements():
        assert time.monotonic() < deadline, spa.elements()
        time.sleep(0.1)
    doctor = spa.client(world.cli, "alice", "doctor", profile, "--time-server", "none")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert f"ok   name: {SRV6} is {SRV6}" in doctor.stdout
    assert "opened in" in doctor.stdout and f"at {SRV6}" in doctor.stdout
