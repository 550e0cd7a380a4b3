"""fwknopd's forwarding stanzas carried over to gateway mode: FORCE_NAT
becomes the gateway service fwknopd made where it maps exactly (each
setting), everything else is refused with what to do; the plan's services
never collide; an imported client is served by the real compat verifier
(a plain knock and `fwknop -N`), and a FORCE_NAT address of this machine
stops the import before anything is written."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest

from spa.core.errors import Reason
from spa.core.fwknop import FwknopKeys, Message
from spa.core.fwknop_verify import CompatAccepted, CompatVerifier, HmacBudget
from spa.core.policy import DEFAULT_SERVICES, Policy, Service
from spa.core.verify import Refused
from spa.server import config as config_mod
from spa.server.admin_fwknop import import_fwknopd
from spa.server.errors import LocalError
from spa.server.fwknop_import import Known, Outcome, plan, render
from spa.server.fwknop_nat import Forwarding, NatTarget
from spa.server.fwknop_stanza import judge
from spa.server.fwknopd_files import FwknopdConf, Stanza, read_access
from spa.server.gwroute import FakeRoute, HostRoute
from tests.fwknop_world import FakeFiles, packet
from tests.unit.test_fwknop_import import (
    CONFIG,
    HMAC,
    KEYS,
    NOW,
    RIJNDAEL,
    assert_no_secret,
    other_keys,
)

DB = ipaddress.IPv4Address("10.20.0.5")
FORWARDING = Forwarding(enabled=True)
CONF = FwknopdConf(Path("/etc/fwknop/fwknopd.conf"), {"ENABLE_IPT_FORWARDING": "Y"}, True)
EMPTY = Known((), {})
NAT = f"SOURCE ANY\nOPEN_PORTS tcp/2222\nFORCE_NAT 10.20.0.5 22\n{KEYS}"


def one(text: str) -> Stanza:
    return read_access(Path("/etc/fwknop/access.conf"), FakeFiles(
        {"/etc/fwknop/access.conf": text}))[0]


@pytest.mark.parametrize(("body", "forwarding", "target"), [
    ("OPEN_PORTS tcp/2222\nFORCE_NAT 10.20.0.5 22\n", FORWARDING,
     NatTarget("tcp", DB, 22, 2222)),  # fwknopd DNATs the port the client names
    ("OPEN_PORTS udp/5353\nFORCE_NAT 10.20.0.5 53 extra\n", FORWARDING,
     NatTarget("udp", DB, 53, 5353)),  # sscanf("%15s %5u") ignores the rest
    ("OPEN_PORTS tcp/2222, tcp/2223\nRESTRICT_PORTS tcp/2223\nFORCE_NAT 10.20.0.5 22\n",
     FORWARDING, NatTarget("tcp", DB, 22, 2222)),  # one port left
    ("OPEN_PORTS tcp/22\nFORCE_NAT 10.20.0.5 22\nDISABLE_DNAT Y\n", FORWARDING,
     NatTarget("tcp", DB, 22, 0)),  # forwarded, not DNATed: reached routed
    ("OPEN_PORTS tcp/2222\nFORCE_NAT 10.20.0.5 22\n",
     Forwarding.of({"ENABLE_IPT_LOCAL_NAT": "Y"}, "nftables"), NatTarget("tcp", DB, 22, 2222)),
    ("OPEN_PORTS tcp/2222\nFORCE_NAT 10.20.0.5 22\n",
     Forwarding.of({"ENABLE_FIREWD_FORWARDING": "yes"}, "memory"),
     NatTarget("tcp", DB, 22, 2222)),
])
def test_force_nat_maps_onto_the_gateway_service_fwknopd_made(
        body: str, forwarding: Forwarding, target: NatTarget) -> None:
    judged = judge(one(f"SOURCE 203.0.113.0/24\n{body}{KEYS}"), now=NOW, forwarding=forwarding)
    assert judged.reasons == ()
    assert judged.nat == target
    assert judged.ports == ((target.protocol, target.listen_port or target.port),)
    assert any(f"a grant opens {target.protocol}/{target.port} of {DB} only" in note
               for note in judged.notes), judged.notes
    said = any("for every source (fwknopd: the knocking source only)" in note
               for note in judged.notes)
    assert said == bool(target.listen_port)


@pytest.mark.parametrize(("body", "settings", "backend", "fragment"), [
    ("OPEN_PORTS tcp/2222\nFORCE_NAT 10.20.0.5 22\n", {}, "nftables",
     "FORCE_NAT without ENABLE_IPT_FORWARDING or ENABLE_IPT_LOCAL_NAT in fwknopd.conf: "
     "fwknopd refuses this file too"),
    ("OPEN_PORTS tcp/2222\nFORCE_NAT 10.20.0.5 22\n",
     {"ENABLE_IPT_FORWARDING": "Y", "ENABLE_IPT_SNAT": "Y"}, "nftables",
     "FORCE_NAT with fwknopd.conf's ENABLE_IPT_SNAT Y: fwknopd rewrote each forwarded "
     "connection's source; spa does no SNAT"),
    ("OPEN_PORTS tcp/2222\nFORCE_NAT 10.20.0.5 22\nFORCE_SNAT 192.0.2.1\n",
     {"ENABLE_IPT_FORWARDING": "Y"}, "nftables",
     "FORCE_SNAT: fwknopd rewrote the forwarded connection's source; spa does no SNAT: the "
     "internal host would see the client's own address"),
    ("OPEN_PORTS tcp/2222\nFORCE_NAT 10.20.0.5 22\nFORCE_MASQUERADE Y\n",
     {"ENABLE_IPT_FORWARDING": "Y"}, "nftables", "delete FORCE_MASQUERADE and run again"),
    ("OPEN_PORTS tcp/2222\nFORCE_NAT 10.20.0.5 22\nFORWARD_ALL Y\n",
     {"ENABLE_IPT_FORWARDING": "Y"}, "nftables",
     "replace FORWARD_ALL with FORCE_NAT IP PORT for that one"),
    ("OPEN_PORTS tcp/2222\nFORCE_NAT 10.20.0.5 22\n", {"ENABLE_IPT_FORWARDING": "Y"},
     "iptables", "FORCE_NAT: a gateway service needs backend nftables ([server] backend is "
     "iptables here)"),
    ("OPEN_PORTS tcp/2222, tcp/2223\nFORCE_NAT 10.20.0.5 22\n", {"ENABLE_IPT_FORWARDING": "Y"},
     "nftables", "FORCE_NAT with OPEN_PORTS tcp/2222, tcp/2223: fwknopd DNATed whichever"),
    ("OPEN_PORTS tcp/2222\nFORCE_NAT 10.20.0.5\n", {"ENABLE_IPT_FORWARDING": "Y"}, "nftables",
     "FORCE_NAT '10.20.0.5': not IP PORT (fwknopd refuses it too)"),
    ("OPEN_PORTS tcp/2222\nFORCE_NAT 10.20.0.5 70000\n", {"ENABLE_IPT_FORWARDING": "Y"},
     "nftables", "FORCE_NAT '10.20.0.5 70000': not IP PORT"),
    ("OPEN_PORTS tcp/2222\nFORCE_NAT db.internal 22\n", {"ENABLE_IPT_FORWARDING": "Y"},
     "nftables", "db.internal is not an IPv4 address (fwknopd refuses it too)"),
    ("OPEN_PORTS tcp/2222\nFORCE_NAT 127.0.0.1 22\n", {"ENABLE_IPT_FORWARDING": "Y"},
     "nftables", "FORCE_NAT 127.0.0.1 22: 127.0.0.1 is a loopback address"),
    ("OPEN_PORTS tcp/2222\nFORCE_NAT 169.254.1.1 22\n", {"ENABLE_IPT_FORWARDING": "Y"},
     "nftables", "is link-local"),
    ("OPEN_PORTS tcp/2222\nFORCE_NAT 10.20.0.5 0\n", {"ENABLE_IPT_FORWARDING": "Y"},
     "nftables", "FORCE_NAT 10.20.0.5 0: port 0 is no port"),
    ("OPEN_PORTS tcp/2222\nFORCE_NAT 10.20.0.5 22\nDISABLE_DNAT Y\n",
     {"ENABLE_IPT_FORWARDING": "Y"}, "nftables",
     "with DISABLE_DNAT: the client reaches 10.20.0.5:22 routed, so it must knock for tcp/22, "
     "not tcp/2222"),
    ("FORCE_NAT 10.20.0.5 22\n", {"ENABLE_IPT_FORWARDING": "Y"}, "nftables",
     "no OPEN_PORTS: fwknopd let this client open any port"),
    ("OPEN_PORTS tcp/22\nFORCE_SNAT 192.0.2.1\n", {"ENABLE_IPT_FORWARDING": "Y"}, "nftables",
     "spa does no SNAT"),  # fwknopd: FORCE_SNAT needs FORCE_NAT or FORWARD_ALL
])
def test_forwarding_that_does_not_map_is_refused_with_what_to_do(
        body: str, settings: dict[str, str], backend: str, fragment: str) -> None:
    stanza = one(f"SOURCE ANY\n{body}{KEYS}")
    judged = judge(stanza, now=NOW, forwarding=Forwarding.of(settings, backend))
    assert judged.keys is None and judged.nat is None
    assert any(fragment in reason for reason in judged.reasons), judged.reasons
    made = plan([stanza], FwknopdConf(CONF.path, settings, True),
                replace(CONFIG, backend=backend), EMPTY, now=NOW)
    assert made.stanzas[0].outcome is Outcome.SKIPPED
    assert not made.entries and not made.services
    assert_no_secret(*render(made, dry_run=True))


def gateway_config(**services: Service) -> config_mod.ServerConfig:
    return replace(CONFIG, services={**DEFAULT_SERVICES, **services})


def test_the_plan_adds_the_gateway_service_once_and_a_second_plan_changes_nothing() -> None:
    text = NAT + ("SOURCE 198.51.100.0/24\nOPEN_PORTS tcp/2222\nFORCE_NAT 10.20.0.5 22\n"
                  f"{other_keys(7)}")
    stanzas = read_access(Path("/a"), FakeFiles({"/a": text}))
    made = plan(stanzas, CONF, CONFIG, EMPTY, now=NOW)
    service = Service("nat-10-20-0-5-22", "tcp", 22, 30, 300, DB, 2222)
    assert made.services == (service,)
    assert [p.outcome for p in made.stanzas] == [Outcome.NEW, Outcome.NEW]
    assert [e.services for e in made.entries] == [(service.name,), (service.name,)]
    assert made.stanzas[0].services == ((("tcp", 2222), service.name, True),)
    lines = render(made, dry_run=True)
    assert ("service nat-10-20-0-5-22: would add tcp/22 of 10.20.0.5, published on 2222 "
            "(30 s, at most 300 s)") in lines
    assert any("keep net.ipv4.ip_forward=1" in line for line in lines)
    assert_no_secret(*lines)
    config = gateway_config(**{service.name: service})
    config = replace(config, fwknop_port=62201)
    again = plan(stanzas, CONF, config, Known(tuple(made.entries), {}), now=NOW + 60)
    assert [p.outcome for p in again.stanzas] == [Outcome.ALREADY, Outcome.ALREADY]
    assert not again.changes
    assert not any("not what OPEN_PORTS says now" in n for p in again.stanzas for n in p.notes)
    routed = plan([one(f"SOURCE ANY\nOPEN_PORTS tcp/22\nFORCE_NAT 10.20.0.5 22\n"
                       f"DISABLE_DNAT Y\n{KEYS}")], CONF, CONFIG, EMPTY, now=NOW)
    assert routed.services == (Service("nat-10-20-0-5-22", "tcp", 22, 30, 300, DB),)
    assert ("service nat-10-20-0-5-22: add tcp/22 of 10.20.0.5, reached routed (30 s, "
            "at most 300 s)") in render(routed, dry_run=False)


def test_an_exact_gateway_service_is_used_and_one_in_the_way_refuses_the_stanza() -> None:
    mine = Service("db-ssh", "tcp", 22, 60, 600, DB, 2222)
    made = plan([one(NAT)], CONF, gateway_config(**{"db-ssh": mine}), EMPTY, now=NOW)
    assert not made.services and made.entries[0].services == ("db-ssh",)
    assert any("tcp/2222 opens db-ssh for 60 s, at most 600 s (fwknopd: 30 s" in note
               for note in made.stanzas[0].notes)
    cases = [
        (gateway_config(**{"db-ssh": replace(mine, listen_port=2200)}),
         NAT, "[services.db-ssh] is tcp/22 of 10.20.0.5 already, reached on 2200: one "
         "service a destination"),
        (gateway_config(other=Service("other", "tcp", 22, 30, 300,
                                      ipaddress.IPv4Address("10.20.0.9"), 2222)),
         NAT, "tcp/2222 of this host is [services.other] (published to 10.20.0.9:22)"),
        (gateway_config(), NAT.replace("tcp/2222", "tcp/22"),
         "tcp/22 of this host is [services.ssh] (a service of this host): a published port "
         "is DNATed for every source here"),
        (gateway_config(**{"db-ssh": mine}), f"SOURCE ANY\nOPEN_PORTS tcp/2222\n{KEYS}",
         "tcp/2222 of this host is published to 10.20.0.5:22 ([services.db-ssh])"),
    ]
    for config, text, fragment in cases:
        refused = plan([one(text)], CONF, config, EMPTY, now=NOW)
        assert refused.stanzas[0].outcome is Outcome.SKIPPED, fragment
        assert fragment in refused.stanzas[0].reasons[0], refused.stanzas[0].reasons
        assert not refused.services and not refused.entries


def test_an_imported_force_nat_client_is_served_exactly_its_gateway_service() -> None:
    """The real compat verifier over the plan: `fwknop -A tcp/2222` (as
    under fwknopd) and `fwknop -A tcp/22 -N 10.20.0.5:22 --nat-port 2222`
    open the gateway service; ssh of this host, another destination, the
    internal port without the published one are refused."""
    made = plan([one(NAT)], CONF, CONFIG, EMPTY, now=NOW)
    entry = made.entries[0]
    services = {**CONFIG.services, **{s.name: s for s in made.services}}
    keys = FwknopKeys(RIJNDAEL, HMAC)
    verifier = CompatVerifier({entry.name: keys},
                              Policy(services, {entry.name: config_mod.client_policy(entry)}),
                              budget=HmacBudget(max_hmacs=10**6, per_source=10**6))
    source = "203.0.113.9"

    def verify(**kwargs: object) -> CompatAccepted | Refused:
        return verifier.verify(packet(keys, **kwargs), source, NOW)  # type: ignore[arg-type]

    for kwargs in ({"ports": (("tcp", 2222),)},
                   {"ports": (("tcp", 2222),), "kind": Message.NAT_ACCESS,
                    "nat": ("10.20.0.5", 22)}):
        accepted = verify(**kwargs)
        assert type(accepted) is CompatAccepted, kwargs
        assert [(d.service.name, str(d.address), d.duration) for d in accepted.decisions] == [
            ("nat-10-20-0-5-22", source, 30)]
    assert verify(ports=(("tcp", 22),)) == Refused(Reason.SERVICE_NOT_ALLOWED, entry.name)
    for nat, ports in ((("10.20.0.6", 22), (("tcp", 2222),)),
                       (("10.20.0.5", 22), (("tcp", 22),))):
        assert verify(ports=ports, kind=Message.NAT_ACCESS, nat=nat) == Refused(
            Reason.NAT_MESSAGE, entry.name)


def test_a_force_nat_address_of_this_machine_stops_the_import(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(f'[server]\nserver_id = "{"B" * 22}"\nlisten_port = 62202\n'
                    f'backend = "nftables"\nstate_dir = "{tmp_path / "state"}"\n')
    path.chmod(0o600)
    access, conf = tmp_path / "access.conf", tmp_path / "fwknopd.conf"
    files = FakeFiles({str(access): NAT, str(conf): "ENABLE_IPT_FORWARDING Y;\n"})
    before = path.read_bytes()
    for dry_run in (True, False):
        with pytest.raises(LocalError, match=r"FORCE_NAT 10\.20\.0\.5 22: 10\.20\.0\.5 is an "
                                             r"address of this machine.*nothing was changed"):
            import_fwknopd(path, access, conf, conf_given=True, dry_run=dry_run, now=NOW,
                           files=files, route=FakeRoute({"10.20.0.5": HostRoute(local=True)}))
    assert path.read_bytes() == before
    route = FakeRoute({"10.20.0.5": HostRoute(local=False)})
    made = import_fwknopd(path, access, conf, conf_given=True, dry_run=True, now=NOW,
                          files=files, route=route)
    assert made.services[0].host == DB and route.asked == [DB]
