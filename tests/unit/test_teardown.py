"""spa-server gate --remove (the package's removal): what it takes out of the
firewall, as rendered commands, without root (STYLE principle 6)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from spa.backends import teardown
from spa.backends.libnft import FakeNft
from spa.server.errors import LocalError

# Real `nft -t list table` output (nft 1.0.6, a netns run of spa-server
# gate and run with service ssh): spa's gate table and the hold table its
# daemon owns.  An instance's tables are the same under spa_NAME, spa_hold_NAME.
GATE = """table inet spa {
\tset svc_ssh_v4 {
\t\ttype ipv4_addr
\t\tflags timeout
\t}

\tset svc_ssh_v6 {
\t\ttype ipv6_addr
\t\tflags timeout
\t}

\tset drops_v4 {
\t\ttype ipv4_addr . inet_service
\t\tsize 8192
\t\tflags dynamic,timeout
\t\ttimeout 10m
\t}

\tset drops_v6 {
\t\ttype ipv6_addr . inet_service
\t\tsize 8192
\t\tflags dynamic,timeout
\t\ttimeout 10m
\t}

\tchain input {
\t\ttype filter hook input priority filter - 10; policy accept;
\t\tct state established,related accept
\t\ttcp dport 22 ip saddr @svc_ssh_v4 meta mark set meta mark | 0x10000000 accept
\t\ttcp dport 22 ip6 saddr @svc_ssh_v6 meta mark set meta mark | 0x10000000 accept
\t\ttcp dport 22 update @drops_v4 { ip saddr . tcp dport counter } drop
\t\ttcp dport 22 update @drops_v6 { ip6 saddr . tcp dport counter } drop
\t\ttcp dport 22 drop
\t}

\tchain forward {
\t\ttype filter hook forward priority filter - 10; policy accept;
\t\tct state established,related accept
\t\tmeta l4proto tcp ct status dnat ct original proto-dst 22 ip saddr @svc_ssh_v4 \
meta mark set meta mark | 0x10000000 accept
\t\tmeta l4proto tcp ct status dnat ct original proto-dst 22 ip6 saddr @svc_ssh_v6 \
meta mark set meta mark | 0x10000000 accept
\t\tmeta l4proto tcp ct status dnat ct original proto-dst 22 drop
\t}
}
"""
HOLD = """table inet spa_hold { # progname spa-server
\tflags owner

\tset svc_ssh_v4 {
\t\ttype ipv4_addr
\t\tflags timeout
\t}

\tset svc_ssh_v6 {
\t\ttype ipv6_addr
\t\tflags timeout
\t}

\tchain input {
\t\ttype filter hook input priority filter - 9; policy accept;
\t\tct state established,related accept
\t\ttcp dport 22 ip saddr @svc_ssh_v4 accept
\t\ttcp dport 22 ip6 saddr @svc_ssh_v6 accept
\t\ttcp dport 22 drop
\t}

\tchain forward {
\t\ttype filter hook forward priority filter - 9; policy accept;
\t\tct state established,related accept
\t\tmeta l4proto tcp ct status dnat ct original proto-dst 22 ip saddr @svc_ssh_v4 accept
\t\tmeta l4proto tcp ct status dnat ct original proto-dst 22 ip6 saddr @svc_ssh_v6 accept
\t\tmeta l4proto tcp ct status dnat ct original proto-dst 22 drop
\t}
}
"""
# The review's reproduction: an admin's own table whose name spa could have made.
ADMIN = """table inet spa_web {
\tchain input {
\t\ttype filter hook input priority filter; policy drop;
\t\ttcp dport 80 accept
\t}
}
"""
LISTINGS = {
    "inet spa": GATE,
    "inet spa_hold": HOLD,
    "inet spa_office": GATE.replace("inet spa {", "inet spa_office {"),
    "inet spa_hold_office": HOLD.replace("inet spa_hold {", "inet spa_hold_office {"),
    "inet spa_web": ADMIN,
    # an admin's table that has spa's input chain but none of its sets
    "inet spa_mine": ADMIN.replace("spa_web", "spa_mine").replace(
        "priority filter; policy drop;", "priority filter - 10; policy accept;"),
    # spa's gate with one more chain of the admin's
    "inet spa_extra": GATE.replace("inet spa {", "inet spa_extra {").replace(
        "\tchain forward {", "\tchain mine {\n\t\tdrop\n\t}\n\n\tchain forward {"),
    "inet spa_hold_Office": HOLD,  # not a name spa makes (upper case)
    "ip spa": GATE.replace("inet spa", "ip spa"),
    "inet spanner": GATE,
}
TABLES = "table inet filter\n" + "".join(f"table {key}\n" for key in LISTINGS)


class Tables(FakeNft):
    """`list tables` as TABLES; `list table F X` as LISTINGS."""

    def list_text(self, command: str) -> str:
        self.texts.append(command)
        if command == "list tables":
            return TABLES
        return LISTINGS[command.removeprefix("list table ")]


def test_only_spas_own_tables_are_deleted() -> None:
    """spa's exact names in family inet, with spa's shape: not an admin's
    table that shares a name (spa_web, the review's reproduction), has spa's
    chain but not its sets, or has a chain of its own; not another family's."""
    nft = Tables()
    removal = teardown.Removal()
    teardown.remove_nftables(nft, removal)
    deleted = [doc["nftables"][0]["delete"]["table"]["name"] for doc in nft.documents]
    assert deleted == ["spa", "spa_hold", "spa_office", "spa_hold_office"]
    assert removal.removed == [f"table inet {name}" for name in deleted]
    assert removal.failed == []


def test_a_table_a_running_daemon_owns_is_one_line_and_the_rest_goes() -> None:
    nft = Tables()
    nft.refuse_next = ["Error: Could not process rule: Operation not permitted"]
    removal = teardown.Removal()
    teardown.remove_nftables(nft, removal)
    assert removal.removed == ["table inet spa_hold", "table inet spa_office",
                               "table inet spa_hold_office"]
    assert len(removal.failed) == 1
    assert removal.failed[0].startswith("table inet spa: ")
    assert "stop it first" in removal.failed[0]


def test_table_names_are_spas_exactly() -> None:
    for name in ("spa", "spa_hold", "spa_office", "spa_hold_office", "spa_site-2"):
        assert teardown.is_ours_table("inet", name), name
    for name in ("spa_", "spa_hold_", "spa_Web", "spa_hold_Office", "spam", "spa_-x",
                 "spa_" + "x" * 17, "spa_hold_hold"):
        assert not teardown.is_ours_table("inet", name), name
    assert not teardown.is_ours_table("ip", "spa")


def test_the_shape_tells_spas_tables_from_an_admins() -> None:
    assert teardown.has_our_shape("spa", GATE)
    assert teardown.has_our_shape("spa_hold", HOLD)
    assert not teardown.has_our_shape("spa_web", ADMIN)
    assert not teardown.has_our_shape("spa_hold", GATE), "a gate's shape under a hold's name"
    assert not teardown.has_our_shape("spa", HOLD), "a hold's shape under a gate's name"
    no_drops = GATE.replace("set drops_v6 {", "set mine {")
    assert not teardown.has_our_shape("spa", no_drops)
    assert not teardown.has_our_shape("spa", "table inet spa {\n}\n")
    # a gate without services (no svc_* sets) is still spa's
    bare = "".join(GATE.partition("\tset drops_v4")[1:])
    assert teardown.has_our_shape("spa", "table inet spa {\n" + bare)


def test_chain_and_ipset_names_are_spas_exactly() -> None:
    assert teardown.is_ours_chain("SPA") and teardown.is_ours_chain("SPA_office")
    for name in ("SPA_TRUSTED", "SPAM", "SPA_", "SPA_hold"):
        assert not teardown.is_ours_chain(name), name
    for name in ("spa_drops_v4", "spa_drops_v6", "spa_drops_v4_office"):
        assert teardown.is_our_ipset(name), name
    for name in ("spa_allowlist", "spa_drops_v5", "spa_drops_v4_", "spa_drops_v4_X", "spa_"):
        assert not teardown.is_our_ipset(name), name


RULES = """-P INPUT ACCEPT
-P FORWARD ACCEPT
-P OUTPUT ACCEPT
-N SPA
-N SPAM
-N SPA_TRUSTED
-N SPA_web
-A INPUT -j SPA
-A INPUT -j SPA_TRUSTED
-A INPUT -j SPA_web
-A INPUT -p tcp -m tcp --dport 80 -j SPAM
-A INPUT -s 192.0.2.1/32 -m comment --comment "a spa rule? -j SPA" -j ACCEPT
-A SPA -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A SPA -s 198.51.100.7/32 -p tcp -m tcp --dport 22 -m comment --comment spa:ssh:1.000 -j ACCEPT
-A SPA -p tcp -m tcp --dport 22 -j DROP
-A SPA_TRUSTED -s 192.0.2.0/24 -j ACCEPT
-A SPA_web -p tcp -m tcp --dport 80 -j ACCEPT
"""


def test_iptables_chains_of_both_first_rules_are_spas() -> None:
    """The iptables chain's first rule since 2026-12-06 (`! -p tcp`: a TCP
    SYN is never accepted as established, a second rule takes the rest of
    tcp) and the one before it are both spa's; an admin's chain whose first
    rule only looks alike is not."""
    new = RULES.replace("-A SPA -m conntrack", "-A SPA ! -p tcp -m conntrack")
    assert "! -p tcp" in new
    assert teardown.render_ipt_removal(new) == teardown.render_ipt_removal(RULES)
    other = RULES.replace("-A SPA -m conntrack", "-A SPA ! -p udp -m conntrack")
    assert ["-X", "SPA"] not in teardown.render_ipt_removal(other)


def test_iptables_jumps_go_before_the_chain_and_nothing_else_is_touched() -> None:
    """Not the admin's SPA_TRUSTED (not a name spa makes) nor SPA_web (a
    name it could make, but not its first rule)."""
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
        out = RULES if argv[-1] == "-S" else "spa_drops_v4\nother\nspa_allowlist\nspa_drops_v6\n"
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


def test_a_table_a_running_daemon_put_back_is_a_failure_named_once() -> None:
    """After the removal `list tables` is read again: spa's tables still
    there fail the removal (the package then stays installed), each once."""
    nft = Tables()
    removal = teardown.Removal(failed=["table inet spa_hold: nftables: operation not permitted"])
    teardown.recheck_nftables(nft, removal)
    assert removal.failed[1:] == [
        f"table inet {name} is still there after its removal (a spa-server still runs and "
        "put it back: stop it first)" for name in ("spa", "spa_office", "spa_hold_office")]


# A gateway service with a published port adds chain published (nat, prerouting)
# to the gate table (real nft 1.0.6 listing, spa/backends/nftgateway.py).
GATEWAY_DNAT = """\tchain published {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tmeta nfproto ipv4 fib daddr type local tcp dport 2222 dnat ip to 10.20.0.5:22
\t}
"""


def test_a_gateway_table_with_its_published_chain_is_spas_and_an_admins_nat_is_not() -> None:
    gateway = GATE.rstrip().removesuffix("}") + "\n" + GATEWAY_DNAT + "}\n"
    assert teardown.has_our_shape("spa", gateway)
    assert not teardown.has_our_shape("spa_hold", HOLD.rstrip().removesuffix("}") + "\n"
                                      + GATEWAY_DNAT + "}\n"), "the hold has no nat chain"
    other_hook = gateway.replace("hook prerouting priority dstnat",
                                 "hook postrouting priority srcnat")
    assert not teardown.has_our_shape("spa", other_hook)
    other_name = gateway.replace("\tchain published {", "\tchain mine {")
    assert not teardown.has_our_shape("spa", other_name)
