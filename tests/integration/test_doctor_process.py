"""spa-client doctor and open as processes, with every packet on 127.0.0.1:
`open` records that the port opened, doctor reads the record, takes --otp and
--time-server.  No spa-server runs: a plain listener plays the opened port."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from spa.core.uri import Enrollment, ServiceRef, render
from tests.integration.procs import run_cli

pytestmark = pytest.mark.integration


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def enroll(directory: Path, name: str, port: int, *, otp: bool = False) -> None:
    uri = render(Enrollment("127.0.0.1", free_port(socket.SOCK_DGRAM), os.urandom(16), name,
                            os.urandom(32), (ServiceRef("web", "tcp", port),), otp=otp))
    done = client(directory, "enroll", uri, "--name", name)
    assert done.returncode == 0, done.stderr


def client(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("spa-client", "--config-dir", str(directory), *args, input="")


def test_open_records_and_doctor_reads_it(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = int(listener.getsockname()[1])
        enroll(tmp_path, "srv", port)
        done = client(tmp_path, "open", "web", "srv")
        assert done.returncode == 0, done.stderr
        record = tmp_path / "profiles" / "srv.opened"
        assert stat.S_IMODE(record.stat().st_mode) == 0o600
        done = client(tmp_path, "doctor", "srv", "--time-server", "127.0.0.1")
        assert "ok   enrollment: in use: this profile last opened its port at" in done.stdout
        assert "is open already, before any knock" in done.stdout
        assert "clock first" not in done.stdout
    done = client(tmp_path, "doctor", "srv", "--time-server", "none")  # nothing listens now
    assert done.returncode == 1, done.stdout
    assert "FAIL knock: web (tcp/" in done.stdout
    assert "not measured (--time-server none)" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("fix: revoked or re-keyed")


def test_doctor_takes_otp_for_an_authenticator_profile(tmp_path: Path) -> None:
    enroll(tmp_path, "bob", free_port(socket.SOCK_STREAM), otp=True)
    done = client(tmp_path, "doctor", "bob", "--time-server", "none")  # no terminal to ask on
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith(
        "no knock sent: run spa-client doctor bob --otp CODE (the code your app shows now)")
    done = client(tmp_path, "doctor", "bob", "--otp", "123456", "--time-server", "none")
    assert done.returncode == 1, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("fix: revoked, not enrolled, or unreachable"), last
    assert "authenticator code was wrong or stale" in last
    bad = client(tmp_path, "doctor", "bob", "--otp", "12", "--time-server", "none")
    assert bad.returncode == 2 and "6 digits" in bad.stderr
