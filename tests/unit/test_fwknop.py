"""fwknop's packets: the real client's vectors, the format, the verifier's order."""

from __future__ import annotations

import ipaddress

import pytest

from spa.core.errors import PacketError, Reason
from spa.core.fwknop import (
    FwknopKeys,
    Message,
    check_shape,
    decode,
    decrypt,
    derive,
    split,
)
from spa.core.fwknop_verify import CompatAccepted, CompatVerifier, HmacBudget
from spa.core.policy import ClientPolicy, Policy, Service
from spa.core.verify import Refused
from tests.fwknop_world import (
    CLIENTS,
    KEYS,
    NOW,
    OTHER_KEYS,
    POLICY,
    SOURCE,
    VECTORS,
    compat,
    packet,
    vector,
)

EXPECTED_CLIENT = {"accepted": "oldphone", "unknown_sender": None, "legacy_iv": "shortkey"}


@pytest.mark.parametrize("item", VECTORS["vectors"], ids=lambda v: v["name"])
def test_real_client_vectors_get_their_verdict(item: dict[str, object]) -> None:
    """Packets Debian's fwknop client made (`fwknop --test`, the command in
    tests/vectors/fwknop.json) are accepted or refused with their reason."""
    packet_bytes = str(item["packet"]).encode()
    result = compat().verify(packet_bytes, SOURCE, float(item["made_at"]))  # type: ignore[arg-type]
    expect = str(item["expect"])
    client = EXPECTED_CLIENT.get(expect, "oldphone")
    if expect == "accepted":
        assert type(result) is CompatAccepted, result
        assert result.client == client
    else:
        assert result == Refused(Reason(expect), client)


def test_real_client_vector_decodes_field_by_field() -> None:
    item = vector("client_timeout")
    signed, _ = split(item["packet"].encode())
    data = decode(decrypt(signed, KEYS.rijndael))
    assert data.message_type is Message.CLIENT_TIMEOUT_ACCESS
    assert data.client_timeout == 120
    assert data.allow_ip == SOURCE
    assert data.ports == (("tcp", 22),)
    assert data.timestamp == item["timestamp"]
    assert data.username == "vector"


def test_real_client_vectors_open_what_they_ask() -> None:
    verifier = compat()
    two = vector("two_ports")
    result = verifier.verify(two["packet"].encode(), SOURCE, two["made_at"])
    assert type(result) is CompatAccepted
    assert [d.service.name for d in result.decisions] == ["ssh", "https"]
    timed = vector("client_timeout")
    result = verifier.verify(timed["packet"].encode(), SOURCE, timed["made_at"])
    assert type(result) is CompatAccepted
    assert result.decisions[0].duration == 120  # within ssh's maximum (300)
    anywhere = vector("source_ip")
    result = verifier.verify(anywhere["packet"].encode(), SOURCE, anywhere["made_at"])
    assert type(result) is CompatAccepted
    assert result.decisions[0].address == SOURCE  # -s: 0.0.0.0, the packet's source


def test_key_derivation_is_openssl_evp_bytes_to_key_md5() -> None:
    """`openssl enc -aes-256-cbc -md md5 -S 0102030405060708 -k password -P`
    (OpenSSL 3.0) prints this key and IV."""
    key, iv = derive(b"password", bytes.fromhex("0102030405060708"))
    assert key.hex().upper() == "E7B0971E52CA5CC8D0539FB3412F6316F7BA2E6EE293D9F3457B99436B51CE02"
    assert iv.hex().upper() == "8D450E2ED75A84A923D4EAC9FE49226B"


def test_verification_order_refuses_cheapest_first() -> None:
    verifier = compat()
    assert verifier.verify(b"A" * 139, SOURCE, NOW) == Refused(Reason.BAD_LENGTH)
    assert verifier.verify(b"A" * 200 + b"!", SOURCE, NOW) == Refused(Reason.MALFORMED)
    assert verifier.verify(b"A" * 450, SOURCE, NOW) == Refused(Reason.GPG_MODE)
    assert verifier.verify(b"A" * 200, SOURCE, NOW) == Refused(Reason.UNKNOWN_SENDER)


def test_a_packet_is_accepted_once() -> None:
    verifier = compat()
    knock = packet()
    assert type(verifier.verify(knock, SOURCE, NOW)) is CompatAccepted
    assert verifier.verify(knock, SOURCE, NOW + 1) == Refused(Reason.REPLAY, "oldphone")


def test_a_replay_costs_no_hmac() -> None:
    budget = HmacBudget(max_hmacs=3, per_source=100)  # 3 clients: one packet's worth
    verifier = CompatVerifier(CLIENTS, POLICY, budget=budget)
    knock = packet()
    assert type(verifier.verify(knock, SOURCE, NOW)) is CompatAccepted
    assert verifier.verify(knock, SOURCE, NOW) == Refused(Reason.REPLAY, "oldphone")


def test_time_window_both_ways() -> None:
    verifier = compat()
    assert verifier.verify(packet(now=NOW - 31), SOURCE, NOW) == Refused(Reason.STALE, "oldphone")
    assert verifier.verify(packet(now=NOW + 31), SOURCE, NOW) == Refused(Reason.FUTURE, "oldphone")


def test_the_grant_goes_to_the_source_unless_allowed_otherwise() -> None:
    verifier = compat()
    elsewhere = packet(allow="203.0.113.9")
    assert verifier.verify(elsewhere, SOURCE, NOW) == Refused(Reason.ADDRESS_NOT_ALLOWED,
                                                              "oldphone")
    result = verifier.verify(packet(OTHER_KEYS, allow="203.0.113.9"), SOURCE, NOW)
    assert type(result) is CompatAccepted
    assert result.decisions[0].address == ipaddress.IPv4Address("203.0.113.9")


def test_ports_map_onto_services_by_protocol_and_port() -> None:
    verifier = compat()
    assert verifier.verify(packet(ports=(("udp", 22),)), SOURCE, NOW) == Refused(
        Reason.SERVICE_NOT_ALLOWED, "oldphone")
    assert verifier.verify(packet(OTHER_KEYS, ports=(("tcp", 443),)), SOURCE, NOW) == Refused(
        Reason.SERVICE_NOT_ALLOWED, "other")
    result = verifier.verify(packet(ports=(("tcp", 443),)), SOURCE, NOW)
    assert type(result) is CompatAccepted
    assert result.decisions[0].service.name == "https"


def test_command_and_nat_messages_are_refused_after_authentication() -> None:
    """A NAT message naming no gateway service (POLICY has none), a local NAT
    message and a command are refused with their reasons; a NAT message
    without its destination field is malformed, as fwknop's decoder says."""
    verifier = compat()
    assert verifier.verify(packet(kind=Message.NAT_ACCESS, nat=("10.0.0.2", 22)), SOURCE,
                           NOW) == Refused(Reason.NAT_MESSAGE, "oldphone")
    assert verifier.verify(packet(kind=Message.LOCAL_NAT_ACCESS, nat=("192.0.2.1", 22)),
                           SOURCE, NOW) == Refused(Reason.NAT_MESSAGE, "oldphone")
    assert verifier.verify(packet(kind=Message.COMMAND), SOURCE, NOW) == Refused(
        Reason.COMMAND_MESSAGE, "oldphone")
    assert verifier.verify(packet(kind=Message.NAT_ACCESS), SOURCE, NOW) == Refused(
        Reason.MALFORMED, "oldphone")


def test_the_real_clients_nat_message_decodes_to_its_destination() -> None:
    """`fwknop -A tcp/22 -N 10.0.0.2:22` (the vector Debian's client made):
    the access port and the destination, as fwknopd reads them."""
    item = vector("nat")
    text, _ = split(str(item["packet"]).encode())
    data = decode(decrypt(text, KEYS.rijndael))
    assert data.message_type is Message.NAT_ACCESS
    assert (data.ports, data.nat) == ((("tcp", 22),), ("10.0.0.2", 22))


DB = ipaddress.IPv4Address("10.20.0.5")
GATEWAYS = {**POLICY.services,
            "db": Service("db", "tcp", 22, 30, 60, DB, 2222),
            "db-routed": Service("db-routed", "tcp", 22, 30, 60,
                                 ipaddress.IPv4Address("10.20.0.6")),
            "not-yours": Service("not-yours", "tcp", 22, 30, 60,
                                 ipaddress.IPv4Address("10.20.0.7"), 2223)}
NAT_POLICY = Policy(GATEWAYS, {
    "oldphone": ClientPolicy("oldphone", frozenset({"ssh", "db", "db-routed"})),
    "other": ClientPolicy("other", frozenset({"ssh"}))})


@pytest.mark.parametrize(("ports", "nat", "expect"), [
    ((("tcp", 2222),), ("10.20.0.5", 22), "db"),  # fwknop -A tcp/22 -N 10.20.0.5:22 --nat-port 2222
    ((("tcp", 22),), ("10.20.0.6", 22), "db-routed"),  # no published port: its own port
    ((("tcp", 22),), ("10.20.0.5", 22), Reason.NAT_MESSAGE),  # not db's published port
    ((("tcp", 2222),), ("10.20.0.9", 22), Reason.NAT_MESSAGE),  # a destination no service names
    ((("tcp", 2222),), ("10.20.0.5", 23), Reason.NAT_MESSAGE),
    ((("udp", 2222),), ("10.20.0.5", 22), Reason.NAT_MESSAGE),
    ((("tcp", 2222),), ("db.internal", 22), Reason.NAT_MESSAGE),  # names are never resolved
    ((("tcp", 2222),), ("010.20.0.5", 22), Reason.NAT_MESSAGE),
    ((("tcp", 2222), ("tcp", 22)), ("10.20.0.5", 22), Reason.NAT_MESSAGE),  # one port only
    ((("tcp", 2223),), ("10.20.0.7", 22), Reason.SERVICE_NOT_ALLOWED),  # not this client's
])
def test_a_nat_message_opens_exactly_the_gateway_service_it_names(
        ports: tuple[tuple[str, int], ...], nat: tuple[str, int], expect: str | Reason) -> None:
    verifier = CompatVerifier({"oldphone": KEYS, "other": OTHER_KEYS}, NAT_POLICY,
                              budget=HmacBudget(max_hmacs=10**9, per_source=10**9))
    result = verifier.verify(packet(kind=Message.NAT_ACCESS, ports=ports, nat=nat), SOURCE, NOW)
    if isinstance(expect, Reason):
        assert result == Refused(expect, "oldphone")
        return
    assert type(result) is CompatAccepted
    assert [(d.service, d.address, d.duration) for d in result.decisions] == [
        (GATEWAYS[expect], SOURCE, 30)]
    timed = verifier.verify(packet(kind=Message.CLIENT_TIMEOUT_NAT_ACCESS, ports=ports, nat=nat,
                                   timeout=9999), SOURCE, NOW)
    assert type(timed) is CompatAccepted and timed.decisions[0].duration == 60  # capped
    stranger = verifier.verify(packet(OTHER_KEYS, kind=Message.NAT_ACCESS, ports=ports, nat=nat),
                               SOURCE, NOW)
    assert stranger == Refused(Reason.SERVICE_NOT_ALLOWED, "other")


def test_a_plain_knock_opens_the_clients_service_on_that_port_of_this_host() -> None:
    """fwknop -A tcp/2222 opens the gateway service published on 2222 (as
    fwknopd's FORCE_NAT did); tcp/22 opens this host's ssh, not a gateway
    service whose internal port is 22 (before: the last service on tcp/22)."""
    verifier = CompatVerifier({"oldphone": KEYS, "other": OTHER_KEYS}, NAT_POLICY,
                              budget=HmacBudget(max_hmacs=10**9, per_source=10**9))
    published = verifier.verify(packet(ports=(("tcp", 2222),)), SOURCE, NOW)
    assert type(published) is CompatAccepted
    assert published.decisions[0].service.name == "db"
    local = verifier.verify(packet(ports=(("tcp", 22),)), SOURCE, NOW)
    assert type(local) is CompatAccepted and local.decisions[0].service.name == "ssh"
    other = verifier.verify(packet(OTHER_KEYS, ports=(("tcp", 22),)), SOURCE, NOW)
    assert type(other) is CompatAccepted and other.decisions[0].service.name == "ssh"
    assert verifier.verify(packet(OTHER_KEYS, ports=(("tcp", 2222),)), SOURCE, NOW) == Refused(
        Reason.SERVICE_NOT_ALLOWED, "other")


def test_refused_digests_and_hmacs() -> None:
    verifier = compat()
    assert verifier.verify(packet(digest="md5"), SOURCE, NOW) == Refused(Reason.WEAK_DIGEST,
                                                                        "oldphone")
    assert verifier.verify(packet(hmac_name="md5"), SOURCE, NOW) == Refused(Reason.WEAK_HMAC,
                                                                           "oldphone")
    assert verifier.verify(packet(hmac_name=None), SOURCE, NOW) == Refused(Reason.NO_HMAC,
                                                                          "oldphone")


def test_a_loopback_allow_address_is_malformed() -> None:
    verifier = compat()
    result = verifier.verify(packet(OTHER_KEYS, allow="127.0.0.1"), SOURCE, NOW)
    assert result == Refused(Reason.MALFORMED, "other")


def test_a_source_over_its_budget_gets_no_hmac() -> None:
    verifier = CompatVerifier(CLIENTS, POLICY, budget=HmacBudget(per_source=2))
    junk = b"B" * 200
    assert verifier.verify(junk, SOURCE, NOW) == Refused(Reason.UNKNOWN_SENDER)
    assert verifier.verify(junk, SOURCE, NOW) == Refused(Reason.UNKNOWN_SENDER)
    assert verifier.verify(junk, SOURCE, NOW) == Refused(Reason.HMAC_BUDGET)
    assert verifier.verify(junk, "203.0.113.1", NOW) == Refused(Reason.UNKNOWN_SENDER)
    assert verifier.verify(junk, SOURCE, NOW + 1) == Refused(Reason.UNKNOWN_SENDER)


def test_a_flood_from_other_sources_never_locks_out_a_trusted_client() -> None:
    budget = HmacBudget(max_hmacs=30, per_source=100, per_trusted=5)
    verifier = CompatVerifier(CLIENTS, POLICY, budget=budget)
    assert type(verifier.verify(packet(), SOURCE, NOW)) is CompatAccepted  # now trusted
    for i in range(20):  # spoofed sources spend the total (3 HMACs each)
        verifier.verify(b"C" * 200, f"203.0.113.{i}", NOW)
    assert verifier.verify(b"C" * 200, "203.0.113.99", NOW) == Refused(Reason.HMAC_BUDGET)
    assert type(verifier.verify(packet(), SOURCE, NOW)) is CompatAccepted


def test_the_compat_clients_are_capped() -> None:
    from spa.core.fwknop_verify import MAX_CLIENTS

    verifier = compat()
    for i in range(MAX_CLIENTS - len(verifier.clients)):
        verifier.add_client(f"c{i}", OTHER_KEYS)
    with pytest.raises(ValueError, match="at most"):
        verifier.add_client("one-more", OTHER_KEYS)


def test_shape_and_split_raise_packet_error_only() -> None:
    with pytest.raises(PacketError):
        check_shape(b"U2FsdGVkX1" + b"A" * 200)
    with pytest.raises(PacketError):
        split(b"A" * 150 + b"B" * 42 + b"F")  # a non-canonical last character


def test_fwknop_keys_are_checked_and_hidden() -> None:
    with pytest.raises(ValueError, match="Rijndael"):
        FwknopKeys(b"x" * 33, b"y")
    assert "xxxx" not in repr(FwknopKeys(b"x" * 32, b"y" * 64))
