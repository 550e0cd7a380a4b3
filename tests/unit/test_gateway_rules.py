"""Gateway services (spa/backends/nftgateway.py): the config that names one,
and the nftables rules rendered for it, without root (STYLE principle 6)."""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from pathlib import Path
from typing import Any

import pytest

from spa.backends.hostcheck import Outcome, Target, check, render
from spa.backends.names import DEFAULT_NAMES
from spa.backends.nftgateway import NAT_CHAIN
from spa.backends.nftrender import CHAIN, FORWARD, render_hold, render_start
from spa.core.policy import Service, local_port_names
from spa.server import config as config_mod
from spa.server.coexist import forwarding_lines, targets_of
from spa.server.config import gateway_host_problem
from spa.server.errors import ConfigError
from spa.server.gatemsg import RefusedError, parse_address

DB = Service("db", "tcp", 22, 30, 300, ipaddress.ip_address("10.20.0.5"), 2222)
DB6 = Service("db6", "tcp", 22, 30, 300, ipaddress.ip_address("fd00:20::5"))
SSH = Service("ssh", "tcp", 22, 30, 300)
SERVICES = {"db": DB, "db6": DB6, "ssh": SSH}


def load(tmp_path: Path, services: str, backend: str = "nftables") -> config_mod.ServerConfig:
    server_id = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
    path = tmp_path / "server.toml"
    path.write_text(f'[server]\nserver_id = "{server_id}"\nbackend = "{backend}"\n{services}')
    return config_mod.parse(path, path.read_bytes())


GATEWAY = ('[services.db]\nport = 22\ndefault_duration = 30\nmax_duration = 300\n'
           'host = "{host}"\n')


def test_a_service_names_its_internal_host_by_address(tmp_path: Path) -> None:
    loaded = load(tmp_path, GATEWAY.format(host="10.20.0.5") + "listen_port = 2222\n")
    assert loaded.services["db"] == DB
    assert loaded.services["db"].gateway and loaded.services["db"].client_port == 2222
    assert load(tmp_path, GATEWAY.format(host="fd00:20::5")).services["db"].host \
        == ipaddress.ip_address("fd00:20::5")


def test_a_name_for_host_is_kept_unresolved_and_a_malformed_one_refused_in_one_line(
        tmp_path: Path) -> None:
    loaded = load(tmp_path, GATEWAY.format(host="db.internal")).services["db"]
    assert (loaded.host, loaded.host_name, loaded.gateway, loaded.named) == (
        None, "db.internal", True, True)
    for bad in ("db..internal", "-db.internal", "db_1.internal", "10.20.0", "db internal"):
        with pytest.raises(ConfigError, match=re.escape(f"host = {bad!r} is ")) as raised:
            load(tmp_path, GATEWAY.format(host=bad))
        assert "\n" not in str(raised.value) and "DNS host name" in str(raised.value)
    published = load(tmp_path, GATEWAY.format(host="db.internal") + "listen_port = 2222\n")
    db = published.services["db"]
    assert (db.host, db.host_name, db.listen_port, db.client_port) == (
        None, "db.internal", 2222, 2222)


@pytest.mark.parametrize(("host", "why"), [
    ("::ffff:10.198.9.5", "is an IPv4-mapped IPv6 address, which would leave the IPv4 host "
                          "ungated; write 10.198.9.5"),
    ("fe80::5%eth0", "has a zone"),
    ("fd00:20::5%2", "has a zone"),
    ("0.0.0.0", "is not a host address"),
    ("::", "is not a host address"),
    ("224.0.0.1", "is not a host address"),
    ("ff02::1", "is not a host address"),
    ("255.255.255.255", "is not a host address"),
    ("127.0.0.1", "is a loopback address"),
    ("::1", "is a loopback address"),
    ("169.254.1.5", "is link-local"),
    ("fe80::5", "is link-local"),
])
def test_a_host_that_is_not_one_routed_address_is_refused_in_one_line(
        tmp_path: Path, host: str, why: str) -> None:
    """What gatemsg's parse_address refuses for a client, and loopback and
    link-local: a mapped host would gate nothing of the real IPv4 host, a
    zone would pass the load and fail in nftables (the review's gw.py)."""
    with pytest.raises(ConfigError, match=re.escape(f"[services.db] host = {host!r} {why}")
                       ) as raised:
        load(tmp_path, GATEWAY.format(host=host))
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("text", ["::ffff:10.198.9.5", "fe80::5%eth0", "0.0.0.0", "::",
                                  "224.0.0.1", "ff02::1", "255.255.255.255"])
def test_every_address_refused_for_a_client_is_refused_for_a_host(text: str) -> None:
    with pytest.raises(RefusedError):
        parse_address(text)
    assert gateway_host_problem(ipaddress.ip_address(text))


def test_a_published_port_needs_a_host(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="listen_port must be 1-65535 and needs host"):
        load(tmp_path, '[services.db]\nport = 22\ndefault_duration = 30\nmax_duration = 300\n'
             'listen_port = 2222\n')


def test_the_iptables_backend_refuses_a_gateway_service(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[services.db\] gateway services need backend "
                       "nftables$"):
        load(tmp_path, GATEWAY.format(host="10.20.0.5"), backend="iptables")


def rules(document: dict[str, Any], table: str, chain: str) -> list[list[Any]]:
    return [command["add"]["rule"]["expr"] for command in document["nftables"]
            if "rule" in command.get("add", {}) and command["add"]["rule"]["table"] == table
            and command["add"]["rule"]["chain"] == chain]


def chains(document: dict[str, Any], table: str) -> dict[str, dict[str, Any]]:
    return {command["add"]["chain"]["name"]: command["add"]["chain"]
            for command in document["nftables"]
            if "chain" in command.get("add", {}) and command["add"]["chain"]["table"] == table}


def test_the_gateway_is_gated_on_forward_only_and_the_hosts_own_port_on_input() -> None:
    document = render_start(SERVICES)
    text = repr(rules(document, "spa", CHAIN))
    assert "@svc_ssh_v4" in text and "@svc_db" not in text, "not the gateway's own port 22"
    forward = rules(document, "spa", FORWARD)
    daddr = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": "10.20.0.5"}}
    grant = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                       "right": "@svc_db_v4"}}
    ours = [expr for expr in forward if daddr in expr]
    assert [grant in expr for expr in ours] == [True, False]
    assert ours[0][-1] == {"accept": None} and ours[1][-1] == {"drop": None}
    assert any("@svc_db6_v6" in repr(expr) and "fd00:20::5" in repr(expr) for expr in forward)


def test_a_published_port_is_one_dnat_rule_in_our_table_and_not_in_the_hold() -> None:
    document = render_start(SERVICES)
    nat = chains(document, "spa")[NAT_CHAIN]
    assert (nat["type"], nat["hook"], nat["prio"]) == ("nat", "prerouting", -100)
    [dnat] = rules(document, "spa", NAT_CHAIN)
    assert dnat[-1] == {"dnat": {"family": "ip", "addr": "10.20.0.5", "port": 22}}
    assert NAT_CHAIN not in chains(render_start({"ssh": SSH, "db6": DB6}), "spa")
    hold = render_hold(SERVICES, {}, 0.0)
    assert NAT_CHAIN not in chains(hold, DEFAULT_NAMES.hold)
    assert any("@svc_db_v4" in repr(expr) and expr[-1] == {"accept": None}
               for expr in rules(hold, DEFAULT_NAMES.hold, FORWARD))


def router(hook: str, policy: str) -> dict[str, Any]:
    """An admin's table with one base chain on `hook` (priority 0) and the policy."""
    return {"nftables": [
        {"table": {"family": "inet", "name": "filter"}},
        {"chain": {"family": "inet", "table": "filter", "name": hook, "type": "filter",
                   "hook": hook, "prio": 0, "policy": policy}}]}


GATEWAY_TARGET = Target("tcp", 22, "db", host="10.20.0.5")


def test_check_walks_the_hosts_forward_chains_for_a_gateway_service() -> None:
    [finding] = check(router("forward", "drop"), [GATEWAY_TARGET])
    assert (finding.outcome, finding.version) == (Outcome.DROPS, 4)
    assert render([finding]) == [
        "db (tcp/22 to 10.20.0.5), IPv4: table inet filter chain forward (policy drop) drops "
        "it: nft insert rule inet filter forward meta mark and 0x10000000 == 0x10000000 accept"]
    passes = check(router("input", "drop"), [GATEWAY_TARGET])
    assert passes == [] and render(check(router("forward", "accept"), [GATEWAY_TARGET])) == [
        "db (tcp/22 to 10.20.0.5): ok, no other base chain on hook forward drops it"]


def test_forwarding_off_is_one_line_per_ip_version_a_gateway_needs(tmp_path: Path) -> None:
    loaded = load(tmp_path, GATEWAY.format(host="10.20.0.5"))
    assert forwarding_lines(loaded, lambda version: True) == []
    assert forwarding_lines(loaded, lambda version: version == 6) == [
        "IPv4 forwarding is off (net.ipv4.ip_forward = 0): gateway services reach no internal "
        "host until it is on (sysctl -w net.ipv4.ip_forward=1, and a file in /etc/sysctl.d/ "
        "to keep it)"]
    assert targets_of(loaded) == [GATEWAY_TARGET]
    local = load(tmp_path, '[services.ssh]\nport = 22\ndefault_duration = 3\nmax_duration = 3\n')
    assert forwarding_lines(local, lambda version: False) == [], "only a gateway needs it"


def test_a_drop_on_port_22_is_the_local_services_not_the_gateways() -> None:
    """The input chain's drop counters name this host's service: a gateway
    service on the same port number (db, db6) is another host's."""
    assert local_port_names({"db": DB, "ssh": SSH, "db6": DB6}) == {22: "ssh"}
