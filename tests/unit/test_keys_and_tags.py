"""Known answers for the primitives (RFC 5869, RFC 4231, RFC 6238) and the
relation between our knock tag and a standard TOTP computed by pyotp."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac

import pyotp
import pytest

from spa.core.keys import derive_keys, hkdf, hkdf_expand, hkdf_extract
from spa.core.knock import (
    STEP_SECONDS,
    TagTable,
    knock_tag,
    step_of,
    step_of_ms,
    steps_for_window,
    totp_hmac,
)
from tests.world import OTHER_SERVER_ID, SECRETS, SERVER_ID


# RFC 5869, appendix A, test cases 1 and 3 (SHA-256).
def test_hkdf_rfc5869_case1() -> None:
    ikm = bytes([0x0B]) * 22
    salt = bytes(range(13))
    info = bytes(range(0xF0, 0xFA))
    prk = hkdf_extract(salt, ikm)
    assert prk.hex() == "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
    assert hkdf_expand(prk, info, 42).hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
        "34007208d5b887185865"
    )


def test_hkdf_rfc5869_case3_empty_salt_and_info() -> None:
    okm = hkdf(bytes([0x0B]) * 22, b"", b"", 42)
    assert okm.hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
        "9d201395faa4b61a96c8"
    )


def test_hkdf_rejects_impossible_lengths() -> None:
    with pytest.raises(ValueError, match="length"):
        hkdf_expand(bytes(32), b"", 255 * 32 + 1)


# RFC 4231, test cases 1 and 2 (HMAC-SHA-256), the MAC the packets carry.
@pytest.mark.parametrize(
    ("key", "data", "expected"),
    [
        (bytes([0x0B]) * 20, b"Hi There",
         "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
        (b"Jefe", b"what do ya want for nothing?",
         "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    ],
)
def test_hmac_sha256_rfc4231(key: bytes, data: bytes, expected: str) -> None:
    assert hmac.digest(key, data, "sha256").hex() == expected


def test_derived_keys_are_distinct_and_bound_to_the_server() -> None:
    a = derive_keys(SECRETS["alice"], SERVER_ID)
    b = derive_keys(SECRETS["alice"], OTHER_SERVER_ID)
    mine = {a.tag_key, a.cipher_key, a.mac_key}
    assert len(mine) == 3
    assert mine.isdisjoint({b.tag_key, b.cipher_key, b.mac_key})
    assert derive_keys(SECRETS["alice"], SERVER_ID) == a
    assert "secret" in repr(a)
    assert a.tag_key.hex() not in repr(a)


@pytest.mark.parametrize(("secret", "server_id"), [(bytes(31), SERVER_ID), (bytes(32), bytes(15))])
def test_derive_keys_rejects_wrong_sizes(secret: bytes, server_id: bytes) -> None:
    with pytest.raises(ValueError, match="bytes"):
        derive_keys(secret, server_id)


# RFC 6238, appendix B, SHA-256 rows: our totp_hmac is the TOTP HMAC.
RFC6238_SEED = b"12345678901234567890123456789012"


def rfc4226_truncate(digest: bytes, digits: int) -> str:
    offset = digest[-1] & 0x0F
    code = int.from_bytes(digest[offset : offset + 4], "big") & 0x7FFFFFFF
    return str(code % 10**digits).zfill(digits)


@pytest.mark.parametrize(
    ("unix", "code"),
    [
        (59, "46119246"),
        (1111111109, "68084774"),
        (1111111111, "67062674"),
        (1234567890, "91819424"),
        (2000000000, "90698825"),
        (20000000000, "77737706"),
    ],
)
def test_totp_hmac_matches_rfc6238_sha256(unix: int, code: str) -> None:
    assert rfc4226_truncate(totp_hmac(RFC6238_SEED, step_of(unix)), 8) == code


@pytest.mark.parametrize("unix", [0, 59, 1_111_111_109, 1_800_000_000, 1_800_000_029])
def test_knock_tag_is_the_pyotp_totp_hmac_kept_to_8_bytes(unix: int) -> None:
    """Same step, same counter encoding, same key -> same HMAC as pyotp."""
    key = derive_keys(SECRETS["alice"], SERVER_ID).tag_key
    totp = pyotp.TOTP(base64.b32encode(key).decode(), digits=8, digest=hashlib.sha256)
    step = step_of(unix)
    assert totp.timecode(datetime.datetime.fromtimestamp(unix)) == step
    assert totp.int_to_bytestring(step) == step.to_bytes(8, "big")
    pyotp_hmac = hmac.new(totp.byte_secret(), totp.int_to_bytestring(step), totp.digest).digest()
    assert pyotp_hmac == totp_hmac(key, step)
    assert knock_tag(key, step) == pyotp_hmac[:8]
    assert totp.at(unix) == rfc4226_truncate(totp_hmac(key, step), 8)


def test_step_arithmetic() -> None:
    assert step_of(0) == 0
    assert step_of(29.999) == 0
    assert step_of(30) == 1
    assert step_of(-0.5) == -1
    assert step_of_ms(29_999) == 0
    assert step_of_ms(30_000) == 1
    assert STEP_SECONDS == 30
    assert steps_for_window(30) == 1
    assert steps_for_window(31) == 2
    assert steps_for_window(1) == 1


def tag_keys() -> dict[str, bytes]:
    return {name: derive_keys(secret, SERVER_ID).tag_key for name, secret in SECRETS.items()}


def settle(table: TagTable) -> None:
    """Run the rotation's slices to the end (a housekeeping thread's work)."""
    while table.slice():
        pass


def test_tag_table_holds_previous_current_and_next_step() -> None:
    keys = tag_keys()
    table = TagTable(keys, step=100)
    assert len(table) == 3 * len(keys)
    for name, key in keys.items():
        for step in (99, 100, 101):
            assert table.lookup(knock_tag(key, step)) == (name, step)
        assert table.lookup(knock_tag(key, 98)) is None
        assert table.lookup(knock_tag(key, 102)) is None


def test_tag_table_advance_matches_a_rebuild() -> None:
    keys = tag_keys()
    table = TagTable(keys, step=100)
    settle(table)
    table.advance(101)
    fresh = TagTable(keys, step=101)
    settle(table)
    settle(fresh)
    for _name, key in keys.items():
        for step in range(97, 105):
            assert table.lookup(knock_tag(key, step)) == fresh.lookup(knock_tag(key, step))
    table.advance(500)  # a jump (clock change, long sleep) rebuilds
    assert table.step == 500
    assert table.lookup(knock_tag(keys["alice"], 501)) == ("alice", 501)
    assert table.lookup(knock_tag(keys["alice"], 101)) is None
    assert len(table) == 3 * len(keys)


def test_tag_table_add_and_remove_take_effect_at_once() -> None:
    keys = tag_keys()
    table = TagTable(keys, step=7)
    table.remove("alice")
    assert all(table.lookup(knock_tag(keys["alice"], s)) is None for s in (6, 7, 8))
    assert table.lookup(knock_tag(keys["bob"], 7)) == ("bob", 7)
    assert "alice" not in table.clients
    table.add("alice", keys["alice"])
    assert table.lookup(knock_tag(keys["alice"], 8)) == ("alice", 8)
    table.advance(8)
    assert table.lookup(knock_tag(keys["alice"], 9)) == ("alice", 9)
    # re-key: the old key's tags are gone
    table.add("alice", keys["bob"][::-1])
    assert table.lookup(knock_tag(keys["alice"], 8)) is None
    assert table.lookup(knock_tag(keys["bob"][::-1], 8)) == ("alice", 8)
    table.remove("nobody")  # unknown client: no effect
    settle(table)
    assert len(table) == 4 * len(keys), "three live steps and the next one"


def test_tag_table_wider_window_holds_more_steps() -> None:
    table = TagTable(tag_keys(), step=10, skew=2)
    key = tag_keys()["bob"]
    assert table.lookup(knock_tag(key, 8)) == ("bob", 8)
    assert table.lookup(knock_tag(key, 12)) == ("bob", 12)
    with pytest.raises(ValueError, match="skew"):
        TagTable({}, step=0, skew=0)


def test_a_rekey_during_slicing_is_noticed() -> None:
    """Review finding (of the prepared tags this replaced): a re-key keeps
    the name and changes the key; the next step's slices use the new key."""
    keys = tag_keys()
    table = TagTable(keys, step=10)
    table.slice(1)  # the next step's slicing has begun
    new_key = bytes(32)
    table.add("alice", new_key)  # same name, new key
    table.advance(11)
    assert table.lookup(knock_tag(new_key, 12)) == ("alice", 12)
    assert table.lookup(knock_tag(keys["alice"], 12)) is None
