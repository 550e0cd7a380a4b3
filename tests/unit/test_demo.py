"""The demo runs, exits 0, and shows the refusals with their reasons."""

from __future__ import annotations

import subprocess
import sys

from spa import demo_core


def test_demo_core_tells_the_story() -> None:
    lines: list[str] = []
    assert demo_core.run(lines.append) == 0
    text = "\n".join(lines)
    for expected in ("refused replay", "refused bad_mac", "refused unknown_tag",
                     "refused service_not_allowed", "bob still holds https: ['bob']",
                     "demo passed"):
        assert expected in text
    assert "key=<secret>" in text


def test_spa_server_demo_command_exits_0() -> None:
    done = subprocess.run([sys.executable, "-c", "from spa.cli import main; main()", "demo"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "refused replay" in done.stdout
    assert "Traceback" not in done.stderr
