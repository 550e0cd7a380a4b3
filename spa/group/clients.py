"""A client as a group keeps it: its derived keys and its rules, never its secret.

Invariants (docs/groups.md, "What a member holds"):
- A client record holds the three keys spa.core.keys derives from the
  client's master secret for the group's server id (and those of the secret a
  rotate replaced, while its grace lasts), never the master secret: nothing
  in it is the secret or a function of it but those HKDF outputs, bound to
  the group's server id (a record of another group's id is refused).
- Only clients of our own protocol join a group: an fwknop client's keys are
  its own (not derived per server), so a member would hold the secret itself.
- The record carries what a member needs to verify and decide: the keys, the
  services, allow_other_address, the source networks (canonical), enroll_by,
  the authenticator secret (drawn per enrollment, not derived: a member holds
  it as it is), and the rotation's end.  Its revoked state is a key of its own
  (revoked/<client>, spa.group.records.Revocation), so a revoke never races
  a rewrite of this record.
- Strict both ways: a GroupClient is checked when made; what encode_client
  writes decode_client reads back equal; other bytes raise RecordError.
  decode_client's fast path (a member's start decodes every record) accepts
  exactly what decode_client_strict accepts, with the same result, and hands
  it everything else (tests/property/test_group_records.py).
- Pure: no clock (`now` is an argument), no etcd library.
"""

from __future__ import annotations

import binascii
import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spa.core.keys import KEY_SIZE, SERVER_ID_SIZE, ClientKeys, derive_keys
from spa.core.otp import MIN_SECRET_BITS
from spa.core.policy import ClientPolicy
from spa.core.sources import MAX_SOURCES, NOWHERE, SourceNetwork, canonical_network
from spa.group import codec
from spa.group.codec import RecordError
from spa.group.layout import GroupNameError, check_client, check_service

if TYPE_CHECKING:
    from spa.server.config import ClientEntry

KIND_SPA = "spa"  # spa.server.config.KIND_SPA: the only kind a group holds
OLD_KEY = "~old"  # spa.server.config.OLD_KEY: a rotated-out key's name suffix
MAX_OTP_SECRET = 128  # characters of base32 (SECRET_BYTES = 20 is 32)
_MIN_OTP_BYTES = MIN_SECRET_BITS // 8  # as the config file requires (and the checker takes)
_FIELDS = frozenset({"name", "server_id", "kind", "keys", "old", "services",
                     "allow_other_address", "sources", "enroll_by", "otp_secret", "enrolled"})
_RECORD_FIELDS = _FIELDS | {"v", "type"}
_KEY_FIELDS = frozenset({"tag", "cipher", "mac"})
_B32_RE = re.compile(r"[A-Za-z2-7]*(=*)")
_B32_DROP = {0: 0, 1: 1, 3: 2, 4: 3, 6: 4}  # '=' at the end -> bytes short of 5 a block
_CANONICAL_CACHE = 16384  # network texts remembered as canonical or not (~2 MB at most)
_OLD_FIELDS = _KEY_FIELDS | {"until"}
_SERVICE_SETS = 1024  # distinct service lists remembered as sets


@dataclass(frozen=True, slots=True, repr=False)
class GroupClient:
    """What every member knows of one client (see the invariants)."""

    name: str
    server_id: bytes
    keys: ClientKeys
    services: tuple[str, ...]
    allow_other_address: bool = False
    sources: tuple[str, ...] = ()  # canonical networks; empty: anywhere
    enroll_by: int | None = None  # pending: its first knock due by (Unix seconds)
    otp_secret: str = field(default="")  # base32 TOTP secret; empty: no code
    enrolled: int | None = None  # when it was enrolled (Unix seconds), if known
    old_keys: ClientKeys | None = None  # the keys a rotate replaced ...
    old_until: int | None = None  # ... which work until then (Unix seconds)
    kind: str = KIND_SPA

    def __post_init__(self) -> None:
        _check(self)

    def __repr__(self) -> str:
        return f"GroupClient({self.name!r}, services={self.services})"

    def policy(self, *, revoked: bool = False) -> ClientPolicy:
        """Its rules as spa.core.policy holds them (`revoked`: revoked/<name> exists)."""
        return ClientPolicy(self.name, _service_set(self.services), self.allow_other_address,
                            revoked, None if self.enroll_by is None else float(self.enroll_by),
                            tuple(_canonical_network(text) or NOWHERE[0]  # (checked: never)
                                  for text in self.sources) if self.sources else ())

    def key_sets(self, now: float) -> dict[str, ClientKeys]:
        """Key name -> keys, as the verifier names them: NAME, and NAME~old
        while a rotation's grace lasts (`now` before old_until)."""
        found = {self.name: self.keys}
        if self.old_keys is not None and self.old_until is not None and now < self.old_until:
            found[self.name + OLD_KEY] = self.old_keys
        return found

    def tag_keys(self, now: float) -> dict[str, bytes]:
        """Key name -> knock-tag key: what the tag table and the kernel's tag
        filter need of this client at `now`."""
        return {name: keys.tag_key for name, keys in self.key_sets(now).items()}


def _check_keys(keys: object, what: str) -> None:
    if not isinstance(keys, ClientKeys) or not all(
            isinstance(key, bytes) and len(key) == KEY_SIZE
            for key in (keys.tag_key, keys.cipher_key, keys.mac_key)):
        raise RecordError(f"{what}: not three keys of {KEY_SIZE} bytes")


def _check(client: GroupClient) -> None:
    """Raise RecordError unless every field of `client` is one a record holds."""
    try:
        check_client(client.name)
    except GroupNameError:
        raise RecordError("name or services: not valid names") from None
    if client.kind != KIND_SPA:
        raise RecordError("kind: only spa clients join a group (an fwknop client's keys "
                          "are its own, not derived for the group)")
    if not isinstance(client.server_id, bytes) or len(client.server_id) != SERVER_ID_SIZE:
        raise RecordError(f"server_id: not {SERVER_ID_SIZE} bytes")
    _check_keys(client.keys, "keys")
    _check_services(client.services)
    if not isinstance(client.allow_other_address, bool):
        raise RecordError("allow_other_address: not true or false")
    _check_sources(client.sources)
    for value, name in ((client.enroll_by, "enroll_by"), (client.enrolled, "enrolled")):
        if value is not None and (type(value) is not int or not 0 <= value <= codec.MAX_TIME):
            codec.seconds({name: value}, name)  # (raises: its message names the field)
    _check_otp(client.otp_secret)
    if (client.old_keys is None) != (client.old_until is None):
        raise RecordError("old: keys and until go together")
    if client.old_keys is not None:
        _check_keys(client.old_keys, "old")
        codec.seconds({"until": client.old_until}, "until")


def _check_services(services: tuple[str, ...]) -> None:
    """Raise RecordError unless `services` is a tuple of at most MAX_LIST
    distinct valid service names (each distinct tuple's verdict cached:
    10^5 clients share a few dozen lists)."""
    if not isinstance(services, tuple):
        raise RecordError(f"services: a tuple of at most {codec.MAX_LIST} distinct names")
    try:
        problem = _services_problem(services)
    except TypeError:  # an item that cannot be hashed: not a name
        problem = "name or services: not valid names"
    if problem:
        raise RecordError(problem)


@functools.lru_cache(maxsize=_SERVICE_SETS)
def _services_problem(services: tuple[str, ...]) -> str:
    """What is wrong with a tuple of services ("": nothing)."""
    try:
        for service in services:
            check_service(service)
    except GroupNameError:
        return "name or services: not valid names"
    if len(set(services)) != len(services) or len(services) > codec.MAX_LIST:
        return f"services: a tuple of at most {codec.MAX_LIST} distinct names"
    return ""


def _check_sources(sources: tuple[str, ...]) -> None:
    """canonical_sources(sources) == sources, each network's verdict cached
    (many clients share their networks; parsing one took 20-50 us)."""
    if not isinstance(sources, tuple) or len(sources) > MAX_SOURCES:
        raise RecordError(f"sources: a tuple of at most {MAX_SOURCES} networks")
    if not (all(type(text) is str and _canonical_network(text) is not None
                for text in sources) and len(set(sources)) == len(sources)):
        raise RecordError("sources: not networks in their canonical form")


@functools.lru_cache(maxsize=_SERVICE_SETS)
def _service_set(services: tuple[str, ...]) -> frozenset[str]:
    """frozenset(services), one object per distinct tuple (10^5 clients
    share a few dozen service lists)."""
    return frozenset(services)


@functools.lru_cache(maxsize=_CANONICAL_CACHE)
def _canonical_network(text: str) -> SourceNetwork | None:
    """The network whose canonical text `text` is (spa.core.sources), None
    if it is not one's canonical text."""
    return canonical_network(text)


def _check_otp(secret: str) -> None:
    if not isinstance(secret, str) or len(secret) > MAX_OTP_SECRET:
        raise RecordError("otp_secret: not a base32 secret")
    if secret and otp_bytes(secret) < _MIN_OTP_BYTES:
        raise RecordError("otp_secret: not a base32 secret of 80 bits or more")


def otp_bytes(secret: str) -> int:
    """len(base64.b32decode(secret, casefold=True)), or -1 where it raises,
    from the text's shape alone (Python's decoder: blocks of 8 digits, either
    case, the last padded with 0, 1, 3, 4 or 6 '='; it took 4 us a secret)."""
    match = _B32_RE.fullmatch(secret)
    drop = None if match is None or len(secret) % 8 else _B32_DROP.get(len(match.group(1)))
    return -1 if drop is None else len(secret) // 8 * 5 - drop


# ---- from a ClientEntry ----------------------------------------------------

def _utc(text: str, name: str) -> int | None:
    if not text:
        return None
    try:
        return codec.utc_seconds(text)
    except RecordError:
        raise RecordError(f"{name}: not a UTC time like 2026-12-06T00:14:18Z") from None


def group_client(entry: ClientEntry, server_id: bytes) -> GroupClient:
    """The group's view of a client of the config or the client store: its keys
    derived for `server_id` (the group's), its secrets left behind.  The
    revoked state is not in it: write a Revocation for a revoked entry.
    Raises RecordError (an fwknop client, a secret or server id of the wrong
    size, a time that is not UTC_FORMAT)."""
    if entry.kind != KIND_SPA:
        raise RecordError(f"client {entry.name}: only spa clients join a group (an fwknop "
                          "client's keys are its own; move it to spa1:// with rotate first)")
    try:
        keys = derive_keys(entry.secret, server_id)
        old = (derive_keys(entry.old_secret, server_id)
               if entry.old_secret and entry.old_until else None)
    except ValueError:
        raise RecordError(f"client {entry.name}: a secret or the server id has the wrong "
                          "size") from None
    try:
        enrolled = codec.utc_seconds(entry.enrolled)
    except RecordError:
        enrolled = None  # informational, and never checked by the config: not carried over
    return GroupClient(
        name=entry.name, server_id=server_id, keys=keys,
        services=tuple(dict.fromkeys(entry.services)),
        allow_other_address=entry.allow_other_address, sources=tuple(entry.sources),
        enroll_by=_utc(entry.enroll_by, "enroll_by"), otp_secret=entry.otp_secret,
        enrolled=enrolled, old_keys=old,
        old_until=_utc(entry.old_until, "old_until") if old is not None else None)


def client_record(entry: ClientEntry, server_id: bytes) -> bytes:
    """The record at clients/<name> for `entry` in the group of `server_id`.
    Raises RecordError (see group_client)."""
    return encode_client(group_client(entry, server_id))


# ---- the record ------------------------------------------------------------

def _keys_fields(keys: ClientKeys) -> dict[str, Any]:
    return {"tag": codec.b64(keys.tag_key), "cipher": codec.b64(keys.cipher_key),
            "mac": codec.b64(keys.mac_key)}


def encode_client(client: GroupClient) -> bytes:
    """The canonical bytes of a client record."""
    old = None
    if client.old_keys is not None:
        old = {**_keys_fields(client.old_keys), "until": client.old_until}
    return codec.encode({
        "name": client.name, "server_id": codec.b64(client.server_id), "kind": client.kind,
        "keys": _keys_fields(client.keys), "old": old, "services": list(client.services),
        "allow_other_address": client.allow_other_address, "sources": list(client.sources),
        "enroll_by": client.enroll_by, "otp_secret": client.otp_secret,
        "enrolled": client.enrolled}, "client")


def _keys(record: Any, fields: frozenset[str], what: str) -> ClientKeys:
    if not isinstance(record, dict):
        raise RecordError(f"{what}: not an object")
    codec.exact(record, fields, what)
    return ClientKeys(codec.key_bytes(record, "tag", KEY_SIZE),
                      codec.key_bytes(record, "cipher", KEY_SIZE),
                      codec.key_bytes(record, "mac", KEY_SIZE))


def decode_client(data: bytes, server_id: bytes) -> GroupClient:
    """The client a record at clients/<name> describes, for the group whose
    server id is `server_id`.  Raises RecordError for anything encode_client
    would not write, and for a record of another server id.

    A record in canonical form takes the fast path (_decode_canonical, 3-4
    times faster: a member's start decodes every record); anything else, and
    anything the fast path doubts, is decided by decode_client_strict, whose
    RecordError names the field.  The two agree on every record
    (tests/property/test_group_records.py)."""
    client = _decode_canonical(data, server_id)
    return client if client is not None else decode_client_strict(data, server_id)


def _fast_keys(value: Any, fields: frozenset[str]) -> ClientKeys | None:
    if type(value) is not dict or value.keys() != fields:
        return None
    tag = codec.key_bytes_or_none(value["tag"], KEY_SIZE)
    cipher = codec.key_bytes_or_none(value["cipher"], KEY_SIZE)
    mac = codec.key_bytes_or_none(value["mac"], KEY_SIZE)
    if tag is None or cipher is None or mac is None:
        return None
    return ClientKeys(tag, cipher, mac)


def _short_strings(value: Any) -> bool:
    return type(value) is list and all(type(v) is str and len(v) <= 64 for v in value)


_K = rb'"([A-Za-z0-9_-]{43})"'  # a key as encode_client writes it
_INT = rb"(null|0|[1-9][0-9]{0,11})"
# encode_client's output, byte for byte, for records whose strings need no JSON
# escape (every one it writes: the names, services, networks, keys and base32
# secrets it accepts have none): one match replaces json.loads and the
# canonical re-encoding (10 us of a record's 19)
_EXACT = re.compile(
    rb'\{"allow_other_address":(true|false),"enroll_by":' + _INT + rb',"enrolled":' + _INT
    + rb',"keys":\{"cipher":' + _K + rb',"mac":' + _K + rb',"tag":' + _K
    + rb'\},"kind":"([a-z]{1,16})","name":"([A-Za-z0-9._@-]{1,64})","old":(?:null|\{"cipher":'
    + _K + rb',"mac":' + _K + rb',"tag":' + _K + rb',"until":(0|[1-9][0-9]{0,11})\}),'
    rb'"otp_secret":"([A-Za-z2-7=]{0,128})","server_id":"([A-Za-z0-9_-]{22})",'
    rb'"services":\[((?:"[a-z0-9_-]{1,32}")(?:,"[a-z0-9_-]{1,32}")*)?\],'
    rb'"sources":\[((?:"[0-9a-f.:/]{1,43}")(?:,"[0-9a-f.:/]{1,43}")*)?\],'
    rb'"type":"client","v":1\}')


def _names(group: bytes | None) -> tuple[str, ...]:
    return () if group is None else tuple(group[1:-1].decode("ascii").split('","'))


@functools.lru_cache(maxsize=_SERVICE_SETS)
def _service_names(group: bytes | None) -> tuple[str, ...]:
    """_names of a services list (a few dozen distinct lists in a group)."""
    return _names(group)


def _number(group: bytes) -> int | None:
    return None if group == b"null" else int(group)


# the last digit of 32 bytes in canonical unpadded base64url: its 2 unused bits zero
_LAST_OF_KEY = frozenset(ord(digit) for digit in codec.last_digits(KEY_SIZE))
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def _exact_key(text: bytes) -> bytes | None:
    """The key of 43 base64url digits (_EXACT's _K), None unless canonical:
    what codec.key_bytes_or_none returns for them, without its checks of
    the length and the alphabet (the regular expression made them)."""
    if text[-1] not in _LAST_OF_KEY:
        return None
    return binascii.a2b_base64(text.translate(_URLSAFE_TO_STANDARD) + b"=")


def _exact_keys(texts: tuple[bytes, bytes, bytes]) -> ClientKeys | None:
    cipher, mac, tag = (_exact_key(text) for text in texts)
    if cipher is None or mac is None or tag is None:
        return None
    return ClientKeys(tag, cipher, mac)


@functools.lru_cache(maxsize=16)
def _server_id_text(server_id: bytes) -> bytes:
    """The server id as a record writes it (its one canonical spelling)."""
    return codec.b64(server_id).encode("ascii")


def _decode_exact(data: bytes, server_id: bytes) -> GroupClient | None:
    """The client of a record that matches _EXACT; None for anything else."""
    match = _EXACT.fullmatch(data) if type(data) is bytes else None
    if match is None or match[14] != _server_id_text(server_id):
        return None
    g = match.groups()
    keys = _exact_keys((g[3], g[4], g[5]))
    old = _exact_keys((g[8], g[9], g[10])) if g[8] is not None else None
    if keys is None or (g[8] is not None and old is None):
        return None
    try:
        return GroupClient(
            name=g[7].decode("ascii"), server_id=server_id, keys=keys,
            services=_service_names(g[14]),
            allow_other_address=g[0] == b"true", sources=_names(g[15]),
            enroll_by=_number(g[1]), otp_secret=g[12].decode("ascii"),
            enrolled=_number(g[2]), old_keys=old,
            old_until=int(g[11]) if g[11] is not None else None, kind=g[6].decode("ascii"))
    except RecordError:
        return None


def _decode_canonical(data: bytes, server_id: bytes) -> GroupClient | None:
    """The client of a record that is JSON in canonical form, its fields of
    the JSON types decode_client_strict reads; None for anything else.  The
    JSON is canonical and every field is as encode_client writes it (keys
    canonical base64url, the rest checked by GroupClient), so encode_client
    would write exactly `data`: no re-encoding of the client is needed."""
    exact = _decode_exact(data, server_id)
    if exact is not None:
        return exact
    record = codec.canonical_record(data)
    if record is None or record.keys() != _RECORD_FIELDS:
        return None
    version, old = record["v"], record["old"]
    keys = _fast_keys(record["keys"], _KEY_FIELDS)
    old_keys = None if old is None else _fast_keys(old, _OLD_FIELDS)
    if (type(version) is not int or version != codec.VERSION or record["type"] != "client"
            or codec.key_bytes_or_none(record["server_id"], SERVER_ID_SIZE) != server_id
            or keys is None or (old is not None and old_keys is None)
            or not (_short_strings(record["services"]) and _short_strings(record["sources"]))
            or type(record["name"]) is not str or type(record["kind"]) is not str
            or type(record["otp_secret"]) is not str):
        return None
    try:
        return GroupClient(
            name=record["name"], server_id=server_id, keys=keys,
            services=tuple(record["services"]),
            allow_other_address=record["allow_other_address"],
            sources=tuple(record["sources"]), enroll_by=record["enroll_by"],
            otp_secret=record["otp_secret"], enrolled=record["enrolled"], old_keys=old_keys,
            old_until=None if old is None else old["until"], kind=record["kind"])
    except RecordError:  # GroupClient's own checks: let the strict path name the field
        return None


def decode_client_strict(data: bytes, server_id: bytes) -> GroupClient:
    """decode_client field by field, then the re-encoding compared with
    `data`: the reference the fast path is tested against, and the path of
    every record that is not canonical (its RecordError names the field)."""
    record = codec.decode(data, "client", _FIELDS)
    if codec.key_bytes(record, "server_id", SERVER_ID_SIZE) != server_id:
        raise RecordError("server_id: the record is another group's")
    old = record["old"]
    old_keys = None if old is None else _keys(old, _OLD_FIELDS, "old")
    client = GroupClient(
        name=codec.text(record, "name", 64), server_id=server_id,
        keys=_keys(record["keys"], _KEY_FIELDS, "keys"),
        services=codec.strings(record, "services"),
        allow_other_address=codec.flag(record, "allow_other_address"),
        sources=codec.strings(record, "sources"),
        enroll_by=codec.maybe_seconds(record, "enroll_by"),
        otp_secret=codec.text(record, "otp_secret", MAX_OTP_SECRET),
        enrolled=codec.maybe_seconds(record, "enrolled"),
        old_keys=old_keys, old_until=None if old is None else codec.seconds(old, "until"),
        kind=codec.text(record, "kind", 16))
    codec.canonical(data, encode_client(client), "client")
    return client
