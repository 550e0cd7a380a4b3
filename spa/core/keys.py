"""Key derivation: one 32-byte client master secret -> tag, cipher and MAC keys.

Invariants (docs/protocol.md, "Keys"):
- The three keys are independent outputs of HKDF-SHA256 (RFC 5869) with the
  server id as salt and distinct labels that also carry the server id, so the
  same master secret enrolled at two servers yields unrelated keys, and no key
  is ever used for two purposes.
- Nothing here reads a clock or draws randomness; secrets and server ids are
  created by the caller (the server's `init` and `enroll`).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

MASTER_SECRET_SIZE = 32  # bytes of client master secret (256 bits)
SERVER_ID_SIZE = 16  # bytes of random server id, chosen once at `init`
KEY_SIZE = 32  # bytes of every derived key
_HASH_SIZE = 32  # SHA-256 output

LABEL_TAG = b"spa1 knock-tag key"
LABEL_CIPHER = b"spa1 cipher key"
LABEL_MAC = b"spa1 mac key"


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """RFC 5869 HKDF-Extract with SHA-256."""
    return hmac.digest(salt or bytes(_HASH_SIZE), ikm, "sha256")


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-Expand with SHA-256.

    Raises ValueError if `length` is out of the range RFC 5869 allows.
    """
    if not 0 < length <= 255 * _HASH_SIZE:
        raise ValueError("HKDF output length out of range")
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
        counter += 1
    return out[:length]


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-SHA256 (extract, then expand)."""
    return hkdf_expand(hkdf_extract(salt, ikm), info, length)


@dataclass(frozen=True, slots=True, repr=False)
class ClientKeys:
    """The per-client, per-server keys.  `repr` hides them (never log a key)."""

    tag_key: bytes
    cipher_key: bytes
    mac_key: bytes

    def __repr__(self) -> str:
        return "ClientKeys(<secret>)"


class HmacSha256:
    """HMAC-SHA256 under one key, with the padded-key states computed once.

    `digest(m) == hmac.digest(key, m, "sha256")` (RFC 2104), about twice as
    fast per call, since OpenSSL 3's one-shot HMAC re-creates its context on
    every call.  tests/property/test_roundtrip.py checks the equality.
    """

    __slots__ = ("_inner", "_outer")
    _BLOCK = 64  # SHA-256 block size

    def __init__(self, key: bytes) -> None:
        if len(key) > self._BLOCK:
            key = hashlib.sha256(key).digest()
        padded = key.ljust(self._BLOCK, b"\0")
        self._inner: Any = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer: Any = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        result: bytes = outer.digest()
        return result

    def __repr__(self) -> str:
        return "HmacSha256(<secret>)"


def check_server_id(server_id: bytes) -> None:
    """Raise ValueError unless `server_id` has the right size."""
    if len(server_id) != SERVER_ID_SIZE:
        raise ValueError(f"server id must be {SERVER_ID_SIZE} bytes, got {len(server_id)}")


def derive_tag_key(master_secret: bytes, server_id: bytes) -> bytes:
    """`derive_keys(master_secret, server_id).tag_key`, without the other two
    (what a server needs of every client before its first matching tag).

    Raises ValueError if the secret or the server id has the wrong size.
    """
    if len(master_secret) != MASTER_SECRET_SIZE:
        raise ValueError(f"master secret must be {MASTER_SECRET_SIZE} bytes")
    check_server_id(server_id)
    return hkdf_expand(hkdf_extract(server_id, master_secret), LABEL_TAG + server_id, KEY_SIZE)


def derive_keys(master_secret: bytes, server_id: bytes) -> ClientKeys:
    """Derive a client's keys for one server.

    Raises ValueError if the secret or the server id has the wrong size.
    """
    if len(master_secret) != MASTER_SECRET_SIZE:
        raise ValueError(f"master secret must be {MASTER_SECRET_SIZE} bytes")
    check_server_id(server_id)
    prk = hkdf_extract(server_id, master_secret)
    return ClientKeys(
        tag_key=hkdf_expand(prk, LABEL_TAG + server_id, KEY_SIZE),
        cipher_key=hkdf_expand(prk, LABEL_CIPHER + server_id, KEY_SIZE),
        mac_key=hkdf_expand(prk, LABEL_MAC + server_id, KEY_SIZE),
    )
