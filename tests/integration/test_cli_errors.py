"""Every local error path: one line on stderr, exit status 2, no traceback,
and nothing lost (a failed command leaves the config as it was)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.procs import command, run_cli

pytestmark = pytest.mark.integration


def assert_one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "server.toml"
    done = run_cli("spa-server", "--config", str(path), "init", "--state-dir",
                   str(tmp_path / "state"), "--service", "ssh", "--service", "https")
    assert done.returncode == 0, done.stderr
    return path


def server(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("spa-server", "--config", str(config), *args)


def test_missing_config(tmp_path: Path) -> None:
    done = server(tmp_path / "nope.toml", "clients")
    assert_one_line_error(done, "does not exist", "init")


def test_malformed_config(config: Path) -> None:
    config.write_text("[server\n")
    assert_one_line_error(server(config, "clients"), "not valid TOML")


def test_unknown_key_in_config(config: Path) -> None:
    config.write_text(config.read_text().replace("window = 30", "windwo = 30"))
    assert_one_line_error(server(config, "status"), "unknown key 'windwo'")


def test_group_readable_config_is_refused(config: Path) -> None:
    os.chmod(config, 0o644)
    assert_one_line_error(server(config, "clients"), "chmod 600")


def test_init_refuses_to_overwrite(config: Path) -> None:
    before = config.read_bytes()
    assert_one_line_error(server(config, "init"), "already exists", "--force")
    assert config.read_bytes() == before, "nothing lost"


def test_init_bad_port(tmp_path: Path) -> None:
    assert_one_line_error(server(tmp_path / "c.toml", "init", "--listen-port", "70000"),
                          "out of range")


def test_init_bad_backend(tmp_path: Path) -> None:
    assert_one_line_error(server(tmp_path / "c.toml", "init", "--backend", "pf"), "choose one")


def test_unknown_service(config: Path) -> None:
    before = config.read_bytes()
    done = server(config, "enroll", "alice", "--service", "smtp", "--endpoint", "h")
    assert_one_line_error(done, "unknown service 'smtp'", "https, ssh")
    assert config.read_bytes() == before


def test_bad_endpoint(config: Path) -> None:
    done = server(config, "enroll", "alice", "--service", "ssh", "--endpoint", "bad host!")
    assert_one_line_error(done, "--endpoint")


def test_bad_client_name(config: Path) -> None:
    done = server(config, "enroll", "-x", "--service", "ssh", "--endpoint", "h")
    assert done.returncode == 2
    done = server(config, "enroll", "a b", "--service", "ssh", "--endpoint", "h")
    assert_one_line_error(done, "client name")


def test_duplicate_enroll(config: Path) -> None:
    assert server(config, "enroll", "alice", "--service", "ssh", "--endpoint", "h"
                  ).returncode == 0
    done = server(config, "enroll", "alice", "--service", "ssh", "--endpoint", "h")
    assert_one_line_error(done, "already enrolled")


def test_unknown_client_revoke(config: Path) -> None:
    assert_one_line_error(server(config, "revoke", "bob"), "no client named 'bob'")


def test_missing_argument_is_one_line(config: Path) -> None:
    assert_one_line_error(server(config, "enroll"), "Missing", "--help")


def test_bad_since(config: Path) -> None:
    assert_one_line_error(server(config, "events", "--since", "yesterday"), "duration")


def test_port_in_use(config: Path) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
        port = sock.getsockname()[1]
        config.write_text(config.read_text().replace("listen_port = 62201",
                                                     f"listen_port = {port}"))
        done = server(config, "run", "--backend", "memory", "--mode", "udp")
    assert_one_line_error(done, f"UDP port {port} is already in use")


def test_capture_on_a_missing_interface(config: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("capture needs root")
    done = server(config, "run", "--backend", "memory", "--mode", "capture", "--interface",
                  "nosuch0")
    assert_one_line_error(done, "no network interface named 'nosuch0'")


def test_unknown_mode(config: Path) -> None:
    assert_one_line_error(server(config, "run", "--backend", "memory", "--mode", "pcap"),
                          "unknown mode 'pcap'")


def test_no_permission(tmp_path: Path) -> None:
    """A config that belongs to someone else, read without root's override."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop capabilities")
    config = tmp_path / "server.toml"
    assert server(config, "init").returncode == 0
    os.chown(config, 65534, 65534)  # nobody
    done = subprocess.run(
        ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--",
         *command("spa-server"), "--config", str(config), "clients"],
        capture_output=True, text=True, timeout=30, check=False)
    assert_one_line_error(done, "permission denied")


def as_nobody(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """spa-server run as uid 65534, with no capability; a run that does not
    end in `timeout` is killed with its group and reported as status -9."""
    with subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "--", *command("spa-server"), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return subprocess.CompletedProcess(proc.args, -9, out, err)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("args", [("run", "--mode", "udp"), ("run", "--mode", "udp",
                                                             "--backend", "iptables"),
                                  ("gate",), ("check",)])
def test_a_firewall_command_without_root_says_so_in_one_line(tmp_path: Path,
                                                             args: tuple[str, ...]) -> None:
    """libnftables (before 1.1) prints "Operation not permitted (you must be
    root)" on stderr by itself; the daemon without the kernel's permission
    could never install the gate.  One line of ours, exit 2, nothing else."""
    done = as_nobody("--config", str(nobodys_config(tmp_path)), *args)
    assert_one_line_error(done, "operation not permitted", "run spa-server as root")
    assert "you must be root)\n" not in done.stderr  # libnftables' own line


def nobodys_config(tmp_path: Path, *init: str) -> Path:
    """A config and state dir owned by nobody, listening on a free loopback port."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as nobody")
    home = tmp_path / "nobody"
    config, state = home / "server.toml", home / "state"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert server(config, "init", "--state-dir", str(state),
                  "--listen-port", str(port), *init).returncode == 0
    config.write_text(config.read_text().replace('listen_address = "::"',
                                                 'listen_address = "127.0.0.1"'))
    state.mkdir()
    for path in (home, config, state):
        os.chown(path, 65534, 65534)
    return config


def test_a_try_out_without_root_says_it_closes_nothing(tmp_path: Path) -> None:
    """The memory backend as nobody runs, and says no port is closed and the
    gate keeper holds no capability (it said "gate closed to everyone" and
    "gate keeper ... with CAP_NET_ADMIN only", neither true)."""
    config = nobodys_config(tmp_path, "--backend", "memory")
    done = as_nobody("--config", str(config), "run", "--mode", "udp", timeout=3)
    assert done.returncode == -9, done.stderr  # it served until killed
    assert "gate none: the memory backend closes no port" in done.stderr, done.stderr
    assert "closed to everyone" not in done.stderr
    assert re.search(r"gate keeper pid \d+ with no capability$", done.stderr, re.M), done.stderr


def client(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("spa-client", "--config-dir", str(tmp_path / "client"), *args)


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [("https://example.org", "expected spa1"), ("spa2://h/alice?sid=x", "not supported"),
     ("spa1://h/alice?sid=AAAA&key=AAAA&svc=ssh:tcp:22", "server id")],
)
def test_bad_uri(tmp_path: Path, uri: str, fragment: str) -> None:
    assert_one_line_error(client(tmp_path, "enroll", uri), fragment)


def test_a_uri_the_shell_cut_at_ampersand_says_to_quote_it(tmp_path: Path,
                                                          config: Path) -> None:
    """Typed without quotes, the URI reaches the client cut at its first '&'
    (the shell runs the command in the background with the text before it)."""
    uri = server(config, "enroll", "alice", "--service", "ssh", "--endpoint", "127.0.0.1",
                 "--uri-only").stdout.strip()
    head = uri.split("?")[0]
    quote = ("the URI was cut at '&' by the shell: put it in single quotes: "
             f"spa-client enroll '{head}?sid=...&key=...&svc=...'")
    cut = uri.split("&")[0]
    done = client(tmp_path, "enroll", cut)
    assert_one_line_error(done, quote)
    assert cut.split("sid=")[1] not in done.stderr
    shell = " ".join([*command("spa-client"), "--config-dir", str(tmp_path / "client"),
                      "enroll", uri])  # unquoted, as a user would type it
    typed = subprocess.run(["sh", "-c", shell + "; wait"], capture_output=True, text=True,
                           timeout=30, check=False)
    assert typed.stderr.strip() == "spa-client: error: " + quote
    for whole in ("spa1://h/alice", "spa1://h/alice?"):  # not cut: as before
        assert "cut at '&'" not in client(tmp_path, "enroll", whole).stderr
    assert "cut at '&'" not in run_cli(
        "spa-client", "--config-dir", str(tmp_path / "client"), "enroll", "-",
        input=cut + "\n").stderr


def test_open_without_profile(tmp_path: Path) -> None:
    assert_one_line_error(client(tmp_path, "open", "ssh", "example.org"), "enroll first")


def test_open_bad_duration_and_allow_ip(tmp_path: Path, config: Path) -> None:
    uri = server(config, "enroll", "alice", "--service", "ssh", "--endpoint", "127.0.0.1",
                 "--uri-only").stdout.strip()
    assert client(tmp_path, "enroll", uri).returncode == 0
    assert_one_line_error(client(tmp_path, "open", "ssh", "127.0.0.1", "--duration", "0"),
                          "--duration")
    assert_one_line_error(client(tmp_path, "open", "ssh", "127.0.0.1", "--allow-ip", "x"),
                          "--allow-ip")
    assert_one_line_error(client(tmp_path, "open", "smtp", "127.0.0.1"), "no service 'smtp'")


def test_group_readable_profile_is_refused(tmp_path: Path, config: Path) -> None:
    uri = server(config, "enroll", "alice", "--service", "ssh", "--endpoint", "127.0.0.1",
                 "--uri-only").stdout.strip()
    assert client(tmp_path, "enroll", uri).returncode == 0
    profile = tmp_path / "client" / "profiles" / "127.0.0.1.toml"
    assert profile.stat().st_mode & 0o777 == 0o600
    os.chmod(profile, 0o640)
    assert_one_line_error(client(tmp_path, "open", "ssh", "127.0.0.1"), "chmod 600")


def test_secrets_never_in_error_messages(tmp_path: Path, config: Path) -> None:
    uri = server(config, "enroll", "alice", "--service", "ssh", "--endpoint", "h",
                 "--uri-only").stdout.strip()
    secret = uri.split("key=")[1].split("&")[0]
    broken = uri.replace("svc=ssh:tcp:22", "svc=ssh:tcp:0")
    done = client(tmp_path, "enroll", broken)
    assert done.returncode == 2
    assert secret not in done.stderr + done.stdout


def test_qr_enrollment_round_trip_through_both_programs(config: Path, tmp_path: Path) -> None:
    """spa-server enroll --qr --png, then spa-client enroll --qr-image: the
    profile is the one the URI itself makes."""
    png = tmp_path / "bob.png"
    done = server(config, "enroll", "bob", "--service", "ssh", "--endpoint", "203.0.113.10",
                  "--qr", "--png", str(png))
    assert done.returncode == 0, done.stderr
    assert "▀" in done.stdout or "▄" in done.stdout, "a code in the terminal"
    assert oct(png.stat().st_mode & 0o777) == "0o600"
    uri = next(line.strip() for line in done.stdout.splitlines() if "spa1://" in line)
    by_image, by_uri = tmp_path / "img", tmp_path / "uri"
    done = run_cli("spa-client", "--config-dir", str(by_image), "enroll", "--qr-image", str(png))
    assert done.returncode == 0, done.stderr
    assert "key=" not in done.stdout + done.stderr, "the secret is never echoed"
    assert run_cli("spa-client", "--config-dir", str(by_uri), "enroll", uri).returncode == 0
    assert ((by_image / "profiles" / "203.0.113.10.toml").read_text()
            == (by_uri / "profiles" / "203.0.113.10.toml").read_text())


def test_qr_image_errors(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    blank.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG header, nothing readable
    client = ("spa-client", "--config-dir", str(tmp_path / "c"), "enroll")
    assert_one_line_error(run_cli(*client, "--qr-image", str(tmp_path / "none.png")),
                          "no such file")
    assert_one_line_error(run_cli(*client, "--qr-image", str(blank)), str(blank))
    assert_one_line_error(run_cli(*client), "URI, or --qr-image")
    assert_one_line_error(run_cli(*client, "spa1://x", "--qr-image", str(blank)),
                          "one of the two")


def test_png_into_a_missing_directory_enrolls_nothing(config: Path, tmp_path: Path) -> None:
    before = config.read_text()
    done = server(config, "enroll", "carol", "--service", "ssh", "--endpoint", "203.0.113.10",
                  "--png", str(tmp_path / "no" / "such" / "dir" / "c.png"))
    assert_one_line_error(done, "not a file in an existing directory")
    assert config.read_text() == before


def test_enroll_expires_shows_pending_and_refuses_bad_durations(config: Path) -> None:
    done = server(config, "enroll", "erin", "--service", "ssh", "--endpoint", "203.0.113.10",
                  "--expires", "15m")
    assert done.returncode == 0, done.stderr
    assert "must be used within 15m" in done.stdout
    listing = server(config, "clients").stdout
    assert "erin" in listing and "pending until 20" in listing
    before = config.read_text()
    for bad in ("0", "15x", "-5m", "m", "0s"):
        done = server(config, "enroll", "fay", "--service", "ssh", "--endpoint",
                      "203.0.113.10", "--expires", bad)
        assert_one_line_error(done, "--expires", "e.g. 15m")
    assert config.read_text() == before


def test_bad_enroll_by_in_config(config: Path) -> None:
    """An old server.toml's client (moved into the store at the first command)
    is checked as the file always was."""
    config.write_text(config.read_text() + '\n[clients.gus]\nsecret = "' + "A" * 43
                      + '"\nservices = ["ssh"]\nenroll_by = "soon 2026-01-01T00:00:00Z"\n')
    assert_one_line_error(server(config, "clients"), "enroll_by", "UTC time like")


def test_profiles_lists_and_forget_removes(config: Path, tmp_path: Path) -> None:
    client = ("spa-client", "--config-dir", str(tmp_path / "c"))
    empty = run_cli(*client, "profiles")
    assert empty.returncode == 0 and "no profiles" in empty.stdout
    for name, extra in (("hank", ()), ("iris", ("--otp",))):
        done = server(config, "enroll", name, "--service", "ssh", "--endpoint",
                      "203.0.113.10:4000", *extra, "--uri-only")
        assert done.returncode == 0, done.stderr
        assert run_cli(*client, "enroll", done.stdout.strip(), "--name", name).returncode == 0
    listing = run_cli(*client, "profiles")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert any(line.startswith("hank ") and "203.0.113.10:4000" in line and "ssh (tcp/22)"
               in line and "authenticator" not in line for line in lines)
    assert any(line.startswith("iris ") and "authenticator code" in line for line in lines)
    assert "key=" not in listing.stdout
    done = run_cli(*client, "forget", "hank")
    assert done.returncode == 0 and "spa-server revoke" in done.stdout
    assert not (tmp_path / "c" / "profiles" / "hank.toml").exists()
    assert_one_line_error(run_cli(*client, "forget", "hank"), "no profile for 'hank'")
    done = run_cli(*client, "forget", "203.0.113.10")  # by server host: one profile left
    assert done.returncode == 0 and "iris.toml" in done.stdout
    assert "no profiles" in run_cli(*client, "profiles").stdout


def test_rotate_prints_a_new_uri_and_refuses_what_it_cannot_do(config: Path,
                                                               tmp_path: Path) -> None:
    first = server(config, "enroll", "jo", "--service", "ssh", "--endpoint",
                   "203.0.113.10:4000", "--uri-only").stdout.strip()
    client = ("spa-client", "--config-dir", str(tmp_path / "c"))
    assert run_cli(*client, "enroll", first, "--name", "srv").returncode == 0
    done = server(config, "rotate", "jo", "--grace", "10m")
    assert done.returncode == 0, done.stderr
    assert "keeps working for 10m" in done.stdout
    second = next(line.strip() for line in done.stdout.splitlines() if "spa1://" in line)
    assert second != first and second.split("?")[0] == first.split("?")[0]
    assert "old_until" in server(config, "clients", "export").stdout
    again = run_cli(*client, "enroll", second, "--name", "srv")
    assert again.returncode == 0, "the same client at the same server: the profile is replaced"
    assert_one_line_error(server(config, "rotate", "jo", "--grace", "soon"), "--grace")
    assert_one_line_error(server(config, "rotate", "kim"), "no client named 'kim'")
    assert server(config, "revoke", "jo").returncode == 0
    assert_one_line_error(server(config, "rotate", "jo"), "revoked")


def test_dashboard_password_and_dashboard_errors(config: Path, tmp_path: Path) -> None:
    """No password yet, a short one, no terminal, a bad or busy address: one
    line each, exit 2, and the password never echoed."""
    assert_one_line_error(server(config, "dashboard"),
                          "no dashboard password is set", "spa-server dashboard-password")
    short = run_cli("spa-server", "--config", str(config), "dashboard-password", "--stdin",
                    input="tooshort\n")
    assert_one_line_error(short, "too short", "at least 12")
    assert "tooshort" not in short.stderr
    assert_one_line_error(server(config, "dashboard-password"), "no terminal", "--stdin")
    secret = "a perfectly long passphrase"
    done = run_cli("spa-server", "--config", str(config), "dashboard-password", "--stdin",
                   input=secret + "\n", timeout=60)
    assert done.returncode == 0 and secret not in done.stdout + done.stderr
    stored = tmp_path / "state" / "dashboard.password"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert stored.read_bytes().startswith(b"$argon2id$") and secret.encode() not in (
        stored.read_bytes())
    assert_one_line_error(server(config, "dashboard", "--listen", "localhost"),
                          "write HOST:PORT")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(server(config, "dashboard", "--listen", f"127.0.0.1:{port}"),
                              f"cannot listen on 127.0.0.1:{port}", "--listen")
    config.write_text(config.read_text() + '\n[dashboard]\nlisten = "127.0.0.1:99999"\n')
    assert_one_line_error(server(config, "dashboard"), "[dashboard] listen", "HOST:PORT")


def test_init_protects_what_the_admin_names_and_says_what_it_closes(tmp_path: Path) -> None:
    """Issue 12: `init` once closed tcp/443 for everyone from the first run
    without a word.  Now it protects ssh only unless told, and says what is
    closed; a bad --service is one line, exit 2, nothing written."""
    config = tmp_path / "c.toml"
    done = server(config, "init", "--state-dir", str(tmp_path / "s"))
    assert done.returncode == 0, done.stderr
    assert "except to clients whose knock opens them: ssh (tcp/22)" in done.stdout
    closes = next(line for line in done.stdout.splitlines() if "Closed to everyone" in line)
    assert "443" not in closes and "[services.https]" not in config.read_text()
    again = tmp_path / "d.toml"
    done = server(again, "init", "--state-dir", str(tmp_path / "s"), "--service", "ssh",
                  "--service", "imaps=tcp/993")
    assert done.returncode == 0, done.stderr
    assert "ssh (tcp/22), imaps (tcp/993)" in done.stdout
    assert "[services.imaps]" in again.read_text()
    for bad in ("telnet", "web=tcp/99999", "x=icmp/1"):
        assert_one_line_error(server(tmp_path / "e.toml", "init", "--service", bad),
                              f"--service {bad!r}", "NAME=tcp/PORT")
        assert not (tmp_path / "e.toml").exists()


def test_root_refuses_a_config_or_state_directory_another_user_owns(tmp_path: Path) -> None:
    """Issue 13, finding 4: with /etc/spa owned by the service user (as the
    dashboard's docs asked), root's enroll, revoke, rotate and init created
    any file through a link planted at .server.toml.lock; a daemon run as
    root truncated through links in its state directory.  Root now writes in
    neither when another user owns it: one line, exit 2, nothing changed."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directories to another user")
    etc, state, nologin = tmp_path / "etc", tmp_path / "state", tmp_path / "nologin"
    etc.mkdir()
    config = etc / "server.toml"
    assert server(config, "init", "--state-dir", str(state)).returncode == 0
    assert server(config, "enroll", "alice", "--service", "ssh", "--endpoint", "h"
                  ).returncode == 0
    os.chown(etc, 65534, 65534)
    os.chown(config, 65534, 65534)
    lock = etc / ".server.toml.lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(nologin)
    before = config.read_bytes()
    # enroll, revoke and rotate write the client store, not /etc/spa: they run
    for args in (("enroll", "bob", "--service", "ssh", "--endpoint", "h"),
                 ("rotate", "alice"), ("revoke", "alice")):
        assert server(config, *args).returncode == 0, args
        assert not nologin.exists(), args
    for args in (("init", "--force"),):
        assert_one_line_error(server(config, *args), f"{etc} is owned by nobody (uid 65534)",
                              "root will not write in a directory another user controls",
                              "sudo -u nobody spa-server", f"chown root: {etc}")
        assert not nologin.exists(), args
    assert config.read_bytes() == before
    assert server(config, "clients").returncode == 0, "reading stays allowed"
    os.chown(etc, 0, 0)
    shutil.rmtree(state)  # (the client store the commands above wrote)
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    # (`run` started as root becomes the state directory's owner before it
    # writes there: tests/netns/test_privsep.py)
    writes: list[tuple[list[str], str | None]] = [
        (["dashboard-password", "--stdin"], "correct horse battery\n")]
    for argv, given in writes:
        done = run_cli("spa-server", "--config", str(config), *argv, input=given)
        assert_one_line_error(done, f"{state} is owned by nobody (uid 65534)",
                              f"chown root: {state}")
    assert os.listdir(state) == []


PLANTED: dict[str, Any] = {
    "version": 1, "updated": 0, "backend": "nftables", "expires_by_itself": True,
    "leases": [{"client": "mallory", "address": "10.9.9.9", "service": "ssh",
                "expires": 4102444800}]}


def plant_state_dir(shared: Path) -> Path:
    """What a local user does first in a 1777 directory (issue 16's review,
    F2): a state directory of theirs, with a 73-year ssh lease."""
    shared.mkdir(mode=0o1777)
    os.chmod(shared, 0o1777)
    state = shared / "try-state"
    state.mkdir(mode=0o700)
    (state / "leases.json").write_text(json.dumps(PLANTED))
    for path in (state, state / "leases.json"):
        os.chown(path, 65534, 65534)  # nobody
    return state


def test_root_refuses_a_state_directory_another_user_could_have_planted(
        tmp_path: Path) -> None:
    """init in a 1777 directory is refused before it writes anything; a
    config naming such a state directory is refused by `run` (which ran the
    daemon as the planter, who could then enroll themselves) and by every
    command that opens the client store."""
    if os.geteuid() != 0:
        pytest.skip("the check is root's")
    shared = tmp_path / "advp"
    state = plant_state_dir(shared)
    done = server(shared / "try.toml", "init")
    assert_one_line_error(done, f"state directory {state} would be in {shared}, which other "
                          "users may write in (mode 1777)", "set state_dir")
    assert sorted(os.listdir(shared)) == ["try-state"], "nothing written"
    assert os.listdir(state) == ["leases.json"]
    config = tmp_path / "server.toml"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert server(config, "init", "--state-dir", str(tmp_path / "state"),
                  "--listen-port", str(port)).returncode == 0
    config.write_text(config.read_text().replace(str(tmp_path / "state"), str(state))
                      .replace('listen_address = "::"', 'listen_address = "127.0.0.1"'))
    for args in (("run", "--backend", "memory", "--mode", "udp"),
                 ("enroll", "eve", "--service", "ssh", "--endpoint", "h")):
        try:
            done = run_cli("spa-server", "--config", str(config), *args, timeout=5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{args[0]} served from a planted state directory")
        assert_one_line_error(done, "other users may write in (mode 1777)")
    assert os.listdir(state) == ["leases.json"]


@pytest.mark.parametrize(("old", "new", "message"), [
    ("port = 22", 'port = "22"',
     '[services.ssh] port must be an integer (got a string "22"): write port = 22'),
    ("window = 30", 'window = "thirty"',
     '[server] window must be a number (got a string "thirty"): write window = 30'),
    ("flush_on_stop = false", 'flush_on_stop = "no"',
     '[server] flush_on_stop must be true or false (got a string "no"): '
     "write flush_on_stop = false"),
    ('interface = ""', "interface = 0",
     '[server] interface must be a string (got an integer 0): write interface = "0"'),
    ("listen_port = 62201", "listen_port = 62201.0",
     "[server] listen_port must be an integer (got a number 62201.0): "
     "write listen_port = 62201"),
    ("max_duration = 300", "max_duration = [300]",
     "[services.ssh] max_duration must be an integer (got a list): write max_duration = 300"),
    ("[services.ssh]", "[dashboard]\nlisten = 9713\n[services.ssh]",
     '[dashboard] listen must be a string (got an integer 9713): '
     'write listen = "127.0.0.1:9713"'),
    ("[services.ssh]", "[services]\nssh = 22\n[services.x]",
     "[services.ssh] must be a table (got an integer 22): write [services.ssh] on a line "
     "of its own"),
])
def test_a_wrong_type_in_the_config_names_the_type_wanted_and_the_fix(
        config: Path, old: str, new: str, message: str) -> None:
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new, 1))
    assert_one_line_error(server(config, "clients"), message)


def test_a_secret_of_the_wrong_type_is_named_never_quoted(config: Path) -> None:
    """A wrong type's value is quoted to show the fix, a secret's never."""
    text = config.read_text()
    config.write_text(text + '\n[clients.alice]\nsecret = 918273645546372819\n'
                      'services = ["ssh"]\n')
    done = server(config, "clients")
    assert_one_line_error(done, "[clients.alice] secret must be a string (got an integer): "
                          'write secret = "..."')
    assert "918273645546372819" not in done.stderr
    config.write_text(text.replace("server_id = ", "server_id = 4242 #"))
    done = server(config, "clients")
    assert_one_line_error(done, "[server] server_id must be a string (got an integer)")
    assert "4242" not in done.stderr
