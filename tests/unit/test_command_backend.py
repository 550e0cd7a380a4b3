"""The command backend without a firewall: templates checked at load, values
checked before they go in, commands run off the caller's thread with a
timeout, retries and backoff, and a journal that a restart reconciles from."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from spa.backends import command as command_mod
from spa.backends.base import Held, reconcile
from spa.backends.cmdjournal import JOURNAL, Journal
from spa.backends.cmdrun import MAX_OUTPUT, Outcome, run_command
from spa.backends.cmdspec import CommandSpec, parse_listing, parse_spec, render, values
from spa.backends.command import MAX_LEFTOVERS, WORKERS, CommandBackend
from spa.core.policy import Service
from spa.server import config as config_mod
from spa.server.errors import ConfigError, LocalError
from spa.server.events import Event
from spa.server.metrics import Metrics
from spa.server.privsep import gate_keeper_capabilities

SSH = Service("ssh", "tcp", 22, 30, 3600)
HTTPS = Service("https", "tcp", 443, 30, 3600)
SERVICES = {"ssh": SSH, "https": HTTPS}
A = ipaddress.ip_address("192.0.2.7")
B = ipaddress.ip_address("2001:db8::9")
TRUE = "/bin/true"
SPEC = CommandSpec(allow=(TRUE, "add", "{address}", "{protocol}", "{port}", "{seconds}"),
                   remove=(TRUE, "del", "{address}", "{service}"),
                   list=(TRUE, "list", "{service}"), timeout=2.0, retries=2, backoff=0.0)


class FakeRun:
    """Records argv; `rules` (first word match on argv[1:]) decide outcomes."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.fail: set[str] = set()  # argv[-1] or any argument that makes it fail
        self.hang = threading.Event()  # set: a run whose args name `hang_on` blocks
        self.hang_on = ""
        self.release = threading.Event()
        self.listing: str | dict[str, str] = ""  # (a dict: per service)
        self.lock = threading.Lock()

    def __call__(self, argv: Sequence[str], timeout: float) -> Outcome:
        with self.lock:
            self.calls.append(list(argv))
        if self.hang_on and self.hang_on in argv:
            self.hang.set()
            self.release.wait(10)
            return Outcome(None, problem=f"timed out after {timeout:g} s (killed)")
        if any(arg in self.fail for arg in argv):
            return Outcome(1, problem="exit status 1: no route to router")
        if argv[1] != "list":
            return Outcome(0)
        listing = self.listing
        return Outcome(0, listing.get(argv[-1], "") if isinstance(listing, dict) else listing)

    def of(self, word: str) -> list[list[str]]:
        with self.lock:
            return [c for c in self.calls if c[1] == word]


def backend(run: FakeRun, journal: Journal | None = None, spec: CommandSpec = SPEC
            ) -> CommandBackend:
    found = CommandBackend(spec, journal, run=run, log=lambda line: None, clock=lambda: 1000.0)
    found.start(SERVICES, now=1000.0)
    return found


def settle(found: CommandBackend, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while found.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not found.pending()


# ---- templates -----------------------------------------------------------------


@pytest.mark.parametrize(("table", "says"), [
    ({"allow": "/bin/router-allow {address}", "remove": [TRUE]}, "not one string"),
    ({"allow": [TRUE, "{adress}"], "remove": [TRUE]}, "unknown placeholder {adress}"),
    ({"allow": ["router-allow", "{address}"], "remove": [TRUE]}, "absolute path"),
    ({"allow": ["/bin/{service}"], "remove": [TRUE]}, "absolute path"),
    ({"allow": [TRUE], "remove": [TRUE, "{seconds}"]}, "unknown placeholder {seconds}"),
    ({"allow": [TRUE], "remove": [TRUE], "list": [TRUE, "{address}"]}, "unknown placeholder"),
    ({"allow": [TRUE]}, "needs remove"),
    ({"allow": [TRUE], "remove": [TRUE], "timeout": 0}, "timeout"),
    ({"allow": [TRUE], "remove": [TRUE], "shell": True}, "unknown key"),
    ({"allow": ["/bin/sh", "-c", "nft add element {address}"], "remove": [TRUE]}, "shell code"),
    ({"allow": [TRUE], "remove": ["/usr/bin/bash", "-ec", "x {address}"]}, "shell code"),
    ({"allow": [TRUE], "remove": ["/usr/bin/env", "dash", "-c", "x"]}, "shell code"),
])
def test_command_templates_are_checked_when_the_config_loads(table: dict[str, object],
                                                              says: str) -> None:
    with pytest.raises(ValueError, match=says.replace("{", r"\{").replace("}", r"\}")):
        parse_spec(table)


def test_command_values_are_checked_and_each_stays_one_argument() -> None:
    argv = render(SPEC.allow, values(A, SSH, until=1300.4, now=1000.0))
    assert argv == [TRUE, "add", "192.0.2.7", "tcp", "22", "300"]
    assert render((TRUE, '{"list":"spa","address":"{address}"}'), values(B, SSH)) == [
        TRUE, '{"list":"spa","address":"2001:db8::9"}']  # JSON's braces are left alone
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        values("192.0.2.7; reboot", SSH)  # type: ignore[arg-type]


# Python 3.11 takes any text after an IPv6 scope's %: quotes, spaces, $(), ;
SCOPED = ['fe80::1%","list":"admin-trusted', 'fe80::1%x"}; -rf --all', "fe80::1%$(reboot)",
          "fe80::1%eth0", "::ffff:192.0.2.7"]


@pytest.mark.parametrize("text", SCOPED)
def test_a_scoped_or_mapped_address_never_reaches_a_command(text: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"scope|IPv4-mapped"):
        values(ipaddress.ip_address(text), SSH)
    found, bad = parse_listing(f"192.0.2.7\n{text}\n{text}/128\n")
    assert [str(a) for a in found] == ["192.0.2.7"] and len(bad) == 2
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / JOURNAL).write_text(json.dumps({"grants": [[text, "ssh", 1.0],
                                                        ["192.0.2.7", "ssh", 2.0]]}))
    assert Journal(state).load() == {(A, "ssh"): 2.0}
    # end to end: the list command's output is never spliced into remove's argv
    run = FakeRun()
    run.listing = text + "\n"
    found_backend = backend(run, Journal(state))
    reconcile(found_backend, {}, SERVICES, now=1000.0)
    settle(found_backend)
    assert [c[2] for c in run.of("del")] == ["192.0.2.7"], run.calls
    found_backend.stop()


def test_command_list_output_is_addresses_one_a_line() -> None:
    found, bad = parse_listing("# spa\n192.0.2.7\n2001:db8::9/128\n\n10.0.0.0/8\nnonsense\n")
    assert [str(a) for a in found] == ["192.0.2.7", "2001:db8::9"]
    assert bad == ["10.0.0.0/8", "nonsense"]


def test_command_backend_section_in_the_config(tmp_path: Path) -> None:
    base = tmp_path / "server.toml"
    text = config_mod.render_new(server_id=bytes(range(1, 17)), listen_port=62201,
                                 backend="command", state_dir=tmp_path / "state")
    base.write_text(text)
    base.chmod(0o600)
    with pytest.raises(ConfigError, match=r"needs a \[command\] table"):
        config_mod.load(base)
    base.write_text(text + f'\n[command]\nallow = ["{TRUE}", "{{address}}"]\nremove = ["{TRUE}"]\n'
                    "timeout = 3\n")
    loaded = config_mod.load(base)
    assert loaded.command is not None and loaded.command.timeout == 3.0
    assert gate_keeper_capabilities("command") == frozenset()


# ---- running ---------------------------------------------------------------------


def test_command_runner_kills_the_process_group_at_the_timeout(tmp_path: Path) -> None:
    child = tmp_path / "child.pid"
    script = (f"import os,subprocess,sys,time\np=subprocess.Popen([sys.executable,'-c',"
              f"'import time; time.sleep(30)'])\nopen({str(child)!r},'w').write(str(p.pid))\n"
              "time.sleep(30)")
    started = time.monotonic()
    outcome = run_command([sys.executable, "-c", script], 1.0)
    assert time.monotonic() - started < 5
    assert not outcome.ok and "timed out" in outcome.problem
    pid = int(child.read_text())
    deadline = time.monotonic() + 3
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        assert time.monotonic() < deadline, "the grandchild outlived the timeout"
        time.sleep(0.05)
    assert run_command(["/bin/sh", "-c", "echo nope >&2; exit 3"], 2).problem == \
        "exit status 3: nope"


def test_a_chatty_command_is_killed_once_its_output_passes_the_bound() -> None:
    """A program that prints more than MAX_OUTPUT (or without end) is ended
    when its output passes the bound, not kept in memory until it stops."""
    much = [sys.executable, "-c", f"import sys; sys.stdout.write('x' * {8 * MAX_OUTPUT})"]
    outcome = run_command(much, 60.0)  # (first: the old code kept all 8 MiB and said ok)
    assert not outcome.ok and "output" in outcome.problem, outcome.problem
    assert len(outcome.output) <= MAX_OUTPUT
    noisy = [sys.executable, "-c", f"import sys; sys.stderr.write('e' * {8 * MAX_OUTPUT})"]
    outcome = run_command(noisy, 60.0)
    assert not outcome.ok and "output" in outcome.problem, outcome.problem
    endless = [sys.executable, "-c", "import sys\nwhile True: sys.stdout.write('x' * 65536)"]
    started = time.monotonic()
    outcome = run_command(endless, 60.0)
    assert not outcome.ok and "output" in outcome.problem, outcome.problem
    assert time.monotonic() - started < 30, "it ran on to its timeout"
    said = [sys.executable, "-c", f"print('1' * {MAX_OUTPUT // 2})"]
    done = run_command(said, 60.0)  # under the bound: all of it
    assert done.ok and len(done.output) == MAX_OUTPUT // 2 + 1


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_command_backend_allows_and_removes_off_the_callers_thread() -> None:
    run = FakeRun()
    found = backend(run)
    found.allow(A, SSH, 1300.0, now=1000.0)
    settle(found)
    assert run.of("add") == [[TRUE, "add", "192.0.2.7", "tcp", "22", "300"]]
    assert found.held(now=1000.0) == {(A, "ssh"): 1300.0}
    found.remove(A, SSH)
    settle(found)
    assert run.of("del") == [[TRUE, "del", "192.0.2.7", "ssh"]]
    assert found.held(now=1000.0) == {}
    found.stop()


def test_a_hung_command_blocks_neither_the_caller_nor_other_grants() -> None:
    run = FakeRun()
    run.hang_on = "443"
    found = backend(run)
    started = time.monotonic()
    found.allow(A, HTTPS, 1300.0, now=1000.0)  # its command hangs
    assert run.hang.wait(2)
    found.allow(B, SSH, 1300.0, now=1000.0)
    assert time.monotonic() - started < 0.5, "allow never waits for a program"
    deadline = time.monotonic() + 2
    while not any("2001:db8::9" in c for c in run.of("add")):
        assert time.monotonic() < deadline, "the other grant waited for the hung command"
        time.sleep(0.01)
    run.release.set()
    found.stop()


def test_commands_of_one_hung_service_leave_a_worker_to_the_others() -> None:
    """As many clients as there are workers knock for a service whose program
    hangs: another service's grant still goes through at once."""
    run = FakeRun()
    run.hang_on = "443"
    found = backend(run)
    for n in range(WORKERS + 2):
        found.allow(ipaddress.ip_address(f"192.0.2.{10 + n}"), HTTPS, 1300.0, now=1000.0)
    assert run.hang.wait(2)
    time.sleep(0.2)  # every worker that may take one of them has
    found.allow(B, SSH, 1300.0, now=1000.0)
    deadline = time.monotonic() + 2
    while not any("2001:db8::9" in c for c in run.of("add")):
        assert time.monotonic() < deadline, "the hung service held every worker"
        time.sleep(0.01)
    run.release.set()
    found.stop()


def test_a_retry_waits_without_holding_a_worker() -> None:
    """Failing allows waiting out their backoff hold no worker: another
    grant is carried out meanwhile, and the retries still come."""
    run = FakeRun()
    addresses = [ipaddress.ip_address(f"192.0.2.{10 + n}") for n in range(WORKERS)]
    run.fail = {str(address) for address in addresses}
    spec = CommandSpec(SPEC.allow, SPEC.remove, (), 2.0, 1, 3.0)
    found = backend(run, spec=spec)
    for address in addresses:
        found.allow(address, SSH, 1300.0, now=1000.0)
    deadline = time.monotonic() + 2
    while len(run.of("add")) < len(addresses):  # every first try failed
        assert time.monotonic() < deadline, "the first tries did not all run"
        time.sleep(0.01)
    found.allow(B, SSH, 1300.0, now=1000.0)
    deadline = time.monotonic() + 2.5  # (before the first retry is due)
    while not any("2001:db8::9" in c for c in run.of("add")):
        assert time.monotonic() < deadline, "the backoffs held every worker"
        time.sleep(0.01)
    settle(found, 10)
    assert len(run.of("add")) == 2 * len(addresses) + 1  # each retried once
    found.stop()


def test_a_failing_command_is_retried_then_given_up_and_reported() -> None:
    run = FakeRun()
    run.fail = {"192.0.2.7"}
    events: list[Event] = []
    found = backend(run)
    found.record = events.append
    found.allow(A, SSH, 1300.0, now=1000.0)
    settle(found)
    assert len(run.of("add")) == 3  # the first try and retries = 2
    assert [(e.outcome, e.action, e.reason) for e in events] == [
        ("command", "allow", "failed")] * 3 + [("command", "allow", "gave_up")]
    metrics = Metrics()
    metrics.observe(events)
    assert metrics.registry.get_sample_value(
        "spa_command_failures_total", {"action": "allow", "reason": "gave_up"}) == 1
    # it may be out there (a failure after the change): the journal keeps it, to remove,
    # but not as wanted, so the next reconcile (a start) tries the allow again
    assert found.held(now=1000.0) == {(A, "ssh"): 0.0}
    run.fail = set()
    reconcile(found, {(A, "ssh"): 1300.0}, SERVICES, now=1000.0)
    settle(found)
    assert len(run.of("add")) == 4
    assert found.held(now=1000.0) == {(A, "ssh"): 1300.0}
    found.stop()


def test_a_retried_allow_gives_the_seconds_left_at_its_try() -> None:
    """{seconds} is rendered for each try: an allow retried after its backoff
    does not give the other firewall's own timeout the seconds the first
    try had (the grant would outlive its lease there by the backoffs)."""
    run = FakeRun()
    run.fail = {"192.0.2.7"}
    now = [1000.0]
    spec = CommandSpec(SPEC.allow, SPEC.remove, (), 2.0, 1, 0.2)
    found = CommandBackend(spec, None, run=run, log=lambda line: None, clock=lambda: now[0])
    found.start(SERVICES, now=1000.0)
    found.allow(A, SSH, 1300.0, now=1000.0)
    deadline = time.monotonic() + 2
    while not run.of("add"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    now[0] = 1100.0  # the clock the retry reads
    settle(found)
    assert [c[-1] for c in run.of("add")] == ["300", "200"]
    found.stop()


def test_a_newer_wish_stops_the_retries_of_an_older_one() -> None:
    run = FakeRun()
    run.fail = {"192.0.2.7"}
    spec = CommandSpec(SPEC.allow, SPEC.remove, (), 2.0, 5, 0.3)
    found = backend(run, spec=spec)
    found.allow(A, SSH, 1300.0, now=1000.0)
    time.sleep(0.1)
    run.fail = set()
    found.remove(A, SSH)  # the lease ended during the backoff
    settle(found)
    assert len(run.of("add")) == 1 and len(run.of("del")) == 1
    assert found.held(now=1000.0) == {}
    found.stop()


def test_a_restart_removes_what_was_added_before_a_crash(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    run = FakeRun()
    first = backend(run, Journal(state))
    first.allow(A, SSH, 1300.0, now=1000.0)
    first.allow(B, HTTPS, 1900.0, now=1000.0)
    settle(first)
    assert (state / JOURNAL).stat().st_mode & 0o777 == 0o600
    # a crash: no stop, no remove.  The next start finds both in the journal, and the
    # list command a leftover the journal never had (added by a run that died earlier)
    run2 = FakeRun()
    run2.listing = {"ssh": "192.0.2.7\n192.0.2.99\n", "https": "2001:db8::9\n192.0.2.99\n"}
    second = backend(run2, Journal(state))
    reconcile(second, {(B, "https"): 1900.0}, SERVICES, now=1400.0)
    settle(second)
    removed = sorted(c[2] for c in run2.of("del"))
    assert removed == ["192.0.2.7", "192.0.2.99", "192.0.2.99"], run2.calls  # ssh and https
    assert run2.of("add") == []  # the live one is kept as it is
    assert Journal(state).load() == {(B, "https"): 1900.0}
    second.stop()


def test_a_crash_while_an_allow_waits_to_be_retried_allows_it_at_the_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An allow that failed and waits out its backoff is in the journal as
    "may be out there, not as wanted": a crash then, and the next start's
    reconcile runs the allow again (it is not taken as done)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    run = FakeRun()
    run.fail = {"192.0.2.7"}
    spec = CommandSpec(SPEC.allow, SPEC.remove, (), 2.0, 3, 30.0)
    first = backend(run, Journal(state), spec=spec)
    first.allow(A, SSH, 1300.0, now=1000.0)
    deadline = time.monotonic() + 2
    while Journal(state).load().get((A, "ssh")) != 0.0:
        assert time.monotonic() < deadline, Journal(state).load()
        time.sleep(0.01)
    assert len(run.of("add")) == 1  # (its retry is 30 s away: the crash comes first)
    run2 = FakeRun()  # the next start, no list command: the journal alone
    second = backend(run2, Journal(state), spec=CommandSpec(SPEC.allow, SPEC.remove))
    reconcile(second, {(A, "ssh"): 1300.0}, SERVICES, now=1000.0)
    settle(second)
    assert [c[2] for c in run2.of("add")] == ["192.0.2.7"]
    assert Journal(state).load() == {(A, "ssh"): 1300.0}
    second.stop()
    monkeypatch.setattr(command_mod, "DRAIN", 0.1)  # (the first's retry: not waited for)
    first.stop()


def test_the_journal_refuses_a_link(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / JOURNAL).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LocalError, match="symbolic link"):
        Journal(state).load()
    Journal(state).save({(A, "ssh"): 1.0})  # the link is replaced, never written through
    assert not (tmp_path / "elsewhere").exists()
    assert not (state / JOURNAL).is_symlink()
    assert Journal(state).load() == {(A, "ssh"): 1.0}


def test_a_journal_others_could_have_written_is_refused(tmp_path: Path) -> None:
    """Its rows become `remove` commands with the gate keeper's credentials
    (a dropped service's row: any protocol and port): a journal that group
    or others may write, or that another user owns, is refused in one line."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    journal = Journal(state)
    journal.save({(A, "ssh"): 1.0})
    (state / JOURNAL).chmod(0o666)
    with pytest.raises(LocalError, match="group or others may write") as raised:
        journal.load()
    assert "\n" not in str(raised.value)
    (state / JOURNAL).chmod(0o644)  # (readable is fine: addresses, no secret)
    assert journal.load() == {(A, "ssh"): 1.0}
    if os.geteuid() == 0:
        os.chown(state / JOURNAL, 65534, 65534)
        with pytest.raises(LocalError, match="belongs to"):
            journal.load()


def test_a_missing_program_stops_the_start() -> None:
    spec = CommandSpec(("/nonexistent/router-allow",), (TRUE,))
    with pytest.raises(LocalError, match="missing or not executable"):
        CommandBackend(spec, None, run=FakeRun()).start(SERVICES, now=0.0)


def test_a_program_another_user_could_change_stops_the_start(tmp_path: Path) -> None:
    """A program (or a directory above it) that another user owns, or that
    every user may write, would run that user's code as the gate keeper: the
    start stops with one line.  A sticky directory (/tmp) is no way in."""
    if os.geteuid() != 0:
        pytest.skip("needs root (chown)")
    def program_in(directory: Path, mode: int) -> str:
        directory.mkdir(mode=0o755)
        directory.chmod(mode)
        program = directory / "router-allow"
        program.write_bytes(Path(TRUE).read_bytes())
        program.chmod(0o755)
        return str(program)
    def start(program: str) -> None:
        spec = CommandSpec((program, "{address}"), (TRUE,))
        CommandBackend(spec, None, run=FakeRun()).start(SERVICES, now=0.0)
    open_to_all = program_in(tmp_path / "shared", 0o777)
    with pytest.raises(LocalError, match="writable by every user") as raised:
        start(open_to_all)
    assert "\n" not in str(raised.value) and "shared" in str(raised.value)
    theirs = program_in(tmp_path / "theirs", 0o755)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(LocalError, match="could be changed by nobody"):
        start(theirs)
    os.chown(tmp_path / "theirs", 65534, 65534)
    os.chown(theirs, 0, 0)  # the file root's, in a directory another user owns
    with pytest.raises(LocalError, match="could be changed by nobody"):
        start(theirs)
    link = tmp_path / "link"
    link.symlink_to(open_to_all)  # through a link: where it leads counts
    with pytest.raises(LocalError, match="writable by every user"):
        start(str(link))
    start(program_in(tmp_path / "sticky", 0o1777))  # others may not replace root's file


def test_gate_with_the_command_backend_says_it_keeps_nothing_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from spa.backends import libnft, teardown
    from spa.cli import app

    path = tmp_path / "server.toml"
    path.write_text(config_mod.render_new(server_id=bytes(range(1, 17)), listen_port=62201,
                                          backend="command", state_dir=tmp_path / "state")
                    + f'\n[command]\nallow = ["{TRUE}"]\nremove = ["{TRUE}"]\n')
    path.chmod(0o600)
    done = CliRunner().invoke(app, ["--config", str(path), "gate"])
    assert done.exit_code == 0, done.output
    assert "keeps nothing in this host's firewall" in done.output
    assert "spa: " not in done.output  # no port is closed here
    assert not (tmp_path / "state").exists()
    done = CliRunner().invoke(app, ["--config", str(path), "check"])
    assert done.exit_code == 2 and "check there" in done.output, done.output
    # --remove takes out this host's tables only (none here) and says where the grants are
    monkeypatch.setattr(teardown, "remove_all", lambda runner: teardown.Removal())
    monkeypatch.setattr(libnft, "default_runner", lambda: None)
    done = CliRunner().invoke(app, ["--config", str(path), "gate", "--remove"])
    assert done.exit_code == 0, done.output
    assert "spa has nothing in the firewall" in done.output
    assert "the command backend's grants are on the firewall its programs drive" in done.output


def test_a_command_gets_a_fixed_environment_no_stdin_and_no_descriptor_of_ours(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPA_SECRET_LOOKALIKE", "do-not-pass")
    kept = os.open(tmp_path / "ours", os.O_CREAT | os.O_RDWR)  # a descriptor of the daemon's
    os.set_inheritable(kept, True)
    try:
        script = ("import os,sys\nprint(sorted(os.environ))\nprint(repr(sys.stdin.read()))\n"
                  "print(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))\n"
                  "print(os.getcwd())")
        monkeypatch.chdir(tmp_path)  # wherever spa-server was started: not the program's
        outcome = run_command([sys.executable, "-I", "-c", script], 5)
    finally:
        os.close(kept)
    assert outcome.ok, outcome.problem
    names, stdin, fds, cwd = outcome.output.splitlines()
    assert cwd == "/"
    assert names == "['LANG', 'LC_CTYPE', 'PATH']" or names == "['LANG', 'PATH']"
    assert stdin == "''"
    assert len(fds.strip("[]").split(", ")) == 4, fds  # 0, 1, 2 and listdir's own


def test_the_gate_keepers_signals_reach_its_programs_as_the_default() -> None:
    """The gate keeper leaves SIGTERM, SIGINT and SIGHUP to the daemon by a
    handler that does nothing, not by ignoring them: an ignored signal would
    stay ignored in every program it runs (a `timeout` or `kill` in the
    admin's script, the unit's stop, could not end them)."""
    from spa.server.runner import GATE_KEEPER_SIGNALS, leave_signals_to_the_daemon

    before = {signum: signal.getsignal(signum) for signum in GATE_KEEPER_SIGNALS}
    try:
        leave_signals_to_the_daemon()
        os.kill(os.getpid(), signal.SIGTERM)  # nothing happens here
        outcome = run_command(["/bin/sh", "-c", "grep SigIgn /proc/self/status"], 5)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    ignored = int(outcome.output.split()[1], 16)
    assert not any(ignored >> (signum - 1) & 1 for signum in GATE_KEEPER_SIGNALS), hex(ignored)


def test_the_journal_may_live_where_the_config_says(tmp_path: Path) -> None:
    table = {"allow": [TRUE], "remove": [TRUE], "journal": "/var/lib/spa-gate/grants.json"}
    assert parse_spec(table).journal == "/var/lib/spa-gate/grants.json"
    with pytest.raises(ValueError, match="absolute path of a file"):
        parse_spec({**table, "journal": "grants.json"})
    elsewhere = tmp_path / "gate"
    elsewhere.mkdir(mode=0o700)
    Journal(elsewhere, "grants.json").save({(A, "ssh"): 5.0})
    assert Journal(elsewhere, "grants.json").load() == {(A, "ssh"): 5.0}


@pytest.mark.skipif(os.geteuid() != 0, reason="root writing in another user's directory")
def test_a_journal_the_gate_keeper_may_not_write_stops_the_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)  # the daemon's, and the gate keeper runs as root
    with pytest.raises(LocalError, match="another user controls"):
        backend(FakeRun(), Journal(state))


def test_a_grant_gone_from_the_firewall_is_allowed_again_at_the_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    Journal(state).save({(A, "ssh"): 1300.0})
    run = FakeRun()
    run.listing = ""  # someone removed it on the router
    found = backend(run, Journal(state))
    reconcile(found, {(A, "ssh"): 1300.0}, SERVICES, now=1000.0)
    settle(found)
    assert [c[2] for c in run.of("add")] == ["192.0.2.7"]
    found.stop()


def test_a_list_of_many_addresses_spa_never_added_is_taken_in_part() -> None:
    """A list command that names tens of thousands of addresses the journal
    does not hold (a hostile router, a list of rules not spa's) adds at most
    MAX_LEFTOVERS of them to remove, said in one line: each removal rewrites
    the journal, so all of them would cost the square of their number."""
    run = FakeRun()
    run.listing = "\n".join(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in range(20000))
    lines: list[str] = []
    found = CommandBackend(SPEC, None, run=run, log=lines.append, clock=lambda: 1000.0)
    found.start(SERVICES, now=1000.0)
    held = found.held(now=1000.0)
    assert len([key for key in held if key[1] == "ssh"]) == MAX_LEFTOVERS
    assert any("20000 addresses" in line and f"first {MAX_LEFTOVERS}" in line
               for line in lines), lines
    found.stop()


class FullJournal(Journal):
    """A journal whose writes fail after the start's (a full disk)."""
    full = False

    def save(self, held: Held, services: Mapping[str, Service] | None = None) -> None:
        if self.full:
            raise LocalError(f"cannot write the command journal {self.path}: disk full")
        super().save(held, services)


def test_an_allow_the_journal_cannot_record_is_not_run(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    journal = FullJournal(state)
    run = FakeRun()
    lines: list[str] = []
    events: list[Event] = []
    found = CommandBackend(SPEC, journal, run=run, log=lines.append, clock=lambda: 1000.0)
    found.start(SERVICES, now=1000.0)
    found.record = events.append
    journal.full = True
    found.allow(A, SSH, 1300.0, now=1000.0)
    settle(found)
    assert run.of("add") == [], "allow ran with no record on disk"
    assert found.held(now=1000.0) == {}
    assert [(e.outcome, e.action, e.reason) for e in events] == [("command", "allow", "journal")]
    assert any("not run" in line for line in lines), lines
    metrics = Metrics()
    metrics.observe(events)
    assert metrics.registry.get_sample_value(
        "spa_command_failures_total", {"action": "allow", "reason": "journal"}) == 1
    journal.full = False  # the disk has room again: the next wish goes out
    found.allow(A, SSH, 1300.0, now=1000.0)
    settle(found)
    assert len(run.of("add")) == 1 and Journal(state).load() == {(A, "ssh"): 1300.0}
    found.stop()


def test_a_restart_removes_the_grants_of_a_service_gone_from_the_config(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    run = FakeRun()
    first = backend(run, Journal(state))
    first.allow(A, SSH, 1300.0, now=1000.0)
    first.allow(B, HTTPS, 1300.0, now=1000.0)
    settle(first)
    first.stop()  # no flush: both stay on the router
    rows = json.loads((state / JOURNAL).read_text())["grants"]
    assert sorted(rows) == [["192.0.2.7", "ssh", 1300.0, "tcp", 22],
                            ["2001:db8::9", "https", 1300.0, "tcp", 443]]
    # the admin dropped [services.https] and restarted
    run2 = FakeRun()
    spec = CommandSpec(SPEC.allow, (TRUE, "del", "{address}", "{protocol}", "{port}"),
                       (), 2.0, 0, 0.0)
    second = CommandBackend(spec, Journal(state), run=run2, log=lambda line: None,
                            clock=lambda: 1000.0)
    second.start({"ssh": SSH}, now=1000.0)
    reconcile(second, {(A, "ssh"): 1300.0}, {"ssh": SSH}, now=1000.0)
    settle(second)
    assert run2.of("del") == [[TRUE, "del", "2001:db8::9", "tcp", "443"]], run2.calls
    assert Journal(state).load() == {(A, "ssh"): 1300.0}  # and forgotten
    second.stop()


def test_an_older_journal_without_ports_is_still_read(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / JOURNAL).write_text(json.dumps({"grants": [["192.0.2.7", "ssh", 1300.0],
                                                        ["2001:db8::9", "gone", 1300.0]]}))
    assert Journal(state).load() == {(A, "ssh"): 1300.0, (B, "gone"): 1300.0}
    lines: list[str] = []
    run = FakeRun()
    found = CommandBackend(SPEC, Journal(state), run=run, log=lines.append, clock=lambda: 1000.0)
    found.start({"ssh": SSH}, now=1000.0)
    settle(found)
    assert run.of("del") == [] and any("gone" in line and "by hand" in line for line in lines)
    found.stop()


def test_a_journal_row_with_a_bad_name_or_end_is_skipped(tmp_path: Path) -> None:
    """A row's service name reaches the log (a dropped service is named in a
    line), its end the reconcile: a name that is no service name (a newline
    and a forged log line) or an end that is no finite time is skipped."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / JOURNAL).write_text(json.dumps({"grants": [
        ["192.0.2.7", "ssh", 1300.0],
        ["192.0.2.8", "gone\nerror forged line", 1300.0],
        ["192.0.2.9", "ssh", "nan"], ["192.0.2.10", "ssh", "inf"], ["192.0.2.11", "ssh", True],
        ["192.0.2.12", ["ssh"], 1300.0]]}))
    assert Journal(state).load() == {(A, "ssh"): 1300.0}
    lines: list[str] = []
    found = CommandBackend(SPEC, Journal(state), run=FakeRun(), log=lines.append,
                           clock=lambda: 1000.0)
    found.start({"ssh": SSH}, now=1000.0)
    found.stop()
    assert not any("\n" in line or "forged" in line for line in lines), lines


@pytest.mark.parametrize("text", ['{"grants": [["192.0.2.7", "ssh", 13', "\xff\xfe",
                                  '{"grants": ' + "[" * 100000 + "]" * 100000 + "}"],
                         ids=["truncated", "not-utf8", "nested-deep"])
def test_a_damaged_journal_is_one_line(text: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / JOURNAL).write_bytes(text.encode("latin-1"))
    with pytest.raises(LocalError, match="not one spa wrote") as raised:
        Journal(state).load()
    assert "\n" not in str(raised.value)


THREE = {name: Service(name, "tcp", port, 30, 300) for name, port in
         (("ssh", 22), ("https", 443), ("db", 5432))}


def test_the_starts_list_commands_run_at_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    spec = CommandSpec((TRUE,), (TRUE,), ("/bin/sleep", "100"), 1.0, 0, 0.0)  # a slow router
    lines: list[str] = []
    found = CommandBackend(spec, Journal(state), log=lines.append)
    found.start(THREE, now=time.time())
    started = time.monotonic()
    assert found.held(now=time.time()) == {}
    took = time.monotonic() - started
    assert took < 2.5, f"{took:.1f} s: the lists ran one after another (3 x 1 s)"
    found.stop()


def test_the_starts_list_commands_have_one_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    from spa.backends import command

    monkeypatch.setattr(command, "LIST_DEADLINE", 0.5)
    run = FakeRun()
    run.hang_on = "https"  # its router never answers (and its timeout is 300 s)
    run.listing = {"ssh": "192.0.2.99\n"}
    lines: list[str] = []
    spec = CommandSpec(SPEC.allow, SPEC.remove, SPEC.list, 300.0, 0, 0.0)
    found = CommandBackend(spec, None, run=run, log=lines.append, clock=lambda: 1000.0)
    found.start(SERVICES, now=1000.0)
    started = time.monotonic()
    held = found.held(now=1000.0)
    assert time.monotonic() - started < 2
    assert held == {(ipaddress.ip_address("192.0.2.99"), "ssh"): 0.0}  # the one that answered
    assert any("service=https: not done within 0.5 s" in line for line in lines), lines
    run.release.set()
    found.stop()
