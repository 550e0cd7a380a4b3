"""A receive thread waiting on its socket is woken by another thread's
change (spa.server.sources.Waiter): a group's revocation, a store's client
change, a grace's end are applied at once, not when the wait times out."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from spa.server.daemon import RECEIVE_TIMEOUT
from spa.server.sources import FakeSource, UdpSource
from tests.server_world import World

LONG = 30.0  # a wait no test should sit through: a missed wake shows as a hang


def test_a_wake_from_another_thread_ends_the_wait_at_once() -> None:
    source = UdpSource("127.0.0.1", 0)
    try:
        timer = threading.Timer(0.2, source.wake)
        timer.start()
        began = time.monotonic()
        assert source.receive(LONG) == []
        assert time.monotonic() - began < LONG / 3
        timer.join()
    finally:
        source.close()


def test_wakes_before_a_wait_add_up_to_one_and_datagrams_still_come() -> None:
    source = UdpSource("127.0.0.1", 0)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _ in range(5):
            source.wake()
        assert source.receive(LONG) == []  # the pending wake: once
        sender.sendto(b"x" * 10, ("127.0.0.1", source.port))
        got = source.receive(LONG)
        assert [(data, host) for data, host, _ in got] == [(b"x" * 10, "127.0.0.1")]
        began = time.monotonic()
        assert source.receive(0.3) == []  # no wake left over: the wait runs its time
        assert time.monotonic() - began >= 0.25
    finally:
        sender.close()
        source.close()


def test_a_wake_after_close_is_harmless() -> None:
    source = UdpSource("127.0.0.1", 0)
    source.close()
    source.wake()  # the eventfd is closed: nothing is written anywhere


class WakingSource(FakeSource):
    """A fake source that counts the daemon's wake-ups."""

    def __init__(self) -> None:
        super().__init__()
        self.woken = 0

    def wake(self) -> None:
        self.woken += 1


def test_a_change_from_another_thread_wakes_the_receive_thread(tmp_path: Path) -> None:
    """What other threads hand the receive thread (here a fact for the lock
    file, as a group's member thread does) wakes its source, and runs there
    in order."""
    world = World(tmp_path)
    world.init()
    source = WakingSource()
    server = world.start(source)
    before = source.woken
    server.set_fact_soon("probe", 1)
    server.set_fact_soon("probe", 2)
    assert source.woken == before + 2
    server.run_commands()
    facts = server.state.running_server()
    assert facts is not None and facts["probe"] == 2
    assert RECEIVE_TIMEOUT < LONG
