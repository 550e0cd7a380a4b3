"""Issue 12: the gate is right on real hosts, both ways.

Never shut on its users (an idle server still opens), never open to
strangers (the host's firewall reloaded, the daemon killed or restarted).
Real spa-server, nftables, sshd and ssh in namespaces.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.netns.conftest import SRV4, Spa, open_site, open_world
from tests.netns.test_ssh_e2e import enroll_alice

IDLE = 100  # seconds of silence before the knock: more than three tag steps (30 s each)


def test_a_knock_after_100_s_of_silence_opens_in_both_modes(spa: Spa, tmp_path: Path) -> None:
    """The idle lock-out: the kernel tag filter once stayed on the step of
    the last packet Python saw, so after a quiet minute every knock died in
    the kernel.  Both modes at once (capture here, udp in a second world),
    each enrolled before its start like a freshly booted server, then 100 s
    with no packet, then a real knock and a real ssh login."""
    with open_world(tmp_path / "w2") as other, open_site(other, tmp_path / "s2") as udp:
        for site in (spa, udp):
            enroll_alice(site)
        spa.start()
        udp.start("--mode", "udp")
        time.sleep(IDLE)
        for site in (spa, udp):
            done = site.client(site.world.cli, "alice", "open", "ssh", "srv")
            assert done.returncode == 0, done.stdout + done.stderr + "\n".join(site.lines)
            login = site.world.ssh(site.world.cli, SRV4, "echo after-silence")
            assert login.stdout.strip() == "after-silence", login.stderr
