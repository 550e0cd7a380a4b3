"""Run the real command-line programs as processes, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def command(program: str) -> list[str]:
    """The installed console script, or the module run by this interpreter."""
    script = BIN / program
    if script.exists():
        return [str(script)]
    module = "spa.cli" if program == "spa-server" else "spa_client.cli"
    return [sys.executable, "-c", f"from {module} import main; main()"]


def run_cli(program: str, *args: str, timeout: float = 30, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command(program), *args], capture_output=True, text=True, timeout=timeout,
        input=input, check=False, env={**os.environ, **(env or {})},
    )
