"""The real programs, end to end, on loopback: `spa-server run --mode udp
--backend memory` and `spa-client` as separate processes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spa.core.knock import STEP_SECONDS, step_of, step_start
from spa.core.uri import parse
from spa.core.wire import NONCE_OFFSET, NONCE_SIZE, Action
from spa_client import knock
from tests.integration.harness import (
    PortGate,
    ServerProcess,
    events_json,
    free_port,
    status_json,
    wait_until,
)
from tests.integration.procs import run_cli

pytestmark = pytest.mark.integration


@dataclass
class Site:
    root: Path
    config: Path
    server: ServerProcess
    host: str
    uris: dict[str, str]
    ssh: PortGate
    https: PortGate

    def client(self, who: str, *args: str, timeout: float = 30
               ) -> subprocess.CompletedProcess[str]:
        return run_cli("spa-client", "--config-dir", str(self.root / f"client-{who}"), *args,
                       timeout=timeout)

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("spa-server", "--config", str(self.config), *args)

    def leases(self) -> list[dict[str, object]]:
        return status_json(self.config)

    def events(self, *args: str) -> list[dict[str, object]]:
        return events_json(self.config, *args)


def make_site(root: Path, host: str, *, extra_config: str = "") -> Generator[Site, None, None]:
    config = root / "server.toml"
    state = root / "state"
    port = free_port(socket.SOCK_DGRAM, host)
    done = run_cli("spa-server", "--config", str(config), "init", "--listen-port", str(port),
                   "--state-dir", str(state), "--backend", "memory", "--service", "ssh",
                   "--service", "https")
    assert done.returncode == 0, done.stderr
    with PortGate(state, "ssh", host) as ssh, PortGate(state, "https", host) as https:
        text = config.read_text()
        text = text.replace('listen_address = "::"', f'listen_address = "{host}"')
        text = text.replace('mode = "capture"', 'mode = "udp"')
        text = text.replace("port = 22\n", f"port = {ssh.port}\n")
        text = text.replace("port = 443\n", f"port = {https.port}\n")
        config.write_text(text + extra_config)
        endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        uris = {}
        for who, services in (("alice", ["ssh", "https"]), ("bob", ["https"])):
            args = [a for s in services for a in ("--service", s)]
            done = run_cli("spa-server", "--config", str(config), "enroll", who, *args,
                           "--endpoint", endpoint, "--uri-only")
            assert done.returncode == 0, done.stderr
            uris[who] = done.stdout.strip()
        with ServerProcess(config) as server:
            site = Site(root, config, server, host, uris, ssh, https)
            for who in uris:
                done = site.client(who, "enroll", uris[who], "--name", "srv")
                assert done.returncode == 0, done.stderr
            yield site


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from make_site(tmp_path, "127.0.0.1")


def test_open_status_close(site: Site) -> None:
    done = site.client("alice", "open", "ssh", "srv", "--duration", "60")
    assert done.returncode == 0, done.stderr
    assert "ssh is open" in done.stdout
    rows = site.leases()
    assert len(rows) == 1
    row = rows[0]
    assert row["address"] == "127.0.0.1"
    assert row["service"] == "ssh"
    assert row["clients"] == ["alice"]
    assert 50 < float(row["seconds_left"]) <= 60  # type: ignore[arg-type]
    human = site.admin("status")
    assert re.search(r"127\.0\.0\.1\s+ssh\s+\d+m\d\ds\s+alice", human.stdout), human.stdout
    done = site.client("alice", "close", "ssh", "srv")
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: site.leases() == [])


def test_port_closed_before_knock_and_open_fails_with_status_1(site: Site) -> None:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        assert probe.connect_ex((site.host, site.ssh.port)) != 0, "closed before a knock"
    site.admin("revoke", "alice")
    time.sleep(1.0)
    done = site.client("alice", "open", "ssh", "srv", "--timeout", "2")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "did not open within 2 s" in done.stderr


def test_lease_expires_after_its_duration(site: Site) -> None:
    assert site.client("alice", "open", "ssh", "srv", "--duration", "1").returncode == 0
    assert site.leases() != []
    assert wait_until(lambda: site.leases() == [], timeout=4)
    assert wait_until(lambda: any(e["outcome"] == "lease_end" for e in site.events()))


def test_no_wait_sends_and_returns(site: Site) -> None:
    done = site.client("alice", "open", "https", "srv", "--no-wait")
    assert done.returncode == 0
    assert "knock sent" in done.stdout
    assert wait_until(lambda: [r["service"] for r in site.leases()] == ["https"])


def test_replayed_packet_is_refused_and_visible_in_events(site: Site) -> None:
    enrollment = parse(site.uris["alice"])
    target = knock.resolve_all(enrollment.host, enrollment.port)[0]
    packet = knock.make_packet(enrollment, Action.OPEN, "ssh", duration=30, address=None,
                               now=time.time(), nonce=os.urandom(NONCE_SIZE))
    knock.send(target, packet)
    knock.send(target, packet)

    def replay_recorded() -> bool:
        return any(e["reason"] == "replay" and e["client"] == "alice" for e in site.events())

    assert wait_until(replay_recorded)
    accepted = [e for e in site.events() if e["outcome"] == "accepted"]
    assert len(accepted) == 1
    assert site.server.wait_for_line("refused reason=replay client=alice src=127.0.0.1")


def test_revoke_while_running(site: Site) -> None:
    assert site.client("alice", "open", "ssh", "srv", "--duration", "100").returncode == 0
    wait_until(lambda: site.leases() != [])
    time.sleep(0.3)  # leases.json is saved within a housekeeping round
    done = site.admin("revoke", "alice")
    assert done.returncode == 0
    assert "refuses its knocks within a second" in done.stdout
    assert "1 active lease(s) stay until they expire" in done.stdout
    time.sleep(1.0)
    assert site.client("alice", "open", "https", "srv", "--no-wait").returncode == 0
    assert wait_until(lambda: any(e["reason"] == "revoked" for e in site.events()))
    assert site.server.wait_for_line("revoked client=alice")
    assert [r["service"] for r in site.leases()] == ["ssh"], "its lease runs out by itself"


def test_two_clients_share_one_address(site: Site) -> None:
    assert site.client("alice", "open", "https", "srv", "--duration", "600").returncode == 0
    assert site.client("bob", "open", "https", "srv", "--duration", "300").returncode == 0
    assert wait_until(lambda: len(site.leases()) == 1
                      and site.leases()[0]["clients"] == ["alice", "bob"])
    assert site.client("alice", "close", "https", "srv").returncode == 0
    assert wait_until(lambda: site.leases()[0]["clients"] == ["bob"])
    with socket.socket() as probe:
        probe.settimeout(1)
        assert probe.connect_ex((site.host, site.https.port)) == 0, "bob keeps access"


def test_events_since_and_human_output(site: Site) -> None:
    assert site.client("alice", "open", "ssh", "srv").returncode == 0
    assert wait_until(lambda: any(e["outcome"] == "accepted" for e in site.events("--since",
                                                                                    "1m")))
    human = site.admin("events", "--since", "10m")
    assert "accepted" in human.stdout
    assert "alice" in human.stdout
    future = site.admin("events", "--since", "0s")
    assert future.returncode == 0


def test_sigterm_stops_cleanly(site: Site) -> None:
    assert site.client("alice", "open", "ssh", "srv", "--duration", "100").returncode == 0
    assert site.server.stop(signal.SIGTERM) == 0
    assert any(line.startswith("stopped") for line in site.server.lines)
    status = site.admin("status")
    assert "not running" in status.stdout
    assert "cannot expire grants while the server is down" in status.stdout


def test_restart_refuses_replay_and_keeps_leases(site: Site) -> None:
    enrollment = parse(site.uris["alice"])
    target = knock.resolve_all(enrollment.host, enrollment.port)[0]
    packet = knock.make_packet(enrollment, Action.OPEN, "ssh", duration=100, address=None,
                               now=time.time(), nonce=os.urandom(NONCE_SIZE))
    knock.send(target, packet)
    assert wait_until(lambda: site.leases() != [])
    site.server.stop(signal.SIGKILL)  # a crash
    with ServerProcess(site.config) as again:
        # one copy, judged at once even when the restart fell just past a
        # step boundary (a small site starts with every live step's tags:
        # this packet's may be the step before's); it is a replay
        knock.send(target, packet)
        assert again.wait_for_line("refused reason=replay client=alice"), again.raw[-30:]
        assert not any(line.startswith("accepted") for line in again.lines)
        assert [r["service"] for r in site.leases()] == ["ssh"]


def test_a_restart_takes_a_knock_of_the_step_before_at_once(site: Site) -> None:
    """A knock sealed in the step before the one a restart falls in (sent
    just before, or from a clock behind) is granted by the new process at
    once, not dropped as an unknown tag while its warm-up runs: a small
    site starts with every live step's tags."""
    enrollment = parse(site.uris["alice"])
    target = knock.resolve_all(enrollment.host, enrollment.port)[0]
    site.server.stop(signal.SIGKILL)
    with ServerProcess(site.config) as again:
        now = time.time()
        if now - step_start(step_of(now)) > 25:  # the step before stays in the window
            time.sleep(STEP_SECONDS - (now - step_start(step_of(now))) + 0.5)
            now = time.time()
        before = step_start(step_of(now)) - 1.0  # the step before's last second
        packet = knock.make_packet(enrollment, Action.OPEN, "ssh", duration=100, address=None,
                                   now=before, nonce=os.urandom(NONCE_SIZE))
        knock.send(target, packet)
        assert again.wait_for_line("accepted action=open client=alice"), again.raw[-30:]


@pytest.fixture
def site6(tmp_path: Path) -> Iterator[Site]:
    if not socket.has_ipv6:
        pytest.skip("this machine has no IPv6")
    yield from make_site(tmp_path, "::1")


def test_ipv6_loopback(site6: Site) -> None:
    done = site6.client("alice", "open", "ssh", "srv")
    assert done.returncode == 0, done.stderr
    assert [r["address"] for r in site6.leases()] == ["::1"]


def test_server_never_answers(site: Site) -> None:
    """Valid, replayed, tampered and junk packets: not one byte comes back."""
    enrollment = parse(site.uris["alice"])
    packet = knock.make_packet(enrollment, Action.OPEN, "ssh", duration=5, address=None,
                               now=time.time(), nonce=os.urandom(NONCE_SIZE))
    tampered = bytearray(packet)
    tampered[NONCE_OFFSET] ^= 1  # a new nonce: the MAC check (not the replay cache) refuses it
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        sock.connect((site.host, enrollment.port))
        for datagram in (packet, packet, bytes(tampered), os.urandom(161), b"", b"x" * 1400):
            sock.send(datagram)
        with pytest.raises(TimeoutError):
            sock.recv(2048)
    assert wait_until(lambda: any(e["reason"] == "bad_mac" for e in site.events()))


def test_client_dir_from_the_environment(site: Site, tmp_path: Path) -> None:
    """SPA_CLIENT_DIR stands in for --config-dir."""
    where = tmp_path / "from-env"
    env = {"SPA_CLIENT_DIR": str(where)}
    done = run_cli("spa-client", "enroll", site.uris["alice"], "--name", "envsrv", env=env)
    assert done.returncode == 0, done.stderr
    assert (where / "profiles" / "envsrv.toml").exists()
    done = run_cli("spa-client", "open", "ssh", "envsrv", env=env)
    assert done.returncode == 0, done.stderr


def test_udp_mode_drops_junk_in_the_kernel(site: Site) -> None:
    """The bound socket carries a filter on the live tags: junk with the right
    version byte and length never reaches the server; knocks do.  (As root
    the eBPF map filter runs; without CAP_BPF the classic program.)"""
    filter_line = "udp eBPF map filter on" if os.geteuid() == 0 else "udp kernel filter on"
    assert site.server.wait_for_line(filter_line), site.server.lines
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(500):
            sock.sendto(b"\x01" + os.urandom(160), (site.host, parse(site.uris["alice"]).port))
    assert site.client("alice", "open", "ssh", "srv").returncode == 0
    time.sleep(0.6)
    assert [e for e in site.events() if e["outcome"] == "refused"] == []


def test_authenticator_code_end_to_end(site: Site) -> None:
    """enroll --otp: the app's code (made here by pyotp from the otpauth URI
    the server printed) opens once; the same code again does not; no code on
    a non-terminal is a one-line error."""
    import pyotp

    endpoint = parse(site.uris["alice"])
    done = site.admin("enroll", "carol", "--service", "ssh", "--otp", "--endpoint",
                      f"{endpoint.host}:{endpoint.port}")
    assert done.returncode == 0, done.stderr
    uri = next(line.strip() for line in done.stdout.splitlines() if "spa1://" in line)
    otpauth = next(line.strip() for line in done.stdout.splitlines() if "otpauth://" in line)
    assert uri.endswith("&otp=1") and "issuer=spa" in otpauth
    assert site.client("carol", "enroll", uri, "--name", "srv").returncode == 0
    assert site.server.wait_for_line("reloaded clients=3")
    done = site.client("carol", "open", "ssh", "srv")
    assert done.returncode == 2 and "pass --otp CODE" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    app = pyotp.parse_uri(otpauth)
    assert isinstance(app, pyotp.TOTP)
    code = app.now()
    done = site.client("carol", "open", "ssh", "srv", "--otp", code)
    assert done.returncode == 0, done.stderr
    assert site.client("carol", "close", "ssh", "srv").returncode == 0  # no code needed
    assert wait_until(lambda: site.leases() == [])
    done = site.client("carol", "open", "ssh", "srv", "--otp", code, "--timeout", "1.5")
    assert done.returncode == 1, "a used code opens nothing"
    assert wait_until(lambda: any(e["reason"] == "otp_reused" for e in site.events()))
    bad = site.client("carol", "open", "ssh", "srv", "--otp", "12ab56")
    assert bad.returncode == 2 and "6 digits" in bad.stderr


def test_keep_renews_the_lease_until_ctrl_c_then_closes(site: Site) -> None:
    """--keep with a 3 s lease: still open after 6 s (renewed every second),
    Ctrl-C (SIGINT) sends a close, the lease ends at once, exit status 0."""
    import signal

    from tests.integration.procs import command

    proc = subprocess.Popen(
        [*command("spa-client"), "--config-dir", str(site.root / "client-alice"), "open",
         "ssh", "srv", "--duration", "3", "--keep"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: site.leases() != [], timeout=5)
        time.sleep(6)
        rows = site.leases()
        assert [r["service"] for r in rows] == ["ssh"], "renewed past its 3 s"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "closed ssh" in out
    assert err.count("renewed") >= 5, err  # plain lines without a terminal
    renewed = [line for line in err.splitlines() if "renewed" in line]
    assert all(re.match(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z ssh: renewed", line)
               for line in renewed), renewed
    assert wait_until(lambda: site.leases() == [], timeout=2)


def test_doctor_knocks_and_says_what_to_fix(site: Site) -> None:
    done = site.client("alice", "doctor", "srv", "--time-server", "none")
    assert "ok   profile 'srv'" in done.stdout and "ok   knock: ssh (tcp/" in done.stdout
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(("all good", "all checks passed")), done.stdout
    assert done.returncode == 0
    again = site.client("alice", "doctor", "srv", "--time-server", "none")
    assert "is open already, before any knock" in again.stdout
    assert site.client("alice", "close", "ssh", "srv").returncode == 0
    assert wait_until(lambda: site.leases() == [])
    site.admin("revoke", "alice")
    time.sleep(1.0)
    done = site.client("alice", "doctor", "srv", "--time-server", "none")
    assert done.returncode == 1
    assert "FAIL knock" in done.stdout and "revoked" in done.stdout.strip().splitlines()[-1]


def test_stats_from_the_running_server(site: Site) -> None:
    assert site.client("alice", "open", "ssh", "srv").returncode == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(3):
            sock.sendto(b"\x01" + os.urandom(160), (site.host, parse(site.uris["alice"]).port))
    assert wait_until(lambda: any(e["outcome"] == "accepted" for e in site.events()))
    done = site.admin("stats", "--since", "1h", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["accepted"] >= 1 and report["accepted_by_client"].get("alice", 0) >= 1
    human = site.admin("stats")
    assert human.returncode == 0 and "knocks accepted" in human.stdout
    assert "accepted by client:" in human.stdout
    bad = site.admin("stats", "--since", "soon")
    assert bad.returncode == 2 and "duration 'soon'" in bad.stderr


def test_stats_by_country_with_a_geoip_database(tmp_path: Path) -> None:
    """[geoip] database: refused knocks from 127.0.0.1 count for the country
    the test's own database gives loopback; a missing file is one clear line."""
    from tests.geoip_db import make_country_db

    db = make_country_db(tmp_path / "countries.mmdb", {"127.0.0.0/8": "NZ"})
    sites = make_site(tmp_path, "127.0.0.1",
                      extra_config=f'\n[geoip]\ndatabase = "{db}"\n')
    site = next(sites)
    try:
        site.admin("revoke", "alice")
        time.sleep(1.0)  # the server reloads within a second
        site.client("alice", "open", "ssh", "srv", "--timeout", "1")  # knocks, refused
        assert wait_until(lambda: sum(e["count"] for e in site.events()  # type: ignore[misc]
                                      if e["outcome"] == "refused") >= 1)
        report = json.loads(site.admin("stats", "--json").stdout)
        failed = report["refused"]
        assert report["geoip"] is True
        assert report["failed_by_country"] == {"NZ": failed}
        month = time.strftime("%Y-%m", time.gmtime())
        assert report["monthly"][month]["failed_by_country"] == {"NZ": failed}
        human = site.admin("stats").stdout
        assert "failed attempts by country:" in human and f"NZ {failed}" in human
        db.unlink()
        gone = site.admin("stats")
        assert gone.returncode == 2 and "Traceback" not in gone.stderr
        assert gone.stderr.strip().endswith("or remove [geoip] from the config")
    finally:
        next(sites, None)


def test_prometheus_metrics_on_loopback(tmp_path: Path) -> None:
    """[metrics] listen: counters by outcome and reason, replays apart, active
    leases per service, the receive queue's drops; nothing when unset."""
    import urllib.request

    metrics_port = free_port(socket.SOCK_STREAM)
    sites = make_site(tmp_path, "127.0.0.1", extra_config=(
        f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'))
    site = next(sites)
    try:
        enrollment = parse(site.uris["alice"])
        packet = knock.make_packet(enrollment, Action.OPEN, "ssh", duration=60, address=None,
                                   now=time.time(), nonce=os.urandom(NONCE_SIZE))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _ in range(3):
                sock.sendto(packet, (site.host, enrollment.port))

        def scrape() -> str:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as answer:
                return str(answer.read().decode())

        assert wait_until(lambda: "spa_replays_total 2.0" in scrape(), timeout=15), scrape()
        text = scrape()
        assert 'spa_knocks_total{outcome="accepted",reason=""} 1.0' in text
        assert 'spa_knocks_total{outcome="refused",reason="replay"} 2.0' in text
        assert 'spa_active_leases{service="ssh"} 1.0' in text
        assert 'spa_active_leases{service="https"} 0.0' in text
        assert "spa_receive_queue_drops" in text
    finally:
        sites.close()


def test_a_second_daemon_on_the_same_state_is_refused_and_the_first_keeps_serving(
        site: Site) -> None:
    """Issue 12: one daemon per state directory.  A second `run` fails with
    one line naming the running pid (exit 2) before it touches anything; the
    first still grants; `status` names the lock holder's pid and uptime; a
    killed daemon's lock goes with it."""
    first = site.server.proc
    assert first is not None
    second = run_cli("spa-server", "--config", str(site.config), "run", timeout=30)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"already running on {site.root / 'state'} (pid {first.pid}, up " in lines[0]
    status = site.admin("status").stdout
    assert re.search(rf"server: running \(pid {first.pid}, up \d+s, port \d+/udp, "
                     r"backend memory\)", status), status
    assert site.client("alice", "open", "ssh", "srv").returncode == 0, "the first still serves"
    site.server.stop(signal.SIGKILL)
    assert "server: not running" in site.admin("status").stdout
    with ServerProcess(site.config) as again:
        assert again.proc is not None
        assert f"pid {again.proc.pid}" in site.admin("status").stdout


# anything that looks like a wall-clock time: a date with a time after it, or a bare
# hh:mm:ss (a duration like 4m09s or 29.8 s does not look like one)
TIME_LIKE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?(?:\.\d+)?"
                       r"(?:Z| ?UTC|[+-]\d{2}:?\d{2})?)?|\b\d{1,2}:\d{2}:\d{2}\b")
ONE_FORMAT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")  # spa.clitools.format_utc


def test_every_time_the_programs_print_is_iso_8601_utc_with_z(site: Site) -> None:
    """events, clients, status, stats, enroll, doctor and the daemon's own
    log lines: every wall-clock time in one format, 2026-12-06T00:14:18Z."""
    assert site.client("alice", "open", "ssh", "srv", "--duration", "60").returncode == 0
    assert wait_until(lambda: any(e["outcome"] == "accepted" for e in site.events()))
    pending = site.admin("enroll", "carol", "--service", "ssh", "--endpoint",
                         f"{site.host}:{parse(site.uris['alice']).port}", "--expires", "1h")
    uri = next(word for word in pending.stdout.split() if word.startswith("spa1://"))
    assert site.client("carol", "enroll", uri, "--name", "srv").returncode == 0
    outputs = {
        "events": site.admin("events"), "clients": site.admin("clients"),
        "status": site.admin("status"), "stats": site.admin("stats"), "enroll": pending,
        "doctor alice": site.client("alice", "doctor", "srv", "--time-server", "none"),
        "doctor carol": site.client("carol", "doctor", "srv", "--time-server", "none"),
    }
    found: dict[str, list[str]] = {}
    for name, done in outputs.items():
        found[name] = TIME_LIKE.findall(done.stdout + done.stderr)
    found["log"] = [t for line in site.server.raw for t in TIME_LIKE.findall(line)]
    for name in ("events", "clients", "doctor alice", "log"):
        assert found[name], f"{name} shows a time: {outputs.get(name)}"
    wrong = {name: [t for t in times if not ONE_FORMAT.fullmatch(t)]
             for name, times in found.items()}
    assert not any(wrong.values()), wrong
