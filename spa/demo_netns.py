"""`spa-server demo` as root: the story with real components, in two network
namespaces it makes and removes.

A server namespace runs a real sshd and spa-server (nftables backend, capture
mode); a client namespace runs spa-client and a real ssh.  Before the knock,
ssh cannot connect; after it, ssh logs in; a replayed and a tampered packet
change nothing; after the close, ssh cannot connect again.  Where namespaces
cannot be made, the caller falls back to the loopback demo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from spa.core.uri import parse
from spa.core.wire import NONCE_OFFSET, NONCE_SIZE, Action
from spa.demo import narrated, until
from spa.netns import Namespace, Sshd, Topology, can_make_namespaces, start_sshd
from spa.server import admin
from spa.server.logline import event_of
from spa_client import knock

SERVER, CLIENT = "10.200.0.1", "10.200.0.2"
PORT = 62201


def unavailable() -> str | None:
    """None if the namespace demo can run here, else why not."""
    reason = can_make_namespaces()
    if reason is not None:
        return reason
    for tool in ("sshd", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"needs {tool} (apt-get install openssh-server openssh-client)"
    return None


def _program(name: str) -> list[str]:
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    module = "spa.cli" if name == "spa-server" else "spa_client.cli"
    return [sys.executable, "-c", f"from {module} import main; main()"]


class NetnsDemo:
    def __init__(self, root: Path, say: Callable[[str], None]) -> None:
        self.root = root
        self.say = say
        self.ok = True
        self.topo = Topology()
        self.lines: list[str] = []
        self.server: subprocess.Popen[str] | None = None
        self.sshd: Sshd | None = None
        self.srv: Namespace
        self.cli: Namespace

    def check(self, ok: bool, line: str) -> None:
        self.ok &= ok
        self.say(("  " if ok else "  FAILED: ") + line)

    def setup(self) -> None:
        self.srv, self.cli = self.topo.ns("srv"), self.topo.ns("cli")
        self.topo.link(self.srv, [f"{SERVER}/24"], self.cli, [f"{CLIENT}/24"])
        self.sshd = start_sshd(self.srv, self.root)
        self.config = self.root / "server.toml"
        admin.init(self.config, listen_port=PORT, backend="nftables",
                   state_dir=self.root / "state", force=False)
        self.uri = admin.enroll(self.config, "alice", ["ssh"], SERVER)
        self.client("enroll", self.uri, "--name", "srv")
        self.server = self.srv.popen(
            [*_program("spa-server"), "--config", str(self.config), "run"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, daemon=True).start()
        if not until(lambda: any(x.startswith("started") for x in self.lines)):
            raise RuntimeError(f"spa-server did not start: {self.lines[-3:]}")

    def _read(self) -> None:
        assert self.server is not None
        assert self.server.stdout is not None
        for line in self.server.stdout:  # the event alone: the story shows no times
            self.lines.append(event_of(line.rstrip("\n")))

    def client(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cli.run(*_program("spa-client"), "--config-dir", str(self.root / "client"),
                            *args, check=False)

    def ssh(self, remote: str) -> subprocess.CompletedProcess[str]:
        assert self.sshd is not None
        return self.cli.run(*self.sshd.login_argv(SERVER, remote, timeout=2), check=False,
                            timeout=30)

    def send_raw(self, packet: bytes) -> None:
        code = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                f"s.sendto(bytes.fromhex(sys.argv[1]),({SERVER!r},{PORT}))")
        self.cli.run(sys.executable, "-c", code, packet.hex())

    def leases(self) -> list[dict[str, object]]:
        done = self.srv.run(*_program("spa-server"), "--config", str(self.config), "status",
                            "--json", check=False)
        rows: list[dict[str, object]] = json.loads(done.stdout or "[]")
        return rows

    def story(self) -> None:
        say = self.say
        say(f"1. namespaces: server {SERVER} (a real sshd on tcp/22, spa-server with nftables "
            f"in capture mode:")
        say(f"   nothing bound to {PORT}/udp) and client {CLIENT} (spa-client, ssh): "
            f"{self.srv.name} and {self.cli.name}, removed at the end")
        before = self.ssh("true")
        self.check(before.returncode != 0,
                   "before the knock: ssh cannot connect (the port is filtered, not even refused)")
        say("2. alice knocks: spa-client open ssh srv")
        started = time.monotonic()
        opened = self.client("open", "ssh", "srv")
        took = (time.monotonic() - started) * 1000
        self.check(opened.returncode == 0, f"the port accepts connections after {took:.0f} ms "
                   "(process start included)")
        say(f"3. alice logs in: ssh root@{SERVER}")
        login = self.ssh("echo logged in as $(whoami)")
        self.check(login.stdout.strip() == "logged in as root",
                   login.stdout.strip() or login.stderr.strip())
        for _ in range(2):
            rows = self.leases()
            if rows:
                say(f"     status: {rows[0]['address']} {rows[0]['service']} "
                    f"{float(rows[0]['seconds_left']):4.1f} s left, "  # type: ignore[arg-type]
                    f"held by {', '.join(rows[0]['clients'])}")  # type: ignore[arg-type]
            time.sleep(1)
        say("4. alice knocks once more (her lease renewed); an eavesdropper on the path "
            "copies that packet,")
        say("   sends the copy, then the copy with one bit flipped")
        enrollment = parse(self.uri)
        packet = knock.make_packet(enrollment, Action.OPEN, "ssh", duration=30, address=None,
                                   now=time.time(), nonce=os.urandom(NONCE_SIZE))
        self.send_raw(packet)
        self.check(until(lambda: self.count("accepted action=open") >= 2),
                   "alice's knock accepted (the original: it renews her lease)")
        self.send_raw(packet)
        tampered = bytearray(packet)
        tampered[NONCE_OFFSET] ^= 1  # a new nonce, so not a replay
        self.send_raw(bytes(tampered))
        self.check(until(lambda: self.count("refused reason=replay") >= 1),
                   "the eavesdropper's copy refused: reason=replay (nothing opens for it)")
        self.check(until(lambda: self.count("refused reason=bad_mac") >= 1),
                   "the copy with one bit flipped refused: reason=bad_mac")
        self.check(self.count("accepted action=open") == 2,
                   "no knock accepted but alice's two")
        say("5. alice closes ssh: spa-client close ssh srv")
        self.client("close", "ssh", "srv")
        self.check(until(lambda: not self.leases()), "lease gone")
        after = self.ssh("true")
        self.check(after.returncode != 0, "after the close: ssh cannot connect again")
        say("6. the server's log lines (fail2ban-readable), each after the packet behind it:")
        for line in narrated(self.lines):
            say(f"     {line}")

    def count(self, start: str) -> int:
        """How many of the server's lines so far begin with `start`."""
        return sum(1 for line in list(self.lines) if line.startswith(start))

    def teardown(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.server.kill()
        if self.sshd is not None:
            self.sshd.stop()
        self.topo.cleanup()


def run(say: Callable[[str], None] = print) -> int:
    root = Path(tempfile.mkdtemp(prefix="spa-demo-"))
    root.chmod(0o711)  # the daemon runs as a service user: it must get through (files stay 0600)
    demo = NetnsDemo(root, say)
    try:
        demo.setup()
        demo.story()
    except RuntimeError as exc:  # a program of the stage failed (ip, sshd, spa-server)
        say(f"demo FAILED: {exc}")
        return 1
    finally:
        demo.teardown()
        shutil.rmtree(root, ignore_errors=True)
    say("demo " + ("passed: every step behaved as promised" if demo.ok
                   else "FAILED: a step did not behave as promised"))
    return 0 if demo.ok else 1
