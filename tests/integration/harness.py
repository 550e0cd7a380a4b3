"""A real `spa-server run` process on loopback, and a port gate for tests.

The memory backend records grants but blocks nothing.  `PortGate` stands in
for the firewall in loopback tests: it listens on the service's TCP port only
while the server's leases.json holds a live lease for that service, so the
real client's "does the port accept?" check means something.  Real firewalls
in network namespaces replace it in tests/netns.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

from spa.server.logline import event_of
from tests.integration.procs import command, run_cli


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class PortGate:
    """Listens on `port` only while a lease for `service` is live."""

    def __init__(self, state_dir: Path, service: str, host: str = "127.0.0.1") -> None:
        self.state_dir = state_dir
        self.service = service
        self.host = host
        self.port = free_port(socket.SOCK_STREAM, host)
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open_now(self) -> bool:
        try:
            data = json.loads((self.state_dir / "leases.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        now = time.time()
        return any(lease["service"] == self.service and lease["expires"] > now
                   for lease in data["leases"])

    def _run(self) -> None:
        while not self._stop.is_set():
            want = self._open_now()
            if want and self._sock is None:
                family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.port))
                sock.listen(16)
                self._sock = sock
            elif not want and self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._sock is not None:
                ready, _, _ = select.select([self._sock], [], [], 0.02)
                if ready:
                    conn, _ = self._sock.accept()
                    conn.close()
            else:
                time.sleep(0.02)

    def __enter__(self) -> PortGate:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()


class ServerProcess:
    """`spa-server --config C run`, started and stopped by a test."""

    def __init__(self, config: Path, *args: str) -> None:
        self.config = config
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.raw: list[str] = []  # as written, the time in front
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 15) -> ServerProcess:
        self.proc = subprocess.Popen(
            [*command("spa-server"), "--config", str(self.config), "run", *self.args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self.wait_for_line("started ", timeout):
            self.stop()
            raise AssertionError(f"server did not start: {self.lines}")
        return self

    def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # as the journal keeps them: the event, no time
            self.raw.append(line.rstrip("\n"))
            self.lines.append(event_of(line.rstrip("\n")))

    def wait_for_line(self, prefix: str, timeout: float = 15) -> bool:
        """Whether a line starting with `prefix` came within `timeout` seconds
        (a line that comes returns at once: the generous default only costs a
        failing test; 5 s was too short on a loaded machine, where a restarted
        server's refusal once took longer)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.startswith(prefix) for line in self.lines):
                return True
            if self.proc is not None and self.proc.poll() is not None:
                time.sleep(0.1)
                return any(line.startswith(prefix) for line in self.lines)
            time.sleep(0.02)
        return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
        return code

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def status_json(config: Path) -> list[dict[str, object]]:
    done = run_cli("spa-server", "--config", str(config), "status", "--json")
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, object]] = json.loads(done.stdout)
    return rows


def events_json(config: Path, *args: str) -> list[dict[str, object]]:
    done = run_cli("spa-server", "--config", str(config), "events", "--json", *args)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, object]] = json.loads(done.stdout)
    return rows


def wait_until(check: object, timeout: float = 5.0) -> bool:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
