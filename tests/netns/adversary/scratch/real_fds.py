"""Start the real `spa-server run` in a namespace made here and list what each
half holds: uid, capabilities, no_new_privs, and every descriptor (netlink
sockets with their protocol, AF_PACKET sockets marked).

    PYTHONPATH=. .venv/bin/python tests/adversary/scratch/real_fds.py [BACKEND [MODE [OWNER]]]
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spa.netns import Topology
from tests.integration.procs import command

FIELDS = ("Uid", "Gid", "Groups", "CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb",
          "NoNewPrivs", "Seccomp")


def table(pid: int, name: str) -> list[list[str]]:
    """/proc/PID/net/NAME (the namespace's table), or /proc/PID/task/PID/net/NAME."""
    for path in (Path(f"/proc/{pid}/net/{name}"), Path(f"/proc/{pid}/task/{pid}/net/{name}")):
        try:
            return [line.split() for line in path.read_text().splitlines()[1:]]
        except OSError:
            continue
    print(f"   (no {name} table readable for {pid})")
    return []


def describe(pid: int, who: str) -> None:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    keep = [line.replace("\t", " ") for line in status if line.split(":")[0] in FIELDS]
    print(f"== {who} pid {pid}: " + "; ".join(keep))
    netlink = {row[-1]: row[1] for row in table(pid, "netlink")}
    packet = {row[-1] for row in table(pid, "packet")}
    for fd in sorted(Path(f"/proc/{pid}/fd").iterdir(), key=lambda p: int(p.name)):
        try:
            target = os.readlink(fd)
        except OSError as exc:
            target = f"? {exc}"
        flags = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().split("\n")[1].strip()
        extra = ""
        found = re.match(r"socket:\[(\d+)\]", target)
        if found and found.group(1) in netlink:
            extra = f" NETLINK proto {netlink[found.group(1)]}"
        if found and found.group(1) in packet:
            extra = " AF_PACKET"
        print(f"   fd {fd.name}: {target} ({flags}){extra}")


def main() -> None:
    backend = sys.argv[1] if len(sys.argv) > 1 else "nftables"
    mode = sys.argv[2] if len(sys.argv) > 2 else "capture"
    owner = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    topo = Topology()
    root = Path(tempfile.mkdtemp(prefix="spa-fds-"))
    os.chmod(root, 0o755)
    try:
        srv, cli = topo.ns("srv"), topo.ns("cli")
        topo.link(srv, ["10.232.1.1/24"], cli, ["10.232.1.2/24"])
        cfg = root / "server.toml"
        subprocess.run([*command("spa-server"), "--config", str(cfg), "init", "--listen-port",
                        "62201", "--state-dir", str(root / "state"), "--service", "ssh"],
                       check=True, capture_output=True)
        if owner:
            (root / "state").mkdir(mode=0o700)
            for path in (cfg, root / "state"):
                os.chown(path, owner, owner)
        bindir = root / "bin"
        bindir.mkdir()
        (bindir / "iptables").symlink_to(shutil.which("iptables-legacy") or "/bin/false")
        proc = srv.popen(["env", f"PATH={bindir}:{os.environ['PATH']}", *command("spa-server"),
                          "--config", str(cfg), "run", "--backend", backend, "--mode", mode],
                         stderr=subprocess.PIPE)
        time.sleep(3)
        kids = [int(p) for task in Path(f"/proc/{proc.pid}/task").iterdir()
                for p in (task / "children").read_text().split()]
        describe(proc.pid, "daemon")
        for kid in kids:
            describe(kid, "keeper")
        proc.terminate()
        print("stderr:", proc.communicate(timeout=20)[1][-1500:])
    finally:
        topo.cleanup()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
