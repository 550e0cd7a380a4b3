"""Issue 16: two spa-servers on one host, each with its own config, state
and instance name (spa-server@site1, spa-server@site2), in one namespace
with the real kernel: each gates its own port, a knock to each opens only
its port, stopping one leaves the other's table and lease alone, the guard
of one does not stir at the other's commits, and a port both would gate is
refused at start."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spa.server.state import StateDir
from tests.netns.conftest import CLI4, SRV4, SRV_ATT4, Spa, World
from tests.netns.test_ssh_e2e import tcp_open


def site(world: World, root: Path, instance: str, port: int, service: str) -> Spa:
    root.mkdir(parents=True, exist_ok=True)
    spa = Spa(world, root)
    spa.admin("init", "--instance", instance, "--listen-port", str(port), "--service", service)
    return spa

def tables(world: World) -> set[str]:
    return {line.split()[2] for line in world.srv.run("nft", "list", "tables").stdout.splitlines()
            if line.startswith("table inet ")}

def last_host_check(spa: Spa) -> Any:
    facts = StateDir(spa.root / "server-state").running_server() or {}
    return facts.get("check", {}).get("at")

def settled(spa: Spa, seconds: float = 2.5) -> Any:
    """The time of the daemon's last host check, once none came for `seconds`."""
    last = last_host_check(spa)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        time.sleep(seconds)
        now = last_host_check(spa)
        if now == last:
            return now
        last = now
    raise AssertionError("the host check never settled")

@contextlib.contextmanager
def two_sites(world: World, root: Path) -> Iterator[tuple[Spa, Spa]]:
    one = site(world, root / "site1", "site1", 62201, "ssh")
    two = site(world, root / "site2", "site2", 62202, "https")
    try:
        yield one, two
    finally:
        for spa in (one, two):
            spa.stop(signal.SIGKILL)
        for table in ("spa_site1", "spa_site2", "spa_site3"):
            world.srv.run("nft", "delete", "table", "inet", table, check=False)

def test_two_instances_on_one_host_each_gate_and_open_only_their_own_port(
        world: World, tmp_path: Path) -> None:
    with two_sites(world, tmp_path) as (one, two):
        one.start()
        two.start()
        assert {"spa_site1", "spa_hold_site1", "spa_site2", "spa_hold_site2"} <= tables(world)
        assert "spa" not in tables(world)
        assert two.wait_for("check: ok: no other firewall drops what spa lets in"), \
            two.lines  # site1's table, which site2 reads as any other, drops none of its port
        assert not tcp_open(world, "att", SRV_ATT4, 22)
        assert not tcp_open(world, "att", SRV_ATT4, 443)
        for spa, service in ((one, "ssh"), (two, "https")):
            uri = spa.enroll("alice", SRV4, service)
            assert spa.client(world.cli, "alice", "enroll", uri, "--name", "srv").returncode == 0
        quiet_one = settled(one)
        assert "held meanwhile by the daemon's own table inet spa_hold_site1" in \
            one.admin("status").stdout

        assert two.client(world.cli, "alice", "open", "https", "srv").returncode == 0
        assert tcp_open(world, "cli", SRV4, 443)
        assert not tcp_open(world, "cli", SRV4, 22), "a knock to site2 opens only its port"
        assert two.elements("spa_site2") == [f"svc_https_v4 {CLI4}"]
        assert one.elements("spa_site1") == []
        time.sleep(2.5)  # housekeeping rounds and more than HOST_CHECK_EVERY
        assert last_host_check(one) == quiet_one, "site1 stirred at site2's commit"

        assert one.client(world.cli, "alice", "open", "ssh", "srv").returncode == 0
        assert world.ssh(world.cli, SRV4, "echo in").stdout.strip() == "in"
        assert not tcp_open(world, "att", SRV_ATT4, 22)
        assert not tcp_open(world, "att", SRV_ATT4, 443)

        two.stop(signal.SIGTERM)
        assert one.elements("spa_site1") == [f"svc_ssh_v4 {CLI4}"]
        assert {"spa_site1", "spa_hold_site1", "spa_site2"} <= tables(world)
        assert "spa_hold_site2" not in tables(world)  # the stopped daemon's own table went
        assert world.ssh(world.cli, SRV4, "echo still").stdout.strip() == "still"
        assert not tcp_open(world, "att", SRV_ATT4, 443), "site2's table outlives its daemon"
        for spa in (one, two):
            assert not [line for line in spa.lines if "restored with" in line], spa.lines
        assert one.proc is not None and one.proc.poll() is None

        # the control: a change of the host's own firewall is looked at
        before = settled(one)
        world.srv.run("nft", "add", "table", "inet", "hostfw")
        world.srv.run("nft", "delete", "table", "inet", "hostfw")
        deadline = time.monotonic() + 5
        while last_host_check(one) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert last_host_check(one) != before

def test_a_port_another_instance_gates_is_refused_at_start_in_one_line(
        world: World, tmp_path: Path) -> None:
    with two_sites(world, tmp_path) as (one, _):
        one.start()
        third = site(world, tmp_path / "site3", "site3", 62203, "ssh")
        done = world.srv.run("timeout", "20", *third_run(third), check=False)
        assert done.returncode == 2, (done.stdout, done.stderr)
        lines = [line for line in done.stderr.splitlines() if line.startswith("spa-server")]
        assert lines and "port tcp/22 (ssh) is gated by another spa instance too (table inet " \
            "spa_site1)" in lines[-1], done.stderr
        assert "spa_site3" not in tables(world)
        assert one.proc is not None and one.proc.poll() is None
        # another config that forgot its own instance name: one table, two daemons
        twin = site(world, tmp_path / "twin", "site1", 62204, "https")
        done = world.srv.run("timeout", "20", *third_run(twin), check=False)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert "another spa-server of instance 'site1' runs (it owns table inet " \
            "spa_hold_site1)" in done.stderr, done.stderr
        assert one.elements("spa_site1") == [] and one.proc.poll() is None
        assert "svc_https_v4" not in world.srv.run("nft", "list", "table", "inet",
                                                   "spa_site1").stdout

def third_run(spa: Spa) -> list[str]:
    from tests.integration.procs import command

    return [*command("spa-server"), "--config", str(spa.config), "run"]


def test_two_iptables_instances_keep_their_own_chains_and_refuse_a_shared_port(
        world: World, tmp_path: Path) -> None:
    """The same with the iptables backend (legacy tables): chains SPA_site1
    and SPA_site2, each jumped to from INPUT; a third on site1's port is
    refused before it changes anything."""
    from tests.netns.test_iptables_e2e import legacy_path

    prefix = legacy_path(tmp_path)
    one = site(world, tmp_path / "site1", "site1", 62201, "ssh")
    two = site(world, tmp_path / "site2", "site2", 62202, "https")
    try:
        one.start("--backend", "iptables", prefix=prefix)
        two.start("--backend", "iptables", prefix=prefix)
        rules = world.srv.run("iptables-legacy", "-S").stdout
        assert "-A INPUT -j SPA_site1" in rules and "-A INPUT -j SPA_site2" in rules
        assert "-N SPA\n" not in rules
        assert not tcp_open(world, "att", SRV_ATT4, 22)
        assert not tcp_open(world, "att", SRV_ATT4, 443)
        uri = two.enroll("alice", SRV4, "https")
        assert two.client(world.cli, "alice", "enroll", uri, "--name", "srv").returncode == 0
        assert two.client(world.cli, "alice", "open", "https", "srv").returncode == 0
        assert tcp_open(world, "cli", SRV4, 443) and not tcp_open(world, "cli", SRV4, 22)
        third = site(world, tmp_path / "site3", "site3", 62203, "ssh")
        done = world.srv.run("timeout", "20", *prefix, *third_run(third), "--backend",
                             "iptables", check=False)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert "port tcp/22 (ssh) is gated by another spa instance too (iptables chain " \
            "SPA_site1)" in done.stderr, done.stderr
        assert "SPA_site3" not in world.srv.run("iptables-legacy", "-S").stdout
    finally:
        for spa in (one, two):
            spa.stop(signal.SIGKILL)
        for tool in ("iptables-legacy", "ip6tables-legacy"):
            for chain in ("SPA_site1", "SPA_site2", "SPA_site3"):
                world.srv.run(tool, "-D", "INPUT", "-j", chain, check=False)
                world.srv.run(tool, "-F", chain, check=False)
                world.srv.run(tool, "-X", chain, check=False)
        for name in ("site1", "site2", "site3"):
            for version in (4, 6):
                world.srv.run("ipset", "destroy", f"spa_drops_v{version}_{name}", check=False)
