"""The shipped fail2ban jail against what the daemon writes under a flood
(docs/threat-model.md, "Fill the disk or the log with a flood")."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.f2b import matched_lines
from tests.unit.test_event_budget import ATTACKER, BUDGET, SLOW_ATTACKER, flood, started

pytestmark = pytest.mark.integration

MAXRETRY = 3  # contrib/fail2ban/jail.d/spa-server.conf


def test_a_spoofed_flood_within_the_budget_still_bans_the_real_sources(tmp_path: Path) -> None:
    """2,500 refusals a second from spoofed sources behind a live tag, over
    6 s of the daemon's housekeeping: the log keeps to the budget, and the
    real fail2ban-regex still finds both real sources often enough to ban
    them; no folded line (a /24 or /64) is ever matched."""
    found = flood(started(tmp_path), 6, drops=False)
    assert max(found.budgeted().values()) <= BUDGET
    lines = [line for second in sorted(found.lines) for line in found.lines[second]]
    matched = matched_lines(lines)
    hosts = Counter(m.group(1) for line in matched
                    if (m := re.search(r" src=(\S+)", line)))
    assert hosts[ATTACKER] >= MAXRETRY and hosts[SLOW_ATTACKER] >= MAXRETRY, hosts
    assert not any("/" in host for host in hosts)
    assert any("/" in line for line in lines), "the flood did fold"
