"""contrib/fail2ban against real log lines the running server writes."""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spa.core.uri import parse
from spa.core.wire import NONCE_SIZE, Action
from spa.server.logline import stamped
from spa_client import knock
from tests.integration.f2b import SCANS, matched_lines
from tests.integration.harness import wait_until
from tests.integration.test_loopback import Site, make_site

pytestmark = pytest.mark.integration


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from make_site(tmp_path, "127.0.0.1")


def test_the_filter_bans_forgers_not_replays_junk_or_users(site: Site) -> None:
    enrollment = parse(site.uris["alice"])
    valid = knock.make_packet(enrollment, Action.OPEN, "ssh", duration=60, address=None,
                              now=time.time(), nonce=os.urandom(NONCE_SIZE))
    target = (site.host, enrollment.port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(valid, target)  # accepted
        sock.sendto(valid, target)  # a replay
        for _ in range(80):  # forged behind alice's live tag: bad_mac, then rate_limited
            sock.sendto(valid[:9] + os.urandom(152), target)
    # 127.0.0.1 authenticated for alice just before, so the forgeries from it
    # are never rate-limited (a known client's address stays open): all bad_mac
    assert wait_until(lambda: any(line.startswith("refused reason=bad_mac")
                                  for line in site.server.lines), timeout=5)
    lines = list(site.server.lines)
    assert any(line.startswith("accepted ") for line in lines)
    assert any(line.startswith("refused reason=replay") for line in lines)
    matched = matched_lines(lines)
    assert matched, lines
    assert all(re.match(r"refused reason=(bad_mac|rate_limited) client=alice "
                        r"src=127\.0\.0\.1", line) for line in matched), matched
    assert {line.split()[1] for line in matched} == {"reason=bad_mac"}


def test_the_filter_matches_the_lines_we_document() -> None:
    lines = ["refused reason=bad_mac client=alice src=198.51.100.7 count=12",
             "refused reason=malformed client=bob src=2001:db8::7",
             "scan src=198.51.100.8 service=ssh,https count=40",
             "accepted action=open client=alice src=192.0.2.1 service=ssh duration=30",
             "refused reason=replay client=alice src=203.0.113.9 count=2",
             "refused reason=unknown_tag src=198.51.100.7 count=300",
             "dropped src=198.51.100.8 service=ssh count=3",
             # a forged source (issue 13): banning it would ban the innocent
             "refused reason=spoofed_source client=alice src=198.51.100.9"]
    assert matched_lines(lines) == lines[:2], "the default jail never bans on a scan"
    assert matched_lines(lines, SCANS) == [lines[2]], "the opt-in scans jail"


def test_the_filter_matches_the_lines_written_outside_journald() -> None:
    """Outside journald each line starts with its time (spa/server/logline.py)."""
    lines = [stamped(line, journal=False, now=1_796_515_258) for line in (
        "refused reason=bad_mac client=alice src=198.51.100.7 count=12",
        "scan src=198.51.100.8 service=ssh,https count=40",
        "refused reason=replay client=alice src=203.0.113.9 count=2")]
    assert matched_lines(lines) == lines[:1]
    assert matched_lines(lines, SCANS) == [lines[1]]


def test_the_filters_read_every_server_unit_and_not_the_dashboard() -> None:
    """The filters match the journal's SYSLOG_IDENTIFIER the server units set,
    spa-server.service and every spa-server@NAME.service alike (matching
    _SYSTEMD_UNIT=spa-server.service left every instance unwatched)."""
    root = Path(__file__).resolve().parents[2]
    units = root / "contrib/systemd"
    for name in ("spa-server.conf", "spa-server-scans.conf"):
        text = (root / "contrib/fail2ban/filter.d" / name).read_text()
        matches = re.findall(r"^journalmatch = (.*)$", text, re.M)
        assert matches == ["SYSLOG_IDENTIFIER=spa-server"], (name, matches)
    for unit in ("spa-server.service", "spa-server@.service"):
        assert re.search(r"^SyslogIdentifier=spa-server$", (units / unit).read_text(), re.M), unit
    dashboard = (units / "spa-dashboard.service").read_text()
    assert re.search(r"^SyslogIdentifier=spa-dashboard$", dashboard, re.M)
