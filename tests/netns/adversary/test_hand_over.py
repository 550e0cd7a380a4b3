"""hand_over (spa.server.privsep) gives the service user the root-owned
files in its state directory.  The service user decides what is there: any
root file it can rename in (one in any directory it may write, on the same
filesystem) is handed to it at root's next `run`."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from spa.server.privsep import hand_over

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
NOBODY = 65534

MOVE = """
import os, sys
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
os.rename(sys.argv[1], sys.argv[2])
try:
    open(sys.argv[2]).read()
    print("read")
except PermissionError:
    print("unreadable")
"""


def as_nobody(*argv: str) -> str:
    return subprocess.run([sys.executable, "-c", MOVE, *argv], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_a_root_file_the_service_user_moves_in_is_not_handed_over() -> None:
    root = Path(tempfile.mkdtemp(prefix="spa-hand-"))
    try:
        os.chmod(root, 0o755)
        writable = root / "writable-by-spa"  # e.g. /etc/spa when spa owned it
        state = root / "state"
        for directory in (writable, state):
            directory.mkdir(mode=0o700)
            os.chown(directory, NOBODY, NOBODY)
        secret = writable / "roots-secret"
        secret.write_text("root's\n")
        secret.chmod(0o600)  # root's, unreadable by spa
        assert as_nobody(str(secret), str(state / "moved")) == "unreadable"
        hand_over(state, pwd.getpwuid(NOBODY))
        moved = state / "moved"
        assert moved.stat().st_uid == 0, (
            "root's 0600 file, moved in by the service user, is now the service user's")
    finally:
        shutil.rmtree(root, ignore_errors=True)
