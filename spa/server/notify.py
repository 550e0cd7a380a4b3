"""systemd's notify protocol (sd_notify) with the standard library only.

READY=1 once the server serves, WATCHDOG=1 every half of WatchdogSec while
the receive loop is alive, STOPPING=1 at shutdown, STATUS=... for
`systemctl status`.  Without NOTIFY_SOCKET (not under systemd) every call
does nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None) -> None:
        self.address = address
        self.interval = (watchdog_usec / 2e6) if watchdog_usec else None
        self._last_ping = 0.0
        self._sock: socket.socket | None = None

    def connect(self) -> None:
        """Connect now (before the daemon drops its privileges: the socket's
        permissions are checked when it connects, not at each message)."""
        if not self.address or self._sock is not None:
            return
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(target)
        except OSError:
            sock.close()
            return
        self._sock = sock

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        address = env.get("NOTIFY_SOCKET") or None
        watchdog = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        usec = int(watchdog) if watchdog and watchdog.isdigit() else None
        if pid and pid.isdigit() and int(pid) != os.getpid():
            usec = None  # the watchdog is meant for another process
        return cls(address, usec)

    def send(self, message: str) -> bool:
        if not self.address:
            return False
        if self._sock is not None:
            try:
                self._sock.send(message.encode())
            except OSError:
                return False
            return True
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(message.encode(), target)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self, now: float, alive: bool) -> None:
        """Ping when due, and only if the receive loop is making progress."""
        if self.interval is None or not alive or now - self._last_ping < self.interval:
            return
        if self.send("WATCHDOG=1"):
            self._last_ping = now
