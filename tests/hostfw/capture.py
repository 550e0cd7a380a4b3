"""Regenerate the JSON fixtures of tests/hostfw from the ruleset files beside it (root only).

    .venv/bin/python tests/hostfw/capture.py [--from-daemons]

Each ruleset is loaded into a network namespace this script creates (spa-hc-<random>; the
host's own ruleset is never touched), listed with `nft -j list ruleset` and written as
NAME.json; the namespace is deleted at the end.  The *-fixed fixtures apply the exact lines
`spa.backends.hostcheck` suggests for the unfixed one (written to NAME.cmds).

--from-daemons first regenerates the sources made by real programs: ufw-*.rules by running
ufw 0.36 (on copies of its files, via --rootdir/--datadir) and firewalld*.nft by running
firewalld in the namespace with its own mount namespace (tmpfs /run) and a private D-Bus.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from spa.backends.hostcheck import Target, check  # noqa: E402

TARGETS = [Target("tcp", 22, "ssh"), Target("tcp", 443, "https"), Target.knock_port(62201)]
MARK_RULE = "-A {chain} -m mark --mark 0x10000000/0x10000000 -j ACCEPT\n"


def run(ns: str, *argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, text=True,
                          capture_output=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def iptables(name: str) -> Callable[[str], None]:
    def load(ns: str) -> None:
        run(ns, "iptables-nft-restore", str(HERE / f"{name}.v4.rules"))
        if (HERE / f"{name}.v6.rules").exists():
            run(ns, "ip6tables-nft-restore", str(HERE / f"{name}.v6.rules"))
    return load


def nft(name: str) -> Callable[[str], None]:
    def load(ns: str) -> None:
        run(ns, "nft", "-f", str(HERE / f"{name}.nft"))
    return load


def fixed(name: str, load: Callable[[str], None]) -> Callable[[str], None]:
    """`load`, then every fix line that check() gives for fixture `name`."""
    def apply(ns: str) -> None:
        load(ns)
        findings = check(json.loads((HERE / f"{name}.json").read_text()), TARGETS)
        lines = list(dict.fromkeys(f.fix for f in findings if f.fix))
        (HERE / f"{name}-fixed.cmds").write_text("".join(f"{line}\n" for line in lines))
        for line in lines:
            run(ns, *shlex.split(line))
    return apply


FIXTURES: dict[str, Callable[[str], None]] = {
    "debian-default": nft("debian-default"),
    "policy-drop": nft("policy-drop"),
    "policy-drop-fixed": fixed("policy-drop", nft("policy-drop")),
    "ufw-default": iptables("ufw-default"),
    "ufw-allow22": iptables("ufw-allow22"),
    "ufw-default-fixed": fixed("ufw-default", iptables("ufw-default")),
    "ufw-hinted": iptables("ufw-hinted"),
    "firewalld": nft("firewalld"),
    "firewalld-ports": nft("firewalld-ports"),
    "docker": iptables("docker"),
}


@contextmanager
def namespace() -> Iterator[str]:
    ns = f"spa-hc-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        run(ns, "ip", "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=True)


def capture() -> None:
    """Each fixture in a fresh namespace, so that even the table handles are reproducible."""
    for name, load in FIXTURES.items():
        with namespace() as ns:
            load(ns)
            document = json.loads(run(ns, "nft", "-j", "list", "ruleset"))
        (HERE / f"{name}.json").write_text(json.dumps(document, indent=1) + "\n")
        print(f"{name}.json")


def ufw(ns: str, name: str, setup: Callable[[Path], None], *commands: list[str]) -> None:
    """Run the real ufw on a copy of its files, save what it loaded as NAME.v4/v6.rules."""
    run(ns, "nft", "flush", "ruleset")
    root = Path(tempfile.mkdtemp(prefix="spa-hc-ufw-"))
    try:
        for part in ("etc/ufw", "lib/ufw", "usr/share/ufw"):
            shutil.copytree(f"/{part}", root / part)
        (root / "etc/default").mkdir()
        defaults = Path("/etc/default/ufw").read_text()
        (root / "etc/default/ufw").write_text(defaults.replace(  # no sysctl changes
            "IPT_SYSCTL=/etc/ufw/sysctl.conf", "IPT_SYSCTL="))
        setup(root)
        where = [f"--rootdir={root}", f"--datadir={root}"]
        for command in (["--force", "enable"], *commands):
            run(ns, "ufw", *where, *command)
        for tool, suffix in (("iptables-save", "v4"), ("ip6tables-save", "v6")):
            saved = run(ns, tool)
            text = "".join(line for line in saved.splitlines(True) if not line.startswith("#"))
            (HERE / f"{name}.{suffix}.rules").write_text(text)
    finally:
        shutil.rmtree(root)


def add_mark_rule(root: Path) -> None:
    """The ufw hint: the mark rule with the other ufw(6)-before-input rules."""
    marker = "# don't delete the 'COMMIT' line"
    for path, chain in (("before.rules", "ufw-before-input"), ("before6.rules",
                                                                "ufw6-before-input")):
        rules = root / "etc/ufw" / path
        rules.write_text(rules.read_text().replace(marker, MARK_RULE.format(chain=chain)
                                                   + marker, 1))


def firewalld(ns: str, name: str, *args: str) -> None:
    run(ns, "nft", "flush", "ruleset")
    run(ns, "unshare", "--mount", "--propagation", "private", sys.executable, __file__,
        "--inner-firewalld", name, *args)


def inner_firewalld(name: str, args: list[str]) -> None:
    """In the namespace, in a private mount namespace: dbus, firewalld, firewall-cmd, dump."""
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
    Path("/run/dbus").mkdir()
    bus = subprocess.run(["dbus-daemon", "--system", "--fork", "--print-pid"], check=True,
                         capture_output=True, text=True)
    daemon = subprocess.Popen(["firewalld", "--nofork", "--nopid", "--log-target", "console"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(60):
            state = subprocess.run(["firewall-cmd", "--state"], capture_output=True, text=True,
                                   check=False)
            if state.stdout.strip() == "running":
                break
            time.sleep(1)
        if args:
            subprocess.run(["firewall-cmd", *args], check=True)
        listing = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True,
                                 check=True).stdout
        (HERE / f"{name}.nft").write_text(listing)
    finally:
        daemon.terminate()
        daemon.wait()
        os.kill(int(bus.stdout.split()[0]), signal.SIGTERM)


def from_daemons(ns: str) -> None:
    ufw(ns, "ufw-default", lambda root: None)
    ufw(ns, "ufw-allow22", lambda root: None, ["allow", "22/tcp"])
    ufw(ns, "ufw-hinted", add_mark_rule, ["allow", "62201/udp"])
    firewalld(ns, "firewalld")
    firewalld(ns, "firewalld-ports", "--add-port=443/tcp", "--add-port=62201/udp")


def main() -> None:
    if sys.argv[1:2] == ["--inner-firewalld"]:
        inner_firewalld(sys.argv[2], sys.argv[3:])
        return
    if "--from-daemons" in sys.argv:
        with namespace() as ns:
            from_daemons(ns)
    capture()


if __name__ == "__main__":
    main()
