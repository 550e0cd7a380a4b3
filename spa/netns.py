"""Network namespaces made (and removed) by whoever uses them: the tests and
`spa-server demo`.

Every namespace, veth and address here is created by its user and deleted
afterwards; traffic only ever goes to these addresses.  Names carry a random
suffix, so parallel or leftover runs never collide.  Commands are argv lists,
never shell strings.

    client ns ---- veth ---- server ns ---- veth ---- attacker ns
                               |
                             veth
                               |
                  router ns (masquerade) ---- nat1 ns
                               \\------------- nat2 ns
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command (argv, never a shell string)."""
    done = subprocess.run(list(argv), capture_output=True, text=True,  # noqa: S603
                          timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done


def can_make_namespaces() -> str | None:
    """None if this machine can make namespaces (root, ip, nft), else why not."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs the {tool} program"
    name = f"spa-probe-{secrets.token_hex(3)}"
    done = sh("ip", "netns", "add", name, check=False)
    if done.returncode != 0:
        return f"cannot create a network namespace here: {done.stderr.strip()}"
    sh("ip", "netns", "del", name, check=False)
    return None


@dataclass
class Namespace:
    name: str

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 30
            ) -> subprocess.CompletedProcess[str]:
        return sh(*self.argv(*argv), check=check, timeout=timeout)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*argv), text=True, **kwargs)  # noqa: S603


@dataclass
class Topology:
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[Namespace] = field(default_factory=list)
    links: int = 0  # veth pairs made: each gets its own number (a random one once collided)

    def ns(self, role: str) -> Namespace:
        namespace = Namespace(f"spa-{self.tag}-{role}")
        sh("ip", "netns", "add", namespace.name)
        self.namespaces.append(namespace)
        namespace.run("ip", "link", "set", "lo", "up")
        namespace.run("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=0")
        return namespace

    def link(self, a: Namespace, a_addrs: Sequence[str], b: Namespace,
             b_addrs: Sequence[str]) -> tuple[str, str]:
        """A veth pair between two namespaces, with addresses (CIDR) on each end."""
        self.links += 1
        index = self.links
        a_if, b_if = f"v{self.tag}a{index}", f"v{self.tag}b{index}"
        sh("ip", "link", "add", a_if[:15], "type", "veth", "peer", "name", b_if[:15])
        a_if, b_if = a_if[:15], b_if[:15]
        for ns, ifname, addrs in ((a, a_if, a_addrs), (b, b_if, b_addrs)):
            sh("ip", "link", "set", ifname, "netns", ns.name)
            for addr in addrs:
                extra = ["nodad"] if ":" in addr else []
                ns.run("ip", "addr", "add", addr, "dev", ifname, *extra)
            ns.run("ip", "link", "set", ifname, "up")
        return a_if, b_if

    def cleanup(self) -> None:
        for namespace in reversed(self.namespaces):
            self._delete(namespace)
        self.namespaces.clear()

    def remove(self, namespace: Namespace) -> None:
        """Delete one namespace of this topology (and what runs inside)."""
        self.namespaces.remove(namespace)
        self._delete(namespace)

    @staticmethod
    def _delete(namespace: Namespace) -> None:
        # kill whatever still runs inside, then remove the namespace
        pids = sh("ip", "netns", "pids", namespace.name, check=False).stdout.split()
        for pid in pids:
            sh("kill", "-9", pid, check=False)
        sh("ip", "netns", "del", namespace.name, check=False)


@dataclass
class Sshd:
    """A real OpenSSH server in a namespace, with throwaway keys: key login as
    root only, verbose log to a file.  For the tests and the demo."""

    process: subprocess.Popen[str]
    client_key: Path
    log: Path

    def login_argv(self, host: str, remote: str, timeout: int = 3) -> list[str]:
        return ["ssh", "-i", str(self.client_key), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", f"ConnectTimeout={timeout}", "-o", "LogLevel=ERROR",
                f"root@{host}", remote]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def start_sshd(ns: Namespace, root: Path, timeout: float = 10) -> Sshd:
    """Generate keys in `root`, start sshd in `ns` on port 22, wait until it
    listens.  Raises RuntimeError if it does not come up."""
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host_key"))
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "client_key"))
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    (root / "sshd_config").write_text(
        f"Port 22\nListenAddress 0.0.0.0\nListenAddress ::\nHostKey {root}/host_key\n"
        f"PidFile {root}/sshd.pid\nAuthorizedKeysFile {root}/authorized_keys\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nLogLevel VERBOSE\n"
        "MaxStartups 100\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log_path = root / "sshd.log"
    with open(log_path, "w") as log:
        process = ns.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(root / "sshd_config")],
                           stdout=log, stderr=log)
    deadline = time.monotonic() + timeout
    while "Server listening" not in log_path.read_text():
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError(f"sshd did not start: {log_path.read_text()[-300:]}")
        time.sleep(0.05)
    return Sshd(process, root / "client_key", log_path)
