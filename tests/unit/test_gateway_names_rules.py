"""A gateway service's host by DNS name, from the lease to the kernel's
rules, without root: the (source . destination) grant sets, the drop of the
addresses its leases were given, the gate keeper's messages and checks, and
the saved leases (spa/backends/nftgateway.py, spa/server/gatemsg.py,
spa/server/monitor.py, spa/server/state.py)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, cast

import pytest

from spa.backends.base import Backend
from spa.backends.libnft import FakeNft
from spa.backends.nftables import NftablesBackend
from spa.backends.nftrender import FORWARD, parse_held, render_changes, render_start
from spa.backends.nftrepair import render_repair
from spa.backends.teardown import has_our_shape
from spa.core.leases import Allow, LeaseTable, Remove
from spa.core.policy import Service
from spa.server import gatemsg
from spa.server.monitor import GateKeeper
from spa.server.state import StateDir
from tests.unit.test_privsep import NOW, Clock

ip = ipaddress.ip_address
DB = Service("db", "tcp", 22, 30, 300, host_name="db.internal")
SSH = Service("ssh", "tcp", 22, 30, 300)
SERVICES = {"db": DB, "ssh": SSH}
A, B = ip("192.0.2.10"), ip("192.0.2.20")
INT5, INT6 = ip("10.20.0.5"), ip("10.20.0.6")


def sets(doc: dict[str, Any], table: str = "spa") -> dict[str, Any]:
    return {c["add"]["set"]["name"]: (c["add"]["set"]["type"], c["add"]["set"].get("flags"))
            for c in doc["nftables"] if "set" in c.get("add", {})
            and c["add"]["set"]["table"] == table}


def test_a_named_service_keys_its_grants_by_source_and_destination() -> None:
    doc = render_start(SERVICES)
    found = sets(doc)
    assert found["svc_db_v4"] == (["ipv4_addr", "ipv4_addr"], ["timeout"])
    assert found["svc_db_v6"] == (["ipv6_addr", "ipv6_addr"], ["timeout"])
    assert found["dst_db_v4"] == ("ipv4_addr", None), "its destinations: no timeout"
    assert found["svc_ssh_v4"] == ("ipv4_addr", ["timeout"]), "a local service as before"
    forward = [c["add"]["rule"]["expr"] for c in doc["nftables"]
               if c.get("add", {}).get("rule", {}).get("chain") == FORWARD]
    pair = {"concat": [{"payload": {"protocol": "ip", "field": "saddr"}},
                       {"payload": {"protocol": "ip", "field": "daddr"}}]}
    accept = next(e for e in forward if {"match": {"op": "==", "left": pair,
                                                   "right": "@svc_db_v4"}} in e)
    drop = next(e for e in forward if {"match": {"op": "==", "left": {"payload": {
        "protocol": "ip", "field": "daddr"}}, "right": "@dst_db_v4"}} in e)
    assert accept[-1] == {"accept": None} and drop[-1] == {"drop": None}
    assert forward.index(accept) < forward.index(drop)
    for rule in (accept, drop):
        assert {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                          "right": 22}} in rule


def test_a_grant_is_its_pair_and_adds_its_destination_and_one_without_is_left_out() -> None:
    doc = render_changes([(Allow(A, "db", NOW + 30, INT5), DB),
                          (Allow(B, "db", NOW + 30), DB),  # no destination: never opened
                          (Allow(B, "db", NOW + 30, ip("fd00::5")), DB),  # another version
                          (Remove(ip("192.0.2.30"), "db", INT6), DB)], NOW)
    elements = [(verb, body["element"]["name"], body["element"]["elem"])
                for command in doc["nftables"] for verb, body in command.items()]
    pair = {"concat": [str(A), str(INT5)]}
    assert ("add", "dst_db_v4", [str(INT5)]) in elements
    assert ("add", "svc_db_v4", [{"elem": {"val": pair, "timeout": 30}}]) in elements
    assert not any(str(B) in str(e) for e in elements)
    assert ("delete", "svc_db_v4", [{"concat": ["192.0.2.30", str(INT6)]}]) in elements


LISTING = {"nftables": [{"set": {"family": "inet", "table": "spa", "name": "svc_db_v4",
                                 "type": ["ipv4_addr", "ipv4_addr"], "flags": ["timeout"],
                                 "elem": [{"elem": {"val": {"concat": [str(A), str(INT5)]},
                                                    "timeout": 30, "expires": 12}}]}}]}


def test_the_kernels_pairs_are_read_back_with_their_destinations() -> None:
    destinations: dict[Any, Any] = {}
    assert parse_held(LISTING, SERVICES, 1000, destinations=destinations) == {(A, "db"): 1012}
    assert destinations == {(A, "db"): INT5}


def test_a_repair_puts_back_each_lease_to_its_own_destination() -> None:
    doc = render_repair(None, SERVICES, {(A, "db"): NOW + 20, (B, "db"): NOW + 20}, NOW,
                        destinations={(A, "db"): INT5, (B, "db"): INT6})
    text = str(doc)
    assert str({"concat": [str(A), str(INT5)]}) in text
    assert str({"concat": [str(B), str(INT6)]}) in text
    assert str({"concat": [str(A), str(INT6)]}) not in text


def test_the_backend_remembers_destinations_for_its_repairs_and_its_start() -> None:
    fake = FakeNft()
    backend = NftablesBackend(fake, hold=False)
    fake.listing = LISTING  # a grant that outlived a crash
    backend.start(SERVICES, now=1000)
    assert str({"concat": [str(A), str(INT5)]}) in str(fake.documents[-2:])
    backend.apply([(Allow(B, "db", 1030, INT6), DB)], now=1000)
    fake.documents.clear()
    backend.repair({(A, "db"): 1012, (B, "db"): 1030}, now=1000)
    text = str(fake.documents)
    assert str({"concat": [str(A), str(INT5)]}) in text
    assert str({"concat": [str(B), str(INT6)]}) in text


def test_gate_remove_knows_a_named_services_destination_sets() -> None:
    text = ("table inet spa {\n\tset svc_db_v4 {\n\t}\n\tset dst_db_v4 {\n\t}\n"
            "\tset drops_v4 {\n\t}\n\tset drops_v6 {\n\t}\n\tchain input {\n"
            "\t\ttype filter hook input priority filter - 10; policy accept;\n\t}\n}\n")
    assert has_our_shape("spa", text)


def keeper() -> tuple[GateKeeper, Any]:
    from spa.backends.memory import MemoryBackend
    backend = MemoryBackend()
    gate = GateKeeper(backend, config_path=Path("/nonexistent/server.toml"),
                      services=SERVICES, clock=Clock(), log=lambda line: None,
                      read_services=lambda path: SERVICES)
    assert "ok" in gate.handle({"kind": "start", "services": ["db", "ssh"]})
    return gate, backend


def test_the_gate_keeper_takes_a_destination_only_where_it_fits() -> None:
    change = Allow(A, "db", NOW + 30, INT5)
    assert gatemsg.parse_request({"kind": "apply", "changes": [gatemsg._change_out(change)]}) \
        == gatemsg.Apply((change,))
    gate, backend = keeper()
    assert gate.handle({"kind": "apply", "changes": [
        ["allow", str(A), "db", NOW + 30, str(INT5)]]}) == {"ok": None}
    assert backend.destinations == {(A, "db"): INT5}
    assert gate.handle({"kind": "apply", "changes": [
        ["remove", str(A), "db", str(INT5)]]}) == {"ok": None}
    assert backend.grants == {}


@pytest.mark.parametrize(("change", "why"), [
    (["allow", str(A), "db", NOW + 30], "needs its destination"),
    (["allow", str(A), "db", NOW + 30, "127.0.0.1"], "is a loopback address"),
    (["allow", str(A), "db", NOW + 30, "169.254.0.5"], "is link-local"),
    (["allow", str(A), "db", NOW + 30, "fd00::5"], "another IP version"),
    (["allow", str(A), "ssh", NOW + 30, str(INT5)], "a service that names none"),
    (["allow", str(A), "db", NOW + 30, "db.internal"], "not an address"),
])
def test_the_gate_keeper_refuses_a_destination_that_does_not_fit(change: list[Any],
                                                                  why: str) -> None:
    """A daemon taken over cannot open a named service to loopback, or to an
    address of another IP version, or give a local service a destination."""
    gate, backend = keeper()
    reply = gate.handle({"kind": "apply", "changes": [change]})
    assert "refused" in reply and why in reply["refused"], reply
    assert backend.grants == {}


def test_a_restart_reconciles_the_gate_keeper_to_the_saved_destinations() -> None:
    gate, backend = keeper()
    assert gate.handle({"kind": "reconcile", "grants": [
        ["allow", str(A), "db", NOW + 30, str(INT5)],
        ["allow", str(B), "db", NOW + 30, str(INT6)]]}) == {"ok": None}
    assert backend.destinations == {(A, "db"): INT5, (B, "db"): INT6}


def test_saved_leases_keep_their_destination(tmp_path: Path) -> None:
    table = LeaseTable()
    table.grant("alice", A, "db", now=NOW, duration=30, destination=INT5)
    table.grant("alice", A, "ssh", now=NOW, duration=30)
    state = StateDir(tmp_path / "state")
    state.ensure()
    state.save_leases(table, now=NOW, backend="nftables", expires_by_itself=True)
    loaded = {lease.service: lease.destination for lease in state.load_leases()}
    assert loaded == {"db": INT5, "ssh": None}


def test_addresses_gated_before_any_lease_are_added_and_kept_through_a_repair() -> None:
    fake = FakeNft()
    backend = NftablesBackend(fake, hold=False)
    backend.start(SERVICES, now=1000)
    backend.gate_addresses({"db": [INT5, ip("fd00:20::5")], "ssh": [INT6]})
    assert fake.documents[-1] == {"nftables": [
        {"add": {"element": {"family": "inet", "table": "spa", "name": "dst_db_v4",
                             "elem": [str(INT5)]}}},
        {"add": {"element": {"family": "inet", "table": "spa", "name": "dst_db_v6",
                             "elem": ["fd00:20::5"]}}}]}, "only a named service's"
    doc = render_repair(None, SERVICES, {}, NOW, gated={"db": [INT5]})
    assert {"add": {"element": {"family": "inet", "table": "spa", "name": "dst_db_v4",
                                "elem": [str(INT5)]}}} in doc["nftables"]
    fake.documents.clear()
    backend.repair({}, now=1000)  # the table is gone (the fake lists nothing)
    assert str(INT5) in str(fake.documents)


@pytest.mark.parametrize(("pairs", "why"), [
    ([["ssh", str(INT5)]], "no named gateway service"),
    ([["db", "127.0.0.1"]], "is a loopback address"),
    ([["db", "db.internal"]], "not an address"),
    ([["db"]], "pairs"),
])
def test_the_gate_keeper_gates_only_a_named_services_reachable_addresses(
        pairs: list[Any], why: str) -> None:
    gate, backend = keeper()
    assert gate.handle({"kind": "gated", "addresses": [["db", str(INT5)]]}) == {"ok": None}
    assert backend.gated == {"db": {INT5}}
    reply = gate.handle({"kind": "gated", "addresses": pairs})
    assert "refused" in reply and why in reply["refused"], reply
    assert backend.gated == {"db": {INT5}}


def test_a_reload_that_renames_or_unnames_a_host_leaves_open_leases_closed_not_elsewhere(
        ) -> None:
    """A lease made before a reload meets the service as it is now: a
    destination goes only to a named service, and a named service's grant
    without one (the service had an address then) opens nothing."""
    from spa.backends.base import apply, fit, reconcile
    from spa.backends.memory import MemoryBackend
    literal = Service("db", "tcp", 22, 30, 300, INT5)
    assert fit(Allow(A, "db", NOW + 30, INT5), literal) == Allow(A, "db", NOW + 30)
    assert fit(Remove(A, "db", INT5), literal) == Remove(A, "db")
    assert fit(Allow(A, "db", NOW + 30), DB) is None
    assert fit(Allow(A, "db", NOW + 30, ip("fd00::5")), DB) is None
    assert fit(Remove(A, "db"), DB) == Remove(A, "db")
    backend = MemoryBackend()
    apply(backend, [Allow(A, "db", NOW + 30), Allow(B, "db", NOW + 30, INT6)], SERVICES,
          now=NOW)
    assert backend.grants == {(B, "db"): NOW + 30}
    assert backend.destinations == {(B, "db"): INT6}
    gate, kept = keeper()
    reconcile(cast(Backend, _Remote(gate)), {(A, "db"): NOW + 30, (B, "db"): NOW + 30},
              SERVICES, now=NOW, destinations={(B, "db"): INT6})
    assert kept.grants == {(B, "db"): NOW + 30}, "one without a destination is left closed"


class _Remote:
    """The daemon's end of the gate keeper, as spa.server.remote sends it."""

    def __init__(self, gate: GateKeeper) -> None:
        self.gate = gate

    def reconcile(self, wanted: Any, *, now: float, destinations: Any = None) -> None:
        grants = [gatemsg._change_out(Allow(key[0], key[1], until,
                                            (destinations or {}).get(key)))
                  for key, until in wanted.items()]
        assert self.gate.handle({"kind": "reconcile", "grants": grants}) == {"ok": None}


def test_the_start_line_and_check_say_what_a_named_service_gates(tmp_path: Path) -> None:
    from spa.backends.hostcheck import Target
    from spa.server.coexist import closed_ports, forwarding_lines, targets_of
    from tests.unit.test_gateway_rules import GATEWAY, load
    loaded = load(tmp_path, GATEWAY.format(host="db.internal"))
    assert closed_ports(loaded.services) == (
        "forwarded through this host only to clients whose knock opens them: db: tcp/22 of "
        "db.internal, resolved when a lease starts (gated on the addresses the name gives at "
        "start, reload and each lease, not on others, nor connections that do not pass "
        "through this host)")
    target = targets_of(loaded)[0]
    assert target == Target("tcp", 22, "db", host="db.internal")
    assert (target.hook, target.versions) == ("forward", (4, 6)), "either version may be given"
    assert forwarding_lines(loaded, lambda version: version == 6) == [], "one version is enough"
    assert len(forwarding_lines(loaded, lambda version: False)) == 2
