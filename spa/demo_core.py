"""An in-process walk through the protocol core (no network, no firewall).

This is the edge that reads the clock and the CSPRNG and hands them to the
pure core.  `spa-server demo` runs it until the loopback demo lands.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable

from spa.core.leases import Allow, FirewallAction, LeaseTable, Remove
from spa.core.policy import DEFAULT_SERVICES, ClientPolicy, Policy
from spa.core.uri import Enrollment, ServiceRef, render
from spa.core.verify import Accepted, Refused, Verifier
from spa.core.wire import PACKET_SIZE, Action, Request, build_packet


def _describe(action: FirewallAction) -> str:
    if isinstance(action, Allow):
        return f"firewall: allow {action.address} -> {action.service} until +{action.until:.0f}s"
    assert isinstance(action, Remove)
    return f"firewall: remove {action.address} -> {action.service}"


def run(say: Callable[[str], None] = print) -> int:
    """Tell the story; return 0 when every step behaved as the protocol says."""
    server_id, secrets = os.urandom(16), {"alice": os.urandom(32), "bob": os.urandom(32)}
    policy = Policy(dict(DEFAULT_SERVICES), {
        "alice": ClientPolicy("alice", frozenset({"ssh", "https"})),
        "bob": ClientPolicy("bob", frozenset({"https"})),
    })
    now = time.time()
    verifier = Verifier(server_id, secrets, policy, now=now)
    leases = LeaseTable()
    nat = ipaddress.ip_address("203.0.113.5")
    uri = render(Enrollment("knock.example.org", 62201, server_id, "alice", secrets["alice"],
                            (ServiceRef("ssh", "tcp", 22), ServiceRef("https", "tcp", 443))))
    say(f"enrolled alice and bob; alice's URI: {uri.split('key=')[0]}key=<secret>&...")
    ok = True

    def knock(client: str, action: Action, service: str, duration: int = 0) -> bytes:
        from spa.core.keys import derive_keys

        request = Request(int(now * 1000), action, service, duration)
        return build_packet(request, derive_keys(secrets[client], server_id), server_id,
                            nonce=os.urandom(24))

    def receive(label: str, packet: bytes, expect: str) -> Accepted | Refused:
        nonlocal ok
        started = time.perf_counter()
        result = verifier.verify(packet, nat, now)
        micros = (time.perf_counter() - started) * 1e6
        outcome = "accepted" if isinstance(result, Accepted) else f"refused {result.reason}"
        ok &= outcome == expect
        say(f"{label:<38} -> {outcome} ({micros:.0f} us)")
        if isinstance(result, Accepted):
            d = result.decision
            if result.request.action is Action.OPEN:
                actions = leases.grant(result.client, d.address, d.service.name,
                                       now=0, duration=d.duration)
            else:
                actions = leases.close(result.client, d.address, d.service.name, now=0)
            for action in actions:
                say(f"    {_describe(action)}")
        return result

    first = knock("alice", Action.OPEN, "ssh", 60)
    say(f"every packet is {PACKET_SIZE} bytes of UDP; the server never answers")
    receive("alice: open ssh for 60 s", first, "accepted")
    receive("the same packet again (replay)", first, "refused replay")
    tampered = bytearray(first)
    tampered[60] ^= 1
    receive("alice's packet with one bit flipped", bytes(tampered), "refused bad_mac")
    receive("random junk", b"\x01" + os.urandom(PACKET_SIZE - 1), "refused unknown_tag")
    receive("bob: open ssh (not his service)", knock("bob", Action.OPEN, "ssh"),
            "refused service_not_allowed")
    receive("alice: open https (behind NAT)", knock("alice", Action.OPEN, "https", 600),
            "accepted")
    receive("bob: open https (same NAT address)", knock("bob", Action.OPEN, "https", 1200),
            "accepted")
    receive("alice: close https", knock("alice", Action.CLOSE, "https"), "accepted")
    say(f"    bob still holds https: {list(leases.holders(nat, 'https'))}")
    receive("bob: close https", knock("bob", Action.CLOSE, "https"), "accepted")
    for action in leases.expire(61):
        say(f"61 s later: {_describe(action)}")
    say("demo " + ("passed: every packet got the verdict the protocol promises" if ok
                   else "FAILED: a verdict differed from the protocol"))
    return 0 if ok else 1
