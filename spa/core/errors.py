"""Refusal reasons and the one remote-error type.

Invariants (docs/protocol.md, "Verification order"; STYLE principle 4):
- Every refusal of a packet carries exactly one `Reason`.
- Anything a remote party can make the core do wrong surfaces as `PacketError`
  and nothing else; the verifier turns it into a `Refused` value.  The wire never
  learns the reason: the server does not answer.
"""

from __future__ import annotations

import enum


class Reason(enum.Enum):
    """Why a packet was refused, in the order the checks run."""

    BAD_LENGTH = "bad_length"
    BAD_VERSION = "bad_version"
    UNKNOWN_TAG = "unknown_tag"
    RATE_LIMITED = "rate_limited"  # a tag or source over its forged-packet limit
    BAD_MAC = "bad_mac"
    BAD_CIPHERTEXT = "bad_ciphertext"
    MALFORMED = "malformed"
    STALE = "stale"
    FUTURE = "future"
    STEP_MISMATCH = "step_mismatch"
    REPLAY = "replay"
    REPLAY_CACHE_FULL = "replay_cache_full"
    REVOKED = "revoked"
    ENROLLMENT_EXPIRED = "enrollment_expired"  # a pending client's first knock came too late
    SERVICE_NOT_ALLOWED = "service_not_allowed"
    ADDRESS_NOT_ALLOWED = "address_not_allowed"
    # the packet's source is outside the client's source networks (enroll --from)
    SOURCE_NOT_ALLOWED = "source_not_allowed"
    OTP_INVALID = "otp_invalid"  # a client enrolled with --otp sent no code or a wrong one
    OTP_REUSED = "otp_reused"  # that code (or a later one) was used before
    # the route back to the source does not leave by the arrival interface
    # (checked by the daemon after the verifier accepted; docs/threat-model.md)
    SPOOFED_SOURCE = "spoofed_source"
    # a member of a group could not claim the packet's nonce in etcd, and the
    # group fails closed (spa.group.policy; docs/groups.md): no grant without a claim
    GROUP_UNREACHABLE = "group_unreachable"
    # a named gateway service's host (docs/install.md, section 11), resolved
    # by the daemon when a lease starts: no address of the client's IP
    # version, a resolver error or no answer in time (spa/server/gwresolve.py)
    HOST_UNRESOLVED = "host_unresolved"
    # ... or it resolved to an address no gateway may reach (loopback,
    # link-local, this machine's own: spa/server/config.py gateway_host_problem)
    HOST_NOT_ALLOWED = "host_not_allowed"
    # fwknop's packets (spa.core.fwknop, spa.core.fwknop_verify; docs/protocol.md,
    # "fwknop compatibility"): what the compat listener refuses, each its own
    UNKNOWN_SENDER = "unknown_sender"  # no compat client's HMAC key matches (fwknop's junk)
    HMAC_BUDGET = "hmac_budget"  # the compat port's HMAC work for a source, or in all, is spent
    GPG_MODE = "gpg_mode"  # GnuPG encryption (fwknopd's length rule, or its HMAC prefix)
    NO_HMAC = "no_hmac"  # a packet with no HMAC (decrypts under a client's key: diagnosed)
    WEAK_HMAC = "weak_hmac"  # an HMAC-MD5 or HMAC-SHA1 (fits a client's key: diagnosed)
    OTHER_HMAC = "other_hmac"  # an HMAC-SHA384 or -SHA512 (only HMAC-SHA256 is taken)
    WEAK_DIGEST = "weak_digest"  # fwknop -m md5 / sha1: the inner digest MD5 or SHA-1
    LEGACY_IV = "legacy_iv"  # fwknop's legacy IV mode (a short key padded with '0's)
    COMMAND_MESSAGE = "command_message"  # remote execution: never
    NAT_MESSAGE = "nat_message"  # fwknop NAT access naming no gateway service exactly; local NAT

    def __str__(self) -> str:
        return self.value


# Refusals that come after the packet's MAC and ciphertext checked out: its
# sender held a client's key (or replays a packet too old for the replay set).
# (Not SPOOFED_SOURCE: its source is the one thing not proven, and the daemon
# spares the sources listed here from scan detection.)
AFTER_AUTHENTICATION = frozenset({
    Reason.STALE, Reason.FUTURE, Reason.STEP_MISMATCH, Reason.REPLAY_CACHE_FULL,
    Reason.REVOKED, Reason.ENROLLMENT_EXPIRED, Reason.SERVICE_NOT_ALLOWED,
    Reason.ADDRESS_NOT_ALLOWED, Reason.SOURCE_NOT_ALLOWED, Reason.OTP_INVALID,
    Reason.OTP_REUSED, Reason.GROUP_UNREACHABLE,
    Reason.LEGACY_IV, Reason.COMMAND_MESSAGE, Reason.NAT_MESSAGE, Reason.WEAK_DIGEST,
})


# Reasons only the compat listener gives (fwknop's packets): a flood there folds
# into the same event budget as ours (rows may wait a second; no count is lost).
FWKNOP_ONLY = frozenset({
    Reason.UNKNOWN_SENDER, Reason.HMAC_BUDGET, Reason.GPG_MODE, Reason.NO_HMAC,
    Reason.WEAK_HMAC, Reason.OTHER_HMAC, Reason.WEAK_DIGEST, Reason.LEGACY_IV,
    Reason.COMMAND_MESSAGE, Reason.NAT_MESSAGE,
})


class PacketError(Exception):
    """A packet (or a field of one) is not acceptable.  Remote input only."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


class FormatError(ValueError):
    """Local input (an enrollment URI, a saved cache) is malformed.

    The message is one line meant for an operator or user, and never contains
    a secret.
    """
