"""An adversarial review of the group's claims and shared leases (2026-12-06):
each test is a sequence that broke a claim of docs/threat-model.md ("Groups
on etcd") before its fix, or one that held, kept as a guard."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import pyotp
import pytest

from spa.core.otp import STEP
from spa.core.wire import Action
from spa.group import claims as claims_module
from spa.group import layout
from spa.group.kv import StoreError, StoreUnavailableError
from spa.group.policy import OnStoreDown
from tests.group_world import GROUP, SOURCE, Group

LEASE_KEY = layout.lease_key(GROUP, "alice", ipaddress.ip_address(SOURCE), "ssh").encode()


class Deferred:
    """A claim thread that runs when the test says (the receive thread has
    handed it the packet; its transaction is in flight)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> object:
        self.jobs.append((fn, args))
        return None

    def run(self) -> None:
        jobs, self.jobs = self.jobs, []
        for fn, args in jobs:
            fn(*args)


def test_a_close_queued_before_a_members_own_grant_never_ends_that_grant(
        group: Group) -> None:
    """a grants (r1), a closes (r2, queued at b), b grants anew (r3) before
    its receive thread runs r2's removal: b's own lease is put back by r3's
    echo, in order after the removal."""
    a, b = group.member("a"), group.member("b")
    group.enroll("alice")
    group.settle()
    a.handle(group.packet("alice"), SOURCE)
    group.settle()
    assert group.grants("b") == {(SOURCE, "ssh")}
    a.handle(group.packet("alice", action=Action.CLOSE, duration=0), SOURCE)
    b.handle(group.packet("alice"), SOURCE)
    assert group.grants("b") == {(SOURCE, "ssh")}
    group.settle()
    assert group.kv.get(LEASE_KEY) is not None  # the group holds b's lease
    assert group.grants("a") == group.grants("b") == {(SOURCE, "ssh")}


def test_a_close_that_lands_while_a_members_claim_is_in_flight_ends_nothing_of_its_grant(
        group: Group) -> None:
    """The same with b's claim on a claim thread of its own (as in the
    daemon): r2's removal, run after b's grant, does not end it for good."""
    a, b = group.member("a"), group.member("b")
    group.enroll("alice")
    group.settle()
    a.handle(group.packet("alice"), SOURCE)
    group.settle()
    deferred = Deferred()
    group.links["b"].claimer.executor = deferred
    b.run_commands()
    b.handle(group.packet("alice"), SOURCE)
    a.handle(group.packet("alice", action=Action.CLOSE, duration=0), SOURCE)
    deferred.run()
    assert group.grants("b") == {(SOURCE, "ssh")}
    group.settle()
    assert group.kv.get(LEASE_KEY) is not None
    assert group.grants("a") == group.grants("b") == {(SOURCE, "ssh")}


def test_an_install_queued_before_a_close_here_never_reopens_it(group: Group) -> None:
    a, b = group.member("a"), group.member("b")
    group.enroll("alice")
    group.settle()
    a.handle(group.packet("alice"), SOURCE)
    b.handle(group.packet("alice", action=Action.CLOSE, duration=0), SOURCE)
    group.settle()
    assert group.grants("a") == group.grants("b") == set()


def test_etcd_refusing_the_members_user_is_never_a_grant_even_local_only(
        group: Group) -> None:
    """A refusal that is an answer (the member's user deleted or its password
    changed: a plain StoreError from the login) is not an outage:
    on_store_down = local_only does not turn it into a grant."""
    a = group.member("a", OnStoreDown.LOCAL_ONLY)
    group.enroll("alice")
    group.settle()

    def refused(*args: object, **kwargs: object) -> object:
        raise StoreError("etcd refused user 'a': check its password file and that the "
                         "user exists")
    group.links["a"].claimer.kv.create_many = refused  # type: ignore[assignment,method-assign]
    a.handle(group.packet("alice"), SOURCE)
    assert group.grants("a") == set()


def test_a_knock_whose_claim_was_in_flight_when_revoke_close_landed_opens_nothing(
        group: Group) -> None:
    a, _ = group.member("a"), group.member("b")
    group.enroll("alice")
    group.settle()
    deferred = Deferred()
    group.links["a"].claimer.executor = deferred
    a.handle(group.packet("alice"), SOURCE)  # accepted at a; its claim thread has it
    group.revoke("alice", close=True)  # committed meanwhile, applied at both
    group.settle()
    deferred.run()  # a's claim lands (and writes the lease record)
    group.settle()  # b sees the record
    assert a.verifier.policy.clients["alice"].revoked
    assert group.grants("a") == group.grants("b") == set()
    assert ("revoked", "alice") in group.refusals("a")


def test_a_client_being_removed_is_still_claimed_never_granted_twice(group: Group) -> None:
    """clients/alice deleted: each member's watch drops alice from its view
    at once, while its verifier forgets alice only at the receive thread's
    next turn; a packet (and its copy at the other member) judged in between
    is still claimed as a group client's: granted at one member at most."""
    a, b = group.member("a"), group.member("b")
    group.enroll("alice")
    group.settle()
    packet = group.packet("alice")
    group.kv.delete(layout.client_key(GROUP, "alice").encode())
    a.handle(packet, SOURCE)
    b.handle(packet, SOURCE)
    assert not (group.grants("a") and group.grants("b"))


def test_a_close_whose_delete_failed_stays_closed_here_after_a_reread(group: Group) -> None:
    """Held: a close whose delete etcd did not take (a code's step claimed
    apart) is not shared, and a re-read at its member does not reopen it."""
    a, _ = group.member("a"), group.member("b")
    group.enroll("alice", otp=True)
    group.settle()
    code = pyotp.TOTP(group.otp_secrets["alice"]).at(group.clock.now)
    a.handle(group.packet("alice", duration=300, otp=code), SOURCE)
    group.settle()
    assert group.grants("a") == group.grants("b") == {(SOURCE, "ssh")}
    group.clock.advance(STEP + 1)
    code = pyotp.TOTP(group.otp_secrets["alice"]).at(group.clock.now)
    real_delete = group.kv.delete

    def blip(key: bytes) -> bool:
        raise StoreUnavailableError("etcd could not delete a key: no endpoint answered")
    group.kv.delete = blip  # type: ignore[method-assign]
    a.handle(group.packet("alice", action=Action.CLOSE, duration=0, otp=code), SOURCE)
    group.kv.delete = real_delete  # type: ignore[method-assign]
    group.settle()
    assert group.grants("a") == set()
    b_after_close = group.grants("b")
    group.links["a"].member.load()
    group.settle()
    assert (b_after_close, group.grants("a")) == (set(), set())


def test_etcd_refusing_a_codes_step_claim_is_never_a_grant_even_local_only(
        group: Group, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for the claim of an authenticator code's step: an answer
    that refuses (here the login) is no grant under local_only; no answer is
    what on_store_down decides."""
    a = group.member("a", OnStoreDown.LOCAL_ONLY)
    group.enroll("alice", otp=True)
    group.settle()

    def refused(*args: object, **kwargs: object) -> bool:
        raise StoreError("etcd refused user 'a': check its password file and that the "
                         "user exists")
    monkeypatch.setattr(claims_module, "claim_step", refused)
    code = pyotp.TOTP(group.otp_secrets["alice"]).at(group.clock.now)
    a.handle(group.packet("alice", otp=code), SOURCE)
    assert group.grants("a") == set()
