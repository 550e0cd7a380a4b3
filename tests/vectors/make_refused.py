"""Make tests/vectors/refused_v1.json: packets a server must refuse, each with
its reason (and two it must accept, for contrast).  Frozen once made: the
file is the contract, and tests/unit/test_vectors.py checks every case
against the verifier; this script says how each was built.

    .venv/bin/python -m tests.vectors.make_refused > tests/vectors/refused_v1.json

The keys are packet_v1.json's; each case has its own nonce.  A body case
seals an 80-byte plaintext no request encodes to (wire.seal_body), so the
packet authenticates and decrypts, and the strict parse refuses it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import struct
import sys
from typing import Any

from spa.core.keys import derive_keys
from spa.core.knock import knock_tag, step_of_ms
from spa.core.wire import (
    BODY_SIZE,
    CIPHERTEXT_OFFSET,
    MAC_OFFSET,
    Action,
    Request,
    build_packet,
    seal_body,
)

SECRET = bytes.fromhex("202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f")
SERVER_ID = bytes.fromhex("5350412d746573742d7365727665722e")
KEYS = derive_keys(SECRET, SERVER_ID)
TS = 1_800_000_000_123  # ms: step 60000000
NOW = 1_800_000_000.5
SOURCE = "203.0.113.9"


def nonce(index: int) -> bytes:
    return bytes(range(0xA0, 0xA0 + 23)) + bytes([index])


def body(*, ts: int = TS, action: int = 1, duration: int = 60, family: int = 0,
         address: bytes = b"", service: bytes = b"ssh", service_len: int | None = None,
         otp: bytes = b"", otp_len: int | None = None, tail: bytes = b"") -> bytes:
    """A plaintext laid out field by field (lengths may lie), zero padded."""
    raw = (struct.pack(">QBIB", ts, action, duration, family) + address
           + bytes([len(service) if service_len is None else service_len]) + service
           + bytes([len(otp) if otp_len is None else otp_len]) + otp + tail)
    return raw + bytes(BODY_SIZE - len(raw))


def sealed(plain: bytes, index: int, ts: int = TS) -> bytes:
    return seal_body(plain, KEYS, SERVER_ID, tag=knock_tag(KEYS.tag_key, step_of_ms(ts)),
                     nonce=nonce(index))


def address_body(text: str) -> bytes:
    address = ipaddress.ip_address(text)
    return body(family=address.version, address=address.packed)


BODIES: list[tuple[str, bytes]] = [
    ("action 0", body(action=0)),
    ("action 3", body(action=3)),
    ("a close with a duration", body(action=2, duration=7)),
    ("address family 5", body(family=5)),
    ("service length 0", body(service=b"", service_len=0)),
    ("service length 33", body(service=b"s" * 33)),
    ("service in upper case", body(service=b"SSH")),
    ("service starting with '-'", body(service=b"-ssh")),
    ("service with a space", body(service=b"ss h")),
    ("service with a non-ASCII byte", body(service=b"ss\xff")),
    ("service length 4 over 'ssh' and a zero byte", body(service=b"ssh\x00")),
    ("otp length 5", body(otp=b"12345")),
    ("otp length 11", body(otp=b"12345678901")),
    ("otp with a letter", body(otp=b"12345a")),
    ("otp with a space", body(otp=b"123 56")),
    ("a byte right after the fields", body(tail=b"\x01")),
    ("the last padding byte not zero", body()[:-1] + b"\x01"),
    *[(f"address {a} ({why})", address_body(a)) for a, why in (
        ("0.0.0.0", "this_network"), ("0.1.2.3", "this_network"), ("127.0.0.1", "loopback"),
        ("224.0.0.1", "multicast"), ("255.255.255.255", "reserved"), ("::", "unspecified"),
        ("::1", "loopback"), ("::ffff:c000:201", "ipv4_mapped"),
        ("::c000:201", "ipv4_compatible"), ("ff02::1", "multicast"),
        ("4000::1", "not_unicast_v6"), ("100::1", "not_unicast_v6"),
        ("64:ff9b::7f00:1", "nat64_of_refused"))],
]


def case(name: str, packet: bytes, reason: str | None, *, plain: bytes | None = None,
         now: float = NOW, source: str = SOURCE) -> dict[str, Any]:
    return {"name": name, "now": now, "source": source, "reason": reason,
            "body": None if plain is None else plain.hex(), "packet": packet.hex()}


def remac(packet: bytearray) -> bytes:
    return bytes(packet[:MAC_OFFSET]) + hmac.digest(KEYS.mac_key, bytes(packet[:MAC_OFFSET]),
                                                    "sha256")


def cases() -> list[dict[str, Any]]:
    found = [case(f"malformed: {name}", sealed(plain, i), "malformed", plain=plain)
             for i, (name, plain) in enumerate(BODIES)]
    n = len(found)
    good = build_packet(Request(TS, Action.OPEN, "ssh", 60), KEYS, SERVER_ID, nonce=nonce(n))
    flipped = bytearray(good)
    flipped[CIPHERTEXT_OFFSET] ^= 1
    version = bytearray(good)
    version[0] = 2
    mac = bytearray(good)
    mac[-1] ^= 1
    nat64 = "64:ff9b::c000:207"
    found += [
        case("accepted: open ssh from the source (control)", good, None),
        case("accepted: open ssh naming its own NAT64 source", build_packet(
            Request(TS, Action.OPEN, "ssh", 60, ipaddress.ip_address(nat64)), KEYS, SERVER_ID,
            nonce=nonce(n + 1)), None, source=nat64),
        case("one byte short", good[:-1], "bad_length"),
        case("one byte long", good + b"\x00", "bad_length"),
        case("version 2", bytes(version), "bad_version"),
        case("a tag 4 steps ahead (sealed for 2 minutes later)", build_packet(
            Request(TS + 120_000, Action.OPEN, "ssh"), KEYS, SERVER_ID, nonce=nonce(n + 2)),
            "unknown_tag"),
        case("the MAC's last bit flipped", bytes(mac), "bad_mac"),
        case("a ciphertext bit flipped, MAC made again", remac(flipped), "bad_ciphertext"),
        case("30.5 s old, its step still live", build_packet(
            Request(1_799_999_999_400, Action.OPEN, "ssh"), KEYS, SERVER_ID,
            nonce=nonce(n + 3)), "stale", now=1_800_000_029.9),
        case("30.6 s ahead, its step live", build_packet(
            Request(1_800_000_030_700, Action.OPEN, "ssh"), KEYS, SERVER_ID,
            nonce=nonce(n + 4)), "future", now=1_800_000_000.1),
        case("the tag of the step before its timestamp's", sealed(body(), n + 5, ts=TS - 30_000),
             "step_mismatch"),
        case("open https, a service the client may not open", build_packet(
            Request(TS, Action.OPEN, "https"), KEYS, SERVER_ID, nonce=nonce(n + 6)),
            "service_not_allowed"),
        case("naming an address other than the source", build_packet(
            Request(TS, Action.OPEN, "ssh", 0, ipaddress.ip_address("192.0.2.7")), KEYS,
            SERVER_ID, nonce=nonce(n + 7)), "address_not_allowed"),
    ]
    return found


def main() -> None:
    doc = {
        "comment": "Packets the server must refuse, with the reason (docs/protocol.md, "
                   "'Verification order'), and two it must accept.  Verifier: server_id, one "
                   "client 't' with master_secret, allowed service ssh only (services ssh "
                   "tcp/22 and https tcp/443 exist), no allow_other_address, no authenticator, "
                   "window 30 s; judge each case alone (a fresh verifier) at its 'now' (Unix "
                   "seconds) from its 'source'.  'body' is the plaintext sealed in 'packet' "
                   "where the strict parse is what refuses it.  Made by "
                   "tests/vectors/make_refused.py.",
        "master_secret": SECRET.hex(), "server_id": SERVER_ID.hex(), "client": "t",
        "services": ["ssh"], "window": 30,
        "cases": cases(),
    }
    lines = json.dumps(doc, indent=1).splitlines()
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
