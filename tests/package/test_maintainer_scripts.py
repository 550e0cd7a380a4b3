"""debian/spa.prerm and debian/spa.postinst, run as dpkg runs them, with
fake systemctl, deb-systemd-invoke and spa-server on PATH: what they start,
stop and say.  They act on systemd only where /run/systemd/system exists:
each run has a tmpfs /run of its own (a private mount namespace, `unshare
-m`), so this machine's /run is never touched.  Marked `netns` (root, and
namespaces); the real package is tests/package/test_deb.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from spa.netns import can_make_namespaces

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
REASON = can_make_namespaces() or (None if shutil.which("unshare") else "needs unshare")

# What `systemctl list-units --plain --no-legend --state=active` shows on a
# host where these run.
RUNNING = ("spa-gate.service loaded active exited Close the ports\n"
           "spa-server.service loaded active running spa-server\n"
           "spa-server@site1.service loaded active running spa-server site1\n")
FAKES = {
    # list-units: the units of RUNNING that one of the patterns matches
    "systemctl": 'echo "systemctl $*" >> "$CALLS"\n'
                 'printf "%s" "$RUNNING" | while read -r unit rest; do\n'
                 '  for pattern in "$@"; do\n'
                 '    case "$pattern" in -*|list-units) continue;; esac\n'
                 '    case "$unit" in $pattern) echo "$unit $rest"; break;; esac\n'
                 '  done\n'
                 'done\n',
    "deb-systemd-invoke": 'echo "deb-systemd-invoke $*" >> "$CALLS"\n',
    "spa-server": 'echo "spa-server $*" >> "$CALLS"\n'
                  'if [ -n "$FAIL" ]; then echo "spa-server: error: $FAIL" >&2; exit 2; fi\n'
                  'echo "removed table inet spa"\n',
}


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str
    calls: list[str]


def maintainer_script(tmp_path: Path, script: str, *args: str, systemd: bool = True,
                      running: str = RUNNING, fail: str = "") -> Ran:
    if REASON is not None:
        pytest.skip(REASON)
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name, body in FAKES.items():
        (bindir / name).write_text("#!/bin/sh\n" + body)
        (bindir / name).chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    mkdir = "mkdir -p /run/systemd/system && " if systemd else ""
    inner = f'mount -t tmpfs tmpfs /run && {mkdir}exec sh "$0" "$@"'
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "CALLS": str(calls),
           "RUNNING": running, "FAIL": fail}
    done = subprocess.run(["unshare", "-m", "sh", "-c", inner, str(ROOT / "debian" / script),
                           *args], capture_output=True, text=True, env=env, timeout=30,
                          check=False)
    return Ran(done.returncode, done.stdout, done.stderr, calls.read_text().splitlines())


def invoked(ran: Ran) -> list[str]:
    return [call for call in ran.calls if call.startswith("deb-systemd-invoke")]


def test_an_upgrade_restarts_the_daemons_that_run_and_says_so(tmp_path: Path) -> None:
    """From the review: an upgrade restarted nothing and said nothing, so the
    old code kept running.  try-restart only what runs (not the gate)."""
    ran = maintainer_script(tmp_path, "spa.postinst", "configure", "0.0.9")
    assert ran.code == 0, ran.stderr
    assert invoked(ran) == ["deb-systemd-invoke try-restart spa-server.service "
                            "spa-server@site1.service"]
    assert "spa: upgraded from 0.0.9; restarted spa-server.service spa-server@site1.service" \
        in ran.stdout


def test_a_fresh_install_or_an_upgrade_with_nothing_running_starts_nothing(
        tmp_path: Path) -> None:
    ran = maintainer_script(tmp_path, "spa.postinst", "configure", "")
    assert (ran.code, invoked(ran)) == (0, []), ran.stderr
    assert "spa: nothing started" in ran.stdout
    ran = maintainer_script(tmp_path, "spa.postinst", "configure", "0.0.9", running="")
    assert (ran.code, invoked(ran), ran.stdout) == (0, [], ""), ran.stderr
    ran = maintainer_script(tmp_path, "spa.postinst", "configure", "0.0.9", systemd=False)
    assert (ran.code, ran.calls, ran.stdout) == (0, [], ""), ran.stderr


def test_abort_remove_starts_nothing(tmp_path: Path) -> None:
    """dpkg's answer to a failed prerm: the gate stays, nothing is started
    (prerm itself started again what it had stopped)."""
    ran = maintainer_script(tmp_path, "spa.postinst", "abort-remove")
    assert (ran.code, invoked(ran), ran.stdout, ran.stderr) == (0, [], "", "")


def test_a_removal_that_takes_spa_out_of_the_firewall_goes_ahead(tmp_path: Path) -> None:
    ran = maintainer_script(tmp_path, "spa.prerm", "remove")
    assert (ran.code, ran.stderr) == (0, "")
    assert len(invoked(ran)) == 1 and invoked(ran)[0].startswith("deb-systemd-invoke stop ")
    assert "spa-server gate --remove" in ran.calls
    assert ran.calls.index("spa-server gate --remove") > ran.calls.index(invoked(ran)[0])


def test_a_removal_that_cannot_take_spa_out_fails_in_one_line_and_restarts_what_ran(
        tmp_path: Path) -> None:
    """From the review: prerm warned "run spa-server gate --remove" and let
    the removal delete spa-server while spa's tables still closed ports.  Now
    it fails (dpkg keeps spa installed), starts again what it had stopped,
    and says what was left in one line."""
    left = ("could not remove table inet spa is still there after its removal (a "
            "spa-server still runs and put it back: stop it first)")
    ran = maintainer_script(tmp_path, "spa.prerm", "remove", fail=left)
    assert ran.code == 1
    assert ran.stderr == (f"spa: not removed: spa's firewall rules are still there and close "
                          f"ports ({left}); spa stays installed: fix that, then run apt-get "
                          "remove spa again\n")
    assert invoked(ran)[1:] == ["deb-systemd-invoke start spa-gate.service spa-server.service "
                                "spa-server@site1.service"]
    ran = maintainer_script(tmp_path, "spa.prerm", "remove", fail=left, systemd=False)
    assert ran.code == 1 and invoked(ran) == []


def test_an_upgrade_leaves_the_firewall_alone(tmp_path: Path) -> None:
    ran = maintainer_script(tmp_path, "spa.prerm", "upgrade", "0.2.0")
    assert (ran.code, ran.calls) == (0, [])
