"""Issue 12: counts that don't lie, and no ban on a word nobody proved.

Real spa-server, nftables drop counters, spa-client, nmap and the real
fail2ban-regex: forged SYNs in a victim's name, a refused client probing
its port, and three restarts give the shipped jail nothing on either; a
real scanner is called a scan and matches the opt-in scans filter only.
"""

from __future__ import annotations

import signal
import sys
import time

from tests.integration.f2b import SCANS, matched_lines
from tests.netns.conftest import ATT4, CLI4, ROUTER4, SRV_ATT4, SRV_NAT4, Spa
from tests.netns.test_ssh_e2e import enroll_alice, tcp_open

VICTIM = "10.199.1.77"  # an innocent address on the client's link, never used by anyone
DROPS_EVERY = 5.0  # the daemon reads the drop counters this often


def dropped_from(spa: Spa, source: str) -> int:
    return sum(int(str(e["count"])) for e in spa.events()
               if e["outcome"] == "dropped" and e["source"] == source)


def forge_syns(spa: Spa, source: str) -> None:
    """SYNs to both protected ports in `source`'s name, from the attacker."""
    code = ("from scapy.all import IP, TCP, send\nimport sys\n"
            "send(IP(src=sys.argv[1], dst=sys.argv[2]) / TCP(sport=40000, dport=[22, 443], "
            "flags='S'), count=3, verbose=0)\n")
    spa.world.att.run(sys.executable, "-c", code, source, SRV_ATT4, timeout=60)


def mark(spa: Spa) -> int:
    """One SYN to ssh from a marker address (nat1's, masqueraded to the
    router's), dropped and counted by the kernel now, after everything the
    test sent before it; the marker's count in the event store before it."""
    seen = dropped_from(spa, ROUTER4)
    assert not tcp_open(spa.world, "nat1", SRV_NAT4, 22, timeout=0.3), "dropped"
    return seen


def read_past(spa: Spa, seen: int) -> None:
    """Wait until the marker's SYN is in the event store: the daemon has read
    the drop counters since it was sent (a reading takes every counter at
    once), and written what that reading found."""
    deadline = time.monotonic() + 3 * DROPS_EVERY
    while dropped_from(spa, ROUTER4) == seen:
        assert time.monotonic() < deadline, spa.lines[-5:]
        time.sleep(0.1)


def test_forged_syns_restarts_and_a_refused_client_ban_nobody(spa: Spa) -> None:
    world = spa.world
    lines: list[str] = []
    spa.start()
    enroll_alice(spa)
    forge_syns(spa, VICTIM)
    assert spa.wait_for(f"scan src={VICTIM} service=ssh,https", timeout=3 * DROPS_EVERY), (
        spa.lines[-5:])
    # a refused client keeps probing its own port while it waits
    spa.admin("revoke", "alice")
    assert spa.wait_for("revoked client=alice")
    assert spa.client(world.cli, "alice", "open", "ssh", "srv", "--timeout", "4"
                      ).returncode == 1
    read_past(spa, mark(spa))  # a reading after its last probe
    assert dropped_from(spa, CLI4) > 0, "its drops are counted"
    assert not any(line.startswith(f"scan src={CLI4}") for line in spa.lines), spa.lines
    before = (dropped_from(spa, VICTIM), dropped_from(spa, CLI4))
    for _ in range(3):  # each start once re-recorded the kernel's counters of minutes past
        lines += spa.lines
        spa.stop(signal.SIGTERM)
        seen = mark(spa)  # with no daemon: the start's first reading has it
        spa.start()
        read_past(spa, seen)
    assert (dropped_from(spa, VICTIM), dropped_from(spa, CLI4)) == before
    # a real scanner, from its own address
    world.att.run("nmap", "-sS", "-Pn", "-n", "-p", "22,443", "--max-retries", "1",
                  SRV_ATT4, timeout=120)
    assert spa.wait_for(f"scan src={ATT4}", timeout=3 * DROPS_EVERY), spa.lines[-5:]
    assert (dropped_from(spa, VICTIM), dropped_from(spa, CLI4)) == before, "nor a later reading"
    lines += spa.lines
    banned = matched_lines(lines)
    assert not [line for line in banned if VICTIM in line or CLI4 in line], banned
    assert not any(line.startswith("scan ") for line in banned), "no ban on an unproven scan"
    opted = matched_lines(lines, SCANS)
    assert any(f"src={ATT4}" in line for line in opted), "the opt-in jail sees the scanner"
    assert not any(CLI4 in line for line in opted), "never the refused client"


def fill_drop_counters(spa: Spa) -> None:
    """Every drop counter the kernel will hold, both families, as a wide
    scan (or one attacker's /64, a SYN from each address) leaves them."""
    from spa.backends.nftables import DROPS_SIZE

    lines = [f"add element inet spa drops_v4 {{ 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} . 22 "
             "counter packets 1 bytes 60 }" for i in range(DROPS_SIZE)]
    lines += [f"add element inet spa drops_v6 {{ fd00:199:2::{i:x} . 22 counter packets 1 "
              "bytes 80 }" for i in range(DROPS_SIZE)]
    script = spa.root / "drops.nft"
    script.write_text("\n".join(lines) + "\n")
    spa.world.srv.run("nft", "-f", str(script))


def test_a_revoke_holds_within_a_second_while_the_drop_counters_are_full(spa: Spa) -> None:
    """From the adversarial review: with 65,536 drop counters (one SYN from
    each address of a /64 the attacker owns) a reading took 1.1-2.3 s in
    housekeeping, the revoke waited behind it, and a revoked client's knock
    1 s after `revoke` returned opened ssh (2 of 10 trials).  Now the store
    is polled first, the counters are read by a thread of their own without
    the lease lock, and at most 8,192 a family are kept: over a whole reading
    cycle, each revoke is said (its rules in force) within a second."""
    spa.start()
    names = [f"m{i}" for i in range(5)]
    for name in names:
        spa.enroll(name, SRV_ATT4, "ssh")
    assert not any(line.startswith("dropped ") for line in spa.lines), spa.lines
    fill_drop_counters(spa)
    # the first reading of them is behind us (its rows are the first "dropped"
    # lines), and a second more for its work
    assert spa.wait_for("dropped ", timeout=3 * DROPS_EVERY), spa.lines[-5:]
    time.sleep(1)
    took = []
    for name in names:  # 1.1 s apart: every phase of the 5 s reading cycle
        spa.admin("revoke", name)
        said = time.monotonic()
        while not any(line.startswith(f"revoked client={name} ") for line in spa.lines):
            assert time.monotonic() - said < 5, spa.lines[-5:]
            time.sleep(0.02)
        took.append(time.monotonic() - said)
        time.sleep(max(0.0, 1.1 - took[-1]))
    assert max(took) < 1.0, took
