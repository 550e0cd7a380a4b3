"""Prometheus metrics (issue 8), served on loopback when [metrics] listen is set.

Invariants:
- Nothing on the receive path: counters advance from the rows the event
  store writes (once per housekeeping round, aggregated refusals weighted by
  their count), so a flood costs the metrics nothing per packet.
- Replays have their own counter: a replay means someone captured a knock.
- Gauges (active leases per service, the kernel's receive-queue drops) are set
  each round from the daemon's own state.
- Off by default; the endpoint binds where the admin says (loopback in the
  docs' example) and serves only metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from spa.server.errors import LocalError
from spa.server.events import Event


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.knocks = Counter("spa_knocks", "Knocks by outcome (accepted, refused) and reason",
                              ["outcome", "reason"], registry=self.registry)
        self.replays = Counter("spa_replays", "Replayed knocks refused (someone captured a "
                               "packet: alert on any increase)", registry=self.registry)
        self.leases_started = Counter("spa_leases_started", "Grants that opened a service",
                                      ["service"], registry=self.registry)
        self.dropped = Counter("spa_firewall_dropped", "Connection attempts the firewall "
                               "dropped on protected ports", ["service"],
                               registry=self.registry)
        self.scans = Counter("spa_scans", "Port scans or brute-force runs seen",
                             registry=self.registry)
        self.restores = Counter("spa_firewall_restores", "Times another program removed or "
                                "altered the gate and spa put it back (alert on any increase)",
                                ["reason"], registry=self.registry)
        self.active_leases = Gauge("spa_active_leases", "Leases now open", ["service"],
                                   registry=self.registry)
        self.receive_drops = Gauge("spa_receive_queue_drops", "Datagrams the kernel dropped "
                                   "because the knock socket's queue was full (since start)",
                                   registry=self.registry)
        self._server: Any = None

    def observe(self, events: Iterable[Event]) -> None:
        """Advance the counters by rows the event store just wrote."""
        for event in events:
            if event.outcome in ("accepted", "refused"):
                self.knocks.labels(event.outcome, event.reason or "").inc(event.count)
                if event.reason == "replay":
                    self.replays.inc(event.count)
            elif event.outcome == "lease_start":
                self.leases_started.labels(event.service or "").inc(event.count)
            elif event.outcome == "dropped":
                self.dropped.labels(event.service or "").inc(event.count)
            elif event.outcome == "scan":
                self.scans.inc()
            elif event.outcome == "firewall":
                self.restores.labels(event.reason or "").inc(event.count)

    def set_state(self, leases: Mapping[str, int], services: Iterable[str],
                  receive_drops: int | None) -> None:
        for name in services:
            self.active_leases.labels(name).set(leases.get(name, 0))
        if receive_drops is not None:
            self.receive_drops.set(receive_drops)

    def serve(self, listen: str) -> None:
        """Serve /metrics at HOST:PORT in a daemon thread.  Raises LocalError."""
        host, _, port = listen.rpartition(":")
        try:
            self._server = start_http_server(int(port), addr=host.strip("[]"),
                                             registry=self.registry)
        except OSError as exc:
            raise LocalError(f"[metrics] listen = {listen!r}: cannot listen there: "
                             f"{exc.strerror or exc}") from None

    def close(self) -> None:
        if isinstance(self._server, tuple):  # (server, thread) in prometheus-client >= 0.17
            self._server[0].shutdown()
