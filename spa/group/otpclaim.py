"""A group client's authenticator code, used up at every member.

Invariants (docs/groups.md, "Authenticator codes across members";
docs/protocol.md, "Authenticator codes"):
- On one server a code works once: its time step must be later than the last
  step the client used (spa.core.otp).  Each member still checks that, and a
  member that granted a packet's nonce claim then creates
  claims/<client>/otp-<step> only if absent: only the member whose create
  made the key grants; one that finds it there refuses `otp_reused`, for a
  new packet with a new nonce too.  So a code used at one member is refused
  at every other.
- With it the member creates, whatever they hold, the keys of the EARLIER
  steps before it that a member (its clock up to MEMBER_SKEW behind) could
  still accept: as on one server, an earlier code is refused once a later one
  was used, at every member whose claim comes after.  (Two codes used at two
  members in the same instant may both pass; each was used once.)
- Every such key lives while any member could accept its code: until the end
  of its step's drift (step + DRIFT + 1 steps) plus MEMBER_SKEW, as an etcd
  lease.  The keys sit under claims/, so a member's role writes them as it
  writes its nonce claims (spa.group.rbac: no new permission).
"""

from __future__ import annotations

from spa.core.otp import DRIFT, STEP
from spa.group import layout
from spa.group.kv import KV
from spa.group.records import MEMBER_SKEW, Claim, encode_claim, lease_ttl

# steps before a used one that a member may still accept: the server's drift
# either side, and one more for a member whose clock is MEMBER_SKEW (< STEP) behind
EARLIER = 2 * DRIFT + 1


def otp_claim_until(step: int, skew: float = MEMBER_SKEW) -> float:
    """Until when the claim on a code of time step `step` must hold: a member
    accepts that code while its clock's step is at most step + DRIFT
    (spa.core.otp), and one `skew` behind reaches the end of that later."""
    return (step + DRIFT + 1) * STEP + skew


def otp_claim_ttl(step: int, now: float) -> int:
    """The etcd lease, in seconds, of the claim on `step` made at `now`."""
    return lease_ttl(otp_claim_until(step), now)


def claim_step(kv: KV, group: str, client: str, step: int, member: str, now: float) -> bool:
    """Create the step's key if absent, and the EARLIER steps' keys (their
    results ignored), on one lease; True if this call made the step's key.
    Raises StoreError (StorePermissionError: etcd's RBAC refused it)."""
    value = encode_claim(Claim(member, now))
    lease = kv.grant(otp_claim_ttl(step, now))
    created = kv.create(layout.otp_claim_key(group, client, step).encode(), value, lease)
    if created:
        for earlier in range(max(step - EARLIER, 0), step):
            kv.create(layout.otp_claim_key(group, client, earlier).encode(), value, lease)
    return created
