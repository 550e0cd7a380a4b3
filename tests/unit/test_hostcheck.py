"""spa.backends.hostcheck: other base chains that would drop what spa lets in.

The fixtures in tests/hostfw are `nft -j list ruleset` captured from the real rulesets loaded
in network namespaces (tests/hostfw/README.md); these tests read them and need no root."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spa.backends import hostcheck_eval as ev
from spa.backends.hostcheck import Finding, Outcome, Target, check, render

FIXTURES = Path(__file__).resolve().parents[1] / "hostfw"
SSH, HTTPS, WEB = Target("tcp", 22, "ssh"), Target("tcp", 443, "https"), Target("tcp", 8080, "web")
KNOCK = Target.knock_port(62201)
TARGETS = [SSH, HTTPS, KNOCK]
MARK_LINE = "meta mark and 0x10000000 == 0x10000000 accept"
PASSES, DROPS, MAY_DROP, FORWARDED = (Outcome.PASSES, Outcome.DROPS, Outcome.MAY_DROP,
                                      Outcome.FORWARDED)


@cache
def fixture(name: str) -> Any:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def outcomes(findings: list[Finding]) -> list[tuple[str, int, Outcome, str, str]]:
    return [(f.target.label, f.version, f.outcome, " ".join(f.chain), f.where) for f in findings]


def both(label: str, outcome: Outcome, chain: str, where: str,
         ) -> list[tuple[str, int, Outcome, str, str]]:
    return [(label, 4, outcome, chain, where), (label, 6, outcome, chain, where)]


def split(label: str, outcome: Outcome, where4: str, where6: str,
          ) -> list[tuple[str, int, Outcome, str, str]]:
    return [(label, 4, outcome, "ip filter INPUT", where4),
            (label, 6, outcome, "ip6 filter INPUT", where6)]


FW_REJECT = "rule 9 of filter_IN_public, handle 124: reject with icmpx admin-prohibited"
FW_SSH = "rule 1 of filter_IN_public_allow, handle 125: tcp dport 22 accept"
EXPECTED = {
    "debian-default": [row for t in ("ssh", "https", "knock port")
                       for row in both(t, PASSES, "inet filter input", "policy accept")],
    "policy-drop": [row for t in ("ssh", "https", "knock port")
                    for row in both(t, DROPS, "inet filter input", "policy drop")],
    "policy-drop-fixed": [
        *both("ssh", PASSES, "inet filter input", f"rule 2 of input, handle 12: {MARK_LINE}"
              .replace(" and ", " & ")),
        *both("https", PASSES, "inet filter input", f"rule 2 of input, handle 12: {MARK_LINE}"
              .replace(" and ", " & ")),
        *both("knock port", PASSES, "inet filter input",
              "rule 1 of input, handle 13: udp dport 62201 accept")],
    "ufw-default": [row for t in ("ssh", "https", "knock port")
                    for row in split(t, DROPS, "policy drop", "policy drop")],
    "ufw-allow22": [
        *split("ssh", PASSES, "rule 1 of ufw-user-input, handle 98: tcp dport 22 accept",
               "rule 1 of ufw6-user-input, handle 137: tcp dport 22 accept"),
        *split("https", DROPS, "policy drop", "policy drop"),
        *split("knock port", DROPS, "policy drop", "policy drop")],
    "firewalld": [*both("ssh", PASSES, "inet firewalld filter_INPUT", FW_SSH),
                  *both("https", DROPS, "inet firewalld filter_INPUT", FW_REJECT),
                  *both("knock port", DROPS, "inet firewalld filter_INPUT", FW_REJECT)],
    "firewalld-ports": [
        *both("ssh", PASSES, "inet firewalld filter_INPUT", FW_SSH),
        *both("https", PASSES, "inet firewalld filter_INPUT",
              "rule 3 of filter_IN_public_allow, handle 127: tcp dport 443 accept"),
        *both("knock port", PASSES, "inet firewalld filter_INPUT",
              "rule 4 of filter_IN_public_allow, handle 128: udp dport 62201 accept")],
    "docker": [(t, 4, PASSES, "ip filter INPUT", "policy accept")
               for t in ("ssh", "https", "knock port")],
}


@pytest.mark.parametrize("name", EXPECTED)
def test_fixture_findings(name: str) -> None:
    assert outcomes(check(fixture(name), TARGETS)) == EXPECTED[name]


@pytest.mark.parametrize("name", ["ufw-default-fixed", "ufw-hinted"])
def test_ufw_with_the_suggested_lines_passes_everything(name: str) -> None:
    findings = check(fixture(name), TARGETS)
    assert [f.outcome for f in findings] == [PASSES] * 6
    assert render(findings) == [f"{t}: ok, no other base chain on hook input drops it"
                                for t in TARGETS]


def test_policy_drop_fix_lines_and_render() -> None:
    findings = check(fixture("policy-drop"), TARGETS)
    assert {f.fix for f in findings} == {
        f"nft insert rule inet filter input {MARK_LINE}",
        "nft insert rule inet filter input udp dport 62201 accept"}
    assert all(f.hint is None for f in findings)
    assert render(findings)[0] == (
        "ssh (tcp/22), IPv4, IPv6: table inet filter chain input (policy drop) drops it: "
        f"nft insert rule inet filter input {MARK_LINE}")
    assert (FIXTURES / "policy-drop-fixed.cmds").read_text().splitlines() == sorted(
        {f.fix for f in findings if f.fix}, key=lambda fix: "udp" in fix)


def test_ufw_fix_lines_and_hints() -> None:
    findings = check(fixture("ufw-default"), TARGETS)
    ssh4, ssh6 = findings[0], findings[1]
    assert ssh4.fix == "iptables -I INPUT 1 -m mark --mark 0x10000000/0x10000000 -j ACCEPT"
    assert ssh6.fix == "ip6tables -I INPUT 1 -m mark --mark 0x10000000/0x10000000 -j ACCEPT"
    assert ssh4.hint is not None and ssh6.hint is not None
    assert "`-A ufw-before-input -m mark --mark 0x10000000/0x10000000 -j ACCEPT`" in ssh4.hint
    assert "/etc/ufw/before.rules" in ssh4.hint
    assert "`-A ufw6-before-input -m mark" in ssh6.hint and "before6.rules" in ssh6.hint
    knock4 = findings[4]
    assert knock4.fix == "iptables -I INPUT 1 -p udp --dport 62201 -j ACCEPT"
    assert knock4.hint == "with ufw, instead: `ufw allow 62201/udp`"


def test_firewalld_fix_and_hint() -> None:
    https = check(fixture("firewalld"), [HTTPS])[0]
    assert https.fix == f"nft insert rule inet firewalld filter_INPUT {MARK_LINE}"
    assert https.hint is not None
    assert "`firewall-cmd --permanent --add-port=443/tcp && firewall-cmd --reload`" in https.hint
    assert "priority -10, before firewalld's +10" in https.hint
    knock = check(fixture("firewalld"), [KNOCK])[0]
    assert knock.fix == "nft insert rule inet firewalld filter_INPUT udp dport 62201 accept"


def test_docker_published_port_is_forwarded() -> None:
    findings = check(fixture("docker"), [SSH, WEB])
    forwarded = [f for f in findings if f.outcome is FORWARDED]
    assert [(f.target, f.version, f.chain) for f in forwarded] == [
        (WEB, 4, ("ip", "nat", "PREROUTING"))]
    web = forwarded[0]
    assert web.where == ("rule 2 of DOCKER, handle 11: iifname != docker0 tcp dport 8080 "
                         "xt target DNAT")
    assert web.destination is None  # iptables-nft's xt DNAT keeps its address out of JSON
    assert web.gated_in_forward is False
    assert "xt match addrtype" in web.unknown
    assert render(findings)[0] == "ssh (tcp/22): ok, no other base chain on hook input drops it"
    assert "may DNAT it" in render(findings)[1]


# Synthetic chains, in nft's JSON forms (as `nft -j list ruleset` prints them).

def dport(right: Any, op: str = "==", proto: str = "tcp") -> dict[str, Any]:
    return {"match": {"op": op, "left": {"payload": {"protocol": proto, "field": "dport"}},
                      "right": right}}


def match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


SADDR = match({"payload": {"protocol": "ip", "field": "saddr"}},
              {"prefix": {"addr": "10.0.0.0", "len": 8}})
MARKED = match({"&": [{"meta": {"key": "mark"}}, 0x10000000]}, 0x10000000)
ACCEPT, DROP = {"accept": None}, {"drop": None}


def ruleset(chains: dict[str, list[list[dict[str, Any]]]], *, policy: str = "accept",
            prio: int = 0, table: tuple[str, str] = ("inet", "t"),
            extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Chain "input" is the base chain (hook input); the others are regular chains."""
    family, name = table
    items: list[dict[str, Any]] = [{"table": {"family": family, "name": name}}]
    for chain, rules in chains.items():
        base = {"type": "filter", "hook": "input", "prio": prio, "policy": policy}
        items.append({"chain": {"family": family, "table": name, "name": chain,
                                **(base if chain == "input" else {})}})
        items += [{"rule": {"family": family, "table": name, "chain": chain, "handle": h,
                            "expr": expr}} for h, expr in enumerate(rules, 1)]
    return {"nftables": items + (extra or [])}


def one(doc: dict[str, Any], target: Target = SSH) -> Finding:
    return check(doc, [target])[0]


def test_jump_returns_and_goto_does_not() -> None:
    jumped = ruleset({"input": [[{"jump": {"target": "c"}}], [dport(22), ACCEPT]],
                      "c": [[{"return": None}]]}, policy="drop")
    assert one(jumped).outcome is PASSES
    went = ruleset({"input": [[{"goto": {"target": "c"}}], [dport(22), ACCEPT]], "c": []},
                   policy="drop")
    assert (one(went).outcome, one(went).where) == (DROPS, "policy drop")
    dropped = ruleset({"input": [[{"jump": {"target": "c"}}]], "c": [[dport(22), DROP]]})
    assert (one(dropped).outcome, one(dropped).where) == (DROPS, "rule 1 of c, handle 1: "
                                                                 "tcp dport 22 drop")


def test_not_equal_sets_ranges_and_named_sets() -> None:
    doc = ruleset({"input": [[dport(22, "!="), DROP]]})
    assert (one(doc, SSH).outcome, one(doc, HTTPS).outcome) == (PASSES, DROPS)
    ranged = ruleset({"input": [[dport({"set": [80, {"range": [400, 500]}]}), DROP]]})
    assert (one(ranged, SSH).outcome, one(ranged, HTTPS).outcome) == (PASSES, DROPS)
    named = ruleset({"input": [[dport("@ports"), ACCEPT]]}, policy="drop", extra=[
        {"set": {"family": "inet", "table": "t", "name": "ports", "type": "inet_service",
                 "elem": [22, {"range": [8000, 8100]}]}}])
    assert (one(named, SSH).outcome, one(named, HTTPS).outcome) == (PASSES, DROPS)
    assert one(ruleset({"input": [[dport(22, "<"), DROP]]}), HTTPS).outcome is PASSES


def test_an_undecided_match_before_a_drop_or_an_accept_may_drop() -> None:
    before_drop = one(ruleset({"input": [[SADDR, dport(22), DROP]]}))
    assert (before_drop.outcome, before_drop.unknown) == (MAY_DROP, ("ip saddr 10.0.0.0/8",))
    before_accept = one(ruleset({"input": [[SADDR, ACCEPT]]}, policy="drop"))
    assert (before_accept.outcome, before_accept.where) == (MAY_DROP, "policy drop")
    assert before_accept.fix == f"nft insert rule inet t input {MARK_LINE}"
    # a decided False after the undecided match settles the rule
    assert one(ruleset({"input": [[SADDR, dport(80), DROP]]})).outcome is PASSES


def test_mark_masks_and_the_knock_port() -> None:
    doc = ruleset({"input": [[MARKED, ACCEPT]]}, policy="drop")
    assert one(doc, SSH).outcome is PASSES
    assert one(doc, KNOCK).outcome is DROPS  # the knock port carries no mark
    low = ruleset({"input": [[match({"&": [{"meta": {"key": "mark"}}, 0xFF]}, 1), ACCEPT]]},
                  policy="drop")
    assert one(low).outcome is DROPS
    assert check(doc, [SSH], mark=0x1)[0].outcome is DROPS
    set_mark = [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 0x10000000}}]
    assert one(ruleset({"input": [set_mark, [MARKED, ACCEPT]]}, policy="drop"),
               KNOCK).outcome is PASSES


def test_chain_before_ours_sees_no_mark_and_gets_a_port_rule() -> None:
    finding = one(ruleset({"input": [[MARKED, ACCEPT]]}, policy="drop", prio=-100))
    assert finding.outcome is DROPS
    assert finding.fix == "nft insert rule inet t input tcp dport 22 accept"
    assert finding.hint is not None and "(priority -100) may run before spa's (-10)" in finding.hint


def test_packet_facts() -> None:
    lo = [match({"meta": {"key": "iifname"}}, "lo"), ACCEPT]
    assert one(ruleset({"input": [lo]}, policy="drop")).outcome is DROPS
    not_lo = [match({"meta": {"key": "iif"}}, "lo", "!="), ACCEPT]
    assert one(ruleset({"input": [not_lo]}, policy="drop")).outcome is PASSES
    eth0 = [match({"meta": {"key": "iifname"}}, "eth0"), ACCEPT]
    assert one(ruleset({"input": [eth0]}, policy="drop")).outcome is MAY_DROP
    new = [match({"ct": {"key": "state"}}, {"set": ["established", "related"]}), ACCEPT]
    assert one(ruleset({"input": [new]}, policy="drop")).outcome is DROPS
    invalid = [match({"ct": {"key": "state"}}, "invalid", "in"), DROP]
    assert one(ruleset({"input": [invalid]})).outcome is PASSES
    local = [match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"), ACCEPT]
    assert one(ruleset({"input": [local]}, policy="drop")).outcome is PASSES
    icmp = [match({"payload": {"protocol": "icmp", "field": "type"}}, "echo-request", "!="),
            DROP]
    assert one(ruleset({"input": [icmp]})).outcome is PASSES
    l4 = [match({"meta": {"key": "l4proto"}}, {"set": ["tcp", "udp"]}), ACCEPT]
    assert one(ruleset({"input": [l4]}, policy="drop"), KNOCK).outcome is PASSES
    tcp_only = ruleset({"input": [[dport(62201), ACCEPT]]}, policy="drop")
    assert one(tcp_only, KNOCK).outcome is DROPS
    syn = [match({"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "ack"]]},
                 "syn", "!="), DROP]
    assert one(ruleset({"input": [syn]})).outcome is PASSES
    v4_only = [match({"meta": {"key": "nfproto"}}, "ipv4"), DROP]
    assert [f.outcome for f in check(ruleset({"input": [v4_only]}), [SSH])] == [DROPS, PASSES]


def test_statements_verdict_maps_and_xt() -> None:
    logged: list[dict[str, Any]] = [{"limit": {"rate": 3, "per": "minute"}}, {"counter": None},
                                    {"log": None}]
    assert one(ruleset({"input": [logged, [dport(22), DROP]]})).outcome is DROPS
    vmap = [{"vmap": {"key": {"payload": {"protocol": "tcp", "field": "dport"}},
                      "data": {"set": [[22, ACCEPT], [443, DROP]]}}}]
    doc = ruleset({"input": [vmap]}, policy="drop")
    assert (one(doc, SSH).outcome, one(doc, HTTPS).outcome) == (PASSES, DROPS)
    xt: list[dict[str, Any]] = [{"xt": {"type": "match", "name": "conntrack"}}, DROP]
    assert one(ruleset({"input": [xt]})).outcome is MAY_DROP
    comment: list[dict[str, Any]] = [{"xt": {"type": "match", "name": "comment"}}, dport(22), DROP]
    assert one(ruleset({"input": [comment]})).outcome is DROPS
    assert one(ruleset({"input": [[{"queue": {"num": 1}}]]})).outcome is MAY_DROP
    over: list[dict[str, Any]] = [{"limit": {"rate": 9, "per": "second", "inv": True}}, DROP]
    assert one(ruleset({"input": [over]})).outcome is MAY_DROP


def test_iptables_layout_gets_iptables_lines() -> None:
    doc = ruleset({"INPUT": []}, policy="drop", table=("ip", "filter"))
    doc["nftables"][1]["chain"].update(type="filter", hook="input", prio=0, policy="drop")
    assert one(doc).fix == "iptables -I INPUT 1 -m mark --mark 0x10000000/0x10000000 -j ACCEPT"


def test_own_table_other_hooks_and_cycles() -> None:
    ours = ruleset({"input": [[DROP]]}, table=("inet", "spa"))
    assert check(ours, TARGETS) == []
    assert render([]) == []
    cycle = ruleset({"input": [[{"jump": {"target": "c"}}]], "c": [[{"jump": {"target": "c"}}]]})
    assert one(cycle).outcome is MAY_DROP
    with pytest.raises(ValueError, match="nft -j list ruleset"):
        check({"tables": []}, TARGETS)


def test_native_dnat_and_our_forward_gate() -> None:
    nat = {"family": "ip", "table": "nat"}
    dnat = {"dnat": {"family": "ip", "addr": "10.0.0.2", "port": 80}}
    gate = {"family": "inet", "table": "spa"}
    doc = {"nftables": [
        {"chain": {**nat, "name": "pre", "type": "nat", "hook": "prerouting", "prio": -100}},
        {"rule": {**nat, "chain": "pre", "handle": 3, "expr": [dport(8080), dnat]}},
        {"chain": {**gate, "name": "fwd", "type": "filter", "hook": "forward", "prio": -10}},
        {"rule": {**gate, "chain": "fwd", "handle": 4, "expr": [
            match({"ct": {"key": "proto-dst", "dir": "original"}}, {"set": [8080]}), ACCEPT]}},
    ]}
    [web] = check(doc, [WEB])
    assert (web.outcome, web.destination, web.gated_in_forward, web.unknown) == (
        FORWARDED, "10.0.0.2:80", True, ())
    assert render([web]) == [
        "web (tcp/8080), IPv4: table ip nat chain pre DNATs it to 10.0.0.2:80 (rule 1 of pre, "
        "handle 3: tcp dport 8080 dnat to 10.0.0.2:80): such connections are forwarded, not "
        "delivered locally, and gated by a forward chain in spa's table"]
    assert check(doc, [SSH]) == []


@given(st.sets(st.integers(1, 65535), max_size=5), st.integers(1, 65535))
def test_port_sets_decide_exactly(ports: set[int], port: int) -> None:
    doc = ruleset({"input": [[dport({"set": sorted(ports)}, proto="th"), ACCEPT]]},
                  policy="drop")
    assert one(doc, Target("udp", port, "x")).outcome is (PASSES if port in ports else DROPS)


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_mark_masks_decide_exactly(mark: int, mask: int, value: int) -> None:
    doc = ruleset({"input": [[match({"&": [{"meta": {"key": "mark"}}, mask]}, value), DROP]]})
    expected = DROPS if mark & mask == value else PASSES
    assert check(doc, [SSH], mark=mark)[0].outcome is expected


def test_walk_lists_every_way_out() -> None:
    index = ev.index(ruleset({"input": [[SADDR, DROP], [dport(22), ACCEPT]]}))
    ends = ev.walk(index, ("inet", "t", "input"), ev.Packet(4, "tcp", 22, 0))
    assert [(end.kind, end.unknown) for end in ends] == [
        (ev.EndKind.DROP, ("ip saddr 10.0.0.0/8",)), (ev.EndKind.ACCEPT, ("ip saddr 10.0.0.0/8",))]
