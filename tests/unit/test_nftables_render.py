"""The nftables backend's commands, checked as data without root."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from spa.backends.base import Change, apply
from spa.backends.libnft import FakeNft
from spa.backends.nftables import (
    DROPS_SIZE,
    NftablesBackend,
    parse_held,
    render_allow,
    render_changes,
    render_hold,
    render_remove,
    render_start,
    set_name,
    timeout_seconds,
)
from spa.core.leases import Allow, Remove
from spa.core.policy import DEFAULT_SERVICES, Service
from spa.server.errors import LocalError

SERVICES = dict(DEFAULT_SERVICES) | {"dns": Service("dns", "udp", 53, 10, 60)}
A4 = ipaddress.ip_address("192.0.2.5")
A6 = ipaddress.ip_address("2001:db8::5")


def commands(doc: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for command in doc["nftables"]:
        (verb, body), = command.items()
        (kind, _), = body.items()
        out.append((verb, kind))
    return out


def test_start_touches_only_our_table_and_is_idempotent() -> None:
    doc = render_start(SERVICES)
    for command in doc["nftables"]:
        (_, body), = command.items()
        (kind, spec), = body.items()
        if kind == "table":
            assert spec == {"family": "inet", "name": "spa"}
        else:
            assert spec["family"] == "inet"
            assert spec["table"] == "spa"
    verbs = commands(doc)
    assert ("delete", "table") not in verbs and ("flush", "set") not in verbs, "grants kept"
    assert verbs.count(("add", "set")) == 2 * len(SERVICES) + 2  # and the drop counters
    assert ("flush", "chain") in verbs, "our one chain is rewritten"


def test_chain_accepts_established_then_sets_then_drops_never_rejects() -> None:
    rules = [c["add"]["rule"]["expr"] for c in render_start(SERVICES)["nftables"]
             if "add" in c and "rule" in c["add"]]
    for rule in rules[:2]:
        assert rule[-1] == {"accept": None}
        assert rule[1]["match"]["right"] == ["established", "related"]
    verdicts = [next(iter(r[-1])) for r in rules]
    assert "reject" not in verdicts
    for name, service in SERVICES.items():
        mine = [r for r in rules if r[0]["match"]["left"] == {
            "payload": {"protocol": service.protocol, "field": "dport"}}
            and r[0]["match"]["right"] == service.port]
        assert [next(iter(r[-1])) for r in mine] == ["accept", "accept"] + ["drop"] * 3, name
        assert [r[2]["set"]["set"] for r in mine[2:4]] == ["@drops_v4", "@drops_v6"], "counted"
        assert mine[0][1]["match"]["right"] == f"@{set_name(name, 4)}"
        assert mine[1][1]["match"]["right"] == f"@{set_name(name, 6)}"
    chain = next(c["add"]["chain"] for c in render_start(SERVICES)["nftables"]
                 if "add" in c and "chain" in c["add"])
    assert chain["policy"] == "accept"
    assert chain["hook"] == "input"


NOT_TCP = {"match": {"op": "!=", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
TCP_FLAGS = {"payload": {"protocol": "tcp", "field": "flags"}}
NOT_A_SYN = {"match": {"op": "!=", "left": {"&": [TCP_FLAGS, ["syn", "ack"]]}, "right": "syn"}}
ESTABLISHED = {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                         "right": ["established", "related"]}}


def test_a_tcp_syn_is_never_accepted_as_established() -> None:
    """The kill -9 test's opening: conntrack lets a SYN that matches an entry
    it still holds as established pass as established.  Every base chain of
    ours, in our table and in the hold table, accepts established traffic
    only as two rules: any protocol but TCP, and TCP but a SYN without ACK
    (which then meets the grant sets and the drop like any new connection).
    The real kernel: test_a_syn_that_conntrack_calls_established_is_still_gated."""
    for doc in (render_start(SERVICES), render_hold(SERVICES, {}, 0.0)):
        chains = [c["add"]["chain"]["name"] for c in doc["nftables"]
                  if "add" in c and "chain" in c["add"] and "hook" in c["add"]["chain"]]
        assert chains and set(chains) >= {"input", "forward"}
        for chain in chains:
            rules = [c["add"]["rule"]["expr"] for c in doc["nftables"]
                     if "add" in c and "rule" in c["add"] and c["add"]["rule"]["chain"] == chain]
            assert rules[:2] == [[NOT_TCP, ESTABLISHED, {"accept": None}],
                                 [NOT_A_SYN, ESTABLISHED, {"accept": None}]], chain
            assert all(ESTABLISHED not in rule for rule in rules[2:]), chain


def test_allow_replaces_the_timeout_in_one_transaction() -> None:
    doc = render_allow(A6, "ssh", 42)
    assert commands(doc) == [("add", "element"), ("delete", "element"), ("add", "element")]
    last = doc["nftables"][2]["add"]["element"]
    assert last["name"] == "svc_ssh_v6"
    assert last["elem"] == [{"elem": {"val": "2001:db8::5", "timeout": 42}}]


def test_timeouts_are_whole_seconds_rounded_up_never_zero() -> None:
    assert timeout_seconds(130.0, 100.0) == 30
    assert timeout_seconds(130.2, 100.0) == 31
    assert timeout_seconds(100.1, 100.0) == 1
    assert timeout_seconds(99.0, 100.0) == 1
    assert all(isinstance(timeout_seconds(100 + d / 7, 100), int) for d in range(50))


def test_backend_sends_each_call_as_one_document() -> None:
    fake = FakeNft()
    backend = NftablesBackend(fake, flush_on_stop=True)
    backend.start(SERVICES, now=0)
    backend.allow(A4, SERVICES["ssh"], 30.5, now=0)
    backend.remove(A4, SERVICES["ssh"])
    backend.stop()
    # start lists the table first (are the drop sets there?), installs, and
    # lists it again (the shape `repair` compares with)
    assert len(fake.documents) == 6
    assert commands(fake.documents[0]) == [("list", "table")]
    assert commands(fake.documents[2]) == [("list", "table")]
    assert commands(fake.documents[5]) == [("flush", "set")] * (2 * len(SERVICES))
    assert NftablesBackend(FakeNft()).flush_on_stop is False


def test_a_batch_of_changes_is_one_transaction() -> None:
    fake = FakeNft()
    backend = NftablesBackend(fake)
    backend.start(SERVICES, now=0)
    backend.apply([(Allow(A4, "ssh", 30.5), SERVICES["ssh"]),
                   (Allow(A6, "https", 100.0), SERVICES["https"]),
                   (Remove(A4, "dns"), SERVICES["dns"])], now=0)
    backend.apply([], now=0)  # nothing to do: no transaction at all
    assert len(fake.documents) == 4  # the listings and the start, then the batch
    batch = fake.documents[3]
    assert batch["nftables"] == (render_changes([(Allow(A4, "ssh", 30.5), SERVICES["ssh"])], 0,
                                                lambda address, name: True)["nftables"]
                                 + [{"create": {"element": {
                                     "family": "inet", "table": "spa", "name": "svc_https_v6",
                                     "elem": [{"elem": {"val": str(A6), "timeout": 100}}]}}}]
                                 + render_remove(A4, "dns")["nftables"])
    assert commands(batch)[0] == ("create", "element")


def test_a_grant_for_an_absent_address_is_one_create_and_a_renewal_replaces() -> None:
    fake = FakeNft()
    backend = NftablesBackend(fake)
    backend.start(SERVICES, now=0)
    backend.held(now=0)  # the kernel holds nothing
    backend.apply([(Allow(A4, "ssh", 30.0), SERVICES["ssh"]),
                   (Allow(A6, "ssh", 30.0), SERVICES["ssh"])], now=0)
    assert commands(fake.documents[-1]) == [("create", "element")] * 2
    backend.apply([(Allow(A4, "ssh", 90.0), SERVICES["ssh"])], now=0)  # now present
    assert fake.documents[-1] == render_allow(A4, "ssh", 90)
    backend.apply([(Remove(A4, "ssh"), SERVICES["ssh"])], now=0)
    backend.apply([(Allow(A4, "ssh", 30.0), SERVICES["ssh"])], now=0)  # absent again
    assert commands(fake.documents[-1]) == [("create", "element")]


def test_a_create_the_kernel_refuses_is_resent_in_the_form_that_always_works() -> None:
    """The element existed after all (someone else's, or an unknown leftover):
    the whole batch goes again as add+delete+add, so the timeout is ours."""
    fake = FakeNft()
    backend = NftablesBackend(fake)
    backend.start(SERVICES, now=0)
    fake.refuse_next.append("Error: Could not process rule: File exists")
    changes: list[Change] = [(Allow(A4, "ssh", 30.0), SERVICES["ssh"]),
                             (Remove(A6, "https"), SERVICES["https"])]
    backend.apply(changes, now=0)
    assert commands(fake.documents[-2]) == [("create", "element"), ("add", "element"),
                                            ("delete", "element")]
    assert fake.documents[-1]["nftables"] == (render_allow(A4, "ssh", 30)["nftables"]
                                              + render_remove(A6, "https")["nftables"])
    # Both attempts refused: the error reaches the daemon (which reconciles).
    fake.refuse_next += ["Error: first", "Error: second"]
    with pytest.raises(LocalError, match="second"):
        backend.apply([(Allow(A6, "ssh", 30.0), SERVICES["ssh"])], now=0)


def test_held_replaces_what_the_backend_believes_the_kernel_holds() -> None:
    fake = FakeNft()
    backend = NftablesBackend(fake)
    backend.start(SERVICES, now=0)
    fake.listing = {"nftables": [{"set": {"family": "inet", "table": "spa", "name": "svc_ssh_v4",
                                          "elem": [{"elem": {"val": str(A4), "expires": 20}}]}}]}
    backend.held(now=0)
    backend.apply([(Allow(A4, "ssh", 30.0), SERVICES["ssh"])], now=0)
    assert fake.documents[-1] == render_allow(A4, "ssh", 30)


def test_apply_sends_only_the_last_action_per_address_and_service() -> None:
    fake = FakeNft()
    backend = NftablesBackend(fake)
    backend.start(SERVICES, now=0)
    backend.allow(A4, SERVICES["ssh"], 5.0, now=0)  # present: a grant replaces it
    apply(backend, [Allow(A4, "ssh", 10.0), Allow(A6, "ssh", 20.0), Allow(A4, "ssh", 40.0),
                    Remove(A6, "ssh")], SERVICES, now=0)
    assert fake.documents[4]["nftables"] == (render_allow(A4, "ssh", 40)["nftables"]
                                             + render_remove(A6, "ssh")["nftables"])
    apply(backend, [], SERVICES, now=0)
    assert len(fake.documents) == 5


def test_drop_sets_are_added_only_when_missing_and_their_counters_parse() -> None:
    """The kernel marks the drop sets dynamic once rules update them; adding
    them again (nft's JSON cannot say 'dynamic') is refused, so start leaves
    them alone when the table has them."""
    fake = FakeNft()
    backend = NftablesBackend(fake)
    backend.start(SERVICES, now=0)
    assert ("add", "set") in commands(fake.documents[-2])
    first = sum(1 for c in fake.documents[-2]["nftables"]
                if "add" in c and "set" in c["add"] and c["add"]["set"]["name"].startswith("drops"))
    assert first == 2
    fake.listing = {"nftables": [
        {"table": {"family": "inet", "name": "spa"}},
        {"set": {"family": "inet", "table": "spa", "name": "drops_v4",
                 "type": ["ipv4_addr", "inet_service"], "flags": ["dynamic", "timeout"],
                 "timeout": 600, "size": DROPS_SIZE, "elem": [
            {"elem": {"val": {"concat": ["198.51.100.7", 22]}, "counter": {"packets": 3}}},
            {"elem": {"val": {"concat": ["198.51.100.7", 443]}, "counter": {"packets": 1}}}]}},
        {"set": {"family": "inet", "table": "spa", "name": "drops_v6",
                 "type": ["ipv6_addr", "inet_service"], "flags": ["dynamic", "timeout"],
                 "timeout": 600, "size": DROPS_SIZE, "elem": [
            {"elem": {"val": {"concat": ["2001:db8::7", 22]}, "counter": {"packets": 2}}}]}},
        {"set": {"family": "inet", "table": "other", "name": "drops_v4", "elem": [
            {"elem": {"val": {"concat": ["192.0.2.1", 22]}, "counter": {"packets": 9}}}]}},
        *UPDATE_RULES]}
    backend.start(SERVICES, now=0)
    assert commands(fake.documents[-2])[0] == ("add", "table")
    assert not any("add" in c and "set" in c["add"] and c["add"]["set"]["name"].startswith(
        "drops") for c in fake.documents[-2]["nftables"])
    assert backend.drops() == {("198.51.100.7", 22): 3, ("198.51.100.7", 443): 1,
                               ("2001:db8::7", 22): 2}


UPDATE_RULES = [  # our drop rules, as a listing shows them: they make the drop sets dynamic
    {"rule": {"family": "inet", "table": "spa", "chain": "input", "expr": [
        {"set": {"op": "update", "set": f"@drops_v{version}", "stmt": [{"counter": None}],
                 "elem": {"concat": []}}}, {"drop": None}]}} for version in (4, 6)]


def test_drop_sets_no_rule_updates_are_made_again_with_the_rules() -> None:
    """From the 10^5-client start: our table held the drop sets but no rule
    (the gate keeper's guard had put it back before any service was
    started).  Kept, they are plain sets, and nftables refuses the update
    rules on them (EINVAL): the start failed and left no drop rule.  A drop
    set no rule of ours updates goes, and comes back with the rules."""
    fake = FakeNft()
    backend = NftablesBackend(fake)
    plain = [{"set": {"family": "inet", "table": "spa", "name": f"drops_v{version}",
                      "type": [kind, "inet_service"], "flags": ["timeout"],
                      "timeout": 600, "size": DROPS_SIZE}}
             for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr"))]
    fake.listing = {"nftables": [{"table": {"family": "inet", "name": "spa"}}, *plain]}
    backend.start(SERVICES, now=0)
    sent = fake.documents[-2]["nftables"]
    deleted = [c["delete"]["set"]["name"] for c in sent if "set" in c.get("delete", {})]
    added = [c["add"]["set"]["name"] for c in sent if "set" in c.get("add", {})]
    assert sorted(deleted) == ["drops_v4", "drops_v6"]
    assert {"drops_v4", "drops_v6"} <= set(added)
    assert sent.index({"delete": {"set": {"family": "inet", "table": "spa",
                                          "name": "drops_v4"}}}) < min(
        i for i, c in enumerate(sent) if "rule" in c.get("add", {}))


def test_parse_held_reads_our_sets_only() -> None:
    listing = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"set": {"family": "inet", "table": "spa", "name": "svc_ssh_v4", "elem": [
            {"elem": {"val": "192.0.2.5", "timeout": 30, "expires": 12}}]}},
        {"set": {"family": "inet", "table": "spa", "name": "svc_https_v6", "elem": [
            {"elem": {"val": "2001:db8::5", "timeout": 30, "expires": 3}}, "2001:db8::6"]}},
        {"set": {"family": "inet", "table": "other", "name": "svc_ssh_v4", "elem": [
            {"elem": {"val": "198.51.100.1", "timeout": 30, "expires": 3}}]}},
    ]}
    held = parse_held(listing, SERVICES, now=1000)
    assert held == {(A4, "ssh"): 1012, (A6, "https"): 1003,
                    (ipaddress.ip_address("2001:db8::6"), "https"): 1000}


def test_the_hold_table_is_owned_and_every_grant_reaches_both_tables_at_once() -> None:
    """Issue 12: a runner that keeps one socket (libnftables) gets the hold
    table: made `flags owner` in nft's own syntax (its JSON drops table
    flags), filled with the grants our table already holds, and from then
    on each grant and removal is one transaction for both tables."""
    fake = FakeNft(owns_tables=True)
    fake.listing = {"nftables": [{"set": {"family": "inet", "table": "spa",
                                          "name": "svc_ssh_v4",
                                          "elem": [{"elem": {"val": str(A4), "expires": 20}}]}}]}
    backend = NftablesBackend(fake, hold=True)
    backend.start(SERVICES, now=100)
    assert [t for t in fake.texts if t.startswith("add")] == [
        "add table inet spa_hold { flags owner; }"]
    hold = fake.documents[-1]["nftables"]
    assert all(next(iter(next(iter(c.values())).values()))["table"] == "spa_hold"
               for c in hold)
    assert {"add": {"element": {"family": "inet", "table": "spa_hold", "name": "svc_ssh_v4",
                                "elem": [{"elem": {"val": str(A4), "timeout": 20}}]}}} in hold
    chain = next(c["add"]["chain"] for c in hold if "chain" in c.get("add", {}))
    assert chain["hook"] == "input" and chain["prio"] == -9, "right after ours (we count)"
    backend.apply([(Allow(A6, "https", 130.0), SERVICES["https"]),
                   (Remove(A4, "ssh"), SERVICES["ssh"])], now=100)
    batch = fake.documents[-1]["nftables"]
    tables = [next(iter(next(iter(c.values())).values()))["table"] for c in batch]
    assert tables == ["spa", "spa_hold", "spa", "spa", "spa_hold", "spa_hold"]
    assert commands({"nftables": batch})[:2] == [("create", "element")] * 2, "new: a create each"
    backend.start(SERVICES, now=100)  # a reload: the owned table is not made twice
    assert [t for t in fake.texts if t.startswith("add")] == [
        "add table inet spa_hold { flags owner; }"]
    assert NftablesBackend(FakeNft())._hold_wanted is False, "the nft program cannot own one"


def test_our_accept_rules_mark_what_they_let_in() -> None:
    doc = render_start(SERVICES)
    accepts = [c["add"]["rule"]["expr"] for c in doc["nftables"]
               if "rule" in c.get("add", {}) and {"accept": None} in c["add"]["rule"]["expr"]
               and ESTABLISHED not in c["add"]["rule"]["expr"]]
    assert len(accepts) == 4 * len(SERVICES)  # hook input and hook forward (DNAT)
    assert all({"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [
        {"meta": {"key": "mark"}}, 0x10000000]}}} in expr for expr in accepts)


@pytest.mark.parametrize(("version", "warned"), [("1.0.6", True), ("1.0.9", False),
                                                 ("1.1.1", False), ("odd", True)])
def test_the_hold_table_warns_where_json_listings_print_it_badly(version: str,
                                                                 warned: bool) -> None:
    """libnftables before 1.0.9 frees a table's single flag while printing it
    in JSON (garbage in `nft -j list ruleset`; a daemon of ours died of heap
    corruption before it stopped listing the hold table in JSON): the daemon
    keeps the gate's hold table and says what it costs other tools there."""
    fake = FakeNft(owns_tables=True)
    fake.listing = {"nftables": [{"metainfo": {"version": version}}]}
    backend = NftablesBackend(fake)
    backend.start(SERVICES, now=0)
    assert backend.holds
    assert bool(backend.flags_note) is warned
    assert not warned or "hold_table = \"off\"" in backend.flags_note
    off = NftablesBackend(FakeNft(owns_tables=True), hold=False)
    off.start(SERVICES, now=0)
    assert not off.holds and off.flags_note == ""


def test_the_host_check_never_lists_the_hold_table_in_json() -> None:
    from spa.backends.nftables import safe_ruleset

    fake = FakeNft()
    fake.tables_text = "table inet filter\ntable inet spa_hold\ntable ip nat\n"
    listing = safe_ruleset(fake)
    listed = [c["list"]["table"] for d in fake.documents for c in d["nftables"]]
    assert listed == [{"family": "inet", "name": "filter"}, {"family": "ip", "name": "nat"}]
    assert {"table": {"family": "inet", "name": "spa_hold"}} in listing["nftables"]


def test_a_structure_only_diagnosis_ignores_the_grants() -> None:
    from spa.backends.nftrepair import diagnose, shape

    listing = {"nftables": [{"table": {"family": "inet", "name": "spa"}},
                            {"chain": {"family": "inet", "table": "spa", "name": "input"}}]}
    wanted = {(A4, "ssh"): 100.0}
    assert diagnose(listing, shape(listing), SERVICES, None, 0.0) is None
    assert "grant(s) were removed" in str(diagnose(listing, shape(listing), SERVICES, wanted,
                                                   0.0))
    altered = {"nftables": [*listing["nftables"], {"chain": {
        "family": "inet", "table": "spa", "name": "evil"}}]}
    assert "altered" in str(diagnose(altered, shape(listing), SERVICES, None, 0.0))
