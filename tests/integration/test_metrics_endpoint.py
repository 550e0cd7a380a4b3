"""The [metrics] endpoint on a real loopback socket while a local user holds
connections against it (issue 13, finding 5): the endpoint is served by the
daemon's worker, so what it holds (threads, sockets) must not grow with what
others open, and a scraper must still get its answer."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import suppress

import pytest

from spa.server import metrics
from spa.server.metrics import Metrics
from tests.integration.harness import free_port
from tests.integration.held import established, hold, slowloris, still_held, wait_closed

pytestmark = pytest.mark.integration
IDLE = 500
HALF_OPEN = 50
SLOWLORIS = 20


@pytest.fixture
def endpoint() -> Iterator[tuple[Metrics, int]]:
    served = Metrics()
    served.scans.inc()
    port = free_port(socket.SOCK_STREAM)
    served.serve(f"127.0.0.1:{port}")
    try:
        yield served, port
    finally:
        served.close()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        assert answer.status == 200
        return str(answer.read().decode())


def test_idle_and_half_open_connections_cost_no_thread_and_are_closed(
        endpoint: tuple[Metrics, int]) -> None:
    """500 idle connections, 50 with unfinished headers, 20 trickling header
    lines and one sending a megabyte of header: the endpoint keeps one thread,
    holds at most MAX_CONNECTIONS of them, answers every scrape meanwhile, and
    closes the rest once REQUEST_SECONDS pass without a whole request."""
    _, port = endpoint
    baseline = threading.active_count()
    assert "spa_scans_total 1.0" in scrape(port)
    idle = hold(port, IDLE)
    half_open = hold(port, HALF_OPEN, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    with slowloris(port, SLOWLORIS, b"/metrics") as trickling:
        huge = socket.create_connection(("127.0.0.1", port), timeout=10)
        with suppress(OSError):  # closed once the header passed the limit: what we want
            huge.sendall(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (1 << 20))
        for _ in range(5):
            assert "spa_scans_total 1.0" in scrape(port)
        threads = threading.active_count() - baseline - 1  # less the trickling thread
        assert threads == 0, f"{threads} threads for {IDLE} idle connections"
        assert established(port) <= metrics.MAX_CONNECTIONS
        assert still_held([huge]) == 0
        everyone = idle + half_open + trickling
        assert wait_closed(everyone, metrics.REQUEST_SECONDS + 3) == 0
        assert established(port) == 0
    assert threading.active_count() == baseline
    assert "spa_scans_total 1.0" in scrape(port)
    for sock in [*idle, *half_open, huge]:
        sock.close()


def test_a_request_over_the_header_limit_is_refused(endpoint: tuple[Metrics, int]) -> None:
    _, port = endpoint
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * metrics.MAX_REQUEST_BYTES
                     + b"\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431 "), answer


def test_only_get_and_head_of_metrics_are_served(endpoint: tuple[Metrics, int]) -> None:
    _, port = endpoint
    for request, status in ((b"POST /metrics HTTP/1.1", b"405"), (b"GET /other HTTP/1.1", b"404"),
                            (b"nonsense", b"400"), (b"HEAD /metrics HTTP/1.1", b"200")):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request + b"\r\nHost: 127.0.0.1\r\n\r\n")
            answer = sock.recv(4096)
        assert answer.split(b" ")[1] == status, (request, answer)
