"""What a change of clients does to a running server, as one value.

Invariants (docs/groups.md, "Members"):
- A ClientDelta is everything the receive thread needs to switch some
  clients from what it runs with to what they are now: the key names to
  forget, the keys to add (a local client's master secret, or a group
  client's derived keys: never both for one name), each client's rules and
  authenticator secret, who is pending or met its enroll_by, whose leases
  close now (a revoke with close) and who was just revoked.  The daemon
  carries one out the same way whoever made it: its client store
  (spa.server.daemon) or a group's watch (spa.group.member).
- `group_delta` is pure: the views before and after, the keys the verifier
  holds, and `now` in; a delta out.  A group client's rules are its record's
  with its revocation (revoked/<name>) and activation (activated/<name>) keys.
  A revoked group client's keys leave the verifier and the kernel's tag
  filter (docs/groups.md: a revoke removes its tags at every member).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from spa.core.keys import ClientKeys
from spa.core.policy import ClientPolicy
from spa.core.verify import Verifier
from spa.group.clients import GroupClient
from spa.group.records import Revocation


@dataclass(frozen=True, slots=True)
class ClientDelta:
    """The switch of `names` from what the server runs with to what they are."""

    names: tuple[str, ...]
    gone: tuple[str, ...] = ()  # key names (NAME, NAME~old) the verifier forgets
    secrets: Mapping[str, bytes] = field(default_factory=dict, repr=False)  # key -> secret
    keys: Mapping[str, ClientKeys] = field(default_factory=dict, repr=False)  # key -> keys
    rules: Mapping[str, ClientPolicy | None] = field(default_factory=dict)  # None: gone
    otp: Mapping[str, str] = field(default_factory=dict, repr=False)  # "" : no code
    met: frozenset[str] = frozenset()  # pending clients that knocked in time
    pending: frozenset[str] = frozenset()  # pending clients not (yet)
    closed: tuple[str, ...] = ()  # revoked with close just now: their leases end now
    revoked: tuple[str, ...] = ()  # revoked just now, leases left to run out

    @property
    def added(self) -> int:
        return len(self.secrets) + len(self.keys)


def switch_verifier(verifier: Verifier, delta: ClientDelta, *, later: bool) -> None:
    """The verifier's part of carrying a delta out, on the receive thread:
    key names forgotten, secrets and derived keys in (`later`: each key's
    other live steps are sliced in afterwards, the current one now), then
    each client's rules and authenticator secret swapped one entry at a time
    in the clients mapping the verifier's Policy reads (Policy stays a value;
    that mapping is the daemon's).  The daemon's apply_client_delta and
    benchmarks/group_scale.py (which times it) both call this."""
    for key in delta.gone:
        verifier.remove_client(key)
    for key, secret in delta.secrets.items():
        verifier.add_client(key, secret)
    verifier.add_clients_keys(delta.keys, later=later)  # (one lock hold: TagTable.add_many)
    held = verifier.policy.clients
    assert isinstance(held, dict)
    for name, rule in delta.rules.items():
        if rule is None:
            held.pop(name, None)
        else:
            held[name] = rule
        verifier.otp.set_secret(name, delta.otp.get(name, ""))


@dataclass(frozen=True, slots=True)
class ClientView:
    """A group client as the member knows it: record, revocation, activation."""

    client: GroupClient
    revocation: Revocation | None = None
    activated: int | None = None  # the enroll_by an activated/<name> key says it met

    @property
    def met(self) -> bool:
        return (self.client.enroll_by is not None
                and self.activated == self.client.enroll_by)

    def keys(self, now: float) -> dict[str, ClientKeys]:
        """The keys the verifier holds for it at `now`: none once revoked
        (its knocks die at the kernel's tag filter), else its record's live
        ones (NAME~old only while the grace lasts)."""
        return {} if self.revocation is not None else self.client.key_sets(now)

    def rules(self) -> ClientPolicy:
        return self.client.policy(revoked=self.revocation is not None)


def group_delta(before: Mapping[str, ClientView | None], after: Mapping[str, ClientView | None],
                held: Mapping[str, Mapping[str, ClientKeys]], now: float, *,
                live: Mapping[str, Mapping[str, ClientKeys]] | None = None) -> ClientDelta:
    """The delta for the clients named in `after` (`before`: as the server
    runs them, None: unknown to it; `held`: the keys the verifier holds per
    client).  A view's keys are its record's live at `now` (NAME~old only
    while its grace lasts); `live`, if given, holds them already for every
    name of `after` (view.keys(now): the member made them once)."""
    gone: list[str] = []
    keys: dict[str, ClientKeys] = {}
    rules: dict[str, ClientPolicy | None] = {}
    otp: dict[str, str] = {}
    closed: list[str] = []
    revoked: list[str] = []
    met: list[str] = []
    pending: list[str] = []
    for name, view in after.items():  # one pass (a first read: 10^5 names)
        old_keys = held.get(name)
        if view is None:
            gone += old_keys or ()
            rules[name], otp[name] = None, ""
            continue
        new_keys = live[name] if live is not None else view.keys(now)
        if old_keys:
            gone += [key for key in old_keys if key not in new_keys]
            keys.update({k: v for k, v in new_keys.items() if old_keys.get(k) != v})
        else:
            keys.update(new_keys)
        client = view.client
        rules[name], otp[name] = view.rules(), client.otp_secret
        if client.enroll_by is not None:
            (met if view.met else pending).append(name)
        revocation = view.revocation
        if revocation is not None:
            was = before.get(name)
            was_revocation = was.revocation if was is not None else None
            if revocation.close and not (was_revocation is not None and was_revocation.close):
                closed.append(name)
            elif was_revocation is None:
                revoked.append(name)
    return ClientDelta(tuple(after), tuple(gone), {}, keys, rules, otp, frozenset(met),
                       frozenset(pending),
                       tuple(closed), tuple(revoked))
