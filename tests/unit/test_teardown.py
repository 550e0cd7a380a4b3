"""spa-server gate --remove (the package's removal): what it takes out of the
firewall, as rendered commands, without root (STYLE principle 6)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from spa.backends import teardown
from spa.backends.libnft import FakeNft
from spa.server.errors import LocalError

TABLES = """table inet filter
table inet spa
table inet spa_hold
table inet spa_web
table ip spa
table inet spanner
table inet myspa
"""
OURS = "table inet spa {\n\tchain input {\n\t\ttype filter hook input priority filter - 10;\n"


class Tables(FakeNft):
    """`list tables` as TABLES; `list table X` with our chain unless X is spa_web."""

    def list_text(self, command: str) -> str:
        self.texts.append(command)
        if command == "list tables":
            return TABLES
        return "table inet spa_web {\n}\n" if command.endswith("spa_web") else OURS


def test_only_spas_own_tables_are_deleted() -> None:
    """`spa` and `spa_*` in family inet, and only those that hold our chain:
    not a table that merely starts with the letters, nor another family's."""
    nft = Tables()
    removal = teardown.Removal()
    teardown.remove_nftables(nft, removal)
    deleted = [doc["nftables"][0]["delete"]["table"]["name"] for doc in nft.documents]
    assert deleted == ["spa", "spa_hold"]
    assert removal.removed == ["table inet spa", "table inet spa_hold"]
    assert removal.failed == []


def test_a_table_a_running_daemon_owns_is_one_line_and_the_rest_goes() -> None:
    nft = Tables()
    nft.refuse_next = ["Error: Could not process rule: Operation not permitted"]
    removal = teardown.Removal()
    teardown.remove_nftables(nft, removal)
    assert removal.removed == ["table inet spa_hold"]
    assert len(removal.failed) == 1
    assert removal.failed[0].startswith("table inet spa: ")
    assert "stop it first" in removal.failed[0]


def test_instance_tables_are_ours_by_name() -> None:
    assert teardown.is_ours_table("inet", "spa_office")
    assert teardown.is_ours_table("inet", "spa_office_hold")
    assert not teardown.is_ours_table("inet", "spam")
    assert not teardown.is_ours_table("ip", "spa")


RULES = """-P INPUT ACCEPT
-P FORWARD ACCEPT
-P OUTPUT ACCEPT
-N SPA
-N SPAM
-A INPUT -j SPA
-A INPUT -p tcp -m tcp --dport 80 -j SPAM
-A INPUT -s 192.0.2.1/32 -m comment --comment "a spa rule? -j SPA" -j ACCEPT
-A SPA -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A SPA -s 198.51.100.7/32 -p tcp -m tcp --dport 22 -m comment --comment spa:ssh:1.000 -j ACCEPT
-A SPA -p tcp -m tcp --dport 22 -j DROP
"""


def test_iptables_jumps_go_before_the_chain_and_nothing_else_is_touched() -> None:
    assert teardown.render_ipt_removal(RULES) == [
        ["-D", "INPUT", "-j", "SPA"],
        ["-F", "SPA"],
        ["-X", "SPA"],
    ]


class Programs:
    """Records argv; answers `-S` with RULES and `list -n` with two sets."""

    def __init__(self) -> None:
        self.argvs: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.argvs.append(list(argv))
        out = RULES if argv[-1] == "-S" else "spa_drops_v4\nother\nspa_drops_v6\n"
        return subprocess.CompletedProcess(list(argv), 0, out, "")


def test_legacy_tables_the_kernel_does_not_have_are_never_loaded(tmp_path: Path) -> None:
    """Reading a legacy table loads it into the kernel: a host that never
    had one (/proc/net/ip_tables_names empty) is not asked."""
    (tmp_path / "ip_tables_names").write_text("")
    run = Programs()
    removal = teardown.Removal()
    teardown.remove_iptables(removal, run=run, proc=tmp_path)
    assert run.argvs == []
    (tmp_path / "ip_tables_names").write_text("filter\n")
    teardown.remove_iptables(removal, run=run, proc=tmp_path)
    if run.argvs:  # iptables-legacy installed here
        assert [argv[1:] for argv in run.argvs] == [
            ["-w", "-t", "filter", "-S"], ["-w", "-t", "filter", "-D", "INPUT", "-j", "SPA"],
            ["-w", "-t", "filter", "-F", "SPA"], ["-w", "-t", "filter", "-X", "SPA"]]
        assert removal.removed == ["iptables chain SPA (IPv4)"]


def test_only_spas_ipsets_are_destroyed(tmp_path: Path) -> None:
    run = Programs()
    removal = teardown.Removal()
    teardown.remove_ipsets(removal, run=run, module=tmp_path / "absent")
    assert run.argvs == []
    teardown.remove_ipsets(removal, run=run, module=tmp_path)
    if run.argvs:  # ipset installed here
        assert [argv[1:] for argv in run.argvs] == [
            ["list", "-n"], ["destroy", "spa_drops_v4"], ["destroy", "spa_drops_v6"]]


def test_no_nftables_at_all_is_nothing_to_remove() -> None:
    class Broken(FakeNft):
        def list_text(self, command: str) -> str:
            raise LocalError("nftables: operation not permitted")

    removal = teardown.Removal()
    teardown.remove_nftables(Broken(), removal)
    assert removal.removed == []
    assert removal.failed == ["nftables: operation not permitted"]
