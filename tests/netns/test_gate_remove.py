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
from tests.netns.conftest import KNOCK_PORT, Spa


@pytest.fixture
def ns() -> Iterator[Namespace]:
    topo = Topology()
    try:
        yield topo.ns("gone")
    finally:
        topo.cleanup()


def spa_server(ns: Namespace, config: Path, *args: str,
               prefix: tuple[str, ...] = ()) -> tuple[int, str]:
    done = ns.run(*prefix, *command("spa-server"), "--config", str(config), *args, check=False)
    return done.returncode, done.stdout + done.stderr


def gate(ns: Namespace, root: Path, instance: str, port: int, service: str, *args: str,
         prefix: tuple[str, ...] = ()) -> Path:
    """spa-server init and gate for one instance ("" the default)."""
    config = root / (instance or "default") / "server.toml"
    code, out = spa_server(ns, config, "init", "--listen-port", str(port), "--state-dir",
                           str(config.parent / "state"), "--service", service,
                           *(("--instance", instance) if instance else ()))
    assert code == 0, out
    code, out = spa_server(ns, config, "gate", *args, prefix=prefix)
    assert code == 0, out
    return config


# The adversarial review's reproduction: an admin's own table, chain and
# ipset whose names only start like spa's.
ADMINS = (["nft", "add table inet spa_web"],
          ["nft", "add chain inet spa_web input { type filter hook input priority 0; "
                  "policy drop; }"],
          ["nft", "add rule inet spa_web input tcp dport 80 accept"],
          ["ipset", "create", "spa_allowlist", "hash:ip"],
          ["iptables-legacy", "-N", "SPA_TRUSTED"],
          ["iptables-legacy", "-A", "SPA_TRUSTED", "-s", "192.0.2.0/24", "-j", "ACCEPT"],
          ["iptables-legacy", "-A", "INPUT", "-j", "SPA_TRUSTED"])


def test_remove_takes_out_spas_tables_chains_and_sets_and_nothing_else(
        ns: Namespace, tmp_path: Path) -> None:
    """spa's own (the default instance's table, an instance's table, an
    iptables instance's chain and ipsets) go; the admin's, named like them
    (inet spa_web, SPA_TRUSTED, spa_allowlist) or not, stay with their rules."""
    from tests.netns.test_iptables_e2e import legacy_path

    if shutil.which("ipset") is None:
        pytest.skip("needs ipset (apt-get install ipset)")
    legacy = legacy_path(tmp_path)
    config = gate(ns, tmp_path, "", KNOCK_PORT, "ssh")
    gate(ns, tmp_path, "site", KNOCK_PORT + 1, "https")
    gate(ns, tmp_path, "office", KNOCK_PORT + 2, "web=tcp/8080", "--backend", "iptables",
         prefix=legacy)
    assert "-N SPA_office" in ns.run("iptables-legacy", "-S").stdout
    for argv in (["nft", "add table inet filter; add chain inet filter input { type filter "
                         "hook input priority 0; }"],
                 ["ipset", "create", "theirs", "hash:ip"],
                 ["iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "80", "-j",
                  "ACCEPT"], *ADMINS):
        ns.run(*argv)
    admins_table = ns.run("nft", "list", "table", "inet", "spa_web").stdout

    code, out = spa_server(ns, config, "gate", "--remove")
    assert code == 0, out
    assert "removed table inet spa\n" in out
    assert "removed table inet spa_site\n" in out
    assert "removed iptables chain SPA_office (IPv4)" in out
    assert "removed ipset spa_drops_v4_office\n" in out
    assert "spa_web" not in out and "SPA_TRUSTED" not in out and "spa_allowlist" not in out
    tables = ns.run("nft", "list", "tables").stdout.split("\n")
    assert sorted(t for t in tables if t) == ["table inet filter", "table inet spa_web"]
    assert ns.run("nft", "list", "table", "inet", "spa_web").stdout == admins_table
    rules = ns.run("iptables-legacy", "-S").stdout
    assert "SPA_office" not in rules and "SPA_office" not in ns.run("ip6tables-legacy",
                                                                    "-S").stdout
    for rule in ("-N SPA_TRUSTED", "-A INPUT -j SPA_TRUSTED",
                 "-A SPA_TRUSTED -s 192.0.2.0/24 -j ACCEPT",
                 "-A INPUT -p tcp -m tcp --dport 80 -j ACCEPT"):
        assert rule in rules, rules
    assert sorted(ns.run("ipset", "list", "-n").stdout.split()) == ["spa_allowlist", "theirs"]

    code, out = spa_server(ns, config, "gate", "--remove")
    assert (code, out) == (0, "spa has nothing in the firewall\n")


def test_remove_fails_while_a_spa_server_still_runs(spa: Spa) -> None:
    """A unit the package's removal could not stop (policy-rc.d refused):
    its daemon owns the hold table, which cannot go, and without a hold
    table its gate keeper puts inet spa back at once.  Either way the
    removal fails and names the table (the package stays installed, its
    ports as they were), never "removed" and done while spa closes a port."""
    spa.start()
    try:
        done = spa.admin("gate", "--remove", check=False)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "table inet spa_hold: " in done.stderr, done.stderr
    finally:
        spa.stop()
    text = spa.config.read_text()
    spa.config.write_text(text.replace("[server]\n", '[server]\nhold_table = "off"\n', 1))
    spa.start()
    try:
        done = spa.admin("gate", "--remove", check=False)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "table inet spa is still there after its removal (a spa-server still runs" \
            in done.stderr, done.stderr
        assert "table inet spa" in spa.world.srv.run("nft", "list", "tables").stdout
    finally:
        spa.stop()
