"""What a member does with an authenticated packet once it tried to claim its nonce.

Invariants (docs/groups.md, "Claims", "When etcd cannot be reached"):
- Only the member whose claim created the key grants: a claim that finds the
  key there is a replay (the packet, or a copy of it, reached another member
  or this one before), refused `replay`, whatever the mode.
- When the claim cannot be made (etcd unreachable, no answer in time), the
  default, `fail_closed`, refuses the packet `group_unreachable`: no grant
  without a claim.  `local_only`, which an admin must choose, grants on the
  member's own replay cache alone; the verdict says so (GRANT_UNCLAIMED), so
  the daemon logs and counts every such grant.  The risk is LOCAL_ONLY_RISK.
- Pure: enums in, an enum out.
"""

from __future__ import annotations

import enum

from spa.core.errors import Reason

LOCAL_ONLY_RISK = (
    "local_only: while etcd cannot be reached, a member grants on its own replay cache "
    "alone, so a knock captured on the way to one member and sent to another within the "
    "window (default 30 s) is granted there too; fail_closed (the default) grants nothing "
    "until etcd answers")


class OnStoreDown(enum.Enum):
    """What a member does when it cannot claim a nonce in etcd."""

    FAIL_CLOSED = "fail_closed"  # refuse: no grant without a claim (the default)
    LOCAL_ONLY = "local_only"  # grant on the local replay cache alone (see LOCAL_ONLY_RISK)

    def __str__(self) -> str:
        return self.value


DEFAULT_ON_STORE_DOWN = OnStoreDown.FAIL_CLOSED


class ClaimResult(enum.Enum):
    """How a create-if-absent of the claim key ended (the etcd edge says)."""

    CREATED = "created"  # the key did not exist: this member holds the claim
    EXISTS = "exists"  # the key was there: another claim came first
    UNREACHABLE = "unreachable"  # no answer: etcd down, partitioned, or too slow


class Verdict(enum.Enum):
    """The member's decision on the packet."""

    GRANT = "grant"
    GRANT_UNCLAIMED = "grant_unclaimed"  # local_only with etcd down: log and count it
    REFUSE_REPLAY = "refuse_replay"
    REFUSE_UNREACHABLE = "refuse_unreachable"
    REFUSE_OTP_REUSED = "refuse_otp_reused"  # the code's step was used at a member already

    @property
    def granted(self) -> bool:
        return self in (Verdict.GRANT, Verdict.GRANT_UNCLAIMED)

    @property
    def reason(self) -> Reason | None:
        """The refusal reason events and metrics carry (None: granted)."""
        return _REASONS.get(self)


_REASONS = {Verdict.REFUSE_REPLAY: Reason.REPLAY,
            Verdict.REFUSE_UNREACHABLE: Reason.GROUP_UNREACHABLE,
            Verdict.REFUSE_OTP_REUSED: Reason.OTP_REUSED}


def decide(result: ClaimResult, on_store_down: OnStoreDown) -> Verdict:
    """The verdict on an authenticated packet that passed every other check,
    given how its claim ended and the admin's choice for etcd being down."""
    if result is ClaimResult.CREATED:
        return Verdict.GRANT
    if result is ClaimResult.EXISTS:
        return Verdict.REFUSE_REPLAY
    if on_store_down is OnStoreDown.LOCAL_ONLY:
        return Verdict.GRANT_UNCLAIMED
    return Verdict.REFUSE_UNREACHABLE


def decide_otp(result: ClaimResult, on_store_down: OnStoreDown) -> Verdict:
    """The verdict once the packet's nonce is claimed, given how the claim on
    its authenticator code's step ended (spa.group.otpclaim): a step some
    member used already is `otp_reused`, as on one server."""
    if result is ClaimResult.EXISTS:
        return Verdict.REFUSE_OTP_REUSED
    return decide(result, on_store_down)


def parse_on_store_down(text: str) -> OnStoreDown:
    """The mode a config value names.  Raises ValueError with one line."""
    try:
        return OnStoreDown(text)
    except ValueError:
        choices = " or ".join(mode.value for mode in OnStoreDown)
        raise ValueError(f"on_store_down = {text[:40]!r}: choose {choices} (default "
                         f"{DEFAULT_ON_STORE_DOWN.value})") from None
