"""Privilege separation on the real kernel: the process that parses packets
holds no capability, the gate keeper holds CAP_NET_ADMIN (and CAP_BPF while
the eBPF map filter runs) only, and what the daemon can do cannot change
another program's firewall."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sys
import tempfile
import time
from pathlib import Path

from spa.server.privsep import CAP_BPF, CAP_NET_ADMIN, SERVICE_USERS, capabilities
from spa.server.state import StateDir
from tests.netns.conftest import SRV4, Spa, World
from tests.netns.test_ssh_e2e import enroll_alice

KEEPER = 1 << CAP_NET_ADMIN | 1 << CAP_BPF  # the gate keeper's, with the eBPF map filter

# In the server namespace, as the daemon is after its drop (the same function
# the daemon calls), try to change a table that is not ours.
TRY_NFT = """
import sys
from pathlib import Path
if sys.argv[2] == "drop":
    from spa.server.privsep import daemon_user, drop_to_daemon
    drop_to_daemon(daemon_user(Path(sys.argv[1])))
from spa.backends.libnft import default_runner
from spa.server.errors import LocalError
try:
    default_runner().run_text("add table inet not_spa")
except LocalError as exc:
    print("refused", exc)
else:
    print("changed")
"""


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def packet_sockets(pid: int) -> set[str]:
    """The AF_PACKET socket inodes a process holds (/proc/net/packet)."""
    table = Path(f"/proc/{pid}/net/packet").read_text().splitlines()[1:]
    packet = {line.split()[-1] for line in table}
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            held.add(target[8:-1])
    return held & packet


def test_the_packet_parser_holds_no_capability_and_the_gate_keeper_only_what_it_needs(
        spa: Spa) -> None:
    world = spa.world
    spa.start()  # capture mode, nftables: the default
    assert spa.proc is not None
    daemon = spa.proc.pid
    mine = capabilities(daemon)
    assert (mine.effective, mine.permitted, mine.ambient, mine.bounding) == (0, 0, 0, 0), mine
    assert "NoNewPrivs:\t1" in Path(f"/proc/{daemon}/status").read_text()
    assert packet_sockets(daemon), "the daemon holds the capture socket, opened before the drop"
    (keeper,) = children(daemon)
    theirs = capabilities(keeper)
    # CAP_BPF: the eBPF map filter runs (the default as root), for the maps of its growth
    assert theirs.effective == theirs.permitted == theirs.bounding == KEEPER
    assert theirs.ambient == 1 << CAP_NET_ADMIN, "nft and ipset never get CAP_BPF"
    assert not packet_sockets(keeper), "the gate keeper reads no packet"
    # it still works: a knock opens ssh through the gate keeper
    enroll_alice(spa)
    assert spa.client(world.cli, "alice", "open", "ssh", "srv").returncode == 0
    assert world.ssh(world.cli, SRV4, "true").returncode == 0


def test_as_the_daemon_runs_another_table_cannot_be_changed(spa: Spa) -> None:
    world = spa.world
    state = spa.root / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    try:
        dropped = world.srv.run(sys.executable, "-c", TRY_NFT, str(state), "drop").stdout
        assert dropped.startswith("refused"), dropped
        assert "not_spa" not in world.srv.run("nft", "list", "tables").stdout
        # the same without the drop does change it: the check above can fail
        kept = world.srv.run(sys.executable, "-c", TRY_NFT, str(state), "keep").stdout
        assert kept.startswith("changed"), kept
    finally:
        world.srv.run("nft", "delete", "table", "inet", "not_spa", check=False)


def test_when_the_daemon_dies_the_gate_keeper_leaves_the_gate_closed(spa: Spa) -> None:
    """kill -9 of the daemon: the gate keeper sees its end close, stops the
    backend as the daemon would have, exits; the table stays, ssh closed."""
    world = spa.world
    spa.start()
    assert spa.proc is not None
    (keeper,) = children(spa.proc.pid)
    os.kill(spa.proc.pid, 9)
    spa.proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{keeper}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{keeper}").exists() or "Z" in Path(
        f"/proc/{keeper}/stat").read_text().split()[2]
    listing = json.loads(world.srv.run("nft", "-j", "list", "tables").stdout)
    assert any(item.get("table", {}).get("name") == "spa" for item in listing["nftables"])


def _user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_started_as_root_it_never_runs_the_daemon_as_root(world: World) -> None:
    """By hand as root, everything root's (the default by hand): the daemon
    runs as a service user (uid 0 without a capability still owned root's
    files: /etc/cron.d, the config; adversarial review of the split), the
    state directory and what root left in it are handed to that user, a link
    planted there is not followed; the gate keeper stays root's, with
    CAP_NET_ADMIN (and CAP_BPF) only, and reads the config the daemon cannot read (0600,
    root's) again at a reload: an added service reaches the firewall."""
    root = Path(tempfile.mkdtemp(prefix="spa-owners-"))
    os.chmod(root, 0o755)
    secret = root / "root-only"
    secret.write_text("root's\n")
    secret.chmod(0o600)
    spa = Spa(world, root)
    service_user = next(pwd.getpwnam(name) for name in SERVICE_USERS if _user(name))
    try:
        spa.admin("init", "--listen-port", "62201", "--state-dir", str(root / "state"),
                  "--service", "ssh", "--service", "https")
        enroll_alice(spa)
        state = root / "state"
        state.mkdir(mode=0o700, exist_ok=True)  # (enroll made it, root's, for the store)
        StateDir(state).save_activated({})  # a file an earlier run as root left
        (state / "planted").symlink_to(secret)
        spa.start()
        assert spa.proc is not None
        (keeper,) = children(spa.proc.pid)
        assert uid_of(spa.proc.pid) == service_user.pw_uid != 0
        assert capabilities(spa.proc.pid).effective == 0
        assert uid_of(keeper) == 0 and capabilities(keeper).effective == KEEPER
        assert state.stat().st_uid == service_user.pw_uid
        assert (state / "activated.json").stat().st_uid == service_user.pw_uid
        assert (state / "clients.db").stat().st_uid == service_user.pw_uid
        assert secret.stat().st_uid == 0, "the link was not followed"
        assert spa.config.stat().st_uid == 0 and spa.config.stat().st_mode & 0o077 == 0
        assert spa.client(world.cli, "alice", "open", "ssh", "srv").returncode == 0
        text = spa.config.read_text().replace(
            "[services.ssh]", "[services.web]\nprotocol = \"tcp\"\nport = 8443\n"
            "default_duration = 30\nmax_duration = 300\n\n[services.ssh]")
        spa.config.write_text(text)
        assert spa.wait_for("firewall rules updated for services: https, ssh, web"), spa.lines
        assert not any("gate keeper" in line and "error" in line for line in spa.lines), (
            spa.lines)
        rules = world.srv.run("nft", "list", "table", "inet", "spa").stdout
        assert "8443" in rules
    finally:
        spa.stop()
        world.srv.run("nft", "delete", "table", "inet", "spa", check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_the_dropped_daemon_runs_the_ebpf_map_filter_and_follows_an_enroll(spa: Spa) -> None:
    """The tag map is made before the drop (spa.server.runner
    `_reserve_kernel_map`, while the process holds CAP_BPF); the daemon,
    with no capability, fills it and changes it in place: `status` says
    the eBPF map runs, and a client enrolled while it runs opens ssh.
    Without the reserve the daemon's first replace would fall back to the
    classic filter (EPERM), and the status line would say so."""
    world = spa.world
    spa.start()
    assert spa.proc is not None
    mine = capabilities(spa.proc.pid)
    assert mine.effective == mine.permitted == 0, mine
    assert any("eBPF tag map reserved for" in line for line in spa.lines), spa.lines
    status = spa.status_once_it_shows("eBPF map")
    assert "eBPF map of every live knock tag" in status, status
    enroll_alice(spa)
    assert spa.client(world.cli, "alice", "open", "ssh", "srv").returncode == 0
    assert world.ssh(world.cli, SRV4, "true").returncode == 0
    assert "eBPF map of every live knock tag" in spa.admin("status").stdout
