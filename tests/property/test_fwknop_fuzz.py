"""Fuzz invariants of the compat listener's receive path (as test_fuzz.py for ours).

- Any bytes: `CompatVerifier.verify` returns Refused with a reason, never raises.
- Any bytes: `split`, `decrypt` and `decode` return or raise PacketError, nothing else.
- A valid packet with any single-byte change, truncation or extension is never accepted.
- Any plaintext a key holder seals is refused with a reason or accepted well-formed.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from spa.core.errors import PacketError, Reason
from spa.core.fwknop import check_shape, decode, decrypt, seal, split
from spa.core.fwknop_verify import CompatAccepted
from spa.core.verify import Refused
from tests.fwknop_world import KEYS, NOW, SOURCE, compat, packet

VERIFIER = compat()
B64 = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
              min_size=140, max_size=600).map(str.encode)


@given(st.binary(max_size=1600) | B64)
def test_any_bytes_on_the_compat_port_are_refused_with_a_reason(data: bytes) -> None:
    result = VERIFIER.verify(data, SOURCE, NOW)
    assert isinstance(result, Refused)
    assert isinstance(result.reason, Reason)


@given(st.binary(max_size=1600) | B64)
def test_the_format_raises_packet_error_only(data: bytes) -> None:
    reasons = []
    for step in (check_shape, split, lambda d: decrypt(d, KEYS.rijndael), decode):
        try:
            step(data)
        except PacketError as exc:
            reasons.append(exc.reason)
    assert all(isinstance(reason, Reason) for reason in reasons)


@settings(max_examples=300)
@given(st.data())
def test_a_changed_packet_is_never_accepted(data: st.DataObject) -> None:
    good = packet()
    at = data.draw(st.integers(0, len(good) - 1))
    kind = data.draw(st.sampled_from(["flip", "cut", "add"]))
    if kind == "flip":
        byte = data.draw(st.integers(0, 255).filter(lambda b: b != good[at]))
        bad = good[:at] + bytes([byte]) + good[at + 1:]
    elif kind == "cut":
        bad = good[:at]
    else:
        bad = good[:at] + data.draw(st.binary(min_size=1, max_size=8)) + good[at:]
    assert type(compat().verify(bad, SOURCE, NOW)) is Refused


@given(st.binary(min_size=1, max_size=300), st.binary(min_size=8, max_size=8))
def test_any_authenticated_plaintext_is_refused_or_well_formed(plain: bytes, salt: bytes) -> None:
    """A key holder seals arbitrary plaintext: refused with a reason, or a
    well-formed access request."""
    result = compat().verify(seal(plain, KEYS, salt=salt), SOURCE, NOW)
    if isinstance(result, CompatAccepted):
        assert result.decisions and result.client == "oldphone"
    else:
        assert isinstance(result.reason, Reason)
