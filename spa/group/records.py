"""A group's records beside its clients': meta, leases, claims, revocations,
activations, members; and the TTLs their etcd leases get.

Invariants (docs/groups.md, "Records"):
- Each record is a frozen value checked when it is made, so what `encode_*`
  writes `decode_*` reads back equal, and anything else raises RecordError
  (spa.group.codec's framing).  The client record is spa.group.clients'.
- A key that lives for a time (a lease, a claim) is written with an etcd
  lease of `ttl` seconds: whole seconds, rounded up, at least 1, so the key
  is never gone before the moment it stands for.  Time is an argument.
- Pure: no clock, no etcd library.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from spa.core.keys import SERVER_ID_SIZE
from spa.core.wire import PROTOCOLS, IPAddress
from spa.group import codec
from spa.group.codec import RecordError
from spa.group.layout import (
    GroupNameError,
    check_address,
    check_client,
    check_group,
    check_member,
    check_service,
)

MAX_TTL = 9_000_000_000  # seconds: etcd's longest lease (MaxLeaseTTL); a longer one is refused
# how far a member's clock may run behind the claiming member's: a claim lasts
# this much past the end of the window, so a member that is late by up to it still
# finds the claim while it would accept the packet (members keep time with NTP)
MEMBER_SKEW = 5


def _named(check: Callable[[str], object], value: str, name: str) -> None:
    """Run a layout name check, as a RecordError naming the field."""
    try:
        check(value)
    except GroupNameError:
        raise RecordError(f"{name}: not a valid name") from None


# ---- TTLs ------------------------------------------------------------------

def lease_ttl(until: float, now: float) -> int:
    """Seconds of etcd lease for a key that must live until `until`: rounded
    up, at least 1 (etcd takes whole seconds; an end already past still
    gets 1).  Raises ValueError for a time that is not finite, or a TTL past
    MAX_TTL."""
    if not (math.isfinite(until) and math.isfinite(now)):
        raise ValueError("a TTL needs finite times")
    ttl = max(1, math.ceil(until - now))
    if ttl > MAX_TTL:
        raise ValueError(f"a TTL is at most {MAX_TTL} seconds (etcd's longest lease)")
    return ttl


def claim_until(sent: float, window: float, skew: float = MEMBER_SKEW) -> float:
    """Until when a claim on a packet sent at `sent` (its authenticated
    timestamp, seconds) must hold: a member accepts the packet while its clock
    reads at most `sent + window` (spa.core.verify), and a member whose clock
    is up to `skew` behind the claimer's reaches that moment `skew` later."""
    if not (window > 0 and skew >= 0):
        raise ValueError("a claim needs a positive window and a skew of 0 or more")
    return sent + window + skew


def claim_ttl(sent: float, now: float, window: float, skew: float = MEMBER_SKEW) -> int:
    """The etcd lease, in seconds, of a claim made at `now` on a packet sent at
    `sent`: at most 2 * window + skew + 1, since the claimer accepted it
    (`now >= sent - window`).  Raises ValueError (see lease_ttl, claim_until)."""
    return lease_ttl(claim_until(sent, window, skew), now)


# ---- the group -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GroupMeta:
    """The group: its name, the server id its members share, when it began."""

    group: str
    server_id: bytes = field(repr=False)
    created: int  # Unix seconds

    def __post_init__(self) -> None:
        _named(check_group, self.group, "group")
        if not isinstance(self.server_id, bytes) or len(self.server_id) != SERVER_ID_SIZE:
            raise RecordError(f"server_id: not {SERVER_ID_SIZE} bytes")
        codec.seconds({"created": self.created}, "created")


_META_FIELDS = frozenset({"group", "server_id", "created"})


def encode_meta(meta: GroupMeta) -> bytes:
    return codec.encode({"group": meta.group, "server_id": codec.b64(meta.server_id),
                         "created": meta.created}, "meta")


def decode_meta(data: bytes) -> GroupMeta:
    """Raises RecordError."""
    record = codec.decode(data, "meta", _META_FIELDS)
    value = GroupMeta(codec.text(record, "group", 32),
                      codec.key_bytes(record, "server_id", SERVER_ID_SIZE),
                      codec.seconds(record, "created"))
    codec.canonical(data, encode_meta(value), "meta")
    return value


@dataclass(frozen=True, slots=True)
class Member:
    """A server of the group, as it announces itself."""

    member: str
    started: float  # Unix seconds

    def __post_init__(self) -> None:
        _named(check_member, self.member, "member")
        codec.check_instant(self.started, "started")


_MEMBER_FIELDS = frozenset({"member", "started"})


def encode_member(member: Member) -> bytes:
    return codec.encode({"member": member.member, "started": float(member.started)}, "member")


def decode_member(data: bytes) -> Member:
    """Raises RecordError."""
    record = codec.decode(data, "member", _MEMBER_FIELDS)
    value = Member(codec.text(record, "member", 64), codec.instant(record, "started"))
    codec.canonical(data, encode_member(value), "member")
    return value


# ---- leases and claims -----------------------------------------------------

@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """A live lease of the group: what a member opened, for whom, until when."""

    client: str
    address: IPAddress
    service: str
    protocol: str  # tcp or udp
    port: int
    until: float  # Unix seconds: the lease ends
    member: str  # the member that granted it (the one that claimed the nonce)

    def __post_init__(self) -> None:
        _named(check_client, self.client, "client")
        if not isinstance(self.address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise RecordError("address: not an IP address")
        _named(check_address, str(self.address), "address")
        _named(check_service, self.service, "service")
        if self.protocol not in PROTOCOLS:
            raise RecordError("protocol: not tcp or udp")
        if type(self.port) is not int or not 1 <= self.port <= 65535:
            raise RecordError("port: not 1 to 65535")
        codec.check_instant(self.until, "until")
        _named(check_member, self.member, "member")

    def ttl(self, now: float) -> int:
        """The etcd lease its key gets when written at `now`."""
        return lease_ttl(self.until, now)


_LEASE_FIELDS = frozenset({"client", "address", "service", "protocol", "port", "until",
                           "member"})


def encode_lease(lease: LeaseRecord) -> bytes:
    return codec.encode({"client": lease.client, "address": str(lease.address),
                         "service": lease.service, "protocol": lease.protocol,
                         "port": lease.port, "until": float(lease.until),
                         "member": lease.member}, "lease")


def decode_lease(data: bytes) -> LeaseRecord:
    """Raises RecordError."""
    record = codec.decode(data, "lease", _LEASE_FIELDS)
    try:
        address = check_address(codec.text(record, "address", 64))
    except GroupNameError:
        raise RecordError("address: not an IP address in its canonical form") from None
    value = LeaseRecord(codec.text(record, "client", 64), address,
                        codec.text(record, "service", 32), codec.text(record, "protocol", 3),
                        record["port"], codec.instant(record, "until"),
                        codec.text(record, "member", 64))
    codec.canonical(data, encode_lease(value), "lease")
    return value


@dataclass(frozen=True, slots=True)
class Claim:
    """What a claim key holds: which member took the nonce, and when.  (The
    key itself, spa.group.layout.claim_key, is what makes the claim.)"""

    member: str
    at: float  # Unix seconds, the claimer's clock

    def __post_init__(self) -> None:
        _named(check_member, self.member, "member")
        codec.check_instant(self.at, "at")


_CLAIM_FIELDS = frozenset({"member", "at"})


def encode_claim(claim: Claim) -> bytes:
    return codec.encode({"member": claim.member, "at": float(claim.at)}, "claim")


def decode_claim(data: bytes) -> Claim:
    """Raises RecordError."""
    record = codec.decode(data, "claim", _CLAIM_FIELDS)
    value = Claim(codec.text(record, "member", 64), codec.instant(record, "at"))
    codec.canonical(data, encode_claim(value), "claim")
    return value


# ---- client states ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Revocation:
    """A client is revoked (from `at`); `close`: its live leases end at once."""

    client: str
    at: int  # Unix seconds
    close: bool = False

    def __post_init__(self) -> None:
        _named(check_client, self.client, "client")
        codec.seconds({"at": self.at}, "at")
        if not isinstance(self.close, bool):
            raise RecordError("close: not true or false")


_REVOCATION_FIELDS = frozenset({"client", "at", "close"})


def encode_revocation(revocation: Revocation) -> bytes:
    return codec.encode({"client": revocation.client, "at": revocation.at,
                         "close": revocation.close}, "revocation")


def decode_revocation(data: bytes) -> Revocation:
    """Raises RecordError."""
    record = codec.decode(data, "revocation", _REVOCATION_FIELDS)
    value = Revocation(codec.text(record, "client", 64), codec.seconds(record, "at"),
                       codec.flag(record, "close"))
    codec.canonical(data, encode_revocation(value), "revocation")
    return value


@dataclass(frozen=True, slots=True)
class Activation:
    """A pending client knocked in time: the enroll_by it met (Unix seconds).
    As the state directory's activated.json, shared by the group's members."""

    client: str
    enroll_by: int

    def __post_init__(self) -> None:
        _named(check_client, self.client, "client")
        codec.seconds({"enroll_by": self.enroll_by}, "enroll_by")


_ACTIVATION_FIELDS = frozenset({"client", "enroll_by"})


def encode_activation(activation: Activation) -> bytes:
    return codec.encode({"client": activation.client, "enroll_by": activation.enroll_by},
                        "activation")


def decode_activation(data: bytes) -> Activation:
    """Raises RecordError."""
    record = codec.decode(data, "activation", _ACTIVATION_FIELDS)
    value = Activation(codec.text(record, "client", 64), codec.seconds(record, "enroll_by"))
    codec.canonical(data, encode_activation(value), "activation")
    return value
