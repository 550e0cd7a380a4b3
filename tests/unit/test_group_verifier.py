"""A verifier fed a group's record (derived keys) judges every packet as one
fed the master secret does (docs/groups.md, "Members")."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from spa.core.keys import derive_keys
from spa.core.otp import OtpChecker
from spa.core.policy import DEFAULT_SERVICES, Policy
from spa.core.verify import Accepted, Refused, Verifier
from spa.core.wire import Action, Request, build_packet
from spa.group.clients import decode_client

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
GROUP = json.loads((VECTORS / "group_v1.json").read_text())
PACKETS = json.loads((VECTORS / "packet_v1.json").read_text())
SERVER_ID = bytes.fromhex(GROUP["server_id"])
SECRET = bytes.fromhex(GROUP["client"]["secret"])
OLD_SECRET = bytes.fromhex(GROUP["client"]["old_secret"])
RECORD = decode_client(GROUP["client"]["record"].encode("ascii"), SERVER_ID)


def _pair(now: float, *, own_rules: bool) -> tuple[Verifier, Verifier]:
    """(fed the master secrets, fed the record's keys), with the same rules:
    the record's own (pending, a code), or the record's made to accept
    (activated, no code) so that packets get past policy."""
    policy = Policy(dict(DEFAULT_SERVICES), {RECORD.name: RECORD.policy()},
                    frozenset() if own_rules else frozenset({RECORD.name}))
    otp = {RECORD.name: RECORD.otp_secret} if own_rules else {}
    secrets = {RECORD.name: SECRET}
    if RECORD.old_until is not None and now < RECORD.old_until:
        secrets[RECORD.name + "~old"] = OLD_SECRET
    by_secret = Verifier(SERVER_ID, secrets, policy, now=now, otp=OtpChecker(otp))
    by_keys = Verifier(SERVER_ID, {}, policy, now=now, otp=OtpChecker(otp))
    for name, keys in RECORD.key_sets(now).items():
        by_keys.add_client_keys(name, keys)
    return by_secret, by_keys


def _same(a: Accepted | Refused, b: Accepted | Refused) -> bool:
    if isinstance(a, Refused) or isinstance(b, Refused):
        return a == b
    return (a.client, a.request, a.decision, a.source) == (b.client, b.request, b.decision,
                                                           b.source)


SOURCES = ("203.0.113.5", "2001:db8::42", "198.51.100.7", "192.0.2.1")


def _packets(case: dict[str, object]) -> list[bytes]:
    """The vector's packet, and copies with one byte changed (header, tag,
    nonce, body, MAC)."""
    packet = bytes.fromhex(str(case["packet"]))
    mutated = []
    for at in (0, 1, 5, 9, 20, 40, len(packet) - 1):
        changed = bytearray(packet)
        changed[at] ^= 0x01
        mutated.append(bytes(changed))
    return [packet, *mutated]


def test_a_verifier_fed_a_group_record_judges_packets_as_the_master_secret_does() -> None:
    accepted = refused = 0
    for case in PACKETS:
        assert case["server_id"] == GROUP["server_id"]
        now = int(str(case["timestamp_ms"])) / 1000 + 1
        for own_rules in (True, False):
            for source in SOURCES:
                by_secret, by_keys = _pair(now, own_rules=own_rules)
                for packet in _packets(case):
                    a = by_secret.verify(packet, source, now)
                    b = by_keys.verify(packet, source, now)
                    assert _same(a, b), (case["name"], source, own_rules, a, b)
                    accepted += isinstance(b, Accepted)
                    refused += isinstance(b, Refused)
    assert accepted >= 2 and refused > accepted  # both kinds of answer were compared


def test_a_group_verifier_takes_the_old_keys_while_the_grace_lasts_and_no_other() -> None:
    assert RECORD.old_until is not None
    now = RECORD.old_until - 100.0
    request = Request(int(now * 1000), Action.OPEN, "ssh", 60, None, "")
    old = build_packet(request, derive_keys(OLD_SECRET, SERVER_ID), SERVER_ID,
                       nonce=bytes(range(24)))
    other = build_packet(request, derive_keys(bytes(32), SERVER_ID), SERVER_ID,
                         nonce=bytes(range(1, 25)))
    elsewhere = build_packet(request, derive_keys(SECRET, bytes(16)), bytes(16),
                             nonce=bytes(range(2, 26)))
    by_secret, by_keys = _pair(now, own_rules=False)
    for packet in (old, other, elsewhere):
        a, b = by_secret.verify(packet, "203.0.113.5", now), by_keys.verify(
            packet, "203.0.113.5", now)
        assert _same(a, b)
    assert isinstance(by_keys.verify(old, "203.0.113.9", now), Refused)  # a replay now
    fresh_secret, fresh_keys = _pair(now, own_rules=False)
    result = fresh_keys.verify(old, ipaddress.ip_address("203.0.113.5"), now)
    assert isinstance(result, Accepted) and result.client == RECORD.name
    assert isinstance(fresh_secret.verify(old, "203.0.113.5", now), Accepted)
    for packet in (other, elsewhere):
        refusal = fresh_keys.verify(packet, "203.0.113.5", now)
        assert isinstance(refusal, Refused) and refusal.reason.value == "unknown_tag"


def test_removing_a_group_client_forgets_its_derived_keys() -> None:
    case = PACKETS[0]
    now = int(str(case["timestamp_ms"])) / 1000 + 1
    _, by_keys = _pair(now, own_rules=False)
    by_keys.remove_client(RECORD.name)
    refusal = by_keys.verify(bytes.fromhex(str(case["packet"])), "203.0.113.5", now)
    assert isinstance(refusal, Refused) and refusal.reason.value == "unknown_tag"
