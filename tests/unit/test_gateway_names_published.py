"""A named gateway service's published port, without root: the per-lease
DNAT map (source -> the destination its lease resolved) rendered beside the
grant set, in every document that touches a grant: start, grant, renewal,
removal, flush, repair and restart, the hold table (none there), the
guard's check, and `gate --remove`'s shape check
(spa/backends/nftgateway.py, spa/backends/nftrender.py,
spa/backends/nftrepair.py, spa/backends/teardown.py)."""

from __future__ import annotations

import ipaddress
from typing import Any

from spa.backends.libnft import FakeNft
from spa.backends.nftables import NftablesBackend
from spa.backends.nftgateway import NAT_CHAIN
from spa.backends.nftrender import (
    parse_published,
    render_allow,
    render_changes,
    render_flush,
    render_hold,
    render_remove,
    render_start,
)
from spa.backends.nftrepair import diagnose, render_repair
from spa.backends.teardown import has_our_shape
from spa.core.leases import Allow, LeaseTable, Remove
from spa.core.policy import Service

ip = ipaddress.ip_address
DB = Service("db", "tcp", 22, 30, 300, listen_port=2222, host_name="db.internal")
WEB = Service("web", "tcp", 80, 30, 300, host=ip("10.20.0.9"), listen_port=8080)
SERVICES = {"db": DB, "web": WEB}
A, B = ip("192.0.2.10"), ip("192.0.2.20")
A6 = ip("2001:db8::10")
INT5, INT6, INT6V6 = ip("10.20.0.5"), ip("10.20.0.6"), ip("fd00:20::5")
NOW = 1000.0


def elements(doc: dict[str, Any], table: str = "spa") -> list[tuple[str, str, Any]]:
    """(verb, set or map name, elem) of every element command on `table`."""
    return [(verb, body["element"]["name"], body["element"]["elem"])
            for command in doc["nftables"] for verb, body in command.items()
            if "element" in body and body["element"]["table"] == table]


def twin(address: Any, destination: Any, timeout: int) -> list[Any]:
    return [[{"elem": {"val": str(address), "timeout": timeout}}, str(destination)]]


def test_a_named_published_port_dnats_by_the_sources_map_in_each_ip_version() -> None:
    doc = render_start(SERVICES)["nftables"]
    maps = {c["add"]["map"]["name"]: c["add"]["map"] for c in doc if "map" in c.get("add", {})}
    assert {name: (m["type"], m["map"], m["flags"]) for name, m in maps.items()} == {
        "pub_db_v4": ("ipv4_addr", "ipv4_addr", ["timeout"]),
        "pub_db_v6": ("ipv6_addr", "ipv6_addr", ["timeout"])}, "none for a literal host"
    dnats = [c["add"]["rule"]["expr"] for c in doc
             if c.get("add", {}).get("rule", {}).get("chain") == NAT_CHAIN]
    named = [e for e in dnats if isinstance(e[-1]["dnat"]["addr"], dict)]
    assert [e[-1]["dnat"] for e in named] == [
        {"family": proto, "port": 22, "addr": {"map": {
            "key": {"payload": {"protocol": proto, "field": "saddr"}},
            "data": f"@pub_db_v{version}"}}} for version, proto in ((4, "ip"), (6, "ip6"))]
    for expr in named:
        assert {"match": {"op": "==", "left": {"payload": {"protocol": "tcp",
                                                           "field": "dport"}},
                          "right": 2222}} in expr
        assert {"match": {"op": "==", "left": {"fib": {"flags": ["daddr"], "result": "type"}},
                          "right": "local"}} in expr
    literal = [e[-1]["dnat"] for e in dnats if e not in named]
    assert literal == [{"family": "ip", "addr": "10.20.0.9", "port": 80}], "as before"


def test_a_grant_adds_its_map_twin_with_the_same_timeout_in_our_table_only() -> None:
    doc = render_changes([(Allow(A, "db", NOW + 30, INT5), DB),
                          (Allow(A6, "db", NOW + 40, INT6V6), DB),
                          (Allow(B, "web", NOW + 30), WEB)], NOW,
                         lambda address, name: True, hold=True)
    ours = elements(doc)
    assert ("create", "pub_db_v4", twin(A, INT5, 30)) in ours
    assert ("create", "pub_db_v6", twin(A6, INT6V6, 40)) in ours
    assert ("create", "svc_db_v4", [{"elem": {"val": {"concat": [str(A), str(INT5)]},
                                              "timeout": 30}}]) in ours
    assert not [e for e in ours if e[1].startswith("pub_web")], "a literal host: one DNAT rule"
    held = elements(doc, "spa_hold")
    assert held and not [e for e in held if e[1].startswith("pub_")], "the hold has no DNAT"


def test_a_renewal_and_a_removal_replace_and_delete_the_map_twin_with_the_grant() -> None:
    renew = elements(render_changes([(Allow(A, "db", NOW + 50, INT5), DB)], NOW))
    pub = [e for e in renew if e[1] == "pub_db_v4"]
    assert pub == [("add", "pub_db_v4", twin(A, INT5, 1)), ("delete", "pub_db_v4", [str(A)]),
                   ("add", "pub_db_v4", twin(A, INT5, 50))]
    gone = elements(render_changes([(Remove(A, "db", INT5), DB)], NOW))
    assert [e for e in gone if e[1] == "pub_db_v4"] == [
        ("add", "pub_db_v4", twin(A, INT5, 1)), ("delete", "pub_db_v4", [str(A)])]
    assert ("delete", "svc_db_v4", [{"concat": [str(A), str(INT5)]}]) in gone
    one = elements(render_allow(A, "db", 60, destination=INT5, published=True, hold=True))
    assert ("add", "pub_db_v4", twin(A, INT5, 60)) in one
    assert ("delete", "pub_db_v4", [str(A)]) in elements(
        render_remove(A, "db", destination=INT5, published=True))
    assert not [e for e in elements(render_allow(A, "db", 60, destination=INT5, hold=True),
                                    "spa_hold") if e[1].startswith("pub_")]
    flush = render_flush(SERVICES, hold=True)["nftables"]
    assert {"flush": {"map": {"family": "inet", "table": "spa", "name": "pub_db_v6"}}} in flush


def test_a_lease_without_a_destination_adds_no_map_element() -> None:
    doc = render_changes([(Allow(B, "db", NOW + 30), DB),
                          (Allow(B, "db", NOW + 30, INT6V6), DB)], NOW)
    assert elements(doc) == [], "closed: nothing to DNAT to"


def test_a_restart_and_a_repair_put_back_each_sources_twin() -> None:
    wanted = {(A, "db"): NOW + 20, (B, "db"): NOW + 25}
    destinations = {(A, "db"): INT5, (B, "db"): INT6}
    found = elements(render_repair(None, SERVICES, wanted, NOW, destinations=destinations))
    assert ("add", "pub_db_v4", twin(A, INT5, 20)) in found
    assert ("add", "pub_db_v4", twin(B, INT6, 25)) in found
    hold = elements(render_hold(SERVICES, wanted, NOW, destinations=destinations), "spa_hold")
    assert hold and not [e for e in hold if e[1].startswith("pub_")]


def listing(map_elems: list[Any]) -> dict[str, Any]:
    """Our table as nftables lists it: one grant of A to INT5, and the map."""
    return {"nftables": [
        {"table": {"family": "inet", "name": "spa"}},
        {"set": {"family": "inet", "table": "spa", "name": "svc_db_v4",
                 "type": ["ipv4_addr", "ipv4_addr"], "flags": ["timeout"],
                 "elem": [{"elem": {"val": {"concat": [str(A), str(INT5)]}, "timeout": 30,
                                    "expires": 20}}]}},
        {"map": {"family": "inet", "table": "spa", "name": "pub_db_v4", "type": "ipv4_addr",
                 "map": "ipv4_addr", "flags": ["timeout"], "elem": map_elems}},
        {"chain": {"family": "inet", "table": "spa", "name": "input"}}]}


def entry(address: Any, destination: Any, expires: int) -> list[Any]:
    return [{"elem": {"val": str(address), "timeout": 30, "expires": expires}},
            str(destination)]


def test_the_guard_finds_a_missing_moved_or_extra_map_twin() -> None:
    from spa.backends.nftrepair import shape
    wanted = {(A, "db"): NOW + 20}
    good = listing([entry(A, INT5, 20)])
    assert parse_published(good, SERVICES, NOW) == {(A, "db"): (INT5, NOW + 20)}
    installed = shape(good)
    assert diagnose(good, installed, SERVICES, wanted, NOW) is None
    for bad in ([], [entry(A, INT6, 20)], [entry(A, INT5, 3)],
                [entry(A, INT5, 20), entry(B, INT6, 20)]):
        problem = diagnose(listing(bad), installed, SERVICES, wanted, NOW)
        assert problem is not None and "published-port mapping" in problem, bad
    ending = listing([entry(A, INT5, 20), entry(B, INT6, 1)])
    assert diagnose(ending, installed, SERVICES, wanted, NOW) is None, "its twin just ended"


def test_the_backend_sends_the_twin_with_every_grant_and_its_start() -> None:
    fake = FakeNft()
    backend = NftablesBackend(fake, hold=False)
    fake.listing = listing([entry(A, INT5, 20)])  # a grant that outlived a crash
    backend.start(SERVICES, now=NOW)
    assert ("add", "pub_db_v4", twin(A, INT5, 20)) in [
        e for doc in fake.documents for e in elements(doc)]
    fake.documents.clear()
    backend.allow(B, DB.for_destination(INT6), NOW + 30, now=NOW)
    backend.remove(A, DB)
    sent = [e for doc in fake.documents for e in elements(doc)]
    assert ("add", "pub_db_v4", twin(B, INT6, 30)) in sent
    assert ("delete", "pub_db_v4", [str(A)]) in sent


def test_two_clients_behind_one_address_reach_the_first_leases_destination() -> None:
    """One source, one map element: the pair's first lease's answer holds
    for every lease on the pair (a later answer is not asked for, and not
    taken if given), until the pair's last lease ends."""
    table = LeaseTable()
    first = table.grant("alice", A, "db", now=NOW, duration=30, destination=INT5)
    second = table.grant("bob", A, "db", now=NOW + 5, duration=60, destination=INT6)
    pub = [e for action in [*first, *second]
           for e in elements(render_changes([(action, DB)], NOW)) if e[1] == "pub_db_v4"]
    assert ("add", "pub_db_v4", twin(A, INT5, 30)) in pub
    assert ("add", "pub_db_v4", twin(A, INT5, 65)) in pub
    assert not [e for e in pub if str(INT6) in str(e)]
    assert table.destination(A, "db") == INT5


def test_gate_remove_knows_a_named_published_ports_maps() -> None:
    text = ("table inet spa {\n\tset svc_db_v4 {\n\t}\n\tset dst_db_v4 {\n\t}\n"
            "\tset drops_v4 {\n\t}\n\tset drops_v6 {\n\t}\n"
            "\tmap pub_db_v4 {\n\t}\n\tmap pub_db_v6 {\n\t}\n\tchain input {\n"
            "\t\ttype filter hook input priority filter - 10; policy accept;\n\t}\n"
            "\tchain published {\n"
            "\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t}\n}\n")
    assert has_our_shape("spa", text)
    assert not has_our_shape("spa", text.replace("map pub_db_v6", "map admins_map"))
    hold = ("table inet spa_hold {\n\tflags owner\n\tset svc_db_v4 {\n\t}\n"
            "\tmap pub_db_v4 {\n\t}\n\tchain input {\n"
            "\t\ttype filter hook input priority filter - 9; policy accept;\n\t}\n}\n")
    assert not has_our_shape("spa_hold", hold), "the hold table has no maps"
    assert has_our_shape("spa_hold", hold.replace("\tmap pub_db_v4 {\n\t}\n", ""))


def test_the_start_line_says_a_named_published_port_is_per_lease() -> None:
    from spa.server.coexist import closed_ports
    line = closed_ports({"db": DB})
    assert line.endswith("through this host), published on 2222 per lease (DNATed for a "
                         "lease's own address only)"), line
    assert "per lease" not in closed_ports({"web": WEB})
