"""The daemon's log lines carry their time outside journald, and not under it
(spa/server/logline.py): the real `spa-server run`, stderr a pipe."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from spa.server.logline import event_of, stamped, stderr_is_journal
from tests.integration.harness import free_port
from tests.integration.procs import command, run_cli

pytestmark = pytest.mark.integration

STAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z ")


def config_file(tmp_path: Path) -> Path:
    config = tmp_path / "server.toml"
    assert run_cli("spa-server", "--config", str(config), "init", "--listen-port",
                   str(free_port()), "--backend", "memory", "--state-dir",
                   str(tmp_path / "state")).returncode == 0
    text = config.read_text().replace('listen_address = "::"', 'listen_address = "127.0.0.1"')
    config.write_text(text.replace('mode = "capture"', 'mode = "udp"'))
    return config


def log_of_a_run(config: Path, *, journal: bool) -> list[str]:
    """The lines `spa-server run` writes to stderr (a pipe) until it has
    started, then stopped; `journal`: JOURNAL_STREAM names that pipe, as
    systemd names the journal's stream."""
    read, write = os.pipe()
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    if journal:
        found = os.fstat(write)
        env["JOURNAL_STREAM"] = f"{found.st_dev}:{found.st_ino}"
    proc = subprocess.Popen([*command("spa-server"), "--config", str(config), "run"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=write,
                            env=env)
    os.close(write)
    text = ""
    with os.fdopen(read) as stream:
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                line = stream.readline()
                text += line
                if not line or "started " in line:
                    break
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        text += stream.read()
    return text.splitlines()


def test_outside_journald_each_log_line_starts_with_its_time(tmp_path: Path) -> None:
    lines = log_of_a_run(config_file(tmp_path), journal=False)
    assert any(event_of(line).startswith("started port=") for line in lines), lines
    assert lines and all(STAMP.match(line) for line in lines), lines


def test_under_journald_the_lines_are_the_events_alone(tmp_path: Path) -> None:
    lines = log_of_a_run(config_file(tmp_path), journal=True)
    assert any(line.startswith("started port=") for line in lines), lines
    assert not any(STAMP.match(line) for line in lines), lines


def test_journal_stream_counts_only_when_it_names_stderr(tmp_path: Path) -> None:
    """systemd.exec(5): a process whose stderr was redirected inherits the
    variable; only the device and inode of fd 2 itself prove the journal."""
    with open(tmp_path / "log", "w") as log:
        found = os.fstat(log.fileno())
        named = {"JOURNAL_STREAM": f"{found.st_dev}:{found.st_ino}"}
        assert stderr_is_journal(named, log.fileno())
        assert not stderr_is_journal({}, log.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{found.st_dev}:{found.st_ino + 1}"},
                                     log.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": "junk"}, log.fileno())
    assert stamped("accepted client=alice", journal=False, now=1_796_515_258) == \
        "2026-12-06T00:00:58Z accepted client=alice"
    assert stamped("accepted client=alice", journal=True, now=1_796_515_258) == \
        "accepted client=alice"
    assert event_of("2026-12-06T00:00:58Z accepted x=1") == "accepted x=1"
    assert event_of("accepted x=1") == "accepted x=1"
