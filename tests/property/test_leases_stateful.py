"""The lease table against a model, over grants, closes, renewals and time.

Invariant after every step: the firewall that the emitted actions build is
exactly {pair: latest expiry of that pair's live leases}, and no client's
close or expiry ever removes access that another client still holds.
"""

from __future__ import annotations

import ipaddress

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from spa.core.leases import Allow, FirewallAction, Lease, LeaseTable, Remove

CLIENTS = st.sampled_from(["alice", "bob", "carol", "dave"])
ADDRESSES = st.sampled_from([ipaddress.ip_address(a) for a in
                             ("203.0.113.5", "203.0.113.6", "2001:db8::5")])
SERVICES = st.sampled_from(["ssh", "https"])
DURATIONS = st.one_of(st.integers(1, 400), st.floats(0.001, 400, allow_nan=False))


class LeaseMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = LeaseTable()
        self.now = 1000.0
        self.model: dict[tuple[str, object, str], float] = {}
        self.firewall: dict[tuple[object, str], float] = {}

    def apply(self, actions: list[FirewallAction]) -> None:
        for action in actions:
            pair = (action.address, action.service)
            if isinstance(action, Allow):
                assert action.until > self.now, "never allow into the past"
                self.firewall[pair] = action.until
            else:
                assert isinstance(action, Remove)
                assert pair in self.firewall, "remove of a pair the firewall lacks"
                del self.firewall[pair]

    def model_expire(self) -> None:
        self.model = {k: v for k, v in self.model.items() if v > self.now}

    def others_live(self, client: str, address: object, service: str) -> list[float]:
        return [exp for (c, a, s), exp in self.model.items()
                if c != client and a == address and s == service and exp > self.now]

    @rule(client=CLIENTS, address=ADDRESSES, service=SERVICES, duration=DURATIONS)
    def grant(self, client: str, address: object, service: str, duration: float) -> None:
        self.apply(self.table.grant(client, address, service,  # type: ignore[arg-type]
                                    now=self.now, duration=duration))
        self.model_expire()
        key = (client, address, service)
        self.model[key] = max(self.model.get(key, self.now), self.now + duration)

    @rule(client=CLIENTS, address=ADDRESSES, service=SERVICES)
    def close(self, client: str, address: object, service: str) -> None:
        others = self.others_live(client, address, service)
        self.apply(self.table.close(client, address, service,  # type: ignore[arg-type]
                                    now=self.now))
        self.model_expire()
        self.model.pop((client, address, service), None)
        if others:
            assert self.firewall[(address, service)] >= max(others), "a close hurt another"

    @rule(client=CLIENTS)
    def close_client(self, client: str) -> None:
        self.apply(self.table.close_client(client, now=self.now))
        self.model_expire()
        self.model = {k: v for k, v in self.model.items() if k[0] != client}

    @rule(seconds=st.one_of(st.integers(0, 500), st.floats(0, 500, allow_nan=False)))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.apply(self.table.expire(self.now))
        self.model_expire()

    @rule()
    def restart(self) -> None:
        """Persist and rebuild, as the server does at a restart."""
        saved = self.table.leases()
        self.table = LeaseTable.from_leases(saved, now=self.now)

    @invariant()
    def firewall_is_exactly_the_union_of_live_leases(self) -> None:
        wanted: dict[tuple[object, str], float] = {}
        for (_, address, service), expires in self.model.items():
            if expires > self.now:
                pair = (address, service)
                wanted[pair] = max(wanted.get(pair, 0.0), expires)
        # The table expires lazily: pairs whose leases all ended but that no
        # call has expired yet are still allowed; `expire(now)` settles them.
        self.apply(self.table.expire(self.now))
        assert self.firewall == wanted
        assert self.table.allowed() == wanted
        assert sorted(self.table.leases(), key=_key) == sorted(
            (Lease(c, a, s, e) for (c, a, s), e in self.model.items()  # type: ignore[arg-type]
             if e > self.now), key=_key)


def _key(lease: Lease) -> tuple[str, str, str, float]:
    return (lease.client, str(lease.address), lease.service, lease.expires)


# Each example runs up to 60 steps; the CI profile's 3000 examples would take
# minutes here, so the machine runs at most 800 (48,000 steps) per run.
LeaseMachine.TestCase.settings = settings(
    LeaseMachine.TestCase.settings, stateful_step_count=60,
    max_examples=min(settings().max_examples, 800))
TestLeaseTable = LeaseMachine.TestCase
