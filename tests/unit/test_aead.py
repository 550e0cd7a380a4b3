"""The fast paths agree with the reference implementations."""

from __future__ import annotations

import hmac

from hypothesis import given
from hypothesis import strategies as st

from spa.core import aead
from spa.core.keys import HmacSha256


@given(st.binary(max_size=200), st.binary(max_size=300))
def test_hmac_precomputed_equals_hmac_digest(key: bytes, message: bytes) -> None:
    assert HmacSha256(key).digest(message) == hmac.digest(key, message, "sha256")


def test_hmac_repr_hides_the_key() -> None:
    assert "secret" in repr(HmacSha256(b"k" * 32))


@given(st.binary(min_size=0, max_size=120), st.binary(max_size=40),
       st.binary(min_size=24, max_size=24), st.binary(min_size=32, max_size=32))
def test_fast_decrypt_equals_the_public_binding(plaintext: bytes, ad: bytes, nonce: bytes,
                                               key: bytes) -> None:
    sealed = aead.encrypt(plaintext, ad, nonce, key)
    assert aead.decrypt(sealed, ad, nonce, key) == plaintext
    assert aead.decrypt_public(sealed, ad, nonce, key) == plaintext
    for position in (0, len(sealed) // 2, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[position] ^= 0x80
        assert aead.decrypt(bytes(bad), ad, nonce, key) is None
        assert aead.decrypt_public(bytes(bad), ad, nonce, key) is None
    assert aead.decrypt(sealed, ad + b"x", nonce, key) is None


def test_the_fast_path_is_in_use() -> None:
    """If PyNaCl's layout changes we fall back; say so loudly in the tests."""
    assert aead.FAST
