"""The nftables backend's commands, checked as data without root."""

from __future__ import annotations

import ipaddress
from typing import Any

from spa.backends.base import apply
from spa.backends.libnft import FakeNft
from spa.backends.nftables import (
    NftablesBackend,
    parse_held,
    render_allow,
    render_remove,
    render_start,
    set_name,
    timeout_seconds,
)
from spa.core.leases import Allow, Remove
from spa.core.policy import DEFAULT_SERVICES, Service

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
    assert verbs.count(("add", "set")) == 2 * len(SERVICES)
    assert ("flush", "chain") in verbs, "our one chain is rewritten"


def test_chain_accepts_established_then_sets_then_drops_never_rejects() -> None:
    rules = [c["add"]["rule"]["expr"] for c in render_start(SERVICES)["nftables"]
             if "add" in c and "rule" in c["add"]]
    assert rules[0][-1] == {"accept": None}
    assert rules[0][0]["match"]["right"] == ["established", "related"]
    verdicts = [next(iter(r[-1])) for r in rules]
    assert "reject" not in verdicts
    for name, service in SERVICES.items():
        mine = [r for r in rules if r[0]["match"]["left"] == {
            "payload": {"protocol": service.protocol, "field": "dport"}}
            and r[0]["match"]["right"] == service.port]
        assert [next(iter(r[-1])) for r in mine] == ["accept", "accept", "drop"], name
        assert mine[0][1]["match"]["right"] == f"@{set_name(name, 4)}"
        assert mine[1][1]["match"]["right"] == f"@{set_name(name, 6)}"
    chain = next(c["add"]["chain"] for c in render_start(SERVICES)["nftables"]
                 if "add" in c and "chain" in c["add"])
    assert chain["policy"] == "accept"
    assert chain["hook"] == "input"


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
    assert len(fake.documents) == 4
    assert commands(fake.documents[3]) == [("flush", "set")] * (2 * len(SERVICES))
    assert NftablesBackend(FakeNft()).flush_on_stop is False


def test_a_batch_of_changes_is_one_transaction() -> None:
    fake = FakeNft()
    backend = NftablesBackend(fake)
    backend.start(SERVICES, now=0)
    backend.apply([(Allow(A4, "ssh", 30.5), SERVICES["ssh"]),
                   (Allow(A6, "https", 100.0), SERVICES["https"]),
                   (Remove(A4, "dns"), SERVICES["dns"])], now=0)
    backend.apply([], now=0)  # nothing to do: no transaction at all
    assert len(fake.documents) == 2
    batch = fake.documents[1]
    assert batch["nftables"] == (render_allow(A4, "ssh", 31)["nftables"]
                                 + render_allow(A6, "https", 100)["nftables"]
                                 + render_remove(A4, "dns")["nftables"])


def test_apply_sends_only_the_last_action_per_address_and_service() -> None:
    fake = FakeNft()
    backend = NftablesBackend(fake)
    backend.start(SERVICES, now=0)
    apply(backend, [Allow(A4, "ssh", 10.0), Allow(A6, "ssh", 20.0), Allow(A4, "ssh", 40.0),
                    Remove(A6, "ssh")], SERVICES, now=0)
    assert fake.documents[1]["nftables"] == (render_allow(A4, "ssh", 40)["nftables"]
                                             + render_remove(A6, "ssh")["nftables"])
    apply(backend, [], SERVICES, now=0)
    assert len(fake.documents) == 2


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
