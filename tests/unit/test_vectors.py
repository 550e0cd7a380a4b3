"""The specification's vectors beyond packet_v1.json (issue 15, part 4): the
addresses a knock may name, packets that must be refused (with the reason),
authenticator codes and verdicts, and enrollment URIs valid and refused.
Each file is frozen; its maker (tests/vectors/make_*.py) only says how it
was built."""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import pyotp
import pytest

from spa.core import addresses
from spa.core.addresses import Rule, refusal
from spa.core.errors import FormatError, PacketError, Reason
from spa.core.keys import derive_keys
from spa.core.otp import OtpChecker, provisioning_uri
from spa.core.policy import ClientPolicy, Policy
from spa.core.uri import parse, render
from spa.core.verify import Accepted, Verifier
from spa.core.wire import Action, Request, decode_body, encode_body, open_packet
from spa.group.clients import client_record, decode_client
from spa.group.layout import claim_key
from spa.group.records import GroupMeta, decode_meta, encode_meta
from spa.server.config import ClientEntry

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


ADDRESSES = load("address_v1.json")
REFUSED = load("refused_v1.json")
OTP = load("otp_v1.json")
URIS = load("uri_v1.json")


# -- addresses a knock may name -----------------------------------------------------

def test_the_address_vectors_state_the_tables_of_the_code() -> None:
    assert ADDRESSES["refused_v4"] == [[str(n), r.name.lower()] for n, r in addresses.REFUSED_V4]
    assert ADDRESSES["refused_v6"] == [[str(n), r.name.lower()] for n, r in addresses.REFUSED_V6]
    assert ADDRESSES["allowed_v6"] == [str(n) for n in addresses.ALLOWED_V6]
    rules = {case["rule"] for case in ADDRESSES["cases"]} - {None}
    assert rules == {rule.name.lower() for rule in Rule}, "every rule has a case"


def test_the_protocol_doc_lists_every_prefix_of_the_tables() -> None:
    doc = (ROOT / "docs/protocol.md").read_text()
    section = doc[doc.index("## Addresses a knock may name"):]
    section = section[:section.index("\n## ", 1)]
    prefixes = [n for n, _ in ADDRESSES["refused_v4"] + ADDRESSES["refused_v6"]]
    for prefix in prefixes + ADDRESSES["allowed_v6"]:
        assert f"`{prefix}`" in section, prefix


@pytest.mark.parametrize("case", ADDRESSES["cases"], ids=lambda c: c["address"])
def test_address_vector(case: dict[str, Any]) -> None:
    address = ipaddress.ip_address(case["address"])
    found = refusal(address)
    assert (found is None) == case["allowed"]
    assert (None if found is None else found.name.lower()) == case["rule"]
    request = Request(1, Action.OPEN, "ssh", 0, address)
    if case["allowed"]:
        assert decode_body(encode_body(request)) == request
        return
    with pytest.raises(ValueError, match="cannot be named in a knock"):
        encode_body(request)
    body = bytearray(encode_body(Request(1, Action.OPEN, "ssh", 0,
                                         ipaddress.ip_address("192.0.2.1" if address.version == 4
                                                              else "2001:db8::1"))))
    body[14:14 + len(address.packed)] = address.packed
    with pytest.raises(PacketError) as info:
        decode_body(bytes(body))
    assert info.value.reason is Reason.MALFORMED


# -- packets that must be refused ---------------------------------------------------

@pytest.mark.parametrize("case", REFUSED["cases"], ids=lambda c: c["name"])
def test_refused_packet_vector(case: dict[str, Any]) -> None:
    secret, server_id = bytes.fromhex(REFUSED["master_secret"]), bytes.fromhex(REFUSED["server_id"])
    policy = Policy(clients={REFUSED["client"]: ClientPolicy(REFUSED["client"],
                                                             frozenset(REFUSED["services"]))})
    verifier = Verifier(server_id, {REFUSED["client"]: secret}, policy, now=case["now"],
                        window=REFUSED["window"])
    packet = bytes.fromhex(case["packet"])
    verdict = verifier.verify(packet, case["source"], case["now"])
    if case["reason"] is None:
        assert isinstance(verdict, Accepted), verdict
        return
    assert not isinstance(verdict, Accepted)
    assert verdict.reason.value == case["reason"]
    if case["body"] is not None:
        body = bytes.fromhex(case["body"])
        with pytest.raises(PacketError) as info:
            decode_body(body)
        assert info.value.reason is Reason.MALFORMED
        with pytest.raises(PacketError) as opened:
            open_packet(packet, derive_keys(secret, server_id), server_id)
        assert opened.value.reason is Reason.MALFORMED, "it authenticates and decrypts"


def test_the_refused_vectors_cover_every_reason_before_policy_and_two_of_it() -> None:
    reasons = {case["reason"] for case in REFUSED["cases"]}
    assert {"bad_length", "bad_version", "unknown_tag", "bad_mac", "bad_ciphertext",
            "malformed", "stale", "future", "step_mismatch", "service_not_allowed",
            "address_not_allowed", None} <= reasons


# -- authenticator codes ------------------------------------------------------------

def test_authenticator_code_vectors_are_rfc_6238_with_six_digits() -> None:
    totp = pyotp.TOTP(OTP["secret_base32"])
    assert (totp.digits, totp.interval, totp.digest().name) == (6, 30, "sha1")
    for row in OTP["codes"]:
        assert row["step"] == row["time"] // 30
        assert totp.at(row["time"]) == row["code"]
    assert provisioning_uri(OTP["secret_base32"], "alice") == OTP["provisioning_uri"]


def test_authenticator_verdicts_in_order() -> None:
    checker = OtpChecker({"t": OTP["secret_base32"]})
    for row in OTP["sequence"]:
        refused = checker.check("t", row["code"], row["now"])
        assert ("accepted" if refused is None else refused.value) == row["verdict"], row["why"]


# -- enrollment URIs ----------------------------------------------------------------

@pytest.mark.parametrize("case", URIS["valid"], ids=lambda c: c["why"])
def test_valid_uri_vector(case: dict[str, Any]) -> None:
    e = parse(case["uri"])
    assert (e.host, e.port, e.client, e.otp, e.expires) == (
        case["host"], case["port"], case["client"], case["otp"], case["expires"])
    assert (e.server_id.hex(), e.secret.hex()) == (case["server_id"], case["secret"])
    assert [[s.name, s.protocol, s.port] for s in e.services] == case["services"]
    assert render(e) == case["canonical"]
    assert parse(case["canonical"]) == e


@pytest.mark.parametrize("case", URIS["refused"], ids=lambda c: c["uri"][:70])
def test_refused_uri_vector(case: dict[str, Any]) -> None:
    with pytest.raises(FormatError) as info:
        parse(case["uri"])
    assert case["message"] in str(info.value)
    assert "\n" not in str(info.value)
    key = re.search(r"key=([^&#]+)", case["uri"])
    if key is not None and len(key.group(1)) > 8:
        assert key.group(1)[:12] not in str(info.value), "the secret stays out of the error"


def test_every_refused_uri_part_is_one_the_grammar_names() -> None:
    parts = {case["part"] for case in URIS["refused"]}
    assert parts == {"scheme", "host", "port", "client", "fragment", "parameter", "sid",
                     "key", "svc", "otp", "exp"}


# -- a group's records in etcd (docs/groups.md) -------------------------------------

GROUP = load("group_v1.json")


def _group_entry() -> ClientEntry:
    case, fields = GROUP["client"], GROUP["client"]["entry"]
    return ClientEntry(fields["name"], bytes.fromhex(case["secret"]), tuple(fields["services"]),
                       allow_other_address=fields["allow_other_address"],
                       enrolled=fields["enrolled"], enroll_by=fields["enroll_by"],
                       otp_secret=fields["otp_secret"], endpoint=fields["endpoint"],
                       old_secret=bytes.fromhex(case["old_secret"]),
                       old_until=fields["old_until"], sources=tuple(fields["sources"]))


def test_group_client_record_vector() -> None:
    """The record's exact bytes, the keys it holds, and neither secret in it."""
    case, server_id = GROUP["client"], bytes.fromhex(GROUP["server_id"])
    record = client_record(_group_entry(), server_id)
    assert record == case["record"].encode("ascii")
    client = decode_client(record, server_id)
    for keys, want in ((client.keys, case["keys"]), (client.old_keys, case["old_keys"])):
        assert keys is not None
        assert (keys.tag_key.hex(), keys.cipher_key.hex(), keys.mac_key.hex()) == (
            want["tag"], want["cipher"], want["mac"])
    for secret in (case["secret"], case["old_secret"]):
        raw = bytes.fromhex(secret)
        for spelling in (secret, base64.b64encode(raw).decode(),
                         base64.urlsafe_b64encode(raw).decode().rstrip("=")):
            assert spelling not in case["record"]


def test_a_member_opens_the_packet_vector_with_the_record_alone() -> None:
    """packet_v1.json's first packet is alice's at the same server id: the keys
    of the group's record open it, without the master secret."""
    packet_case = json.loads((VECTORS / "packet_v1.json").read_text())[0]
    server_id = bytes.fromhex(GROUP["server_id"])
    assert packet_case["server_id"] == GROUP["server_id"]
    assert packet_case["master_secret"] == GROUP["client"]["secret"]
    client = decode_client(GROUP["client"]["record"].encode("ascii"), server_id)
    assert client.keys.tag_key.hex() == packet_case["tag_key"]
    request = open_packet(bytes.fromhex(packet_case["packet"]), client.keys, server_id)
    assert request.service == packet_case["service"]
    assert request.timestamp_ms == packet_case["timestamp_ms"]


def test_group_claim_and_meta_vectors() -> None:
    claim = GROUP["claim"]
    assert claim_key(claim["group"], claim["client"], bytes.fromhex(claim["nonce"])) == (
        claim["key"])
    meta = GROUP["meta"]
    record = GroupMeta(meta["group"], bytes.fromhex(GROUP["server_id"]), meta["created"])
    assert encode_meta(record) == meta["record"].encode("ascii")
    assert decode_meta(meta["record"].encode("ascii")) == record
