"""Round trips and fuzz invariants of a group's records (spa.group.records,
spa.group.clients; docs/groups.md, "Records").

- Every record encodes to bytes that decode to an equal record, and equal
  records encode to equal bytes (canonical).
- Any bytes decode to a record or raise RecordError, never anything else; so
  does a valid record's JSON with a field dropped, added or replaced, and
  what decodes is exactly what the encoder writes for it (canonical).
- A client record holds no encoding of the client's master secret, nor the
  keys the same secret gives for another server id.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spa.core.errors import FormatError
from spa.core.keys import ClientKeys, derive_keys
from spa.core.sources import canonical_sources
from spa.group import clients, codec
from spa.group.clients import (
    GroupClient,
    client_record,
    decode_client,
    decode_client_strict,
    encode_client,
)
from spa.group.codec import MAX_TIME, RecordError
from spa.group.records import (
    Activation,
    Claim,
    GroupMeta,
    LeaseRecord,
    Member,
    Revocation,
    decode_activation,
    decode_claim,
    decode_lease,
    decode_member,
    decode_meta,
    decode_revocation,
    encode_activation,
    encode_claim,
    encode_lease,
    encode_member,
    encode_meta,
    encode_revocation,
)
from spa.server.config import ClientEntry
from tests.property.strategies import service_names

SERVER_ID = bytes.fromhex("5350412d746573742d7365727665722e")

client_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", fullmatch=True)
member_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
group_names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True)
whole_times = st.integers(0, MAX_TIME)
times = st.one_of(whole_times, st.floats(0, MAX_TIME, allow_nan=False, allow_infinity=False))
key32 = st.binary(min_size=32, max_size=32)
client_keys = st.builds(ClientKeys, key32, key32, key32)
NETWORKS = ("203.0.113.0/24", "198.51.100.7/32", "10.0.0.0/8", "2001:db8::/48",
            "2001:db8:1::5/128", "0.0.0.0/0", "::/0")
otp_secrets = st.one_of(st.just(""), st.binary(min_size=10, max_size=40).map(
    lambda raw: base64.b32encode(raw).decode()))
addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6).map(
    lambda a: ipaddress.IPv6Address(a.packed)))


@st.composite
def group_clients(draw: st.DrawFn, server_id: bytes = SERVER_ID) -> GroupClient:
    old = draw(st.none() | client_keys)
    return GroupClient(
        name=draw(client_names), server_id=server_id, keys=draw(client_keys),
        services=tuple(draw(st.lists(service_names, max_size=6, unique=True))),
        allow_other_address=draw(st.booleans()),
        sources=tuple(draw(st.lists(st.sampled_from(NETWORKS), max_size=4, unique=True))),
        enroll_by=draw(st.none() | whole_times), otp_secret=draw(otp_secrets),
        enrolled=draw(st.none() | whole_times), old_keys=old,
        old_until=None if old is None else draw(whole_times))


metas = st.builds(GroupMeta, group_names, st.binary(min_size=16, max_size=16), whole_times)
members = st.builds(Member, member_names, times)
leases = st.builds(LeaseRecord, client_names, addresses, service_names,
                   st.sampled_from(("tcp", "udp")), st.integers(1, 65535), times, member_names)
claims = st.builds(Claim, member_names, times)
revocations = st.builds(Revocation, client_names, whole_times, st.booleans())
activations = st.builds(Activation, client_names, whole_times)


def _decode_client(data: bytes) -> GroupClient:
    return decode_client(data, SERVER_ID)


# (strategy, encode, decode) of every record
CODECS: list[tuple[st.SearchStrategy[Any], Callable[[Any], bytes], Callable[[bytes], Any]]] = [
    (group_clients(), encode_client, _decode_client),
    (metas, encode_meta, decode_meta),
    (members, encode_member, decode_member),
    (leases, encode_lease, decode_lease),
    (claims, encode_claim, decode_claim),
    (revocations, encode_revocation, decode_revocation),
    (activations, encode_activation, decode_activation),
]
IDS = ["client", "meta", "member", "lease", "claim", "revocation", "activation"]


@pytest.mark.parametrize(("values", "encode", "decode"), CODECS, ids=IDS)
def test_every_record_round_trips_canonically(
        values: st.SearchStrategy[Any], encode: Callable[[Any], bytes],
        decode: Callable[[bytes], Any]) -> None:
    @given(values)
    def check(value: Any) -> None:
        data = encode(value)
        assert len(data) <= codec.MAX_RECORD_SIZE
        back = decode(data)
        assert back == value
        assert encode(back) == data

    check()


@pytest.mark.parametrize(("values", "encode", "decode"), CODECS, ids=IDS)
def test_any_bytes_decode_or_raise_record_error(
        values: st.SearchStrategy[Any], encode: Callable[[Any], bytes],
        decode: Callable[[bytes], Any]) -> None:
    @given(st.binary(max_size=2048))
    def check(data: bytes) -> None:
        with contextlib.suppress(RecordError):
            decode(data)

    check()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


def _mutations(record: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """The record with one field dropped, one added, or one's value replaced
    (at the top level or inside a nested object)."""
    names = sorted(record)
    dropped = st.sampled_from(names).map(lambda n: {k: v for k, v in record.items() if k != n})
    added = st.tuples(st.text(max_size=12), json_values).map(
        lambda kv: {**record, kv[0]: kv[1]})
    replaced = st.tuples(st.sampled_from(names), json_values).map(
        lambda kv: {**record, kv[0]: kv[1]})
    nested = [n for n in names if isinstance(record[n], dict)]
    strategies = [dropped, added, replaced]
    if nested:
        strategies.append(st.tuples(st.sampled_from(nested), st.data()).map(
            lambda nd: {**record, nd[0]: nd[1].draw(_mutations(record[nd[0]]))}))
    return st.one_of(strategies)


@pytest.mark.parametrize(("values", "encode", "decode"), CODECS, ids=IDS)
def test_a_mutated_record_decodes_canonically_or_raises_record_error(
        values: st.SearchStrategy[Any], encode: Callable[[Any], bytes],
        decode: Callable[[bytes], Any]) -> None:
    @given(values, st.data())
    def check(value: Any, data: st.DataObject) -> None:
        record = json.loads(encode(value))
        mutated = data.draw(_mutations(record))
        raw = json.dumps(mutated, sort_keys=True, separators=(",", ":")).encode()
        try:
            back = decode(raw)
        except RecordError:
            return
        assert encode(back) == raw  # what decodes is a record this version writes, exactly

    check()


def test_the_decoders_refuse_what_strict_json_refuses() -> None:
    good = encode_claim(Claim("m1", 5.0))
    for raw in (b'{"v":1,"v":1,"type":"claim","member":"m1","at":5}',  # a duplicate key
                b'{"v":1,"type":"claim","member":"m1","at":NaN}',
                b'{"v":1,"type":"claim","member":"m1","at":Infinity}',
                b'{"v":2,"type":"claim","member":"m1","at":5}',  # a newer version
                b'{"v":true,"type":"claim","member":"m1","at":5}',
                b'{"v":1,"type":"lease","member":"m1","at":5}',  # another type
                b'{"v":1,"type":"claim","member":"m1","at":true}',  # a bool is no time
                b'{"v":1,"type":"claim","member":"m1","at":1' + b"0" * 5000 + b"}",
                b"[" * 8_000 + b"]" * 8_000,  # short enough, nested past the recursion limit
                b"[" * 100_000,  # too long
                b'"\xff"', good + b" " * codec.MAX_RECORD_SIZE,
                # not canonical: a space, another key order, a time as an int
                good + b" ", b'{"at":5.0, "member":"m1","type":"claim","v":1}',
                b'{"member":"m1","at":5.0,"type":"claim","v":1}',
                b'{"at":5,"member":"m1","type":"claim","v":1}'):
        with pytest.raises(RecordError):
            decode_claim(raw)
    assert decode_claim(good) == Claim("m1", 5.0)


def test_a_record_error_never_quotes_a_key() -> None:
    client = GroupClient("alice", SERVER_ID, ClientKeys(b"\x01" * 32, b"\x02" * 32,
                                                        b"\x03" * 32), ("ssh",))
    record = json.loads(encode_client(client))
    secret_text = record["keys"]["mac"]
    record["keys"]["mac"] = secret_text[:-1]  # one character short: not 32 bytes
    with pytest.raises(RecordError) as info:
        decode_client(json.dumps(record).encode(), SERVER_ID)
    assert secret_text[:-1] not in str(info.value)
    assert str(info.value) == "mac: not 32 bytes of unpadded base64url"


def _spellings(raw: bytes) -> list[bytes]:
    """Ways a record could carry these bytes: raw, hex, base64 of both alphabets."""
    return [raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw),
            base64.urlsafe_b64encode(raw).rstrip(b"="), base64.b64encode(raw).rstrip(b"="),
            base64.b32encode(raw)]


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32),
       st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16))
def test_a_client_record_holds_no_master_secret(secret: bytes, old: bytes, server_id: bytes,
                                                 other_id: bytes) -> None:
    """Not the secret (current or rotated out) in any spelling, nor the keys it
    gives at another server id: only the HKDF outputs for this server id."""
    entry = ClientEntry("alice", secret, ("ssh",), old_secret=old,
                        old_until="2026-12-06T01:00:00Z")
    data = client_record(entry, server_id)
    for raw in (secret, old):
        for spelling in _spellings(raw):
            assert spelling not in data
    if other_id != server_id:
        elsewhere = derive_keys(secret, other_id)
        for key in (elsewhere.tag_key, elsewhere.cipher_key, elsewhere.mac_key):
            for spelling in _spellings(key):
                assert spelling not in data
    record = json.loads(data)
    held = {record["keys"][k] for k in ("tag", "cipher", "mac")}
    held |= {record["old"][k] for k in ("tag", "cipher", "mac")}
    mine, before = derive_keys(secret, server_id), derive_keys(old, server_id)
    derived = {codec.b64(k) for keys in (mine, before)
               for k in (keys.tag_key, keys.cipher_key, keys.mac_key)}
    assert held == derived  # every byte string in the record is a derived key or a name
    assert decode_client(data, server_id).keys == mine


# ---- the fast client decoder against the strict one ---------------------------

B64_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
near_keys = st.one_of(
    st.text(B64_DIGITS, min_size=20, max_size=45),
    st.text(B64_DIGITS + "=+/ .", min_size=42, max_size=44),
    key32.map(codec.b64), st.binary(min_size=16, max_size=16).map(codec.b64))
SOURCE_TEXTS = (*NETWORKS, "203.0.113.1/24", " 10.0.0.0/8", "10.0.0.0/255.0.0.0", "10.0.0.1",
                "2001:DB8::/48", "2001:db8:0::/48", "2001:0db8::/48", "::ffff:0:0/96",
                "fe80::%1/64", "10.0.0.0/08", "not a network", "", "1.2.3.4/33")


def _outcome(decode: Callable[[bytes, bytes], GroupClient], data: bytes) -> object:
    try:
        return decode(data, SERVER_ID)
    except RecordError:
        return RecordError


@st.composite
def client_record_variants(draw: st.DrawFn) -> bytes:
    """A valid client record, or one mutated: a field dropped, added or
    replaced (a key by text close to base64url, the sources by texts close to
    networks), written canonically or not, or a byte of it changed."""
    record = json.loads(encode_client(draw(group_clients())))
    how = draw(st.sampled_from(["valid", "fields", "key", "sources", "bytes"]))
    if how == "fields":
        record = draw(_mutations(record))
    elif how == "key":
        where = draw(st.sampled_from(["server_id", "tag", "cipher", "mac"]))
        (record if where == "server_id" else record["keys"])[where] = draw(near_keys)
    elif how == "sources":
        record["sources"] = draw(st.lists(st.sampled_from(SOURCE_TEXTS), max_size=4))
    data = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    if how == "bytes" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1:]
    if draw(st.booleans()) and how != "valid":
        data = json.dumps(record, sort_keys=draw(st.booleans())).encode()  # spaces
    return data


@given(client_record_variants())
def test_the_fast_client_decoder_agrees_with_the_strict_one(data: bytes) -> None:
    strict = _outcome(decode_client_strict, data)
    assert _outcome(decode_client, data) == strict
    fast = clients._decode_canonical(data, SERVER_ID)
    assert fast is None or fast == strict  # what the fast path accepts, the strict path does
    exact = clients._decode_exact(data, SERVER_ID)  # (its first step, on the bytes alone)
    assert exact is None or exact == strict
    if strict is not RecordError:
        assert fast is not None  # and every record the strict path accepts takes it


@given(group_clients())
def test_every_valid_client_record_takes_the_fast_path(client: GroupClient) -> None:
    assert clients._decode_canonical(encode_client(client), SERVER_ID) == client
    assert clients._decode_exact(encode_client(client), SERVER_ID) == client


@given(near_keys, st.sampled_from([16, 32]))
def test_the_quick_key_check_agrees_with_key_bytes(text: str, size: int) -> None:
    try:
        expected: bytes | None = codec.key_bytes({"k": text}, "k", size)
    except RecordError:
        expected = None
    assert codec.key_bytes_or_none(text, size) == expected


@given(st.lists(st.sampled_from(SOURCE_TEXTS), max_size=5))
def test_the_cached_sources_check_agrees_with_canonical_sources(texts: list[str]) -> None:
    try:
        expected = canonical_sources(texts) == tuple(texts)
    except FormatError:
        expected = False
    try:
        clients._check_sources(tuple(texts))
        found = True
    except RecordError:
        found = False
    assert found == expected


@given(st.one_of(st.text("ABCXYZabcz234567=01 ", max_size=40),
                 st.binary(max_size=30).map(lambda raw: base64.b32encode(raw).decode()),
                 st.binary(max_size=30).map(lambda raw: base64.b32encode(raw).decode().lower()),
                 st.text(max_size=16)))
def test_the_shape_check_of_a_code_secret_agrees_with_b32decode(text: str) -> None:
    try:
        expected = len(base64.b32decode(text, casefold=True))
    except (binascii.Error, ValueError):
        expected = -1
    assert clients.otp_bytes(text) == expected
