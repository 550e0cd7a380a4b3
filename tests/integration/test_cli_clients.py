"""`spa-server clients` on the client store: pages, --json, export, import,
and the one-time migration an old server.toml gets at the first command."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from spa.server import config as config_mod
from spa.server.config import ClientEntry
from tests.integration.procs import run_cli
from tests.integration.test_cli_errors import assert_one_line_error

pytestmark = pytest.mark.integration


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "server.toml"
    done = run_cli("spa-server", "--config", str(path), "init", "--state-dir",
                   str(tmp_path / "state"), "--service", "ssh", "--service", "https")
    assert done.returncode == 0, done.stderr
    for name in ("alice", "bob", "carol"):
        done = server(path, "enroll", name, "--service", "ssh", "--endpoint", "203.0.113.10")
        assert done.returncode == 0, done.stderr
    return path


def server(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("spa-server", "--config", str(config), *args)


def test_pages_filters_and_json_without_secrets(config: Path) -> None:
    assert server(config, "revoke", "bob").returncode == 0
    first = server(config, "clients", "--limit", "2")
    assert first.returncode == 0, first.stderr
    assert "alice" in first.stdout and "bob" in first.stdout and "carol" not in first.stdout
    assert "--after bob" in first.stderr and "of 3 client(s)" in first.stderr
    assert "carol" in server(config, "clients", "--after", "bob").stdout
    data = json.loads(server(config, "clients", "--json", "--state", "revoked").stdout)
    assert data == {"count": 3, "clients": [
        {"name": "bob", "state": "revoked", "services": ["ssh"], "enrolled": data["clients"][0]
         ["enrolled"], "endpoint": "203.0.113.10", "otp": False, "sources": [],
         "kind": "spa"}]}
    assert "secret" not in json.dumps(data)
    assert "carol" in server(config, "clients", "--match", "aro").stdout
    assert_one_line_error(server(config, "clients", "--state", "gone"), "--state 'gone'")
    assert_one_line_error(server(config, "clients", "--limit", "0"), "--limit 0")


def test_export_is_0600_and_importing_it_twice_changes_nothing(config: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "clients.json"
    done = server(config, "clients", "export", str(out))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert_one_line_error(server(config, "clients", "export", str(out)), "exists")
    to_stdout = server(config, "clients", "export", "--format", "toml")
    assert "[clients.alice]" in to_stdout.stdout and "secret" in to_stdout.stderr
    again = server(config, "clients", "import", str(out))
    assert again.stdout.splitlines() == ["added 0: -", "updated 0: -", "removed 0: -"]
    data = json.loads(out.read_text())
    del data["clients"]["carol"]
    data["clients"]["alice"]["services"] = ["ssh", "https"]
    data["clients"]["dave"] = dict(data["clients"]["bob"])
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    done = server(config, "clients", "import", "--prune", str(edited))
    assert done.stdout.splitlines() == ["added 1: dave", "updated 1: alice",
                                        "removed 1: carol"], done.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"clients": {"eve": {"services": ["ssh"]}}}')
    assert_one_line_error(server(config, "clients", "import", str(bad)), "needs secret")


def test_an_old_config_is_migrated_by_the_first_command(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    assert run_cli("spa-server", "--config", str(path), "init", "--state-dir",
                   str(tmp_path / "state")).returncode == 0
    config_mod.add_client(path, ClientEntry("old", os.urandom(32), ("ssh",),
                                            enrolled="2025-01-01T00:00:00Z"))
    original = path.read_bytes()
    listing = server(path, "clients")
    assert listing.returncode == 0 and "old" in listing.stdout, listing.stderr
    assert (tmp_path / "server.toml.pre-store").read_bytes() == original
    assert config_mod.load(path).clients == {}
    assert "old" in server(path, "clients").stdout


def test_status_counts_clients_by_state_without_a_store_of_its_own(config: Path,
                                                                   tmp_path: Path) -> None:
    """`status` counts in SQL; it never makes a store (nor moves clients) itself."""
    assert server(config, "revoke", "bob").returncode == 0
    done = server(config, "enroll", "dave", "--service", "ssh", "--endpoint", "203.0.113.10",
                  "--expires", "1h")
    assert done.returncode == 0, done.stderr
    status = server(config, "status")
    assert status.returncode == 0, status.stderr
    assert "clients: 4 (1 revoked, 2 active, 1 pending, 0 expired)" in status.stdout
    fresh = tmp_path / "fresh.toml"
    assert run_cli("spa-server", "--config", str(fresh), "init", "--state-dir",
                   str(tmp_path / "fresh")).returncode == 0
    assert "clients: state directory" in server(fresh, "status").stdout
    (tmp_path / "fresh").mkdir(mode=0o700)
    status = server(fresh, "status")
    assert status.returncode == 0 and "clients: no client store at" in status.stdout
    assert not (tmp_path / "fresh" / "clients.db").exists()
