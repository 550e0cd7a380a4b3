"""`spa-server enroll --from` and `spa-server clients set`, run in process
through the real entry point (spa.cli.main: one-line errors, exit status 2):
what they print, what they store, what they refuse, and the networks in
`clients`, `clients --json` and export / import."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from spa import cli
from spa.server import admin

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def spa_server(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
               tmp_path: Path) -> Run:
    """spa-server ARGS with a fresh config: (exit status, stdout, stderr)."""
    config = tmp_path / "server.toml"

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["spa-server", "--config", str(config), *args])
        with pytest.raises(SystemExit) as done:
            cli.main()
        out = capsys.readouterr()
        return int(done.value.code or 0), out.out, out.err

    assert run("init", "--state-dir", str(tmp_path / "state"), "--backend", "memory")[0] == 0
    return run


def one_line_error(result: tuple[int, str, str], *fragments: str) -> None:
    status, _, err = result
    assert status == 2, result
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def enroll(run: Run, name: str, *args: str) -> tuple[int, str, str]:
    return run("enroll", name, "--service", "ssh", "--endpoint", "203.0.113.1", *args)


def test_enroll_from_stores_canonical_networks_and_says_so(spa_server: Run) -> None:
    status, out, _ = enroll(spa_server, "alice", "--from", "192.0.2.0/24", "--from",
                            "2001:DB8::/48", "--from", "192.0.2.0/255.255.255.0")
    assert status == 0
    assert ("knocks accepted only from 192.0.2.0/24, 2001:db8::/48: a knock from elsewhere "
            "is refused (source_not_allowed)") in out
    assert enroll(spa_server, "bob")[0] == 0
    listing = spa_server("clients")[1].splitlines()
    assert listing[0].split() == ["NAME", "STATE", "SERVICES", "ENROLLED", "FROM"]
    assert listing[1].split()[-1] == "192.0.2.0/24,2001:db8::/48"
    assert listing[2].split()[-1] == "anywhere"
    shown = json.loads(spa_server("clients", "--json")[1])["clients"]
    assert [c["sources"] for c in shown] == [["192.0.2.0/24", "2001:db8::/48"], []]


@pytest.mark.parametrize(("args", "says"), [
    (("--from", "192.0.2.7/24"), "--from '192.0.2.7/24' has host bits set past /24; write "
                                 "192.0.2.0/24 for the network or 192.0.2.7/32"),
    (("--from", "office"), "--from 'office' is not a network; write an address or "
                           "ADDRESS/PREFIX, e.g. 203.0.113.0/24 or 2001:db8::/48"),
    (("--from", "192.0.2.0/24", "--from", "10.0.0.0/33"), "--from '10.0.0.0/33' is not"),
])
def test_a_bad_network_enrolls_nobody(spa_server: Run, args: tuple[str, ...],
                                      says: str) -> None:
    one_line_error(enroll(spa_server, "alice", *args), says)
    assert "no clients enrolled" in spa_server("clients")[1]


def test_clients_set_replaces_clears_and_refuses_what_it_cannot_do(spa_server: Run,
                                                                   tmp_path: Path) -> None:
    assert enroll(spa_server, "alice")[0] == 0
    status, out, _ = spa_server("clients", "set", "alice", "--from", "198.51.100.0/24",
                                "--from", "2001:db8::/48")
    assert status == 0
    assert out.strip() == ("alice: knocks accepted only from 198.51.100.0/24, 2001:db8::/48 "
                           "now; a knock from elsewhere is refused source_not_allowed (a "
                           "running server applies it within a second)")
    assert spa_server("clients", "set", "alice", "--from", "2001:db8::/48")[0] == 0
    assert admin.load(tmp_path / "server.toml").clients["alice"].sources == ("2001:db8::/48",)
    assert "already; nothing changed" in spa_server("clients", "set", "alice", "--from",
                                                   "2001:db8:0::/48")[1]
    assert spa_server("clients", "set", "alice", "--no-from")[1].startswith(
        "alice: knocks accepted from anywhere now")
    assert admin.load(tmp_path / "server.toml").clients["alice"].sources == ()
    one_line_error(spa_server("clients", "set", "alice"), "give --from NET", "or --no-from")
    one_line_error(spa_server("clients", "set", "alice", "--from", "192.0.2.0/24",
                              "--no-from"), "one of the two")
    one_line_error(spa_server("clients", "set", "zed", "--from", "192.0.2.0/24"),
                   "no client named 'zed'")
    one_line_error(spa_server("clients", "set", "alice", "--from", "::ffff:192.0.2.0/120"),
                   "is IPv4-mapped", "write 192.0.2.0/24")
    one_line_error(spa_server("clients", "set", "alice", "--from"), "--from")


@pytest.mark.parametrize("fmt", ["json", "toml"])
def test_export_and_import_carry_the_networks_and_twice_change_nothing(
        spa_server: Run, tmp_path: Path, fmt: str) -> None:
    assert enroll(spa_server, "alice", "--from", "192.0.2.0/24")[0] == 0
    assert enroll(spa_server, "bob")[0] == 0
    exported = tmp_path / f"clients.{fmt}"
    assert spa_server("clients", "export", str(exported), "--format", fmt)[0] == 0
    text = exported.read_text()
    assert "192.0.2.0/24" in text and text.count("sources") == 1  # none written for bob
    assert spa_server("clients", "set", "alice", "--no-from")[0] == 0
    assert spa_server("clients", "import", str(exported))[1].splitlines() == [
        "added 0: -", "updated 1: alice", "removed 0: -"]
    assert spa_server("clients", "import", str(exported))[1].splitlines() == [
        "added 0: -", "updated 0: -", "removed 0: -"]
    assert admin.load(tmp_path / "server.toml").clients["alice"].sources == ("192.0.2.0/24",)
