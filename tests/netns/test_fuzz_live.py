"""The live fuzz, small (issue 13): benchmarks/fuzz_live.py, as it is, with
20,000 mutated datagrams per mode against the real `spa-server run`
(nftables, capture and udp mode) in namespaces the script makes.

The script keeps a ledger of the knocks that must be accepted (fresh,
unmutated, each sent once from its client's own address) and reads the event
store and the log afterwards; it exits 0 only if nothing outside the ledger
was accepted, the log has no `error` line, the server kept running and
stopped cleanly, every warm-up knock was accepted, and memory stayed flat.
The full run (10^6 per mode) and its figures: docs/benchmarks.md, "Live fuzz".
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_live.py"
COUNT = 20_000


@pytest.mark.parametrize("mode", ["capture", "udp"])
def test_mutated_packets_against_the_live_server_are_never_accepted(
        mode: str, tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc for benchmarks/fuzz_send.c (bash benchmarks/setup.sh)")
    out = tmp_path / "fuzz.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--mode", mode, "--count", str(COUNT),
                           "--rate", "20000", "--seconds", "20", "--seed", "ci",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert out.exists(), done.stdout + done.stderr
    result = json.loads(out.read_text())[mode]
    assert result["wrongly_accepted"] == [], done.stdout
    assert result["wrongly_accepted_in_log"] == [], done.stdout
    assert result["leases_not_in_ledger"] == [], done.stdout
    assert result["errors"] == [], done.stdout
    assert result["sent"] == COUNT
    assert result["warm_up"]["accepted"] == result["warm_up"]["sent"] > 0
    assert result["accepted"] > 0
    # every layer was reached: the deep checks as well as the cheap ones
    for reason in ("bad_version", "rate_limited", "bad_mac", "bad_ciphertext", "malformed",
                   "stale", "future", "step_mismatch", "replay", "revoked",
                   "enrollment_expired", "spoofed_source"):
        assert result["refused"].get(reason, 0) > 0, (reason, result["refused"])
    assert result["flat"], result["memory"]
    assert done.returncode == 0, done.stdout + done.stderr
