"""Where a group keeps its state in etcd: key names under one prefix per group.

Invariants (docs/groups.md, "Layout"):
- Every key of group G starts with `/spa/groups/G/`, and every prefix this
  module gives ends with '/': a range over one group's (or one client's) keys
  never reaches another's (`g1` is not a prefix of `g10/`, `alice/` not of
  `alice.b/`).
- Every name put into a key is checked first: a group or member name is
  ASCII letters, digits, '.', '_' or '-', alphanumeric first, bounded; a
  client name is the one enrollment accepts (spa.core.uri); a service name
  the one policy accepts; an address is the canonical text of an IP address;
  a nonce is exactly NONCE_SIZE bytes, written in lower-case hex.  None of
  them can hold '/', so no name can climb out of its place or into another
  kind's; a bad name raises GroupNameError naming what is wrong, never a key.
- `parse_key` is the inverse of the key functions: a key this module made
  parses back to its kind and parts, and anything else raises GroupNameError.
- Pure: strings and bytes in, strings out; no etcd library, no clock.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from typing import NamedTuple

from spa.core.uri import is_valid_client_name
from spa.core.wire import NONCE_SIZE, IPAddress, is_valid_service_name

ROOT = "/spa/groups/"  # every group's keys live under this prefix
MAX_GROUP_NAME = 32  # characters of a group name (a prefix in every key of the group)
MAX_MEMBER_NAME = 64  # characters of a member name (a host name fits)
_GROUP_RE = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,{MAX_GROUP_NAME - 1}}}")
_MEMBER_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_MEMBER_NAME - 1}}}")
_NONCE_RE = re.compile(rf"[0-9a-f]{{{2 * NONCE_SIZE}}}")
OTP_STEP_MAX = 10**12 - 1  # 30 s steps: past year 9999, and no more digits than that
_OTP_STEP_RE = re.compile(r"otp-(0|[1-9][0-9]{0,11})")


class GroupNameError(ValueError):
    """A group, member, client or service name, address, nonce or key is not
    acceptable.  The message is one line and quotes at most a short prefix."""


class Kind(enum.Enum):
    """What a key of a group holds (its directory under the group's prefix)."""

    META = "meta"  # the group itself: name, server id, creation time
    CLIENT = "clients"  # clients/<client>: a client's derived keys and rules
    REVOKED = "revoked"  # revoked/<client>: the client is revoked
    ACTIVATED = "activated"  # activated/<client>: its pending enrollment was used in time
    LEASE = "leases"  # leases/<client>/<address>/<service>: a live lease
    CLAIM = "claims"  # claims/<client>/<nonce-hex>: a packet's nonce, taken by one member
    MEMBER = "members"  # members/<member>: a server of the group


class KeyRef(NamedTuple):
    """A parsed key: its kind and the names in it (none for META)."""

    kind: Kind
    parts: tuple[str, ...]


def _shown(text: str) -> str:
    """A name as an error message may quote it (short, one line)."""
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def check_group(name: str) -> str:
    """Return `name` if it is a valid group name: lower-case ASCII letters,
    digits, '_' and '-', 1-32 characters, alphanumeric first.
    Raises GroupNameError."""
    if not isinstance(name, str) or _GROUP_RE.fullmatch(name) is None:
        raise GroupNameError(f"group name {_shown(str(name))}: use a-z, 0-9, '_' and '-', "
                             f"alphanumeric first, at most {MAX_GROUP_NAME} characters")
    return name


def check_member(name: str) -> str:
    """Return `name` if it is a valid member name: ASCII letters, digits, '.',
    '_' and '-', 1-64 characters, alphanumeric first.  Raises GroupNameError."""
    if not isinstance(name, str) or _MEMBER_RE.fullmatch(name) is None:
        raise GroupNameError(f"member name {_shown(str(name))}: use letters, digits, '.', "
                             f"'_' and '-', alphanumeric first, at most {MAX_MEMBER_NAME} "
                             "characters")
    return name


def check_client(name: str) -> str:
    """Return `name` if enrollment would accept it as a client name.
    Raises GroupNameError."""
    if not isinstance(name, str) or not is_valid_client_name(name):
        raise GroupNameError(f"client name {_shown(str(name))}: use letters, digits, '.', "
                             "'_', '@' and '-', alphanumeric first, at most 64 characters")
    return name


def check_service(name: str) -> str:
    """Return `name` if it is a valid service name.  Raises GroupNameError."""
    if not isinstance(name, str) or not is_valid_service_name(name):
        raise GroupNameError(f"service name {_shown(str(name))}: use a-z, 0-9, '_' and '-', "
                             "at most 32 characters")
    return name


def check_address(text: str) -> IPAddress:
    """The address whose canonical text `text` is (no zone, IPv6 in RFC 5952's
    form).  Raises GroupNameError."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise GroupNameError(f"address {_shown(str(text))}: not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise GroupNameError(f"address {_shown(text)}: a zone is not part of an address")
    if str(address) != text:
        raise GroupNameError(f"address {_shown(text)}: write it as {str(address)!r}")
    return address


def nonce_hex(nonce: bytes) -> str:
    """A packet's nonce as a key holds it.  Raises GroupNameError."""
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
        raise GroupNameError(f"a nonce is {NONCE_SIZE} bytes")
    return nonce.hex()


# ---- keys ------------------------------------------------------------------

def group_prefix(group: str) -> str:
    """`/spa/groups/<group>/`: every key of the group, and no other group's."""
    return f"{ROOT}{check_group(group)}/"


def meta_key(group: str) -> str:
    return group_prefix(group) + Kind.META.value


def kind_prefix(group: str, kind: Kind) -> str:
    """The prefix of every key of one kind (e.g. all clients, all claims).
    Raises GroupNameError for META (a single key, see meta_key)."""
    if kind is Kind.META:
        raise GroupNameError("meta is one key, not a directory: use meta_key")
    return f"{group_prefix(group)}{kind.value}/"


def client_key(group: str, client: str) -> str:
    return kind_prefix(group, Kind.CLIENT) + check_client(client)


def revoked_key(group: str, client: str) -> str:
    return kind_prefix(group, Kind.REVOKED) + check_client(client)


def activated_key(group: str, client: str) -> str:
    return kind_prefix(group, Kind.ACTIVATED) + check_client(client)


def member_key(group: str, member: str) -> str:
    return kind_prefix(group, Kind.MEMBER) + check_member(member)


def client_leases_prefix(group: str, client: str) -> str:
    """Every live lease of one client, and no other client's."""
    return f"{kind_prefix(group, Kind.LEASE)}{check_client(client)}/"


def lease_key(group: str, client: str, address: IPAddress, service: str) -> str:
    """One key per (client, address, service), as spa.core.leases keys a lease."""
    text = str(address)
    check_address(text)
    return f"{client_leases_prefix(group, client)}{text}/{check_service(service)}"


def client_claims_prefix(group: str, client: str) -> str:
    """Every live nonce claim of one client, and no other client's."""
    return f"{kind_prefix(group, Kind.CLAIM)}{check_client(client)}/"


def claim_key(group: str, client: str, nonce: bytes) -> str:
    """The key a member creates (only if absent) to claim a packet's nonce:
    the same (group, client, nonce) always gives the same key, at every member.
    Raises GroupNameError."""
    return client_claims_prefix(group, client) + nonce_hex(nonce)


def otp_claim_key(group: str, client: str, step: int) -> str:
    """The key a member creates (only if absent) to use up the time step of
    a client's authenticator code at every member: `otp-<step>` beside the
    client's nonce claims (a member's role already writes claims/).
    Raises GroupNameError."""
    if type(step) is not int or not 0 <= step <= OTP_STEP_MAX:
        raise GroupNameError(f"an authenticator step is a whole number 0 to {OTP_STEP_MAX}")
    return f"{client_claims_prefix(group, client)}otp-{step}"


def parse_key(group: str, key: str) -> KeyRef:
    """What a key of `group` holds (the inverse of the functions above), e.g.
    for a watch event.  Raises GroupNameError for a key of another group, of
    no known kind, or with a part that its kind would not accept."""
    prefix = group_prefix(group)
    if not isinstance(key, str) or not key.startswith(prefix):
        raise GroupNameError(f"key {_shown(str(key))} is not under {prefix}")
    rest = key[len(prefix):].split("/")
    if rest == [Kind.META.value]:
        return KeyRef(Kind.META, ())
    try:
        kind = Kind(rest[0])
    except ValueError:
        raise GroupNameError(f"key {_shown(key)}: unknown kind {_shown(rest[0])}") from None
    parts = tuple(rest[1:])
    if kind in (Kind.CLIENT, Kind.REVOKED, Kind.ACTIVATED) and len(parts) == 1:
        check_client(parts[0])
    elif kind is Kind.MEMBER and len(parts) == 1:
        check_member(parts[0])
    elif kind is Kind.LEASE and len(parts) == 3:
        check_client(parts[0])
        check_address(parts[1])
        check_service(parts[2])
    elif kind is Kind.CLAIM and len(parts) == 2:
        check_client(parts[0])
        if _NONCE_RE.fullmatch(parts[1]) is None and _OTP_STEP_RE.fullmatch(parts[1]) is None:
            raise GroupNameError(f"key {_shown(key)}: a claim ends in {2 * NONCE_SIZE} "
                                 "lower-case hex digits or otp-<step>")
    else:
        raise GroupNameError(f"key {_shown(key)}: wrong number of parts for {kind.value}")
    return KeyRef(kind, parts)
