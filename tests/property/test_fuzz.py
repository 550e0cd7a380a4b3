"""Fuzz invariants of the receive path.

- Any bytes: `verify` returns Refused with a reason and never raises.
- Any plaintext body: `decode_body` returns a request that re-encodes to the
  same bytes (canonical), or raises PacketError, never anything else.
- A valid packet with any mutation (every single bit flip, truncation,
  extension, splicing with another packet) is never accepted.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt

from spa.core.errors import PacketError, Reason
from spa.core.knock import knock_tag, step_of
from spa.core.limits import FailureLimiter
from spa.core.verify import Accepted, Refused
from spa.core.wire import (
    BODY_SIZE,
    PACKET_SIZE,
    decode_body,
    encode_body,
)
from tests.world import NOW, SERVER_ID, SRC, Knocker, keys, verifier

VERIFIER = verifier()  # shared: nothing below is ever accepted by it
# Each check's own reason, without the forged-packet limits (tested in
# tests/unit/test_limits.py) cutting in after PER_PAIR failures.
UNLIMITED = verifier(limiter=FailureLimiter(per_tag=10**9, per_pair=10**9, per_trusted_pair=10**9))


def live_tag(client: str = "alice") -> bytes:
    return knock_tag(keys(client).tag_key, step_of(NOW))


@given(st.binary(max_size=2 * PACKET_SIZE))
def test_any_bytes_are_refused_with_a_reason(data: bytes) -> None:
    result = VERIFIER.verify(data, SRC, NOW)
    assert isinstance(result, Refused)
    assert isinstance(result.reason, Reason)


@given(st.binary(min_size=PACKET_SIZE - 9, max_size=PACKET_SIZE - 9),
       st.sampled_from(["alice", "bob", "carol", "mallory"]))
def test_any_bytes_behind_a_live_tag_are_refused(rest: bytes, client: str) -> None:
    """The worst case for the server: junk that gets past the tag lookup."""
    result = UNLIMITED.verify(b"\x01" + live_tag(client) + rest, SRC, NOW)
    assert isinstance(result, Refused)
    assert result.reason is Reason.BAD_MAC
    assert result.client == client


@given(st.binary(min_size=BODY_SIZE, max_size=BODY_SIZE))
def test_any_body_decodes_canonically_or_raises_packet_error(body: bytes) -> None:
    try:
        request = decode_body(body)
    except PacketError as exc:
        reason = exc.reason
    else:
        assert encode_body(request) == body
        return
    assert reason is Reason.MALFORMED


@given(st.binary(min_size=BODY_SIZE, max_size=BODY_SIZE), st.binary(min_size=24, max_size=24))
def test_any_authenticated_body_is_refused_or_well_formed(body: bytes, nonce: bytes) -> None:
    """An insider seals arbitrary plaintext with valid keys: the parser and
    policy still only ever refuse it or accept a well-formed request."""
    alice = keys("alice")
    import hmac

    header = b"\x01" + live_tag()
    ciphertext = crypto_aead_xchacha20poly1305_ietf_encrypt(
        body, header + SERVER_ID, nonce, alice.cipher_key)
    signed = header + nonce + ciphertext
    packet = signed + hmac.digest(alice.mac_key, signed, "sha256")
    result = verifier().verify(packet, SRC, NOW)
    if isinstance(result, Accepted):
        assert encode_body(result.request) == body
    else:
        assert result.reason not in {Reason.BAD_MAC, Reason.BAD_CIPHERTEXT, Reason.BAD_LENGTH}


def expected_reason_for_flip(position: int) -> Reason:
    if position == 0:
        return Reason.BAD_VERSION
    if position < 9:
        return Reason.UNKNOWN_TAG
    return Reason.BAD_MAC


@pytest.mark.parametrize("client", ["alice", "carol"])
def test_every_single_bit_flip_is_refused_for_the_right_reason(client: str) -> None:
    packet = Knocker(client).packet("ssh", duration=60)
    fresh = verifier(limiter=FailureLimiter(per_tag=10**9, per_pair=10**9, per_trusted_pair=10**9))
    for position in range(PACKET_SIZE):
        for bit in range(8):
            mutated = bytearray(packet)
            mutated[position] ^= 1 << bit
            result = fresh.verify(bytes(mutated), SRC, NOW)
            assert isinstance(result, Refused), (position, bit)
            assert result.reason is expected_reason_for_flip(position), (position, bit)
    assert isinstance(fresh.verify(packet, SRC, NOW), Accepted), "the original was valid"


PACKETS = [Knocker(c).packet(s) for c, s in
           [("alice", "ssh"), ("alice", "https"), ("bob", "https"), ("carol", "ssh")]]


@given(st.sampled_from(PACKETS), st.integers(0, PACKET_SIZE - 1))
def test_truncation_is_refused(packet: bytes, size: int) -> None:
    assert verifier().verify(packet[:size], SRC, NOW) == Refused(Reason.BAD_LENGTH)


@given(st.sampled_from(PACKETS), st.binary(min_size=1, max_size=64))
def test_extension_is_refused(packet: bytes, extra: bytes) -> None:
    assert verifier().verify(packet + extra, SRC, NOW) == Refused(Reason.BAD_LENGTH)


@given(st.sampled_from(PACKETS), st.sampled_from(PACKETS), st.integers(1, PACKET_SIZE - 1))
def test_splicing_two_packets_is_refused(a: bytes, b: bytes, cut: int) -> None:
    spliced = a[:cut] + b[cut:]
    result = verifier().verify(spliced, SRC, NOW)
    if spliced in (a, b):
        return  # a cut inside a common prefix or suffix rebuilds an original
    assert isinstance(result, Refused)


@given(st.sampled_from(PACKETS), st.lists(st.tuples(st.integers(0, PACKET_SIZE - 1),
                                                    st.integers(1, 255)),
                                          min_size=1, max_size=8))
def test_random_byte_rewrites_are_refused(packet: bytes,
                                          edits: list[tuple[int, int]]) -> None:
    mutated = bytearray(packet)
    for position, xor in edits:
        mutated[position] ^= xor
    if bytes(mutated) == packet:
        return
    assert isinstance(verifier().verify(bytes(mutated), SRC, NOW), Refused)
