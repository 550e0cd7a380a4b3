"""Packet format v1: the frozen vectors, sizes, and strict body parsing."""

from __future__ import annotations

import ipaddress
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from spa.core.errors import PacketError, Reason
from spa.core.keys import derive_keys
from spa.core.knock import knock_tag
from spa.core.policy import ClientPolicy, Policy
from spa.core.verify import Accepted, Verifier
from spa.core.wire import (
    BODY_SIZE,
    PACKET_SIZE,
    Action,
    Request,
    build_packet,
    decode_body,
    encode_body,
    open_packet,
    seal,
)

ROOT = Path(__file__).resolve().parents[2]
VECTORS: list[dict[str, Any]] = json.loads((ROOT / "tests/vectors/packet_v1.json").read_text())


def request_of(v: dict[str, Any]) -> Request:
    address = None if v["address"] is None else ipaddress.ip_address(v["address"])
    return Request(v["timestamp_ms"], Action[v["action"].upper()], v["service"],
                   v["duration"], address, v["otp"])


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["name"])
def test_frozen_vector_encodes_to_the_exact_bytes(v: dict[str, Any]) -> None:
    secret, server_id = bytes.fromhex(v["master_secret"]), bytes.fromhex(v["server_id"])
    keys = derive_keys(secret, server_id)
    assert keys.tag_key.hex() == v["tag_key"]
    assert keys.cipher_key.hex() == v["cipher_key"]
    assert keys.mac_key.hex() == v["mac_key"]
    assert knock_tag(keys.tag_key, v["step"]).hex() == v["knock_tag"]
    request = request_of(v)
    assert encode_body(request).hex() == v["body"]
    packet = build_packet(request, keys, server_id, nonce=bytes.fromhex(v["nonce"]))
    assert packet.hex() == v["packet"]
    assert open_packet(packet, keys, server_id) == request


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["name"])
def test_frozen_vector_is_accepted_by_a_verifier(v: dict[str, Any]) -> None:
    secret, server_id = bytes.fromhex(v["master_secret"]), bytes.fromhex(v["server_id"])
    policy = Policy(clients={"t": ClientPolicy("t", frozenset({"ssh", "https"}),
                                               allow_other_address=True)})
    now = v["timestamp_ms"] / 1000 + 0.5
    verifier = Verifier(server_id, {"t": secret}, policy, now=now)
    result = verifier.verify(bytes.fromhex(v["packet"]), "203.0.113.9", now)
    assert isinstance(result, Accepted), result
    assert result.request == request_of(v)


def test_protocol_doc_carries_the_first_vector() -> None:
    doc = (ROOT / "docs/protocol.md").read_text()
    flat = "".join(doc.split())
    for field in ("master_secret", "server_id", "nonce", "knock_tag", "packet"):
        assert VECTORS[0][field] in flat, f"docs/protocol.md lacks the vector's {field}"


def test_sizes() -> None:
    assert PACKET_SIZE == 1 + 8 + 24 + BODY_SIZE + 16 + 32 == 161
    assert PACKET_SIZE < 200


LONGEST = Request(2**64 - 1, Action.OPEN, "s" * 32, 2**32 - 1,
                  ipaddress.ip_address("2001:db8::1"), "9" * 10)


@pytest.mark.parametrize(
    "request_",
    [
        Request(0, Action.OPEN, "a"),
        LONGEST,
        Request(1, Action.CLOSE, "ssh", 0, ipaddress.ip_address("192.0.2.1")),
    ],
)
def test_every_request_has_the_same_sealed_length(request_: Request) -> None:
    keys = derive_keys(bytes(32), bytes(16))
    assert len(encode_body(request_)) == BODY_SIZE
    packet = seal(request_, keys, bytes(16), tag=bytes(8), nonce=bytes(24))
    assert len(packet) == PACKET_SIZE
    assert decode_body(encode_body(request_)) == request_


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (Request(-1, Action.OPEN, "ssh"), "timestamp"),
        (Request(2**64, Action.OPEN, "ssh"), "timestamp"),
        (Request(0, Action.OPEN, "ssh", -1), "duration"),
        (Request(0, Action.OPEN, "ssh", 2**32), "duration"),
        (Request(0, Action.CLOSE, "ssh", 5), "close"),
        (Request(0, Action.OPEN, "SSH"), "service"),
        (Request(0, Action.OPEN, ""), "service"),
        (Request(0, Action.OPEN, "s" * 33), "service"),
        (Request(0, Action.OPEN, "-ssh"), "service"),
        (Request(0, Action.OPEN, "ssh", otp="12345"), "one-time"),
        (Request(0, Action.OPEN, "ssh", otp="12345a"), "one-time"),
        (Request(0, Action.OPEN, "ssh", address=ipaddress.ip_address("0.0.0.0")), "cannot"),
        (Request(0, Action.OPEN, "ssh", address=ipaddress.ip_address("ff02::1")), "cannot"),
        (Request(0, Action.OPEN, "ssh", address=ipaddress.ip_address("::ffff:1.2.3.4")), "mapped"),
    ],
)
def test_encode_refuses_what_cannot_be_sent(request_: Request, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_body(request_)


def test_seal_refuses_wrong_sizes() -> None:
    keys = derive_keys(bytes(32), bytes(16))
    with pytest.raises(ValueError, match="size"):
        seal(Request(0, Action.OPEN, "ssh"), keys, bytes(16), tag=bytes(7), nonce=bytes(24))


def good_body() -> bytearray:
    return bytearray(encode_body(Request(5, Action.OPEN, "ssh", 10)))


def mutate(offset: int, value: int) -> bytes:
    body = good_body()
    body[offset] = value
    return bytes(body)


# Body layout: 0 ts(8) | 8 action | 9 duration(4) | 13 family | 14 len=3 |
# 15 "ssh" | 18 otp len | 19.. padding
@pytest.mark.parametrize(
    ("body", "why"),
    [
        (bytes(BODY_SIZE - 1), "short"),
        (bytes(good_body()) + b"\0", "long"),
        (mutate(8, 0), "action 0"),
        (mutate(8, 3), "action 3"),
        (mutate(13, 5), "address family 5"),
        (mutate(14, 0), "empty service"),
        (mutate(14, 33), "service too long"),
        (mutate(15, ord("S")), "uppercase service"),
        (mutate(15, 0xFF), "non-ASCII service"),
        (mutate(18, 5), "otp too short"),
        (mutate(18, 11), "otp too long"),
        (mutate(BODY_SIZE - 1, 1), "non-zero padding"),
        (mutate(19, 1), "byte right after the fields"),
    ],
)
def test_decode_refuses_non_canonical_bodies(body: bytes, why: str) -> None:
    with pytest.raises(PacketError) as info:
        decode_body(body)
    assert info.value.reason is Reason.MALFORMED, why


def test_decode_refuses_close_with_duration_and_bad_addresses() -> None:
    body = bytearray(encode_body(Request(5, Action.CLOSE, "ssh")))
    struct.pack_into(">I", body, 9, 7)
    with pytest.raises(PacketError):
        decode_body(bytes(body))
    for address in ("0.0.0.0", "224.0.0.1"):
        raw = bytearray(encode_body(Request(5, Action.OPEN, "ssh", 1,
                                            ipaddress.ip_address("192.0.2.1"))))
        raw[14:18] = ipaddress.ip_address(address).packed
        with pytest.raises(PacketError):
            decode_body(bytes(raw))


def test_decode_refuses_otp_with_letters() -> None:
    body = bytearray(encode_body(Request(5, Action.OPEN, "ssh", otp="123456")))
    body[19] = ord("x")
    with pytest.raises(PacketError) as info:
        decode_body(bytes(body))
    assert info.value.reason is Reason.MALFORMED
