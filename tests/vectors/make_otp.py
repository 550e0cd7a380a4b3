"""Make tests/vectors/otp_v1.json: the authenticator codes of a fixed secret
(RFC 6238: HMAC-SHA-1, 6 digits, 30 s steps from T0 = 0) and a sequence of
open knocks' codes with the server's verdict on each, in order (each code
once; a step not later than the last used one refused; one step of drift).
Frozen once made; tests/unit/test_vectors.py checks it against spa.core.otp.

    .venv/bin/python -m tests.vectors.make_otp > tests/vectors/otp_v1.json
"""

from __future__ import annotations

import base64
import json
import sys

import pyotp

from spa.core.otp import OtpChecker, provisioning_uri

SECRET = base64.b32encode(bytes(range(0x40, 0x40 + 20))).decode()  # 160 bits, as enroll draws
T = 1_800_000_000  # the start of step 60000000


def code(step: int) -> str:
    return pyotp.TOTP(SECRET).at(step * 30)


def sequence() -> list[tuple[float, str, str]]:
    """(now, code sent, why) in order."""
    s = T // 30
    wrong = next(c for c in ("000000", "111111", "222222") if c not in {
        code(s + i) for i in range(1, 4)})
    return [
        (T + 0.0, code(s), "the current step's code"),
        (T + 1.0, code(s), "the same code again, in a new packet"),
        (T + 2.0, code(s - 1), "the previous step's code: within the drift, but not later "
         "than the last used"),
        (T + 3.0, code(s + 1), "the next step's code: within the drift and later"),
        (T + 30.0, code(s + 1), "that code at its own step: used already"),
        (T + 60.0, code(s + 2), "a later step's code"),
        (T + 61.0, code(s + 4), "two steps ahead: beyond the drift"),
        (T + 62.0, "", "no code"),
        (T + 63.0, code(s + 2) + "0", "7 digits: well-formed on the wire, never a match"),
        (T + 64.0, wrong, "a wrong code"),
        (T + 90.0, code(s + 2), "the previous step's code, used already"),
        (T + 91.0, code(s + 3), "the current step's code"),
        (T + 300.0, code(s + 9), "long after: the current step's code"),
    ]


def main() -> None:
    checker = OtpChecker({"t": SECRET})
    rows = []
    for now, sent, why in sequence():
        refused = checker.check("t", sent, now)
        rows.append({"now": now, "code": sent, "verdict": "accepted" if refused is None
                     else refused.value, "why": why})
    doc = {
        "comment": "Authenticator codes (RFC 6238: HMAC-SHA-1, 6 digits, 30 s steps, T0 = 0) "
                   "of secret_base32, and the server's verdict on each code of a sequence "
                   "of open knocks by one client, judged in order from a fresh start "
                   "(spa.core.otp; docs/protocol.md, 'Authenticator codes').  Made by "
                   "tests/vectors/make_otp.py.",
        "secret_base32": SECRET,
        "provisioning_uri": provisioning_uri(SECRET, "alice"),
        "codes": [{"time": T + 30 * i, "step": T // 30 + i, "code": code(T // 30 + i)}
                  for i in range(-1, 4)],
        "sequence": rows,
    }
    sys.stdout.write(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
