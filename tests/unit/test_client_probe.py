"""spa-client's wait for the port: overlapping connects, on loopback."""

from __future__ import annotations

import socket
import threading
import time

from spa_client.knock import MAX_PROBES, PortProbe, Target

LOCAL = Target("127.0.0.1", socket.AF_INET, 62201)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_probe_connects_once_the_port_listens() -> None:
    port = free_port()
    probe = PortProbe([LOCAL], port)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.start()
        assert probe.wait(0.1) is None, "nothing listens yet: refused, not open"
        listener.bind(("127.0.0.1", port))
        listener.listen(8)
        probe.start()
        assert probe.wait(1.0) == LOCAL
    finally:
        probe.close()
        listener.close()


def test_probes_stay_bounded_and_close() -> None:
    """Attempts that never finish (here: a full backlog that the server
    never accepts) are capped at MAX_PROBES and all closed at the end."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    probe = PortProbe([LOCAL], port)
    try:
        for _ in range(3 * MAX_PROBES):
            probe.start()
            probe.wait(0)
        assert probe.attempts() <= MAX_PROBES
    finally:
        probe.close()
        listener.close()
    assert probe.attempts() == 0


def test_the_first_attempt_to_complete_wins_without_waiting_for_older_ones() -> None:
    """An earlier attempt that is still pending (its SYN was dropped) does not
    hold up a later one that connects: the wait returns within milliseconds."""
    port = free_port()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    probe = PortProbe([LOCAL], port)
    opened = threading.Event()

    def open_later() -> None:
        time.sleep(0.05)
        listener.bind(("127.0.0.1", port))
        listener.listen(8)
        opened.set()

    thread = threading.Thread(target=open_later)
    thread.start()
    try:
        started = time.monotonic()
        connected = False
        while not connected and time.monotonic() - started < 2:
            probe.start()
            connected = probe.wait(0.01) is not None
        assert connected and opened.is_set()
        assert time.monotonic() - started < 0.5
    finally:
        thread.join()
        probe.close()
        listener.close()


def test_relay_copies_both_ways_and_half_closes() -> None:
    import os

    from spa_client.relay import relay

    ours, theirs = socket.socketpair()
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    payload = os.urandom(200_000)

    def server_side() -> None:
        received = b""
        while True:
            chunk = theirs.recv(65536)
            if not chunk:  # our end of input reached the server as a half-close
                break
            received += chunk
        theirs.sendall(received[::-1])
        theirs.close()

    def write_input() -> None:
        os.write(stdin_w, payload)
        os.close(stdin_w)

    out: list[bytes] = []

    def read_output() -> None:
        while chunk := os.read(stdout_r, 65536):
            out.append(chunk)

    threads = [threading.Thread(target=f) for f in (server_side, write_input, read_output)]
    for thread in threads:
        thread.start()
    relay(ours, stdin_r, stdout_w)
    os.close(stdout_w)
    for thread in threads:
        thread.join(timeout=10)
    assert b"".join(out) == payload[::-1]
    for fd in (stdin_r, stdout_r):
        os.close(fd)
    ours.close()


def test_keep_renews_every_third_of_the_lease_and_at_once_on_a_new_address() -> None:
    import os

    from spa.core.uri import Enrollment, ServiceRef
    from spa_client.knock import Target, keep_open

    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    target = Target("127.0.0.1", socket.AF_INET, receiver.getsockname()[1])
    enrollment = Enrollment("127.0.0.1", target.knock_port, bytes(16), "alice", os.urandom(32),
                            (ServiceRef("ssh", "tcp", 22),))
    now = [0.0]
    events: list[tuple[str, float]] = []

    def sleep(seconds: float) -> None:
        now[0] += max(seconds, 0.001)

    def where(_: Target) -> str:
        return "192.0.2.1" if now[0] < 50 else "198.51.100.7"  # the laptop moved at 50 s

    sent = keep_open(enrollment, ServiceRef("ssh", "tcp", 22), [target], duration=60,
                     show=lambda event, left, address: events.append((event, now[0])),
                     stop=lambda: now[0] >= 100, clock=lambda: now[0], sleep=sleep,
                     where=where)
    renewals = [(e, t) for e, t in events if e != "tick"]
    assert renewals[0] == ("renewed", 0.0)
    assert ("renewed", 20.0) in renewals and ("renewed", 40.0) in renewals
    moved = [t for e, t in renewals if e == "moved"]
    assert len(moved) == 1 and 50 <= moved[0] <= 51, "a new address: a knock at once"
    assert ("renewed", moved[0] + 20) in renewals, "the schedule restarts from the move"
    got = 0
    try:
        while receiver.recv(2048):
            got += 1
    except BlockingIOError:
        pass
    receiver.close()
    assert got == sent == len(renewals)


def test_only_the_invoked_command_is_built_unless_unsure() -> None:
    from spa_client.cli import _COMMANDS, _invoked

    assert _invoked(["open", "ssh", "srv"]) == "open"
    assert _invoked(["--config-dir", "/x", "ssh-config", "srv"]) == "ssh-config"
    assert _invoked(["--config-dir", "open"]) is None  # 'open' is the option's value
    for unsure in ([], ["--help"], ["-h", "open"], ["opne", "ssh"], ["--config-dir=/x"]):
        assert _invoked(unsure) is None, unsure
    assert {"enroll", "open", "close", "connect", "ssh-config", "doctor", "profiles",
            "forget", "completion"} == set(_COMMANDS)
