"""The dashboard's client views at 5,000 clients (spa/server/dashboard_clients.py):
each view reads at most its page of client rows (plus one), counts in SQL,
pages and filters in SQL; a client's page and its revoke read that client."""

from __future__ import annotations

import base64
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from spa.server import admin
from spa.server import config as config_mod
from spa.server.config import ClientEntry
from spa.server.dashboard_clients import MENU_MAX, OVERVIEW_ROWS, PAGE_ROWS, back_to
from spa.server.state import StateDir
from spa.store.clients import ClientStore
from tests.unit.test_dashboard import Site

CLIENTS = 5_000
ROW = re.compile(r'<tr id="client-([^"]+)">')


def _entry(i: int) -> ClientEntry:
    """One in ten revoked, one in ten pending (enroll_by after the world's
    clock), one in twenty expired; every client has an OTP secret."""
    enroll_by = ("2099-01-01T00:00:00Z" if i % 10 == 1 else
                 "2000-01-01T00:00:00Z" if i % 20 == 2 else "")
    otp = base64.b32encode(i.to_bytes(4, "big") * 4).decode()
    return ClientEntry(f"user{i:05d}", i.to_bytes(4, "big") * 8, ("ssh",), revoked=i % 10 == 0,
                       enrolled="2026-01-01T00:00:00Z", enroll_by=enroll_by, otp_secret=otp)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    made = Site(tmp_path)  # alice and bob, enrolled by admin.enroll
    with ClientStore.open(made.state, create=False) as store:
        store.add_many((_entry(i) for i in range(CLIENTS)), at=1.0)
    StateDir(made.state).save_activated({"user00011": "2099-01-01T00:00:00Z"})  # knocked in time
    assert made.login() == 303
    yield made
    made.http.close()


def read(site: Site, path: str) -> tuple[str, int]:
    """A page's HTML and the client rows the dashboard read for it."""
    before = site.dash.rows_read
    answer = site.http.get(path)
    assert answer.status_code == 200, answer.text
    return answer.text, site.dash.rows_read - before


def expected_states(site: Site) -> Counter[str]:
    """Every client's state the slow way (reads them all: the test's own check)."""
    states = admin.client_states(site.world.config_path, now=site.world.clock.now)
    return Counter(state.split()[0] for state in states.values())


def test_the_overview_counts_by_state_and_reads_one_short_page(site: Site) -> None:
    page, rows = read(site, "/")
    assert rows <= OVERVIEW_ROWS + 1
    assert len(ROW.findall(page)) == OVERVIEW_ROWS
    counts = {state: int(n) for state, n in re.findall(r'id="clients-(\w+)">(\d+)<', page)}
    assert counts.pop("all") == CLIENTS + 2
    assert counts == dict(expected_states(site)) == {
        "active": 3753, "revoked": 500, "pending": 499, "expired": 250}  # user00011: active
    assert 'id="next-page"' in page and f"All {CLIENTS + 2} clients" in page


def test_the_clients_page_reads_its_page_and_pages_on_to_the_last(site: Site) -> None:
    page, rows = read(site, "/clients")
    assert rows <= PAGE_ROWS + 1 and len(ROW.findall(page)) == PAGE_ROWS
    assert f"{CLIENTS + 2} clients" in page
    seen: list[str] = []
    link, pages = "/clients?limit=700", 0
    while link:
        page, rows = read(site, link.replace("&amp;", "&"))
        names = ROW.findall(page)
        assert rows <= 701 and 0 < len(names) <= 700
        seen, pages = seen + names, pages + 1
        found = re.search(r'href="([^"]+)" id="next-page"', page)
        link = found.group(1) if found else ""
    assert seen == sorted(seen) and len(seen) == len(set(seen)) == CLIENTS + 2
    assert pages == 8 and 'id="first-page"' in page


def test_filters_by_name_and_state_are_sql_and_keep_to_the_page(site: Site) -> None:
    page, rows = read(site, "/clients?match=0001&state=pending")
    assert ROW.findall(page) == ["user00001"]  # user00011 knocked in time: active
    assert rows <= 2 and "1 client match" in page
    page, rows = read(site, "/clients?match=001&state=active&limit=1000")
    states = admin.client_states(site.world.config_path, now=site.world.clock.now)
    active = [name for name, state in sorted(states.items()) if "001" in name
              and state == "active"]
    assert ROW.findall(page) == active and len(active) == 84 and rows == len(active)
    page, rows = read(site, "/clients?state=revoked&limit=10&after=user02000")
    assert ROW.findall(page) == [f"user02{i:02d}0" for i in range(1, 11)]
    assert rows == 11 and "500 clients match" in page
    found = re.search(r'href="([^"]+)" id="next-page"', page)
    assert found is not None
    query = parse_qs(urlsplit(found.group(1).replace("&amp;", "&")).query)
    assert query == {"state": ["revoked"], "after": ["user02100"], "limit": ["10"]}
    page, rows = read(site, "/clients?match=%25&state=gone&limit=lots")  # LIKE's %: literal
    assert ROW.findall(page) == [] and rows == 0
    assert "state &#39;gone&#39;: choose one of" in page and "limit &#39;lots&#39;" in page


def test_a_clients_page_and_its_revoke_read_that_client_alone(site: Site) -> None:
    page, rows = read(site, "/clients/user00043")
    assert rows == 1 and 'class="state">active<' in page and "Revoke</button>" in page
    assert site.http.get("/clients/nobody").status_code == 404
    token = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert token is not None
    before = site.dash.rows_read
    answer = site.http.post("/clients/user00043/revoke", follow_redirects=False,
                            data={"csrf": token.group(1), "next": "/clients/user00043"})
    assert answer.status_code == 303 and answer.headers["location"] == "/clients/user00043"
    assert site.dash.rows_read == before  # admin.revoke: one UPDATE on the primary key
    page, rows = read(site, "/clients/user00043")
    assert rows == 1 and 'class="state">revoked<' in page and "Revoke</button>" not in page
    assert "user00043 is revoked" in page


def test_a_clients_page_shows_where_it_may_knock_from(site: Site) -> None:
    page, rows = read(site, "/clients/user00042")
    assert rows == 1 and '<td class="sources">anywhere</td>' in page
    admin.set_sources(site.world.config_path, "user00042", ["192.0.2.0/24", "2001:db8::/48"],
                      now=site.world.clock.now)
    page, rows = read(site, "/clients/user00042")
    assert rows == 1 and '<td class="sources">192.0.2.0/24, 2001:db8::/48</td>' in page
    assert "spa-server clients set user00042 --from NET" in page


def test_a_revoke_comes_back_only_to_this_sites_client_views() -> None:
    for ours in ("/", "/clients", "/clients?state=revoked&after=user02000",
                 "/clients/user00043"):
        assert back_to(ours) == ours
    for other in ("", "https://evil.example/", "//evil.example/clients", "/\\evil.example",
                  "/login", "javascript:alert(1)", "/activity"):
        assert back_to(other) == "/#clients"


def test_the_activity_filter_offers_a_text_field_past_the_menus_size(site: Site) -> None:
    page, rows = read(site, "/activity?client=user00043")
    assert rows == MENU_MAX + 1
    assert '<input name="client" id="filter-client" value="user00043"' in page
    assert "<option>user00000</option>" not in page


def test_no_secret_reaches_the_client_views(site: Site) -> None:
    pages = [read(site, path)[0] for path in ("/", "/clients", "/clients?limit=1000",
                                              "/clients/user00007", "/clients/bob")]
    with ClientStore.open(site.state, create=False) as store:
        shown = [store.get(name) for name in ("user00007", "bob", "user00000", "user00500")]
    for entry in shown:
        assert entry is not None
        for secret in (config_mod.b64encode(entry.secret), entry.secret.hex(),
                       entry.otp_secret):
            assert all(secret not in page for page in pages), entry.name
