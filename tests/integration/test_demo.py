"""`spa-server demo` runs, exits 0, and its output shows the refusals."""

from __future__ import annotations

import pytest

from tests.integration.procs import run_cli

pytestmark = pytest.mark.integration


def test_demo_tells_the_story_and_exits_0() -> None:
    done = run_cli("spa-server", "demo", "--loopback", timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in ("granted", "s left, held by alice", "replayed packet refused: reason=replay",
                     "tampered packet (nonce bit flipped) refused: reason=bad_mac",
                     "the server never saw them",
                     "lease gone", "refused reason=replay client=alice src=127.0.0.1",
                     "demo passed"):
        assert expected in out
    assert "key=<secret>" in out
    assert "FAILED" not in out
    assert "Traceback" not in done.stderr
