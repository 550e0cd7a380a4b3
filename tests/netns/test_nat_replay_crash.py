"""Shared NAT (the seed problem), captured-packet replays, and a crash."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import UDP
from scapy.utils import rdpcap

from spa.netns import Namespace
from tests.netns.conftest import (
    ATT4,
    CLI4,
    HERE,
    KNOCK_PORT,
    ROUTER4,
    SRV4,
    SRV_ATT4,
    SRV_NAT4,
    Spa,
    World,
)
from tests.netns.test_ssh_e2e import enroll_alice, tcp_open


class TlsSession:
    """One TLS connection held open from a namespace (tls_client.py)."""

    def __init__(self, ns: Namespace, host: str) -> None:
        self.proc = ns.popen([sys.executable, str(HERE / "tls_client.py"), host, "443", "2"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        self.first = self.proc.stdout.readline().strip()

    def say(self, text: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def nat_users(spa: Spa) -> None:
    for who, ns in (("alice", spa.world.nat1), ("bob", spa.world.nat2)):
        uri = spa.enroll(who, SRV_NAT4, "https")
        assert spa.client(ns, who, "enroll", uri, "--name", "srv").returncode == 0


def test_nat_first_user_closes_second_keeps_access(spa: Spa) -> None:
    world = spa.world
    spa.start()
    nat_users(spa)
    assert not tcp_open(world, "nat2", SRV_NAT4, 443)
    assert spa.client(world.nat1, "alice", "open", "https", "srv").returncode == 0
    assert spa.client(world.nat2, "bob", "open", "https", "srv").returncode == 0
    # bob's `open` returns as soon as the port answers, which alice's lease on
    # the shared address already makes it do: his grant lands a moment later
    # (and leases.json within a housekeeping round)
    deadline = time.monotonic() + 5
    while '"clients": ["alice", "bob"]' not in (rows := spa.admin("status", "--json").stdout):
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    assert f'"address": "{ROUTER4}"' in rows
    session = TlsSession(world.nat2, SRV_NAT4)
    try:
        assert session.first == "connected"
        assert session.say("before") == "echo before"
        assert spa.client(world.nat1, "alice", "close", "https", "srv").returncode == 0
        time.sleep(0.5)
        assert session.say("after alice closed") == "echo after alice closed"
        fresh = TlsSession(world.nat2, SRV_NAT4)
        assert fresh.first == "connected", "bob can still make new connections"
        fresh.close()
    finally:
        session.close()
    assert spa.elements() == [f"svc_https_v4 {ROUTER4}"]


def test_nat_first_users_lease_expires_second_keeps_access(spa: Spa) -> None:
    world = spa.world
    spa.start()
    nat_users(spa)
    assert spa.client(world.nat1, "alice", "open", "https", "srv", "--duration", "2"
                      ).returncode == 0
    assert spa.client(world.nat2, "bob", "open", "https", "srv", "--duration", "120"
                      ).returncode == 0
    session = TlsSession(world.nat2, SRV_NAT4)
    try:
        time.sleep(3)
        assert session.say("alice expired") == "echo alice expired"
        fresh = TlsSession(world.nat2, SRV_NAT4)
        assert fresh.first == "connected"
        fresh.close()
    finally:
        session.close()


def capture_one_knock(world: World, spa: Spa, tmp_path: Path) -> bytes:
    pcap = tmp_path / "knock.pcap"
    dump = world.srv.popen(["tcpdump", "-i", world.srv_links["cli"], "-w", str(pcap), "-U",
                            "-c", "1", "udp", "dst", "port", str(KNOCK_PORT)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert dump.stderr is not None
    assert "listening on" in dump.stderr.readline()
    assert spa.client(world.cli, "alice", "open", "ssh", "srv").returncode == 0
    dump.wait(timeout=10)
    packets = rdpcap(str(pcap))
    payload: bytes = bytes(packets[0][UDP].payload)
    assert len(payload) == 161
    return payload


def send_from(ns: Namespace, host: str, payload: bytes) -> None:
    code = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"s.sendto(bytes.fromhex(sys.argv[1]),({host!r},{KNOCK_PORT}))")
    ns.run(sys.executable, "-c", code, payload.hex())


def replays(spa: Spa, source: str) -> int:
    return sum(int(e["count"]) for e in spa.events()  # type: ignore[call-overload]
               if e["reason"] == "replay" and e["source"] == source)


def test_captured_packet_replayed_opens_nothing(spa: Spa, tmp_path: Path) -> None:
    world = spa.world
    spa.start()
    enroll_alice(spa)
    payload = capture_one_knock(world, spa, tmp_path)
    # 1. from the attacker's namespace
    send_from(world.att, SRV_ATT4, payload)
    assert spa.wait_for("refused reason=replay client=alice src=10.199.2.2")
    assert not tcp_open(world, "att", SRV_ATT4, 22)
    # 2. from the client's own address, after it closed
    assert spa.client(world.cli, "alice", "close", "ssh", "srv").returncode == 0
    assert spa.wait_for("lease_end")
    send_from(world.cli, SRV4, payload)
    time.sleep(0.6)
    assert replays(spa, CLI4) == 1
    assert not tcp_open(world, "cli", SRV4, 22)
    # 3. after a server restart
    spa.stop()
    spa.start()
    # the knock's step may be the last one: its tags are back within a second
    # of the start (before, the kernel drops the copy as an unknown tag)
    time.sleep(1.5)
    send_from(world.cli, SRV4, payload)
    assert spa.wait_for("refused reason=replay client=alice src=10.199.1.2")
    assert not tcp_open(world, "cli", SRV4, 22)
    assert spa.elements() == []


@pytest.mark.parametrize("mode", ["capture", "udp"])
def test_a_replay_flood_is_dropped_in_the_kernel_and_the_client_still_gets_in(
        spa: Spa, tmp_path: Path, mode: str) -> None:
    """Thousands of copies of one captured knock: after the first few dozen
    the kernel filter drops its nonce, so the rest never wake Python."""
    world = spa.world
    spa.start("--mode", mode)
    enroll_alice(spa)
    payload = capture_one_knock(world, spa, tmp_path)
    flood = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
             "p=bytes.fromhex(sys.argv[1])\n"
             f"for _ in range(int(sys.argv[2])): s.sendto(p,({SRV_ATT4!r},{KNOCK_PORT}))\n")
    world.att.run(sys.executable, "-c", flood, payload.hex(), "2000")
    deadline = time.monotonic() + 5
    while not any("dropping 1 replayed nonces" in line for line in spa.lines):
        assert time.monotonic() < deadline, spa.lines
        time.sleep(0.05)
    time.sleep(0.6)  # an events flush
    before = replays(spa, ATT4)
    assert 20 <= before <= 2000
    world.att.run(sys.executable, "-c", flood, payload.hex(), "5000")
    time.sleep(1.0)
    assert replays(spa, ATT4) == before, "5,000 more copies, and not one reached Python"
    assert not tcp_open(world, "att", SRV_ATT4, 22)
    assert spa.client(world.cli, "alice", "open", "ssh", "srv", "--timeout", "3"
                      ).returncode == 0


def test_kill_9_grants_still_close_on_time_and_restart_leaves_no_stale(spa: Spa) -> None:
    world = spa.world
    spa.start()
    enroll_alice(spa)
    assert spa.client(world.cli, "alice", "open", "ssh", "srv", "--duration", "3"
                      ).returncode == 0
    assert spa.client(world.cli, "alice", "open", "https", "srv", "--duration", "120"
                      ).returncode == 0
    time.sleep(0.4)  # leases.json is saved within a housekeeping round
    spa.stop(signal.SIGKILL)
    assert spa.elements() == [f"svc_https_v4 {CLI4}", f"svc_ssh_v4 {CLI4}"]
    time.sleep(4)  # no daemon: the kernel ends the ssh grant by itself
    assert spa.elements() == [f"svc_https_v4 {CLI4}"]
    assert not tcp_open(world, "cli", SRV4, 22)
    assert tcp_open(world, "cli", SRV4, 443)
    spa.start()
    assert spa.elements() == [f"svc_https_v4 {CLI4}"], "one element per live lease"
    status = spa.admin("status", "--json").stdout
    assert '"service": "https"' in status and '"service": "ssh"' not in status
