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
from collections.abc import Sequence
from dataclasses import dataclass, field
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
        index = sum(1 for _ in self.namespaces) * 10 + len(a_addrs) + secrets.randbelow(1000)
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
            # kill whatever still runs inside, then remove the namespace
            pids = sh("ip", "netns", "pids", namespace.name, check=False).stdout.split()
            for pid in pids:
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", namespace.name, check=False)
        self.namespaces.clear()
