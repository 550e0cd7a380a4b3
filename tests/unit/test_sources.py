"""Per-client source networks (spa/core/sources.py) and the policy rule that
uses them: strict parsing, the check, and its place among the refusals."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pyotp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spa.core.errors import AFTER_AUTHENTICATION, FormatError, Reason
from spa.core.otp import OtpChecker
from spa.core.policy import Decision, Policy
from spa.core.sources import (
    MAX_SOURCES,
    NOWHERE,
    SourceNetwork,
    allows,
    canonical_sources,
    parse_network,
    source_networks,
)
from spa.core.verify import Accepted, Refused
from spa.core.wire import Action, IPAddress, Request
from tests.property.strategies import requests
from tests.world import NOW, POLICY, SRC, SRC6, Knocker, verifier

HOME = "192.0.2.0/24"  # SRC (192.0.2.10) is in it
OFFICE6 = "2001:db8::/48"  # SRC6 (2001:db8::10) is in it
ELSEWHERE = ipaddress.ip_address("198.51.100.7")
ELSEWHERE6 = ipaddress.ip_address("2001:db8:1::7")


def policy_with(client: str, sources: tuple[str, ...]) -> Policy:
    rules = replace(POLICY.clients[client], sources=source_networks(sources))
    return replace(POLICY, clients={**POLICY.clients, client: rules})


def ask(service: str = "ssh", address: IPAddress | None = None) -> Request:
    return Request(round(NOW * 1000), Action.OPEN, service, 0, address)


# ---- parsing -------------------------------------------------------------


@pytest.mark.parametrize(("text", "canonical"), [
    ("203.0.113.0/24", "203.0.113.0/24"),
    ("203.0.113.7", "203.0.113.7/32"),
    ("203.0.113.7/32", "203.0.113.7/32"),
    ("10.0.0.0/255.0.0.0", "10.0.0.0/8"),
    ("0.0.0.0/0", "0.0.0.0/0"),
    (" 2001:DB8::/48 ", "2001:db8::/48"),
    ("2001:db8::1", "2001:db8::1/128"),
    ("::/0", "::/0"),
])
def test_networks_are_kept_in_canonical_text(text: str, canonical: str) -> None:
    assert parse_network(text)[0] == canonical


@pytest.mark.parametrize(("text", "says"), [
    ("203.0.113.7/24", "'203.0.113.7/24' has host bits set past /24; write 203.0.113.0/24 "
                       "for the network or 203.0.113.7/32 for that one address"),
    ("2001:db8::1/48", "write 2001:db8::/48 for the network or 2001:db8::1/128"),
    ("example.org", "'example.org' is not a network; write an address or ADDRESS/PREFIX, "
                    "e.g. 203.0.113.0/24 or 2001:db8::/48"),
    ("", "'' is not a network"),
    ("10.0.0.0/33", "'10.0.0.0/33' is not a network"),
    ("010.0.0.0/8", "'010.0.0.0/8' is not a network"),
    ("10.0.0.0/8,10.1.0.0/16", "is not a network"),
    ("fe80::%eth0/64", "'fe80::%eth0/64' names a zone; write the network without it"),
    ("::ffff:203.0.113.0/120", "is IPv4-mapped, and a knock from there arrives as IPv4; "
                               "write 203.0.113.0/24"),
])
def test_a_bad_network_is_one_line_naming_it_and_the_fix(text: str, says: str) -> None:
    with pytest.raises(FormatError) as caught:
        parse_network(text)
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_list_is_deduplicated_in_order_and_bounded() -> None:
    assert canonical_sources(["10.0.0.0/8", HOME, "10.0.0.0/255.0.0.0"]) == (
        "10.0.0.0/8", HOME)
    assert canonical_sources([]) == ()
    many = [f"10.0.{i}.0/24" for i in range(MAX_SOURCES + 1)]
    assert len(canonical_sources(many[:-1])) == MAX_SOURCES
    with pytest.raises(FormatError, match=f"65 source networks; at most {MAX_SOURCES}"):
        canonical_sources(many)


# ---- the check -----------------------------------------------------------


def test_an_address_is_allowed_inside_its_networks_only() -> None:
    nets = source_networks([HOME, OFFICE6])
    assert allows(nets, SRC) and allows(nets, SRC6)
    assert not allows(nets, ELSEWHERE) and not allows(nets, ELSEWHERE6)
    assert allows((), ELSEWHERE), "no networks: anywhere"
    assert not allows(NOWHERE, SRC) and not allows(NOWHERE, SRC6)
    anywhere4 = source_networks(["0.0.0.0/0"])
    assert allows(anywhere4, ELSEWHERE) and not allows(anywhere4, SRC6), "a family apart"


networks = st.one_of(
    st.builds(lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
              st.ip_addresses(v=4), st.integers(0, 32)),
    st.builds(lambda a, p: ipaddress.IPv6Network((a, p), strict=False),
              st.ip_addresses(v=6), st.integers(0, 128)),
).filter(lambda n: not (n.version == 6 and n.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96"))))
any_address = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


@given(st.lists(networks, max_size=5), any_address)
def test_the_check_agrees_with_ipaddress(nets: list[ipaddress.IPv4Network
                                                  | ipaddress.IPv6Network],
                                         address: IPAddress) -> None:
    parsed = source_networks([str(n) for n in nets])
    assert allows(parsed, address) == (not nets or any(address in n for n in nets))


@given(requests(), st.lists(networks, max_size=3), any_address, st.booleans())
def test_policy_never_grants_a_source_outside_the_clients_networks(
        request: Request, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
        source: IPAddress, other: bool) -> None:
    """Whatever the request (another address too), a client with networks is
    granted only from a source inside them, and only for an address inside
    them; with none, nothing changes."""
    rules = replace(POLICY.clients["carol"], sources=source_networks([str(n) for n in nets]),
                    allow_other_address=other)
    policy = replace(POLICY, clients={"carol": rules})
    before = replace(POLICY, clients={"carol": replace(rules, sources=())})
    request = request._replace(service="ssh")
    decided = policy.decide("carol", request, source)
    asked = source if request.address is None else request.address
    inside = any(source in n for n in nets)
    asked_inside = any(asked in n for n in nets)
    if nets and not (inside and asked_inside):
        assert decided in (Reason.SOURCE_NOT_ALLOWED, Reason.ADDRESS_NOT_ALLOWED)
    else:
        assert decided == before.decide("carol", request, source)
    if isinstance(decided, Decision):
        assert not nets or (inside and any(decided.address in n for n in nets))


# ---- the rule among the others --------------------------------------------


def test_a_knock_from_outside_is_refused_source_not_allowed_after_authentication() -> None:
    assert Reason.SOURCE_NOT_ALLOWED in AFTER_AUTHENTICATION
    policy = policy_with("alice", (HOME, OFFICE6))
    assert isinstance(policy.decide("alice", ask(), SRC), Decision)
    assert isinstance(policy.decide("alice", ask(), SRC6), Decision)
    assert policy.decide("alice", ask(), ELSEWHERE) is Reason.SOURCE_NOT_ALLOWED
    assert policy.decide("alice", ask(), ELSEWHERE6) is Reason.SOURCE_NOT_ALLOWED
    assert policy_with("alice", ()).decide("alice", ask(), ELSEWHERE) == Decision(
        ELSEWHERE, POLICY.services["ssh"], 30), "no networks: anywhere, as before"


def test_another_address_is_still_judged_by_the_source() -> None:
    """carol may name another address; her knock's source must still be
    inside, and so must the address she names (from the review of this
    feature: a thief forging an inside source opened for his own address)."""
    policy = policy_with("carol", (HOME,))
    inside = ipaddress.ip_address(str(SRC).rsplit(".", 1)[0] + ".99")
    from_home = policy.decide("carol", ask(address=inside), SRC)
    assert isinstance(from_home, Decision) and from_home.address == inside
    assert policy.decide("carol", ask(address=ELSEWHERE), SRC) is Reason.ADDRESS_NOT_ALLOWED
    assert policy.decide("carol", ask(address=SRC), ELSEWHERE) is Reason.SOURCE_NOT_ALLOWED


def test_the_cheaper_rules_keep_their_reasons() -> None:
    """Revoked, an unknown service and another address say so first; the walk
    over the networks comes last."""
    policy = policy_with("alice", (HOME,))
    revoked = replace(policy, clients={**policy.clients, "alice": replace(
        policy.clients["alice"], revoked=True)})
    assert revoked.decide("alice", ask(), ELSEWHERE) is Reason.REVOKED
    assert policy.decide("alice", ask("smtp"), ELSEWHERE) is Reason.SERVICE_NOT_ALLOWED
    assert policy.decide("alice", ask(address=SRC), ELSEWHERE) is Reason.ADDRESS_NOT_ALLOWED


def test_a_stolen_secret_from_elsewhere_is_refused_and_spends_no_code() -> None:
    """Through the verifier: a knock from outside alice's networks is refused
    `source_not_allowed` even with her current code, and that code still
    works from home (the rule runs before the code is checked)."""
    secret = pyotp.random_base32()
    v = verifier(otp=OtpChecker({"alice": secret}))
    v.policy = policy_with("alice", (HOME,))
    code = pyotp.TOTP(secret).at(NOW)
    alice = Knocker("alice")
    assert v.verify(alice.packet(otp=code), ELSEWHERE, NOW) == Refused(
        Reason.SOURCE_NOT_ALLOWED, "alice")
    assert isinstance(v.verify(alice.packet(otp=code), SRC, NOW), Accepted)


def test_the_value_is_three_ints() -> None:
    assert parse_network(HOME)[1] == SourceNetwork(4, 0xC0000200, 0xFFFFFF00)
