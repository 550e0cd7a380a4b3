"""A fixed little world for core tests: one server, a few clients, a policy.

Everything is deterministic: secrets and the server id are fixed bytes, time
is a number the test chooses.  Nothing here reads a clock or a CSPRNG.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass

from spa.core.keys import ClientKeys, derive_keys
from spa.core.policy import DEFAULT_SERVICES, ClientPolicy, Policy
from spa.core.verify import Verifier
from spa.core.wire import Action, IPAddress, Request, build_packet

SERVER_ID = bytes(range(16))
OTHER_SERVER_ID = bytes(range(100, 116))
NOW = 1_800_000_000.0  # a fixed "now", 2027-01-15
SECRETS = {
    "alice": bytes([1]) * 32,
    "bob": bytes([2]) * 32,
    "carol": bytes([3]) * 32,  # may allow an address other than the source
    "mallory": bytes([4]) * 32,  # revoked
}
POLICY = Policy(
    dict(DEFAULT_SERVICES),
    {
        "alice": ClientPolicy("alice", frozenset({"ssh", "https"})),
        "bob": ClientPolicy("bob", frozenset({"https"})),
        "carol": ClientPolicy("carol", frozenset({"ssh"}), allow_other_address=True),
        "mallory": ClientPolicy("mallory", frozenset({"ssh"}), revoked=True),
    },
)
SRC = ipaddress.ip_address("192.0.2.10")
SRC6 = ipaddress.ip_address("2001:db8::10")


def keys(client: str, server_id: bytes = SERVER_ID) -> ClientKeys:
    return derive_keys(SECRETS[client], server_id)


def verifier(now: float = NOW, **kwargs: object) -> Verifier:
    return Verifier(SERVER_ID, SECRETS, POLICY, now=now, **kwargs)  # type: ignore[arg-type]


_NONCES = itertools.count(1)  # distinct nonces across every Knocker of a test run


@dataclass
class Knocker:
    """Makes packets for one client with distinct, deterministic nonces."""

    client: str
    server_id: bytes = SERVER_ID

    def nonce(self) -> bytes:
        return next(_NONCES).to_bytes(24, "big")

    def packet(
        self,
        service: str = "ssh",
        *,
        at: float = NOW,
        action: Action = Action.OPEN,
        duration: int = 0,
        address: IPAddress | None = None,
        otp: str = "",
    ) -> bytes:
        request = Request(round(at * 1000), action, service, duration, address, otp)
        return build_packet(request, keys(self.client, self.server_id), self.server_id,
                            nonce=self.nonce())
