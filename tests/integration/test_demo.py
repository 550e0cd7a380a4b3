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
    logged = out.split("each after the packet behind it:")[1].splitlines()
    assert [line.split(":")[0].strip() for line in logged if "accepted action=" in line] == \
        ["alice's knock", "alice's close"]
    assert any(line.strip().startswith("the eavesdropper's copy:") and
               "refused reason=replay" in line for line in logged), out
    assert "FAILED" not in out
    assert "Traceback" not in done.stderr
