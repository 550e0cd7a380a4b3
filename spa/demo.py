"""`spa-server demo`: the whole story on loopback, in a few readable lines.

A temporary state dir, a real server (udp mode, memory backend) on 127.0.0.1,
a client enrolled through a real enrollment URI, a grant with its countdown,
a replayed and a tampered packet refused with their reasons, a close, the
lease gone.  Nothing is left behind.  Returns 0 when every step behaved as
promised, 1 otherwise.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from spa.core.uri import parse
from spa.core.wire import NONCE_OFFSET, NONCE_SIZE, Action
from spa.server import admin, runner
from spa.server.events import Event
from spa.server.state import PairStatus
from spa_client import knock

WAIT = 3.0  # seconds to wait for the server to act on a packet


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def until(check: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll `check` every 50 ms until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


class Demo:
    def __init__(self, root: Path, say: Callable[[str], None]) -> None:
        self.say = say
        self.config = root / "server.toml"
        self.ok = True
        port = _free_udp_port()
        admin.init(self.config, listen_port=port, backend="memory", state_dir=root / "state",
                   force=False, services=("ssh", "https"))
        text = self.config.read_text().replace('listen_address = "::"',
                                               'listen_address = "127.0.0.1"')
        text = text.replace('mode = "capture"', 'mode = "udp"')
        self.config.write_text(text)
        self.uri = admin.enroll(self.config, "alice", ["ssh", "https"], f"127.0.0.1:{port}")
        self.enrollment = parse(self.uri)
        self.target = knock.resolve_all("127.0.0.1", port)[0]
        self.logs: list[str] = []
        # one process: the memory backend gates nothing, and the story reads
        # the state as this process, which the split would make a service user
        self.server = runner.build(self.config, backend=None, mode=None, interface=None,
                                   separate=False)
        self.server.log = self.logs.append
        self.stop = threading.Event()

    def check(self, ok: bool, line: str) -> None:
        self.ok &= ok
        self.say(("  " if ok else "  FAILED: ") + line)

    def packet(self, action: Action, service: str, duration: int = 0) -> bytes:
        return knock.make_packet(self.enrollment, action, service, duration=duration,
                                 address=None, now=time.time(), nonce=os.urandom(NONCE_SIZE))

    def leases(self) -> list[PairStatus]:
        return admin.status(self.config, now=time.time())[2]

    def refusals(self, reason: str) -> list[Event]:
        return [e for e in admin.events(self.config, since=None, now=time.time())
                if e.outcome == "refused" and e.reason == reason]

    def run(self) -> None:
        key_at = self.uri.index("key=") + 4
        shown = self.uri[:key_at] + "<secret>" + self.uri[self.uri.index("&", key_at):]
        self.say(f"1. server on 127.0.0.1 port {self.target.knock_port}/udp (memory firewall); "
                 "enrolled client alice:")
        self.say(f"     {shown}")
        self.server.start()
        thread = threading.Thread(target=self.server.serve, args=(self.stop,), daemon=True)
        thread.start()
        try:
            self.story()
        finally:
            self.stop.set()
            thread.join(timeout=5)
            self.server.shutdown()

    def story(self) -> None:
        first = self.packet(Action.OPEN, "ssh", 30)
        knock.send(self.target, first)
        granted = until(lambda: any(r.service == "ssh" for r in self.leases()))
        self.say("2. alice knocks: open ssh for 30 s (one 161-byte UDP packet, no answer)")
        self.check(granted, "granted: the firewall now lets 127.0.0.1 reach ssh (tcp/22)")
        for _ in range(3):
            rows = self.leases()
            if rows:
                r = rows[0]
                self.say(f"     status: {r.address} {r.service} {r.seconds_left:4.1f} s left, "
                         f"held by {', '.join(r.clients)}")
            time.sleep(1)
        self.say("3. an eavesdropper replays alice's packet, and flips one bit of another copy")
        knock.send(self.target, first)
        tampered = bytearray(first)
        tampered[NONCE_OFFSET] ^= 0x01  # a new nonce, so not a replay
        knock.send(self.target, bytes(tampered))
        self.check(until(lambda: bool(self.refusals("replay"))),
                   "replayed packet refused: reason=replay")
        self.check(until(lambda: bool(self.refusals("bad_mac"))),
                   "tampered packet (nonce bit flipped) refused: reason=bad_mac, before any "
                   "decryption")
        for _ in range(100):
            knock.send(self.target, b"\x01" + os.urandom(160))
        time.sleep(0.6)  # an events flush
        self.check(not self.refusals("unknown_tag"),
                   "100 random junk packets: dropped by the kernel's socket filter, the "
                   "server never saw them")
        self.say("4. alice is done: close ssh")
        knock.send(self.target, self.packet(Action.CLOSE, "ssh"))
        self.check(until(lambda: not self.leases()), "lease gone: ssh is closed again")
        # the lease can be gone from the state file before the close's log line is written
        until(lambda: any(line.startswith("accepted action=close") for line in self.logs))
        self.say("5. the server's log lines (fail2ban-readable), each after the packet "
                 "behind it:")
        for line in narrated(self.logs):
            self.say(f"     {line}")


# who sent the packet behind each kind of log line the story shows, in story order:
# the first `accepted action=open` is alice's knock, any later one her knock again
# (the original of the copies that follow); each refusal is the eavesdropper's
_SENDERS = (
    ("refused reason=replay", "the eavesdropper's copy"),
    ("refused reason=bad_mac", "its copy, one bit flipped"),
    ("accepted action=close", "alice's close"),
    ("lease_start", "(the gate opens)"),
    ("lease_end", "(the gate closes)"),
)


def narrated(lines: list[str]) -> list[str]:
    """The story's log lines (accepted, refused, lease_*), each after the
    name of whose packet it was, so that no `accepted` reads as the
    eavesdropper's: only alice's own packets are ever accepted."""
    shown: list[tuple[str, str]] = []
    for line in lines:
        if line.startswith("accepted action=open"):
            seen = any(label.startswith("alice's knock") for label, _ in shown)
            shown.append(("alice's knock again" if seen else "alice's knock", line))
            continue
        label = next((who for start, who in _SENDERS if line.startswith(start)), None)
        if label is not None:
            shown.append((label, line))
        elif line.startswith(("accepted", "refused", "lease_")):
            shown.append(("", line))
    width = max((len(label) + 2 for label, _ in shown if label), default=0)
    return [f"{label + ':' if label else '':<{width}}{line}" for label, line in shown]


def run(say: Callable[[str], None] = print) -> int:
    root = Path(tempfile.mkdtemp(prefix="spa-demo-"))
    root.chmod(0o711)  # the daemon runs as a service user: it must get through (files stay 0600)
    try:
        demo = Demo(root, say)
        demo.run()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    say("demo " + ("passed: every step behaved as the protocol promises" if demo.ok
                   else "FAILED: a step did not behave as promised"))
    return 0 if demo.ok else 1
