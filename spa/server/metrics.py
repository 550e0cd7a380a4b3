"""Prometheus metrics (issue 8), served on loopback when [metrics] listen is set.

Invariants:
- Nothing on the receive path: counters advance from the rows the event
  store writes (once per housekeeping round, aggregated refusals weighted by
  their count), so a flood costs the metrics nothing per packet.
- Replays have their own counter: a replay means someone captured a knock.
- Compat knocks (fwknop's packets) count in `spa_legacy_knocks`, never in
  `spa_knocks` (replays in both listeners count in `spa_replays`).
- Gauges (active leases per service, the kernel's receive-queue drops) are set
  each round from the daemon's own state.
- Off by default; the endpoint binds where the admin says (loopback in the
  docs' example) and serves only GET /metrics.
- Whatever others open against it (issue 13, finding 5; docs/threat-model.md,
  "Local users and the admin surfaces"), it costs one thread, at most
  MAX_CONNECTIONS sockets of MAX_REQUEST_BYTES each, and no connection lives
  longer than REQUEST_SECONDS: idle, half-open and slowloris connections are
  closed, the longest-waiting first when a new one needs room, so a scraper
  always gets in (spa.server.admission).  One asyncio loop rather than a
  pool: a pool of N threads is held by N idle connections, and each of them
  would need a deadline of its own; the loop waits on all at once and one
  sweep enforces every deadline.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import choose_encoder

from spa.server.errors import LocalError
from spa.server.events import Event
from spa.server.surfaces import Admitter, listen_socket

# A scraper holds one connection; a pair of Prometheus servers and an admin's
# curl at once leave room.  Past this the longest-waiting one is closed.
MAX_CONNECTIONS = 16
# The whole exchange, from connect to the last byte of the answer.  A scraper
# writes its request as soon as it connects (on loopback it is there in
# microseconds, from another host one round trip later) and reads an answer
# of a few kilobytes; a connection still open after this is someone holding it.
REQUEST_SECONDS = 5.0
# A scrape request is a few hundred bytes (Prometheus sends Accept,
# User-Agent, X-Prometheus-Scrape-Timeout-Seconds); a longer one is refused.
MAX_REQUEST_BYTES = 8 * 1024
BACKLOG = 64  # connections the kernel queues before the loop accepts them


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.knocks = Counter("spa_knocks", "Knocks by outcome (accepted, refused) and reason",
                              ["outcome", "reason"], registry=self.registry)
        self.legacy_knocks = Counter("spa_legacy_knocks", "Compat knocks (fwknop's packets) by "
                                     "outcome and reason: clients still to move to spa1://",
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
        self.command_failures = Counter("spa_command_failures", "Runs of a [command] program "
                                        "that failed or timed out, and grants given up on",
                                        ["action", "reason"], registry=self.registry)
        self.active_leases = Gauge("spa_active_leases", "Leases now open", ["service"],
                                   registry=self.registry)
        self.receive_drops = Gauge("spa_receive_queue_drops", "Datagrams the kernel dropped "
                                   "because the knock socket's queue was full (since start)",
                                   registry=self.registry)
        self.group_claims = Counter("spa_group_claims", "A group member's claims by result "
                                    "(claimed, replay, unreachable, unclaimed_grants: granted "
                                    "without a claim, on_store_down = local_only) and its "
                                    "leases shared or not", ["result"], registry=self.registry)
        self._group_seen: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def observe(self, events: Iterable[Event]) -> None:
        """Advance the counters by rows the event store just wrote."""
        for event in events:
            if event.legacy and event.outcome in ("accepted", "refused"):
                self.legacy_knocks.labels(event.outcome, event.reason or "").inc(event.count)
                if event.reason == "replay":
                    self.replays.inc(event.count)
            elif event.outcome in ("accepted", "refused"):
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
            elif event.outcome == "command":
                self.command_failures.labels(event.action or "", event.reason or "").inc(
                    event.count)

    def set_state(self, leases: Mapping[str, int], services: Iterable[str],
                  receive_drops: int | None) -> None:
        for name in services:
            self.active_leases.labels(name).set(leases.get(name, 0))
        if receive_drops is not None:
            self.receive_drops.set(receive_drops)

    def set_group(self, counts: Mapping[str, int]) -> None:
        """Advance spa_group_claims to a member's counts (spa.group.claims)."""
        for result, count in counts.items():
            seen = self._group_seen.get(result, 0)
            if count > seen:
                self.group_claims.labels(result).inc(count - seen)
                self._group_seen[result] = count

    def serve(self, listen: str) -> None:
        """Serve /metrics at HOST:PORT in a daemon thread.  Raises LocalError."""
        try:
            sock = listen_socket(listen, BACKLOG)
        except OSError as exc:
            raise LocalError(f"[metrics] listen = {listen!r}: cannot listen there: "
                             f"{exc.strerror or exc}") from None
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(loop, sock),
                                        name="spa-metrics", daemon=True)
        self._thread.start()

    def _run(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        admitter = Admitter(MAX_CONNECTIONS, REQUEST_SECONDS)
        server = loop.run_until_complete(loop.create_server(
            lambda: Scrape(self.registry, admitter), sock=sock, backlog=BACKLOG))
        try:
            loop.run_forever()
        finally:
            server.close()
            admitter.close_all()
            loop.run_until_complete(server.wait_closed())
            loop.close()

    def close(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop = self._thread = None


class Scrape(asyncio.Protocol):
    """One connection: read one request, answer it, close."""

    def __init__(self, registry: CollectorRegistry, admitter: Admitter) -> None:
        self.registry = registry
        self.admitter = admitter
        self.transport: asyncio.Transport | None = None
        self.received = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.admitter.opened(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.admitter.lost(self.transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.received = (self.received + data)[:MAX_REQUEST_BYTES + 4]  # 4: the blank line
        head, end, _ = self.received.partition(b"\r\n\r\n")
        if not end and len(self.received) <= MAX_REQUEST_BYTES:
            return
        self.transport.pause_reading()
        status, headers, body = answer(head if end else b"", self.registry)
        lines = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}",
                 "Connection: close"]
        self.transport.write("\r\n".join(lines).encode() + b"\r\n\r\n"
                             + (b"" if head.startswith(b"HEAD ") else body))
        self.transport.close()  # after the answer is sent; the deadline still holds


def answer(head: bytes, registry: CollectorRegistry) -> tuple[str, list[str], bytes]:
    """(status, headers, body) for a request's head (b"": it was too long)."""
    if not head:
        return "431 Request Header Fields Too Large", [], b""
    request_line, *fields = head.split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return "400 Bad Request", [], b""
    method, target, _ = parts
    if target.partition(b"?")[0] != b"/metrics":
        return "404 Not Found", [], b""
    if method not in (b"GET", b"HEAD"):
        return "405 Method Not Allowed", ["Allow: GET, HEAD"], b""
    accept = ""
    for field in fields:
        name, _, value = field.partition(b":")
        if name.strip().lower() == b"accept":
            accept = value.strip().decode("latin-1")
    encoder, content_type = choose_encoder(accept)
    return "200 OK", [f"Content-Type: {content_type}"], encoder(registry)
