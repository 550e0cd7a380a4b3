"""spa-server gate --remove (what the Debian package's removal runs): every
table, chain and ipset spa made goes, with the jumps to them; the host's own
rules stay; the protected port answers again.  Real nftables, iptables-legacy
and ipset in a namespace of the test's own."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from spa.netns import Namespace, Topology
from tests.integration.procs import command
from tests.netns.conftest import KNOCK_PORT


@pytest.fixture
def ns() -> Iterator[Namespace]:
    topo = Topology()
    try:
        yield topo.ns("gone")
    finally:
        topo.cleanup()


def spa_server(ns: Namespace, config: Path, *args: str) -> tuple[int, str]:
    done = ns.run(*command("spa-server"), "--config", str(config), *args, check=False)
    return done.returncode, done.stdout + done.stderr


def test_remove_takes_out_spas_tables_chains_and_sets_and_nothing_else(
        ns: Namespace, tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    code, out = spa_server(ns, config, "init", "--listen-port", str(KNOCK_PORT),
                           "--state-dir", str(tmp_path / "state"), "--service", "ssh")
    assert code == 0, out
    code, out = spa_server(ns, config, "gate")
    assert code == 0, out
    # another instance's table (spa_NAME), and the admin's own tables beside ours
    ns.run("nft", "add table inet spa_office; add chain inet spa_office input "
           "{ type filter hook input priority -10; }; add table inet spa_mine; "
           "add table inet filter; add chain inet filter input { type filter hook input "
           "priority 0; }")
    legacy = shutil.which("iptables-legacy") is not None and shutil.which("ipset") is not None
    if legacy:  # what the iptables backend leaves: chain SPA, its jump, the drop sets
        for argv in (["ipset", "create", "spa_drops_v4", "hash:ip,port"],
                     ["ipset", "create", "theirs", "hash:ip"],
                     ["iptables-legacy", "-N", "SPA"],
                     ["iptables-legacy", "-A", "SPA", "-p", "tcp", "--dport", "22", "-m", "set",
                      "--match-set", "spa_drops_v4", "src,dst", "-j", "DROP"],
                     ["iptables-legacy", "-I", "INPUT", "-j", "SPA"],
                     ["iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "80",
                      "-j", "ACCEPT"]):
            ns.run(*argv)

    code, out = spa_server(ns, config, "gate", "--remove")
    assert code == 0, out
    assert "removed table inet spa\n" in out
    assert "removed table inet spa_office" in out
    tables = ns.run("nft", "list", "tables").stdout.split("\n")
    assert sorted(t for t in tables if t) == ["table inet filter", "table inet spa_mine"]
    if legacy:
        rules = ns.run("iptables-legacy", "-S").stdout
        assert "SPA" not in rules
        assert "-A INPUT -p tcp -m tcp --dport 80 -j ACCEPT" in rules
        assert ns.run("ipset", "list", "-n").stdout.split() == ["theirs"]

    code, out = spa_server(ns, config, "gate", "--remove")
    assert (code, out) == (0, "spa has nothing in the firewall\n")
