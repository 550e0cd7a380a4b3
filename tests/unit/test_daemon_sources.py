"""Source networks in the daemon, with fakes: `clients set` reaches a running
server within one housekeeping round, and a knock from elsewhere is refused
`source_not_allowed` in the event store, the log and the metrics."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest

from spa.core.errors import Reason
from spa.core.sources import NOWHERE
from spa.core.verify import Accepted, Refused
from spa.server import admin
from spa.server.config import ClientEntry, client_policy
from spa.server.metrics import Metrics
from tests.server_world import World

HOME = "192.0.2.0/28"
INSIDE, OUTSIDE = "192.0.2.10", "192.0.2.20"  # the second is past the /28


def test_a_running_server_applies_a_clients_networks_at_once(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.init()
    world.enroll("alice")
    server = world.start()
    rules = server.verifier.policy.clients
    admin.set_sources(world.config_path, "alice", [HOME], now=world.clock.now)
    server.housekeeping()
    server.run_commands()  # what the receive thread does between batches
    assert server.verifier.policy.clients is rules, "one entry swapped in, not a new policy"
    refused = server.handle(world.packet("alice", duration=60), OUTSIDE)
    assert refused == Refused(Reason.SOURCE_NOT_ALLOWED, "alice")
    assert world.backend.grants == {}, "nothing opens"
    assert isinstance(server.handle(world.packet("alice", duration=60), INSIDE), Accepted)
    assert [str(address) for address, _ in world.backend.grants] == [INSIDE]
    events = world.events()
    assert [(e.outcome, e.reason, e.client, e.source) for e in events
            if e.outcome == "refused"] == [("refused", "source_not_allowed", "alice", OUTSIDE)]
    assert any(line.startswith(f"refused reason=source_not_allowed client=alice src={OUTSIDE}")
               for line in world.logs), world.logs
    metrics = Metrics()
    metrics.observe(events)
    assert ('spa_knocks_total{outcome="refused",reason="source_not_allowed"} 1.0'
            in generate_latest(metrics.registry).decode())
    admin.set_sources(world.config_path, "alice", [], now=world.clock.now)
    server.housekeeping()
    server.run_commands()
    assert isinstance(server.handle(world.packet("alice", duration=60), OUTSIDE), Accepted)


def test_clients_with_the_same_networks_share_one_tuple_and_a_bad_list_allows_none() -> None:
    """network_set interns per distinct list, as service_set does (10^5 clients
    of one office: one tuple); a list no command would have written (a store
    edited by hand) allows no source rather than any."""
    def rules(name: str, sources: tuple[str, ...]) -> object:
        return client_policy(ClientEntry(name, bytes(32), ("ssh",), sources=sources)).sources

    assert rules("a", (HOME,)) is rules("b", tuple([HOME]))
    assert rules("c", ()) == ()
    assert rules("d", ("192.0.2.7/24",)) is NOWHERE
