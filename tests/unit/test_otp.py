"""The authenticator second factor: RFC 6238 codes made by pyotp, drift, reuse."""

from __future__ import annotations

import base64
import hmac
import ipaddress

import pyotp

from spa.core.errors import Reason
from spa.core.otp import STEP, OtpChecker, provisioning_uri
from spa.core.verify import Accepted, Refused
from spa.core.wire import Action
from tests.world import NOW, Knocker, verifier

SECRET = base64.b32encode(bytes(range(20))).decode()
SRC = ipaddress.ip_address("192.0.2.10")


def code(at: float) -> str:
    return pyotp.TOTP(SECRET).at(at)


def test_codes_within_one_step_of_the_server_clock_pass_once() -> None:
    used: list[tuple[str, int]] = []
    checker = OtpChecker({"alice": SECRET}, on_use=lambda c, s: used.append((c, s)))
    assert checker.check("alice", code(NOW - STEP), NOW) is None  # the phone runs 30 s late
    assert checker.check("alice", code(NOW - STEP), NOW) is Reason.OTP_REUSED
    assert checker.check("alice", code(NOW), NOW) is None
    assert checker.check("alice", code(NOW - STEP), NOW) is Reason.OTP_REUSED  # older: too
    assert checker.check("alice", code(NOW + STEP), NOW) is None  # the phone runs early
    assert used == [("alice", int(NOW // STEP) - 1), ("alice", int(NOW // STEP)),
                    ("alice", int(NOW // STEP) + 1)]


def test_wrong_missing_and_far_codes_are_invalid() -> None:
    checker = OtpChecker({"alice": SECRET})
    for bad in ("", "000000" if code(NOW) != "000000" else "111111",
                code(NOW - 2 * STEP), code(NOW + 2 * STEP)):
        assert checker.check("alice", bad, NOW) is Reason.OTP_INVALID
    assert checker.check("bob", "", NOW) is None  # bob needs no code
    assert checker.required("alice") and not checker.required("bob")


def test_a_changed_secret_is_the_one_checked_and_a_removed_one_needs_no_code() -> None:
    """The checker makes a client's TOTP at its first code: one made for
    an earlier secret never checks the codes of the next."""
    new = base64.b32encode(bytes(range(20, 40))).decode()
    checker = OtpChecker({"alice": SECRET})
    assert checker.check("alice", code(NOW - STEP), NOW) is None  # made for SECRET
    checker.set_secret("alice", new)
    assert checker.check("alice", code(NOW), NOW) is Reason.OTP_INVALID  # the old secret's
    assert checker.check("alice", pyotp.TOTP(new).at(NOW), NOW) is None
    checker.set_secrets({"alice": SECRET})
    assert checker.check("alice", code(NOW + STEP), NOW) is None
    checker.set_secret("alice", "")
    assert checker.check("alice", "", NOW) is None and not checker.required("alice")


def test_a_secret_pyotp_refuses_refuses_every_code_and_never_raises() -> None:
    """Secrets are checked where they are written (the config, a group's
    record); one that reaches the checker anyway fails closed."""
    checker = OtpChecker({"alice": "not base32!"})
    checker.set_secret("bob", "A")  # too short a block for base32
    for client in ("alice", "bob"):
        assert checker.required(client)
        assert checker.check(client, code(NOW), NOW) is Reason.OTP_INVALID
        assert checker.check(client, "", NOW) is Reason.OTP_INVALID


def test_used_steps_survive_a_restart_through_last_steps() -> None:
    first = OtpChecker({"alice": SECRET})
    assert first.check("alice", code(NOW), NOW) is None
    again = OtpChecker({"alice": SECRET}, first.last_steps)
    assert again.check("alice", code(NOW), NOW + 5) is Reason.OTP_REUSED


def test_provisioning_uri_is_what_authenticator_apps_scan() -> None:
    uri = provisioning_uri(SECRET, "alice-phone")
    assert uri.startswith("otpauth://totp/spa:alice-phone?")
    assert f"secret={SECRET}" in uri and "issuer=spa" in uri
    parsed = pyotp.parse_uri(uri)
    assert isinstance(parsed, pyotp.TOTP) and parsed.at(NOW) == code(NOW)


def test_the_verifier_wants_a_code_for_open_only() -> None:
    v = verifier(otp=OtpChecker({"alice": SECRET}))
    alice = Knocker("alice")
    assert v.verify(alice.packet(), SRC, NOW) == Refused(Reason.OTP_INVALID, "alice")
    assert isinstance(v.verify(alice.packet(otp=code(NOW)), SRC, NOW), Accepted)
    assert v.verify(alice.packet(otp=code(NOW)), SRC, NOW) == Refused(Reason.OTP_REUSED,
                                                                      "alice")
    assert isinstance(v.verify(alice.packet(action=Action.CLOSE), SRC, NOW), Accepted)
    bob = Knocker("bob")
    assert isinstance(v.verify(bob.packet("https"), SRC, NOW), Accepted), "bob needs none"


def _rfc6238(secret: bytes, at: float) -> str:
    """RFC 6238's code (SHA-1, 30 s, 6 digits), written out without pyotp."""
    digest = hmac.digest(secret, int(at // STEP).to_bytes(8, "big"), "sha1")
    offset = digest[-1] & 0x0F
    return f"{int.from_bytes(digest[offset:offset + 4], 'big') & 0x7FFFFFFF:010d}"[-6:]


def test_every_secret_the_config_accepts_has_its_codes_accepted() -> None:
    """The config and a group's record take a secret of 80 bits or more
    (10 bytes: JBSWY3DPEHPK3PXP); pyotp 2.12 refuses one under 112 bits,
    which made every code of such a client otp_invalid, silently."""
    assert _rfc6238(b"12345678901234567890", 59) == "287082"  # RFC 6238's vector
    for size in (10, 13, 14, 20):
        raw = bytes(range(100, 100 + size))
        checker = OtpChecker({"alice": base64.b32encode(raw).decode()})
        assert checker.check("alice", _rfc6238(raw, NOW), NOW) is None, size
        assert checker.check("alice", _rfc6238(raw, NOW), NOW) is Reason.OTP_REUSED
    assert OtpChecker({"bob": "JBSWY3DPEHPK3PXP"}).check(
        "bob", _rfc6238(base64.b32decode("JBSWY3DPEHPK3PXP"), NOW), NOW) is None
