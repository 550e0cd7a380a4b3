"""The systemd unit: it verifies, its exposure stays low, and the server
speaks the notify protocol (READY=1, then WATCHDOG=1 pings) to a fake
NOTIFY_SOCKET."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from spa.server.notify import Notifier
from tests.integration.harness import free_port
from tests.integration.procs import command, run_cli

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "contrib/systemd/spa-server.service"


DASHBOARD_UNIT = ROOT / "contrib/systemd/spa-dashboard.service"


def unit_for_this_machine(tmp_path: Path, unit: Path = UNIT, name: str | None = None) -> Path:
    """The unit with ExecStart pointing at this checkout's spa-server (`name`:
    the file's name, e.g. a template's instance).  Verified with --man=no: its
    man:spa-server(8) is installed by the Debian package
    (tests/package/test_deb.py verifies the installed units with it)."""
    text = re.sub(r"/usr(/local)?/bin/spa-server", command("spa-server")[0], unit.read_text())
    path = tmp_path / (name or unit.name)
    path.write_text(text)
    return path


def need_systemd_analyze() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze (apt-get install systemd)")


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    need_systemd_analyze()
    done = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           str(unit_for_this_machine(tmp_path))],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "spa-server.service" not in done.stderr, done.stderr


def test_unit_exposure_stays_below_2(tmp_path: Path) -> None:
    need_systemd_analyze()
    done = subprocess.run(["systemd-analyze", "security", "--offline=true",
                           str(unit_for_this_machine(tmp_path))],
                          capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for spa-server.service: ([0-9.]+)", done.stdout)
    assert match is not None, done.stdout + done.stderr
    assert float(match.group(1)) < 2.0


def test_dashboard_unit_verifies_and_runs_with_no_capability(tmp_path: Path) -> None:
    need_systemd_analyze()
    unit = unit_for_this_machine(tmp_path, DASHBOARD_UNIT)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "spa-dashboard.service" not in done.stderr, done.stderr
    done = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for spa-dashboard.service: ([0-9.]+)",
                      done.stdout)
    assert match is not None, done.stdout + done.stderr
    assert float(match.group(1)) < 2.0, done.stdout
    text = DASHBOARD_UNIT.read_text()
    assert "\nCapabilityBoundingSet=\n" in text and "IPAddressAllow=localhost" in text


def test_unit_asks_for_what_issue_5_names() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=spa",
                 "ConfigurationDirectory=spa", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateTmp=yes",
                 "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_BPF",
                 # CAP_BPF and bpf(2): the map at the start, and the gate keeper's growth
                 "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_BPF",
                 "SystemCallFilter=capset bpf",
                 "After=network-online.target nftables.service",
                 "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6 AF_PACKET"):
        assert line in text, line


def test_notifier_does_nothing_without_systemd() -> None:
    notifier = Notifier.from_environment({})
    assert notifier.send("READY=1") is False
    assert Notifier.from_environment({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000",
                                      "WATCHDOG_PID": "1"}).interval is None


def test_server_sends_ready_then_watchdog_pings(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(10)
    config = tmp_path / "server.toml"
    port = free_port()
    assert run_cli("spa-server", "--config", str(config), "init", "--listen-port", str(port),
                   "--backend", "memory", "--state-dir", str(tmp_path / "state")
                   ).returncode == 0
    text = config.read_text().replace('listen_address = "::"', 'listen_address = "127.0.0.1"')
    config.write_text(text.replace('mode = "capture"', 'mode = "udp"'))
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([*command("spa-server"), "--config", str(config), "run"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 3:
            messages.append(listener.recv(4096).decode())
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    try:
        while True:
            listener.settimeout(1)
            messages.append(listener.recv(4096).decode())
    except TimeoutError:
        pass
    listener.close()
    assert messages[0].startswith("READY=1\nSTATUS=serving port"), messages
    assert sum("WATCHDOG=1" in m for m in messages) >= 3
    assert messages[-1] == "STOPPING=1"


GATE_UNIT = ROOT / "contrib/systemd/spa-gate.service"


def test_the_boot_gate_unit_verifies_and_runs_before_the_network(tmp_path: Path) -> None:
    """Issue 12: the ports are closed before the network comes up: a oneshot
    ordered before network-pre.target (after nftables.service, whose flush
    would remove a table made earlier), and spa-server waits for it."""
    need_systemd_analyze()
    path = unit_for_this_machine(tmp_path, GATE_UNIT)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    text = GATE_UNIT.read_text()
    assert re.search(r"^Before=.*network-pre\.target", text, re.M)
    assert re.search(r"^After=.*nftables\.service", text, re.M)
    assert "DefaultDependencies=no" in text and "Type=oneshot" in text
    assert re.search(r"ExecStart=\S+ --config /etc/spa/server.toml gate$", text, re.M)
    server = UNIT.read_text()
    assert re.search(r"^After=.*spa-gate\.service", server, re.M)
    assert re.search(r"^Wants=.*spa-gate\.service", server, re.M)
    exposure = subprocess.run(["systemd-analyze", "security", "--offline=true", str(path)],
                              capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for spa-gate.service: ([0-9.]+)",
                      exposure.stdout)
    assert match is not None and float(match.group(1)) < 2.5, exposure.stdout[-500:]


TEMPLATE = ROOT / "contrib/systemd/spa-server@.service"
GATE_TEMPLATE = ROOT / "contrib/systemd/spa-gate@.service"


def test_the_templated_units_verify_as_an_instance_with_the_same_sandbox(
        tmp_path: Path) -> None:
    """Issue 16: spa-server@site1 runs with /etc/spa/site1.toml and its state
    in /var/lib/spa/site1, as tightly sandboxed as the single unit."""
    need_systemd_analyze()
    for template, unit in ((TEMPLATE, "spa-server@site1.service"),
                           (GATE_TEMPLATE, "spa-gate@site1.service")):
        unit_for_this_machine(tmp_path, template)  # the template beside its instance
        path = unit_for_this_machine(tmp_path, template, unit)
        done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert unit not in done.stderr, done.stderr
        exposure = subprocess.run(["systemd-analyze", "security", "--offline=true", str(path)],
                                  capture_output=True, text=True, timeout=60, check=False)
        match = re.search(rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+)",
                          exposure.stdout)
        assert match is not None and float(match.group(1)) < (
            2.0 if unit.startswith("spa-server") else 2.5), exposure.stdout[-500:]
    text = TEMPLATE.read_text()
    assert re.search(r"^ExecStart=/usr/bin/spa-server --config /etc/spa/%i\.toml run$", text,
                     re.M)
    assert "\nStateDirectory=spa/%i\n" in text
    assert re.search(r"^Wants=.*spa-gate@%i\.service", text, re.M)
    assert re.search(r"^ExecStart=/usr/bin/spa-server --config /etc/spa/%i\.toml gate$",
                     GATE_TEMPLATE.read_text(), re.M)
    assert "\nStateDirectory=spa/%i\n" in GATE_TEMPLATE.read_text()


def _service_lines(path: Path, start: str) -> list[str]:
    """The unit's settings from the line `start` on (comments left out)."""
    text = path.read_text()
    return [line for line in text[text.index(start):].splitlines()
            if line and not line.startswith("#")]


def test_the_templated_unit_keeps_every_sandbox_line_of_the_single_unit() -> None:
    for single, template in ((UNIT, TEMPLATE), (GATE_UNIT, GATE_TEMPLATE)):
        ours = _service_lines(template, "User=")
        missing = [line for line in _service_lines(single, "User=")
                   if not line.startswith("StateDirectory=") and line not in ours]
        assert not missing, (template.name, missing)


def test_every_unit_runs_the_installed_program_and_documents_what_ships() -> None:
    """ExecStart is the path the Debian package installs, and Documentation=
    names only man pages and the docs the package ships (no web address)."""
    units = sorted((ROOT / "contrib/systemd").glob("*.service"))
    assert len(units) == 5
    for unit in units:
        text = unit.read_text()
        assert re.search(r"^ExecStart=/usr/bin/spa-server ", text, re.M), unit.name
        docs = re.findall(r"^Documentation=(.*)$", text, re.M)
        assert docs, unit.name
        for word in " ".join(docs).split():
            assert word.startswith(("man:", "file:///usr/share/doc/spa/")), (unit.name, word)
            if word.startswith("file://"):
                assert (ROOT / "docs" / Path(word).name).is_file(), (unit.name, word)
