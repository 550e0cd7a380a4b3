"""Run fail2ban-regex with our filter over log lines (the real program)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FILTERS = Path(__file__).resolve().parents[2] / "contrib/fail2ban/filter.d"
FILTER = FILTERS / "spa-server.conf"  # the default jail's
SCANS = FILTERS / "spa-server-scans.conf"  # the opt-in scans jail's


def matched_lines(lines: list[str], filter_file: Path = FILTER) -> list[str]:
    """The lines our fail2ban filter matches, as fail2ban-regex reports them."""
    program = shutil.which("fail2ban-regex")
    if program is None:
        pytest.fail("fail2ban-regex is missing: bash scripts/setup.sh --test installs fail2ban")
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        log.write("\n".join(lines) + "\n")
    try:
        done = subprocess.run([program, "--print-all-matched", log.name, str(filter_file)],
                              capture_output=True, text=True, timeout=60, check=True)
    finally:
        Path(log.name).unlink()
    summary = re.search(r"Lines: (\d+) lines, \d+ ignored, (\d+) matched", done.stdout)
    assert summary is not None, done.stdout
    block = done.stdout.split("|- Matched line(s):", 1)
    found = []
    if len(block) == 2:
        for line in block[1].splitlines()[1:]:
            if not line.startswith("|  "):
                break
            found.append(line[3:].strip())
    assert len(found) == int(summary.group(2)), done.stdout
    return found
