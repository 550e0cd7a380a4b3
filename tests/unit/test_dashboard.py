"""The dashboard's web application, through Starlette's TestClient (in
process; the browser tests in tests/netns/test_dashboard_browser.py drive the
real server in a real chromium)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import nacl.pwhash
import pytest
from starlette.testclient import TestClient

from spa.server import admin, webauth
from spa.server import config as config_mod
from spa.server.dashboard import Dashboard, allowed_hosts, make_app, render_graph
from spa.server.errors import LocalError
from spa.server.events import Event
from tests.server_world import START, World

PASSWORD = "correct horse battery staple"
A, B = "192.0.2.10", "198.51.100.7"
CHEAP = {"opslimit": nacl.pwhash.argon2id.OPSLIMIT_MIN,
         "memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN}


class Site:
    def __init__(self, root: Path) -> None:
        self.world = World(root)
        self.world.init()
        self.world.enroll("alice")
        self.world.enroll("bob", "https", otp=True)
        self.state = root / "state"
        webauth.save(self.state, webauth.make_credentials(PASSWORD, **CHEAP))
        self.logs: list[str] = []
        self.dash = Dashboard(self.world.config_path, clock=self.world.clock,
                              log=self.logs.append)
        self.http = TestClient(make_app(self.dash), base_url="http://127.0.0.1:9713")

    def csrf(self, path: str = "/login") -> str:
        found = re.search(r'name="csrf" value="([0-9a-f]+)"', self.http.get(path).text)
        assert found is not None
        return found.group(1)

    def login(self, password: str = PASSWORD) -> int:
        answer = self.http.post("/login", data={"csrf": self.csrf(), "password": password},
                                follow_redirects=False)
        return answer.status_code


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    made = Site(tmp_path)
    yield made
    made.http.close()


def test_every_page_but_login_needs_a_session(site: Site) -> None:
    for path in ("/", "/activity", "/graph.svg"):
        answer = site.http.get(path, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"] == "/login"
    assert site.http.get("/api/leases").status_code == 401
    answer = site.http.post("/clients/alice/revoke", data={"csrf": "x"},
                            follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/login"
    assert not admin.load(site.world.config_path).clients["alice"].revoked
    assert site.http.get("/static/app.js").status_code == 200  # assets need no login


def test_login_with_the_password_then_the_overview(site: Site) -> None:
    assert site.login("wrong password here") == 401
    assert site.logs == ["dashboard login failed src=testclient"]
    assert site.login() == 303
    page = site.http.get("/")
    assert page.status_code == 200
    assert "Open leases" in page.text and 'id="client-alice"' in page.text
    assert 'id="client-bob"' in page.text and "code</span>" in page.text  # bob needs a code
    assert site.logs[-1] == "dashboard login src=testclient"


def test_a_form_without_its_csrf_token_is_refused(site: Site) -> None:
    answer = site.http.post("/login", data={"password": PASSWORD}, follow_redirects=False)
    assert answer.status_code == 403
    assert site.http.get("/", follow_redirects=False).status_code == 303  # not signed in
    assert site.login() == 303
    token = site.csrf("/")
    wrong = token[:-1] + ("1" if token.endswith("0") else "0")  # always another token
    for data in ({}, {"csrf": ""}, {"csrf": wrong}):
        answer = site.http.post("/clients/alice/revoke", data=data, follow_redirects=False)
        assert answer.status_code == 403
    assert not admin.load(site.world.config_path).clients["alice"].revoked


def test_login_gives_a_new_session_and_csrf_token(site: Site) -> None:
    before = site.csrf()
    assert site.login() == 303
    assert site.csrf("/") != before  # a token an attacker planted before login is dead


def test_lock_out_after_repeated_failures_even_for_the_right_password(site: Site) -> None:
    for _ in range(webauth.MAX_FAILURES):
        assert site.login("wrong password here") == 401
    assert site.login() == 429  # locked: the right password is not even checked
    page = site.http.get("/login")
    assert "Too many failed logins" not in page.text  # the message comes with an attempt
    site.world.clock.advance(webauth.LOCK_SECONDS + 1)
    assert site.login("wrong password again") == 401  # one more failure: a longer lock
    site.world.clock.advance(webauth.LOCK_SECONDS + 1)
    assert site.login() == 429
    site.world.clock.advance(webauth.LOCK_SECONDS + 1)
    assert site.login() == 303
    assert site.dash.limiter.failures == 0


def test_the_limiter_doubles_up_to_its_cap() -> None:
    limiter = webauth.LoginLimiter()
    waits = []
    for _ in range(webauth.MAX_FAILURES + 8):
        limiter.failed(0.0)
        waits.append(limiter.wait(0.0))
    assert waits[:webauth.MAX_FAILURES - 1] == [0.0] * (webauth.MAX_FAILURES - 1)
    assert waits[webauth.MAX_FAILURES - 1:webauth.MAX_FAILURES + 2] == [30.0, 60.0, 120.0]
    assert waits[-1] == webauth.LOCK_MAX
    limiter.succeeded()
    assert limiter.wait(0.0) == 0.0


def test_a_forged_or_foreign_cookie_is_no_session(site: Site, tmp_path: Path) -> None:
    assert site.login() == 303
    cookie = site.http.cookies["spa_dashboard"]
    payload, _, signature = cookie.rpartition(".")
    site.http.cookies.clear()
    site.http.cookies.set("spa_dashboard", payload + "." + signature[::-1])
    assert site.http.get("/", follow_redirects=False).status_code == 303
    other = Site(tmp_path / "other")  # same password, another key
    assert other.login() == 303
    site.http.cookies.clear()
    site.http.cookies.set("spa_dashboard", other.http.cookies["spa_dashboard"])
    assert site.http.get("/", follow_redirects=False).status_code == 303


def test_a_new_password_signs_every_session_out(site: Site) -> None:
    assert site.login() == 303
    assert site.http.get("/", follow_redirects=False).status_code == 200
    webauth.save(site.state, webauth.make_credentials("another long passphrase", **CHEAP))
    assert site.http.get("/", follow_redirects=False).status_code == 303


def test_the_host_header_must_name_this_dashboard(site: Site) -> None:
    """A DNS-rebinding page (evil.example resolving to 127.0.0.1) gets nothing."""
    answer = site.http.get("/login", headers={"host": "evil.example:9713"})
    assert answer.status_code == 400
    assert allowed_hosts("0.0.0.0:9713") == ["127.0.0.1", "::1", "[::1]", "localhost"]
    assert "192.0.2.1" in allowed_hosts("192.0.2.1:9713")
    assert "[2001:db8::1]" in allowed_hosts("[2001:db8::1]:9713")


def test_security_headers_on_every_response(site: Site) -> None:
    for answer in (site.http.get("/login"), site.http.get("/static/style.css"),
                   site.http.get("/", follow_redirects=False)):
        assert "script-src 'self'" in answer.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["cache-control"] == "no-store"
    assert site.login() == 303
    page = site.http.get("/")
    assert "<script>" not in page.text and "https://" not in page.text  # no inline, no CDN


def test_the_session_cookie_is_httponly_and_strict(site: Site) -> None:
    answer = site.http.post("/login", data={"csrf": site.csrf(), "password": PASSWORD},
                            follow_redirects=False)
    header = answer.headers["set-cookie"].lower()
    assert header.startswith("spa_dashboard=")
    assert "httponly" in header and "samesite=strict" in header and "max-age=28800" in header


def test_revoke_buttons_revoke_and_close(site: Site) -> None:
    assert site.login() == 303
    answer = site.http.post("/clients/alice/revoke", data={"csrf": site.csrf("/"),
                                                           "close": "0"})
    assert answer.status_code == 200 and "alice is revoked" in answer.text
    entry = admin.load(site.world.config_path).clients["alice"]
    assert entry.revoked and not entry.close_leases
    assert site.logs[-1] == "dashboard revoke client=alice close=0"
    answer = site.http.post("/clients/bob/revoke", data={"csrf": site.csrf("/"), "close": "1"})
    assert admin.load(site.world.config_path).clients["bob"].close_leases
    answer = site.http.post("/clients/nobody/revoke", data={"csrf": site.csrf("/")})
    assert answer.status_code == 200 and "nobody" in answer.text  # a one-line error, shown
    assert answer.text.count('<td class="state">revoked</td>') == 2
    assert "Revoke</button>" not in answer.text  # no button for a revoked client


def test_a_lease_from_a_real_knock_shows_with_its_expiry(site: Site) -> None:
    server = site.world.start()
    server.handle(site.world.packet("alice", duration=60), A)
    server.housekeeping()
    assert site.login() == 303
    data = site.http.get("/api/leases").json()
    assert data["now"] == site.world.clock.now
    assert data["leases"] == [{"address": A, "service": "ssh", "clients": ["alice"],
                               "expires": pytest.approx(site.world.clock.now + 60)}]
    page = site.http.get("/").text
    assert f"<td>{A}</td><td>ssh</td><td>alice</td>" in page
    assert re.search(r'<td id="client-alice">|id="client-alice"><td>alice', page)
    assert "0s ago from 192.0.2.10" in page  # last seen
    server.shutdown()


def test_activity_filters_and_what_never_reaches_a_page(site: Site) -> None:
    server = site.world.start()
    server.handle(site.world.packet("alice", duration=60), A)
    replayed = site.world.packet("alice", "https", duration=60)
    server.handle(replayed, A)
    server.handle(replayed, B)
    server.handle(b"\x01" + os.urandom(160), B)
    server.events.record(Event(site.world.clock.now, "scan", source=B, service="ssh,https",
                               count=25))
    server.events.flush()
    assert site.login() == 303
    everything = site.http.get("/activity").text
    # 2 accepted, 2 lease starts, the replay, the junk (unknown_tag), the scan
    assert everything.count("<tr class=") == 7
    replays = site.http.get("/activity", params={"reason": "replay"}).text
    assert replays.count("<tr class=") == 1 and f"<td>{B}</td>" in replays
    alice = site.http.get("/activity", params={"client": "alice", "outcome": "accepted"}).text
    assert alice.count("<tr class=") == 2
    injected = site.http.get("/activity", params={"source": "x' OR '1'='1"})
    assert injected.status_code == 200 and injected.text.count("<tr class=") == 0
    later = site.http.get("/activity", params={"since": "soon"})
    assert "duration &#39;soon&#39;" in later.text  # one clear line, escaped, 24h shown
    config = admin.load(site.world.config_path)
    pages = [everything, site.http.get("/").text, site.http.get("/graph.svg").text,
             site.http.get("/api/leases").text]
    secrets = [config_mod.b64encode(c.secret) for c in config.clients.values()]
    secrets += [c.otp_secret for c in config.clients.values() if c.otp_secret]
    secrets += [webauth.load(site.state).hash.decode(), webauth.load(site.state).key.hex(),
                PASSWORD]
    for text in pages:
        for secret in secrets:
            assert secret not in text
    server.shutdown()


def test_names_from_events_are_escaped(site: Site) -> None:
    server = site.world.start()
    server.events.record(Event(site.world.clock.now, "refused", reason="<b>x</b>",
                               source="<script>alert(1)</script>"))
    server.events.flush()
    assert site.login() == 303
    page = site.http.get("/activity").text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    server.shutdown()


def test_the_graph_draws_each_outcome_in_its_bucket() -> None:
    svg = render_graph({"accepted": {0: 4, 23: 2}, "refused": {5: 8}, "dropped": {},
                        "scan": {23: 1}}, start=0.0, width=3600, slots=24)
    bars = re.findall(r'<rect class="bar (\w+)" x="([\d.]+)" y="([\d.]+)" width="[\d.]+" '
                      r'height="([\d.]+)"', svg)
    assert [b[0] for b in bars] == ["accepted", "accepted", "refused", "scan"]
    assert [float(b[3]) for b in bars] == pytest.approx([94.0, 47.0, 188.0, 23.5])
    xs = [float(b[1]) for b in bars]
    assert xs[0] < xs[2] < xs[1] < xs[3]  # slot 0, slot 5, slot 23 (accepted, then scan)
    assert "<title>8</title>" in svg and ">00:00<" in svg


def test_the_graph_endpoint_counts_from_the_store(site: Site) -> None:
    server = site.world.start()
    for _ in range(3):
        server.handle(b"\x01" + os.urandom(160), B)
    server.events.record(Event(site.world.clock.now, "scan", source=B, count=40))
    server.events.flush()
    assert site.login() == 303
    svg = site.http.get("/graph.svg", params={"range": "7d"})
    assert svg.headers["content-type"] == "image/svg+xml"
    titles = re.findall(r'class="bar (\w+)".*?<title>(\d+)</title>', svg.text)
    assert titles == [("refused", "3"), ("scan", "1")]
    server.shutdown()


def test_no_password_set_is_one_clear_error(tmp_path: Path) -> None:
    from spa.server.errors import LocalError

    world = World(tmp_path)
    world.init()
    with pytest.raises(LocalError, match="set one with: spa-server dashboard-password"):
        make_app(Dashboard(world.config_path))
    (tmp_path / "state").mkdir(exist_ok=True)
    bad = tmp_path / "state" / webauth.PASSWORD_FILE
    bad.write_bytes(b"plain\n")
    bad.chmod(0o600)
    with pytest.raises(LocalError, match="is damaged; set the password again"):
        webauth.load(tmp_path / "state")
    bad.chmod(0o644)
    with pytest.raises(LocalError, match="chmod 600"):
        webauth.load(tmp_path / "state")


def test_the_password_is_set_by_the_state_directorys_owner_never_by_root_there(
        tmp_path: Path) -> None:
    """The dashboard runs as the daemon's user, who owns the state directory.
    Root does not write in another user's directory (issue 13, finding 4): it
    is refused in one line naming the user to run it as; run as that user,
    the file is theirs, 0600."""
    state = tmp_path / "state"
    state.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to hand a directory to another user")
    os.chown(state, 65534, 65534)
    credentials = webauth.make_credentials(PASSWORD, **CHEAP)
    with pytest.raises(LocalError, match=r"is owned by nobody \(uid 65534\); root will not "
                       r"write .*sudo -u nobody spa-server"):
        webauth.save(state, credentials)
    assert os.listdir(state) == []
    pid = os.fork()
    if pid == 0:  # the child becomes nobody, in the directory (its parents are root's 0700)
        status = 1
        try:
            os.chdir(state)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            webauth.save(Path("."), credentials)
            status = 0
        finally:
            os._exit(status)
    assert os.waitpid(pid, 0)[1] == 0
    path = state / webauth.PASSWORD_FILE
    assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534)
    assert path.stat().st_mode & 0o777 == 0o600


def test_concurrent_guesses_cannot_slip_past_the_lock_out(site: Site) -> None:
    """Twenty guesses sent at once: only MAX_FAILURES passwords are checked;
    the rest are refused as locked, even though they all arrived before the
    first failure was recorded."""
    from concurrent.futures import ThreadPoolExecutor

    checked = []
    real_check = webauth.Credentials.check

    def counting(self: webauth.Credentials, password: str) -> bool:
        checked.append(password)
        return real_check(self, password)

    token = site.csrf()
    cookies = dict(site.http.cookies)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(webauth.Credentials, "check", counting)

        def guess(n: int) -> int:
            with TestClient(site.http.app, base_url="http://127.0.0.1:9713",
                            cookies=cookies) as client:
                return client.post("/login", data={"csrf": token, "password": f"guess {n:04d}"},
                                   follow_redirects=False).status_code

        with ThreadPoolExecutor(20) as pool:
            codes = list(pool.map(guess, range(20)))
    assert len(checked) == webauth.MAX_FAILURES
    assert sorted(codes) == [401] * webauth.MAX_FAILURES + [429] * (20 - webauth.MAX_FAILURES)


def test_concurrent_revokes_are_all_kept(site: Site) -> None:
    """Eight revokes at once (the dashboard's thread pool, or the dashboard and
    the command line): each read-modify-write of the config holds a lock, so
    none undoes another."""
    from concurrent.futures import ThreadPoolExecutor

    from spa.server import admin

    names = [f"user{i}" for i in range(8)]
    for name in names:
        site.world.enroll(name, "ssh")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: admin.revoke(site.world.config_path, name,
                                                now=site.world.clock.now), names))
    clients = admin.load(site.world.config_path).clients
    assert [name for name in names if not clients[name].revoked] == []
    assert site.login() == 303
    token = site.csrf("/")
    site.world.enroll("late", "ssh")
    site.world.enroll("later", "ssh")

    def revoke(name: str) -> int:
        return site.http.post(f"/clients/{name}/revoke", data={"csrf": token},
                              follow_redirects=False).status_code

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(revoke, ["late", "later"])) == [303, 303]
    clients = admin.load(site.world.config_path).clients
    assert clients["late"].revoked and clients["later"].revoked


def test_a_large_body_is_refused_before_it_is_parsed(site: Site) -> None:
    big = {"csrf": site.csrf(), "password": "x" * 100_000}
    assert site.http.post("/login", data=big).status_code == 413

    def stream() -> Iterator[bytes]:  # no Content-Length: chunked, counted as it comes
        for _ in range(64):
            yield b"a=" + b"x" * 1024 + b"&"

    answer = site.http.post("/login", content=stream(),
                            headers={"content-type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 413
    many = {f"f{i}": "1" for i in range(50)} | {"csrf": site.csrf(), "password": PASSWORD}
    assert site.http.post("/login", data=many).status_code == 400  # too many fields
    assert site.login() == 303  # an ordinary form still works


def test_signing_out_ends_every_copy_of_the_cookie(site: Site) -> None:
    assert site.login() == 303
    copy = site.http.cookies["spa_dashboard"]
    answer = site.http.post("/logout", data={"csrf": site.csrf("/")}, follow_redirects=False)
    assert answer.status_code == 303
    site.http.cookies.clear()
    site.http.cookies.set("spa_dashboard", copy)
    assert site.http.get("/", follow_redirects=False).status_code == 303


def test_a_session_ends_eight_hours_after_login_however_often_it_is_renewed(
        site: Site) -> None:
    """The cookie is re-signed whenever the session changes (a flash message,
    say); the login time inside it still bounds the session."""
    assert site.login() == 303
    for _ in range(3):
        site.world.clock.advance(3 * 3600 - 60)
        page = site.http.post("/clients/nobody/revoke", data={"csrf": site.csrf("/")},
                              follow_redirects=False)
        assert page.status_code in (303, 200), page.status_code
        if site.world.clock.now - START < 8 * 3600:
            assert site.http.get("/", follow_redirects=False).status_code == 200
    assert site.http.get("/", follow_redirects=False).status_code == 303


def test_a_symlink_at_the_password_files_place_is_replaced_not_followed(
        tmp_path: Path) -> None:
    """A link at the password file's name is replaced (a new file renamed
    over it), never written through; in a state directory the service user
    owns, root does not write at all (so it cannot be raced there)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to hand a directory to another user")
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("root's")
    (state / webauth.PASSWORD_FILE).symlink_to(victim)
    path = webauth.save(state, webauth.make_credentials(PASSWORD, **CHEAP))
    assert not path.is_symlink() and path.stat().st_uid == 0
    assert victim.read_text() == "root's"
    path.unlink()
    (state / webauth.PASSWORD_FILE).symlink_to(victim)
    os.chown(state, 65534, 65534)
    with pytest.raises(LocalError, match="root will not write in a directory another user"):
        webauth.save(state, webauth.make_credentials(PASSWORD, **CHEAP))
    assert victim.read_text() == "root's" and victim.stat().st_uid == 0


def test_events_open_read_only_whatever_the_state_directory_is_called(
        tmp_path: Path) -> None:
    from spa.server.events import EVENTS_DB, EventSink, read_events

    odd = tmp_path / "a?mode=rwc#x"
    odd.mkdir()
    sink = EventSink(odd / EVENTS_DB, lambda line: None, retention_days=1)
    sink.record(Event(1.0, "scan", source=A))
    sink.close()
    assert [e.source for e in read_events(odd / EVENTS_DB)] == [A]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a?mode=rwc#x"]  # nothing else made
