"""The authenticator-app second factor (RFC 6238 TOTP, with pyotp).

Invariants (docs/threat-model.md, "Stolen client device"; issue 7):
- A client enrolled with `--otp` must put a valid code from its authenticator
  app in every `open` knock (inside the encrypted body).  The code is the one
  for the server's time, or one step (30 s) either side of it (drift).
- Each code works once: a code whose time step is not later than the last one
  this client used is refused `otp_reused`, even in a new packet (someone who
  saw the code over a shoulder, holding the device's secret, gets nothing).
- A missing or wrong code is `otp_invalid`.  Codes are compared in constant
  time.  Time is an argument (`now`, Unix seconds).
- `close` knocks need no code (`spa-client open --keep` sends one at Ctrl-C;
  closing one's own lease gives an attacker nothing).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping

import pyotp

from spa.core.errors import Reason

STEP = 30  # seconds per code, what authenticator apps use
DRIFT = 1  # steps either side of the server's time that are accepted
ISSUER = "spa"


SECRET_BYTES = 20  # 160 bits, what authenticator apps expect (the caller draws them)
MIN_SECRET_BITS = 80  # the shortest secret the config and a group's record accept


class _TOTP(pyotp.TOTP):
    """pyotp's TOTP taking every secret the config accepts: pyotp 2.12 refuses
    one under 112 bits (its min_secret_length_bits; older versions check
    nothing), and a client with an 80-bit secret the config took (the length
    many authenticator set-ups use) then had every code refused otp_invalid."""

    min_secret_length_bits = MIN_SECRET_BITS


def provisioning_uri(secret: str, client: str) -> str:
    """The otpauth:// URI an authenticator app scans (issuer 'spa', account NAME)."""
    return _TOTP(secret).provisioning_uri(name=client, issuer_name=ISSUER)


class OtpChecker:
    """Who needs a code, and the codes used.  A secret is kept as its text
    and its pyotp.TOTP made at the client's first code (a group member's
    start sets 10^5 clients' secrets: making each took 8 us, 0.4 s in all);
    the callers give secrets their own checks have passed (the config file,
    a group's record), and one that pyotp still refuses is `otp_invalid`."""

    __slots__ = ("_last", "_made", "_secrets", "on_use")

    def __init__(self, secrets: Mapping[str, str], last_steps: Mapping[str, int] | None = None,
                 on_use: Callable[[str, int], None] | None = None) -> None:
        """`secrets`: client -> base32 secret, for the clients that need a code."""
        self._secrets: dict[str, str] = dict(secrets)
        self._made: dict[str, tuple[str, pyotp.TOTP]] = {}  # client -> (secret, its TOTP)
        self._last: dict[str, int] = dict(last_steps or {})
        self.on_use = on_use

    def set_secrets(self, secrets: Mapping[str, str]) -> None:
        """After a reload: who needs a code now (used steps are kept)."""
        self._secrets = dict(secrets)
        self._made = {name: made for name, made in self._made.items()
                      if self._secrets.get(name) == made[0]}

    def set_secret(self, client: str, secret: str) -> None:
        """One client's secret changed (empty: it needs no code any more)."""
        if secret:
            self._secrets[client] = secret
        else:
            self._secrets.pop(client, None)
            self._made.pop(client, None)

    def _totp(self, client: str, secret: str) -> pyotp.TOTP | None:
        """The client's TOTP for `secret`, made once (None: pyotp refuses it)."""
        made = self._made.get(client)
        if made is not None and made[0] == secret:
            return made[1]
        try:
            totp = _TOTP(secret)
        except (ValueError, TypeError):  # (binascii.Error is a ValueError)
            return None
        self._made[client] = (secret, totp)
        return totp

    def required(self, client: str) -> bool:
        return client in self._secrets

    @property
    def last_steps(self) -> dict[str, int]:
        return dict(self._last)

    def last_step(self, client: str) -> int | None:
        """The time step of the last code this client used (None: none yet)."""
        return self._last.get(client)

    def check(self, client: str, code: str, now: float) -> Reason | None:
        """None if the client needs no code or this one is good (it is then
        used up); else the refusal reason."""
        secret = self._secrets.get(client)
        if secret is None:
            return None
        totp = self._totp(client, secret) if code else None
        if totp is None:
            return Reason.OTP_INVALID
        current = int(now // STEP)
        matched = None
        for step in range(current - DRIFT, current + DRIFT + 1):
            if hmac.compare_digest(totp.at(step * STEP), code):
                matched = step
        if matched is None:
            return Reason.OTP_INVALID
        if matched <= self._last.get(client, -1):
            return Reason.OTP_REUSED
        self._last[client] = matched
        if self.on_use is not None:
            self.on_use(client, matched)
        return None
