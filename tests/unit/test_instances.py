"""Several servers on one host (issue 16): each instance's kernel names, the
commands rendered with them, the config key, the guard's view of another
instance's commits, and the refusal of a port two instances would gate."""

from __future__ import annotations

import ipaddress
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from spa.backends.iptables import IptablesBackend
from spa.backends.libnft import FakeNft
from spa.backends.names import DEFAULT_NAMES, Names, instance_of_table, is_hold_table
from spa.backends.nftables import NftablesBackend, safe_ruleset
from spa.backends.nftwatch import Change, Commit
from spa.core.leases import Allow, Remove
from spa.core.policy import DEFAULT_SERVICES, Service
from spa.server import admin
from spa.server.config import load
from spa.server.errors import ConfigError, LocalError
from spa.server.guard import Guard
from tests.unit.test_guard import FakeWatch, run_watch

SERVICES = {"ssh": DEFAULT_SERVICES["ssh"], "dns": Service("dns", "udp", 53, 10, 60)}
A4 = ipaddress.ip_address("192.0.2.5")
A6 = ipaddress.ip_address("2001:db8::5")


def test_the_default_instance_keeps_every_name_of_an_install_before_instances() -> None:
    names = Names()
    assert (names.table, names.hold, names.chain) == ("spa", "spa_hold", "SPA")
    assert (names.drop_set(4), names.drop_set(6)) == ("spa_drops_v4", "spa_drops_v6")
    assert names == DEFAULT_NAMES


def test_an_instance_suffixes_each_name_within_the_kernels_limits() -> None:
    names = Names("site1")
    assert (names.table, names.hold, names.chain) == ("spa_site1", "spa_hold_site1", "SPA_site1")
    assert names.drop_set(4) == "spa_drops_v4_site1"
    longest = Names("a" * 16)
    assert len(longest.chain) <= 28  # iptables' chain names
    assert len(longest.drop_set(6)) <= 31  # ipset's set names
    assert instance_of_table("spa") == "" and instance_of_table("spa_site1") == "site1"
    assert instance_of_table("filter") is None and instance_of_table("spa_") is None
    assert is_hold_table("spa_hold") and is_hold_table("spa_hold_site1")
    assert not is_hold_table("spa_site1")


@pytest.mark.parametrize("bad", ["a" * 17, "Site1", "site 1", "-x", "_x", "x.y", "hold",
                                 "hold_a", "holder", "é"])
def test_an_instance_name_that_would_clash_or_not_fit_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="instance"):
        Names(bad)


def write_config(tmp_path: Path, instance: str | None) -> Path:
    path = tmp_path / "server.toml"
    admin.init(path, listen_port=62201, backend="memory", state_dir=tmp_path / "state",
               force=True, services=["ssh"])
    if instance is not None:
        text = path.read_text().replace("[server]\n", f"[server]\ninstance = {instance!r}\n", 1)
        path.write_text(text)
    return path


def test_the_config_names_its_instance_and_refuses_a_bad_one_in_one_line(
        tmp_path: Path) -> None:
    assert load(write_config(tmp_path, None)).names == DEFAULT_NAMES
    assert load(write_config(tmp_path, "site1")).names.table == "spa_site1"
    with pytest.raises(ConfigError) as info:
        load(write_config(tmp_path, "Site 1"))
    assert "instance = 'Site 1'" in str(info.value) and "\n" not in str(info.value)


# ---- the nftables backend with an instance ------------------------------------------------


def tables_named(value: Any) -> set[str]:
    """Every table a document's commands name."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "table" and isinstance(inner, str):
                found.add(inner)
            elif key == "table" and isinstance(inner, dict) and "name" in inner:
                found.add(inner["name"])
                found |= tables_named({k: v for k, v in inner.items() if k != "name"})
            else:
                found |= tables_named(inner)
    elif isinstance(value, list):
        for inner in value:
            found |= tables_named(inner)
    return found


def test_every_command_of_an_instance_names_only_its_own_tables() -> None:
    fake = FakeNft(owns_tables=True)
    backend = NftablesBackend(fake, names=Names("site1"), flush_on_stop=True)
    backend.start(SERVICES, now=100.0)
    backend.allow(A4, SERVICES["ssh"], 130.0, now=100.0)
    backend.apply([(Allow(A6, "dns", 120.0), SERVICES["dns"]),
                   (Remove(A4, "ssh"), SERVICES["ssh"])], now=100.0)
    backend.remove(A6, SERVICES["dns"])
    backend.drops()
    backend.held(now=100.0)
    fake.listing = {"nftables": []}  # the table is gone: the repair puts it back
    assert backend.repair({}, now=101.0) is not None
    backend.stop()
    named = set().union(*(tables_named(doc) for doc in fake.documents))
    assert named == {"spa_site1", "spa_hold_site1"}
    texts = [text for text in fake.texts if text != "list tables"]
    assert texts and all("spa_site1" in text or "spa_hold_site1" in text for text in texts)


def test_the_default_instance_renders_the_table_it_always_had() -> None:
    fake = FakeNft(owns_tables=True)
    NftablesBackend(fake).start(SERVICES, now=100.0)
    named = set().union(*(tables_named(doc) for doc in fake.documents))
    assert named == {"spa", "spa_hold"}
    assert "add table inet spa_hold { flags owner; }" in fake.texts


def other_gate(table: str, port: int, protocol: str = "tcp") -> dict[str, Any]:
    """What `list table` prints of another instance's gate for one port."""
    dport = {"match": {"op": "==", "left": {"payload": {"protocol": protocol,
                                                        "field": "dport"}}, "right": port}}
    return {"nftables": [
        {"table": {"family": "inet", "name": table}},
        {"chain": {"family": "inet", "table": table, "name": "input", "hook": "input"}},
        {"rule": {"family": "inet", "table": table, "chain": "input",
                  "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                      "right": ["established", "related"]}},
                           {"accept": None}]}},
        {"rule": {"family": "inet", "table": table, "chain": "input",
                  "expr": [dport, {"match": {"op": "==", "left": {"payload": {
                      "protocol": "ip", "field": "saddr"}}, "right": "@svc_x_v4"}},
                      {"accept": None}]}},
        {"rule": {"family": "inet", "table": table, "chain": "input",
                  "expr": [dport, {"drop": None}]}},
    ]}


def test_a_port_another_instance_gates_is_refused_in_one_line_before_anything_changes() -> None:
    """A packet passes every table: each instance would drop the other's grants."""
    fake = FakeNft(owns_tables=True)
    fake.tables_text = "table inet filter\ntable inet spa_site2\ntable inet spa_hold_site2\n"
    fake.listing = other_gate("spa_site2", 22)
    with pytest.raises(LocalError) as info:
        NftablesBackend(fake, names=Names("site1")).start(SERVICES, now=100.0)
    line = str(info.value)
    assert "\n" not in line
    assert "port tcp/22 (ssh) is gated by another spa instance too (table inet spa_site2)" \
        in line and "nft delete table inet spa_site2" in line
    assert not [doc for doc in fake.documents if not tables_named(doc) <= {"spa_site2"}]
    assert not [text for text in fake.texts if text.startswith("add")]


def test_another_instances_other_port_is_no_clash_and_its_hold_table_is_never_listed() -> None:
    fake = FakeNft(owns_tables=True)
    fake.tables_text = "table inet spa\ntable inet spa_hold\ntable inet spa_hold_x\n"
    fake.listing = other_gate("spa", 2222)
    NftablesBackend(fake, names=Names("site1")).start(SERVICES, now=100.0)
    listed = {next(iter(doc["nftables"][0]["list"].values()))["name"]
              for doc in fake.documents if "list" in doc["nftables"][0]}
    assert "spa_hold" not in listed and "spa_hold_x" not in listed
    assert "spa" in listed  # the default instance's gate was read, and let be
    ruleset_fake = FakeNft()
    ruleset_fake.tables_text = "table inet spa_site1\ntable inet spa_hold_site1\n"
    safe_ruleset(ruleset_fake)
    assert [tables_named(doc) for doc in ruleset_fake.documents] == [{"spa_site1"}]


class GoingNft(FakeNft):
    """`list tables` shows a hold table for the first `lasting` listings."""

    def __init__(self, hold: str, lasting: int) -> None:
        super().__init__(owns_tables=True)
        self.hold, self.lasting = hold, lasting

    def list_text(self, command: str) -> str:
        self.texts.append(command)
        if command == "list tables":
            self.lasting -= 1
            return f"table inet {self.hold}\n" if self.lasting >= 0 else ""
        return ""


def test_a_second_daemon_of_one_instance_is_refused_and_a_predecessor_waited_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Our hold table before we made it: another live daemon owns it."""
    from spa.backends import nftables

    monkeypatch.setattr(nftables, "HOLD_GONE", 0.3)
    fake = GoingNft("spa_hold_site1", lasting=1000)
    with pytest.raises(LocalError) as info:
        NftablesBackend(fake, names=Names("site1")).start(SERVICES, now=100.0)
    assert str(info.value).startswith("another spa-server of instance 'site1' runs (it owns "
                                      "table inet spa_hold_site1): give this one its own "
                                      "[server] instance")
    assert not fake.documents and not [t for t in fake.texts if t.startswith("add")]
    going = GoingNft("spa_hold", lasting=2)  # the gate keeper of a restart, on its way out
    backend = NftablesBackend(going)
    backend.start(SERVICES, now=100.0)
    assert backend.holds
    going.lasting = 1000  # a reload's start: ours, made by this process
    backend.start(SERVICES, now=101.0)
    other = GoingNft("spa_hold_other", lasting=1000)  # another instance's: no matter
    NftablesBackend(other, names=Names("site1")).start(SERVICES, now=100.0)


# ---- the guard -----------------------------------------------------------------------------


class Backend:
    def __init__(self, names: Names, watch: FakeWatch) -> None:
        self.names, self._watch, self.checks = names, watch, 0

    def repair(self, wanted: object, *, now: float, grants: bool = True) -> str | None:
        self.checks += 1
        return None

    def watch(self) -> FakeWatch:
        return self._watch


def watched(names: Names, commits: list[Commit]) -> tuple[int, int]:
    """(checks, host-firewall notices) after the guard heard `commits`."""
    watch = FakeWatch([commits])
    backend = Backend(names, watch)
    foreign: list[int] = []
    guard = Guard(backend, lock=threading.Lock(), wanted=dict, clock=time.time,
                  log=lambda line: None, record=lambda event: None,
                  on_foreign=lambda: foreign.append(1))
    run_watch(backend, guard, watch)  # type: ignore[arg-type]
    return backend.checks, len(foreign)


def commit(*tables: str) -> Commit:
    return Commit(1, tuple(Change("element", False, "inet", table) for table in tables))


def test_the_guard_of_one_instance_does_not_react_to_another_instances_commits() -> None:
    site1 = Names("site1")
    assert watched(site1, [commit("spa_site2", "spa_hold_site2"), commit("spa", "spa_hold")]) \
        == (0, 0)
    assert watched(site1, [commit("spa_site1")]) == (1, 0)
    assert watched(site1, [commit("filter")]) == (0, 1)  # the host's firewall: looked at
    assert watched(DEFAULT_NAMES, [commit("spa_site1")]) == (0, 0)
    assert watched(DEFAULT_NAMES, [commit("spa")]) == (1, 0)


# ---- the iptables backend with an instance -------------------------------------------------


def test_the_iptables_backend_counts_drops_in_the_instances_own_ipsets() -> None:
    calls: list[tuple[str, ...]] = []

    def ipset(*args: str) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        return subprocess.CompletedProcess(["ipset", *args], 0, "<ipsets></ipsets>", "")

    backend = IptablesBackend(object(), ipset=ipset, names=Names("site1"))
    assert backend._make_drop_sets()
    backend._counting = True
    backend.drops()
    assert [args[1] for args in calls] == ["spa_drops_v4_site1", "spa_drops_v6_site1"] * 2
    assert backend._chain == "SPA_site1"


class Match:
    def __init__(self, name: str, **parameters: list[str]) -> None:
        self.name, self._parameters = name, parameters

    def get_all_parameters(self) -> dict[str, list[str]]:
        return self._parameters


class Target:
    def __init__(self, name: str) -> None:
        self.name = name


class Rule:
    def __init__(self, target: str, *matches: Match) -> None:
        self.target, self.matches = Target(target), list(matches)


def test_an_iptables_port_another_instances_chain_drops_is_found() -> None:
    from spa.backends.iptables import shared_port

    other = [Rule("ACCEPT", Match("conntrack", ctstate=["ESTABLISHED,RELATED"])),
             Rule("ACCEPT", Match("tcp", dport=["22"]), Match("comment", comment=["spa:x:1"])),
             Rule("DROP", Match("tcp", dport=["2222"])),
             Rule("DROP", Match("udp", dport=["53"]))]
    assert shared_port(SERVICES, {"SPA_site2": other}) == (("udp", 53, "dns"), "SPA_site2")
    assert shared_port(SERVICES, {"SPA_site2": other[:3]}) is None  # an accept is no gate
    assert shared_port({"ssh": SERVICES["ssh"]}, {"SPA": other}) is None


def test_a_reload_the_gate_refuses_keeps_the_running_services(tmp_path: Path) -> None:
    """A service added to the file on a port another instance gates: the
    backend refuses, the daemon says so in one line and keeps what runs."""
    from spa.backends.memory import MemoryBackend
    from spa.server.daemon import Server
    from spa.server.sources import FakeSource
    from tests.server_world import FakeClock

    class Refusing(MemoryBackend):
        def start(self, services: Any, *, now: float) -> None:
            if "imaps" in services:
                raise LocalError("port tcp/993 (imaps) is gated by another spa instance too")
            super().start(services, now=now)

    path = write_config(tmp_path, "site1")
    logs: list[str] = []
    server = Server(load(path), backend=Refusing(), source=FakeSource(), clock=FakeClock(),
                    log=logs.append)
    server.start()
    try:
        text = path.read_text() + ("\n[services.imaps]\nprotocol = \"tcp\"\nport = 993\n"
                                   "default_duration = 60\nmax_duration = 600\n")
        path.write_text(text)
        server.request_reload()
        server.housekeeping()
        assert "error reload refused, keeping the running services: port tcp/993 (imaps) is " \
            "gated by another spa instance too" in logs
        assert set(server.config.services) == {"ssh"}
        assert set(server.verifier.policy.services) == {"ssh"}
    finally:
        server.shutdown()
