"""The iptables backend for real: legacy tables in the server namespace.

This machine's default `iptables` may be the nf_tables variant, where the
backend refuses to start (tested too).  To run it as on a legacy host, the
server gets a PATH whose `iptables` is iptables-legacy; nothing outside the
test's namespace changes.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.procs import command
from tests.netns.conftest import ATT4, CLI4, CLI6, SRV4, SRV6, SRV_ATT4, Spa, World
from tests.netns.test_gate import STALE_PORT, connect_from, make_stale_session
from tests.netns.test_ssh_e2e import enroll_alice, tcp_open


def legacy_path(tmp_path: Path) -> tuple[str, ...]:
    legacy = shutil.which("iptables-legacy")
    if legacy is None:
        pytest.skip("needs iptables-legacy (apt-get install iptables)")
    bindir = tmp_path / "legacy-bin"
    bindir.mkdir()
    (bindir / "iptables").symlink_to(legacy)
    return ("env", f"PATH={bindir}{os.pathsep}{os.environ['PATH']}")


def legacy_rules(world: World) -> str:
    return (world.srv.run("iptables-legacy", "-S", "SPA", check=False).stdout
            + world.srv.run("ip6tables-legacy", "-S", "SPA", check=False).stdout)


@pytest.fixture
def ipt(spa: Spa) -> Iterator[Spa]:
    try:
        yield spa
    finally:
        spa.stop(signal.SIGKILL)
        for tool in ("iptables-legacy", "ip6tables-legacy"):
            spa.world.srv.run(tool, "-D", "INPUT", "-j", "SPA", check=False)
            spa.world.srv.run(tool, "-F", "SPA", check=False)
            spa.world.srv.run(tool, "-X", "SPA", check=False)


@pytest.mark.parametrize(("server", "client"), [(SRV4, f"{CLI4}/32"), (SRV6, f"{CLI6}/128")],
                         ids=["ipv4", "ipv6"])
def test_iptables_backend_hides_and_opens_ssh(ipt: Spa, tmp_path: Path, server: str,
                                              client: str) -> None:
    world = ipt.world
    ipt.start("--backend", "iptables", prefix=legacy_path(tmp_path))
    enroll_alice(ipt, f"[{server}]" if ":" in server else server)
    assert not tcp_open(world, "cli", server, 22)
    assert ipt.client(world.cli, "alice", "open", "ssh", "srv", "--duration", "2"
                      ).returncode == 0
    assert world.ssh(world.cli, server, "echo via-iptables").stdout.strip() == "via-iptables"
    assert f"-s {client}" in legacy_rules(world)
    assert "spa:ssh:" in legacy_rules(world)
    # the daemon removes the rule at expiry (iptables cannot expire it by itself)
    assert ipt.wait_for("lease_end", timeout=6)
    assert f"-s {client}" not in legacy_rules(world)
    assert not tcp_open(world, "cli", server, 22)


def test_iptables_rules_left_by_a_crash_are_removed_at_start(ipt: Spa, tmp_path: Path) -> None:
    world = ipt.world
    prefix = legacy_path(tmp_path)
    ipt.start("--backend", "iptables", prefix=prefix)
    enroll_alice(ipt)
    assert ipt.client(world.cli, "alice", "open", "ssh", "srv", "--duration", "2"
                      ).returncode == 0
    assert ipt.client(world.cli, "alice", "open", "https", "srv", "--duration", "120"
                      ).returncode == 0
    time.sleep(0.4)  # leases.json is saved within a housekeeping round (open now returns
    # within milliseconds of the grant: a kill before the save loses the lease, closed side)
    ipt.stop(signal.SIGKILL)
    time.sleep(3)
    rules = legacy_rules(world)
    # the daemon's crash left its gate keeper, which ends the grants on time
    # (iptables has no timeouts) before it stops; it holds no lock meanwhile
    assert "spa:ssh:" not in rules, "the gate keeper ended the 2 s grant on time"
    assert rules.count("spa:https:") == 1, "the live one stays"
    status = ipt.admin("status").stdout
    assert "cannot expire grants while the server is down" in status  # after a clean stop
    ipt.start("--backend", "iptables", prefix=prefix)
    rules = legacy_rules(world)
    assert "spa:ssh:" not in rules, "no expired grant after the start"
    assert rules.count("spa:https:") == 1, "the live one stayed, once"
    assert not tcp_open(world, "cli", SRV4, 22)
    assert tcp_open(world, "cli", SRV4, 443)


def test_iptables_backend_refuses_an_nf_tables_host(ipt: Spa, tmp_path: Path) -> None:
    nft_variant = shutil.which("iptables-nft")
    if nft_variant is None:
        pytest.skip("needs iptables-nft")
    bindir = tmp_path / "nft-bin"
    bindir.mkdir()
    (bindir / "iptables").symlink_to(nft_variant)
    done = ipt.world.srv.run("env", f"PATH={bindir}{os.pathsep}{os.environ['PATH']}",
                             *ipt_command(ipt), "run", "--backend", "iptables", check=False)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "nf_tables variant" in done.stderr and "--backend nftables" in done.stderr


def ipt_command(spa: Spa) -> list[str]:
    return [*command("spa-server"), "--config", str(spa.config)]


def test_iptables_counts_dropped_attempts_and_reports_a_scan(ipt: Spa, tmp_path: Path) -> None:
    """The counting ipsets: an attacker's SYNs to ssh and https are dropped,
    counted per (source, port), and reported as dropped attempts and a scan;
    the knocking user's own traffic is let in, not counted."""
    world = ipt.world
    ipt.start("--backend", "iptables", prefix=legacy_path(tmp_path))
    enroll_alice(ipt)
    rules = world.srv.run("iptables-legacy", "-S", "SPA").stdout
    ssh_rules = [line for line in rules.splitlines() if "--dport 22 " in line]
    assert ssh_rules == [
        "-A SPA -p tcp -m tcp --dport 22 -m set --match-set spa_drops_v4 src,dst -j DROP",
        "-A SPA -p tcp -m tcp --dport 22 -j SET --add-set spa_drops_v4 src,dst --timeout 600",
        "-A SPA -p tcp -m tcp --dport 22 -j DROP"], rules  # a plain DROP ends each port
    assert "spa_drops_v6" in world.srv.run("ip6tables-legacy", "-S", "SPA").stdout
    assert ipt.client(world.cli, "alice", "open", "ssh", "srv", "--duration", "60"
                      ).returncode == 0
    raced = counted(world, CLI4, 22)  # probes that beat the grant (the first SYN goes 2 ms
    assert world.ssh(world.cli, SRV4, "echo in").stdout.strip() == "in"  # after the knock)
    assert counted(world, CLI4, 22) == raced, "the user's session was let in, not counted"
    probe = ("import socket,sys\nfor port in (22, 443, 22, 443, 22):\n"
             "    try: socket.create_connection((sys.argv[1], port), timeout=0.3)\n"
             "    except OSError: pass\n")
    world.att.run(sys.executable, "-c", probe, SRV_ATT4)
    assert ipt.wait_for(f"scan src={ATT4} service=ssh,https", timeout=15), ipt.lines[-10:]

    def dropped() -> dict[str, int]:
        found: dict[str, int] = {}
        for e in ipt.events():
            if e["outcome"] == "dropped" and e["source"] == ATT4:
                service = str(e["service"])
                found[service] = found.get(service, 0) + int(e["count"])  # type: ignore[call-overload]
        return found

    deadline = time.monotonic() + 12  # the readings (every 5 s) add up to every SYN
    while dropped() != {"ssh": 3, "https": 2}:
        assert time.monotonic() < deadline, dropped()
        time.sleep(0.5)
    assert counted(world, ATT4, 22) == 3 and counted(world, ATT4, 443) == 2
    assert not tcp_open(world, "att", SRV_ATT4, 22), "counting never opens anything"


def counted(world: World, source: str, port: int) -> int:
    """The kernel's drop counter for (source, port), from `ipset list`."""
    for line in world.srv.run("ipset", "list", "spa_drops_v4").stdout.splitlines():
        if line.startswith(f"{source},tcp:{port} "):
            return int(line.split(" packets ")[1].split()[0])
    return 0


def test_iptables_rules_flushed_by_another_program_are_put_back_within_the_poll(
        ipt: Spa, tmp_path: Path) -> None:
    """Issue 12, iptables: legacy iptables sends no notification, so the
    daemon reads its chains every POLL_SECONDS (0.4 s): that is the window an
    `iptables -F` opens.  The chain, the jump and the user's lease come back
    and the log says so."""
    from spa.server.guard import POLL_SECONDS
    from tests.netns.test_gate import Prober

    world = ipt.world
    ipt.start("--backend", "iptables", prefix=legacy_path(tmp_path))
    enroll_alice(ipt)
    assert ipt.client(world.cli, "alice", "open", "ssh", "srv", "--duration", "120"
                      ).returncode == 0
    prober = Prober(world, 3.0)
    time.sleep(1.0)
    world.srv.run("iptables-legacy", "-F")
    probes = prober.result()
    # every 10 ms for at most a poll and the repair (~0.1 s with a few grants)
    assert len(probes["opened"]) <= (POLL_SECONDS + 0.2) / 0.01, probes
    assert ipt.wait_for("warning firewall: the jump from INPUT to chain SPA (IPv4) was removed "
                        "by another program; restored with 1 lease in "), ipt.lines[-5:]
    assert f"-s {CLI4}/32" in legacy_rules(world)
    assert world.ssh(world.cli, SRV4, "echo in").stdout.strip() == "in"
    assert not tcp_open(world, "att", SRV_ATT4, 22)


def test_iptables_a_syn_that_conntrack_calls_established_is_still_gated(
        ipt: Spa, tmp_path: Path) -> None:
    """As for nftables (test_gate.py's test of this name without
    `iptables_`): a connection the kernel still holds as established, both
    its ends gone; with the gate up, a new connection from its port
    reached sshd through `--ctstate RELATED,ESTABLISHED -j ACCEPT`.  Now a
    TCP SYN is never accepted as established."""
    world = ipt.world
    port = STALE_PORT + 1  # not the nftables test's: its entry stays
    make_stale_session(world, port)
    ipt.start("--backend", "iptables", prefix=legacy_path(tmp_path))
    rules = legacy_rules(world)
    assert "! -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" in rules, rules
    assert not tcp_open(world, "att", SRV_ATT4, 22), "the gate stands for a new port"
    assert connect_from(world, port) == "dropped", (
        "a SYN from the stale session's port reached sshd")
