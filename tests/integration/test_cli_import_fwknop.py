"""`spa-server import-fwknop`, run as a user runs it: a dry run changes nothing
and prints the plan; the import makes compat clients with fwknopd's keys,
sources and services and sets fwknop_port; a second run changes nothing and
says so; files that are not fwknopd's are one line each, exit 2; no key is
ever printed."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from tests.integration.procs import run_cli
from tests.integration.test_cli_errors import assert_one_line_error

pytestmark = pytest.mark.integration

ALICE = (base64.b64encode(bytes(range(1, 33))).decode(),
         base64.b64encode(bytes(range(100, 164))).decode())
ANYONE = (base64.b64encode(bytes([7]) * 32).decode(), base64.b64encode(bytes([8]) * 64).decode())
PASSPHRASE = "correct horse battery"
ACCESS = f"""# fwknopd's clients
SOURCE              203.0.113.0/24, 198.51.100.7
OPEN_PORTS          tcp/22, tcp/2222
KEY_BASE64          {ALICE[0]}
HMAC_KEY_BASE64     {ALICE[1]}
REQUIRE_USERNAME    alice
FW_ACCESS_TIMEOUT   60

SOURCE              ANY
OPEN_PORTS          udp/53
KEY_BASE64          {ANYONE[0]}
HMAC_KEY_BASE64     {ANYONE[1]}
ENABLE_CMD_EXEC     Y

SOURCE              ANY
OPEN_PORTS          tcp/22
KEY                 {PASSPHRASE}
HMAC_KEY_BASE64     {ANYONE[1][::-1]}

SOURCE              ANY
KEY_BASE64          __CHANGEME__
HMAC_KEY_BASE64     __CHANGEME__
"""
CONF = "PCAP_INTF eth0;\nPCAP_FILTER udp port 62201;\n"


def server(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("spa-server", "--config", str(config), *args)


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, list[str]]:
    """A config (our port 62202, one spa1:// client) and fwknopd's two files."""
    config = tmp_path / "server.toml"
    assert server(config, "init", "--state-dir", str(tmp_path / "state"), "--backend",
                  "memory", "--listen-port", "62202").returncode == 0
    assert server(config, "enroll", "carol", "--service", "ssh", "--endpoint",
                  "192.0.2.1").returncode == 0
    (tmp_path / "access.conf").write_text(ACCESS)
    (tmp_path / "fwknopd.conf").write_text(CONF)
    return config, ["import-fwknop", "--access", str(tmp_path / "access.conf"), "--conf",
                    str(tmp_path / "fwknopd.conf")]


def no_key(*done: subprocess.CompletedProcess[str]) -> None:
    for run in done:
        for secret in (*ALICE, *ANYONE, PASSPHRASE, ALICE[0][:12], ANYONE[1][:12]):
            assert secret not in run.stdout + run.stderr


def as_done(dry: subprocess.CompletedProcess[str]) -> list[str]:
    """A dry run's lines as the run itself words them."""
    return [line.replace("would import", "imported").replace("would add", "add")
            .replace("would set", "set").replace(" to import", " imported")
            for line in dry.stdout.splitlines()[1:]]


def clients(config: Path) -> dict[str, dict[str, object]]:
    listed = json.loads(server(config, "clients", "--json").stdout)["clients"]
    return {c["name"]: c for c in listed}


def test_import_then_again_changes_nothing_and_a_dry_run_never_does(
        site: tuple[Path, list[str]]) -> None:
    config, command = site
    before = config.read_bytes()
    dry = server(config, *command, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("dry run: nothing is changed")
    assert "would import as alice: opens tcp/22 as ssh, tcp/2222 as tcp-2222 (new service)" \
        in dry.stdout
    assert config.read_bytes() == before and list(clients(config)) == ["carol"]

    done = server(config, *command)
    assert done.returncode == 0, done.stderr
    assert as_done(dry) == done.stdout.splitlines()
    out = done.stdout
    assert "imported as alice" in out and "imported as fwknop-any:" in out
    assert "not imported (fwknop-any-2):\n  - KEY is a passphrase in clear" in out
    assert "not imported (fwknop-any-3):\n  - KEY_BASE64 and HMAC_KEY_BASE64: still" in out
    assert "REQUIRE_USERNAME alice: dropped; fwknop's username field is not authenticated" in out
    assert "command execution (ENABLE_CMD_EXEC): dropped" in out
    assert "set fwknop_port = 62201 under [server] (fwknopd's PCAP_FILTER 'udp port 62201')" \
        in out
    assert "stanzas: 2 imported: alice, fwknop-any; 0 already imported; 2 not imported" in out
    found = clients(config)
    assert found["alice"]["kind"] == "fwknop" and found["alice"]["services"] == [
        "ssh", "tcp-2222"]
    assert found["alice"]["sources"] == ["203.0.113.0/24", "198.51.100.7/32"]
    assert found["fwknop-any"]["services"] == ["udp-53"] and found["fwknop-any"]["sources"] == []
    text = config.read_text()
    assert "[services.tcp-2222]" in text and "default_duration = 60" in text
    assert "fwknop_port = 62201" in text
    export = json.loads(server(config, "clients", "export").stdout)["clients"]["alice"]

    def raw(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    assert raw(export["fwknop_key"]) == base64.b64decode(ALICE[0])
    assert raw(export["fwknop_hmac_key"]) == base64.b64decode(ALICE[1])
    listing = server(config, "clients").stdout
    assert "spa-server rotate alice --grace 0 --endpoint HOST --qr" in listing

    after = config.read_bytes()
    exported = server(config, "clients", "export").stdout
    again = server(config, *command)
    assert again.returncode == 0, again.stderr
    assert "already imported as alice (the store holds its HMAC key): unchanged" in again.stdout
    assert again.stdout.splitlines()[-1] == ("nothing to change: every stanza that can be is "
                                             "imported")
    assert config.read_bytes() == after
    assert server(config, "clients", "export").stdout == exported
    dry_again = server(config, *command, "--dry-run")
    assert as_done(dry_again) == again.stdout.splitlines()
    no_key(dry, done, again, dry_again)


def test_files_that_are_not_fwknopds_are_one_line_and_change_nothing(
        site: tuple[Path, list[str]], tmp_path: Path) -> None:
    config, _ = site
    before = config.read_bytes()
    access, conf = tmp_path / "access.conf", tmp_path / "fwknopd.conf"
    runs = [
        (server(config, "import-fwknop", "--access", str(tmp_path / "nothing.conf")),
         "does not exist"),
        (server(config, "import-fwknop", "--access", str(conf)),
         "no SOURCE line: not an fwknopd access.conf"),
        (server(config, "import-fwknop", "--access", str(access), "--conf", str(access)),
         "SOURCE belongs in an access.conf"),
        (server(config, "import-fwknop", "--access", str(access), "--conf",
                str(tmp_path / "gone.conf")), "config file"),
        (server(config, "import-fwknop", "--access", str(tmp_path)), "is a directory"),
    ]
    (tmp_path / "bad.conf").write_text(f"SOURCE ANY\nKEY_BASE64 {ALICE[0]}\n{ALICE[1]}\n")
    runs.append((server(config, "import-fwknop", "--access", str(tmp_path / "bad.conf")),
                 "the setting on line 3 has no value"))
    for done, fragment in runs:
        assert_one_line_error(done, fragment)
        no_key(done)
    assert config.read_bytes() == before and list(clients(config)) == ["carol"]
