"""The real `spa-server dashboard` process (uvicorn) on loopback: what only
the real server shows (proxy headers, body limits over a real socket)."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import free_port
from tests.integration.held import established, hold, slowloris, wait_closed
from tests.integration.procs import command, run_cli

pytestmark = pytest.mark.integration
PASSWORD = "a long dashboard passphrase"


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    config = tmp_path / "server.toml"
    assert run_cli("spa-server", "--config", str(config), "init", "--state-dir",
                   str(tmp_path / "state")).returncode == 0
    assert run_cli("spa-server", "--config", str(config), "dashboard-password", "--stdin",
                   input=PASSWORD + "\n", timeout=60).returncode == 0
    port = free_port(socket.SOCK_STREAM)
    log = tmp_path / "dashboard.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*command("spa-server"), "--config", str(config), "dashboard",
                                 "--listen", f"127.0.0.1:{port}"], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "dashboard on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def post(url: str, data: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_a_forwarded_for_header_cannot_forge_the_logged_source(
        dashboard: tuple[str, Path]) -> None:
    url, log = dashboard
    with urllib.request.urlopen(url + "/login", timeout=10) as answer:
        cookie = answer.headers["set-cookie"].split(";")[0]
        token = re.search(r'name="csrf" value="(\w+)"', answer.read().decode())
    assert token is not None
    form = f"csrf={token.group(1)}&password=wrong+password+here".encode()
    code = post(url + "/login", form, {"Cookie": cookie,
                                       "X-Forwarded-For": "203.0.113.99 user=root",
                                       "Content-Type": "application/x-www-form-urlencoded"})
    assert code == 401
    deadline = time.monotonic() + 5
    while "dashboard login failed" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    assert "dashboard login failed src=127.0.0.1" in log.read_text()
    assert "203.0.113.99" not in log.read_text()


def test_a_large_body_is_refused_by_the_real_server(dashboard: tuple[str, Path]) -> None:
    """Refused on its Content-Length, before a byte of it is read."""
    url, _ = dashboard
    port = int(url.rpartition(":")[2])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 5000000\r\n\r\npassword=xxxx")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 "), answer


def test_half_open_requests_do_not_starve_a_real_client(dashboard: tuple[str, Path]) -> None:
    """Issue 13, finding 5: 64 (then 300) connections whose request headers
    never end, 20 that trickle a header line every 0.2 s, and one that sits
    idle after a whole request: the login page still answers 200 to a normal
    client, and once REQUEST_SECONDS pass the server has closed every one of
    them and holds no connection."""
    from spa.server import webserver as web

    url, _ = dashboard
    port = int(url.rpartition(":")[2])
    partial = b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # the blank line never comes

    def login_page() -> int:
        try:
            with urllib.request.urlopen(url + "/login", timeout=30) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as error:
            return error.code

    assert login_page() == 200
    kept_alive = socket.create_connection(("127.0.0.1", port), timeout=10)
    kept_alive.sendall(partial + b"\r\n")
    assert kept_alive.recv(4096).startswith(b"HTTP/1.1 200 ")
    kept_alive.sendall(b"G")  # one byte of a next request, then nothing
    held = hold(port, 64, partial)
    assert login_page() == 200
    held += hold(port, 300 - 64, partial)
    with slowloris(port, 20, b"/login") as trickling:
        assert login_page() == 200
        assert established(port) <= web.MAX_CONNECTIONS
        everyone = [kept_alive, *held, *trickling]
        assert wait_closed(everyone, web.REQUEST_SECONDS + 3) == 0
        assert established(port) == 0
    assert login_page() == 200
    for sock in [kept_alive, *held]:
        sock.close()
