"""`spa-client ssh-config` (issue 16): the ProxyCommand works in a new shell,
where neither --config-dir nor $SPA_CLIENT_DIR is set, whatever the path."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from spa.core.keys import MASTER_SECRET_SIZE, SERVER_ID_SIZE
from spa.core.uri import Enrollment, ServiceRef
from spa_client import cli
from spa_client import profile as profile_mod
from spa_client.profile import ProfileStore
from spa_client.sshconfig import SshConfigError, proxy_command, quote

ENROLLMENT = Enrollment("srv.example", 62201, bytes(SERVER_ID_SIZE), "alice",
                        bytes(MASTER_SECRET_SIZE), (ServiceRef("ssh", "tcp", 22),))
ODD = "a 100% odd dir `x` #1 ~ (a);b&c*?"


def as_ssh_runs_it(line: str, host: str = "srv.example", port: str = "22") -> list[str]:
    """The argv ssh's ProxyCommand becomes: ssh expands %h, %p and %%, then
    `sh -c 'exec ...'` splits the words."""
    value = line.strip().removeprefix("ProxyCommand ")
    expanded = value.replace("%h", host).replace("%p", port).replace("%%", "%")
    done = subprocess.run(["sh", "-c", f"exec {sys.executable} -c 'import json,sys; "
                           f"print(json.dumps(sys.argv[1:]))' {expanded}"],
                          capture_output=True, text=True, check=True)
    import json

    found: list[str] = json.loads(done.stdout)
    return found


def test_a_path_with_spaces_percent_and_shell_words_survives_ssh_and_the_shell() -> None:
    line = proxy_command(f"/opt/{ODD}/spa-client", Path(f"/home/a/{ODD}"))
    assert as_ssh_runs_it(line) == [f"/opt/{ODD}/spa-client", "--config-dir", f"/home/a/{ODD}",
                                    "connect", "srv.example", "22"]
    assert proxy_command("spa-client", None) == "spa-client connect %h %p"


@pytest.mark.parametrize("odd", ["it's", 'a "b"', "x\\'y", "end\\", "$HOME", "$(id)", "hi!"])
def test_a_character_some_shell_reads_inside_single_quotes_is_refused(odd: str) -> None:
    """fish reads \\' inside single quotes as a quote (a path ending
    `\\'"(touch x) #` ran a command there), csh expands ! and $: the
    words are single-quoted only when every shell takes them literally."""
    with pytest.raises(SshConfigError, match="not every shell reads"):
        quote(f"/home/a/{odd}")


def test_the_quoting_is_single_quotes_alone() -> None:
    quoted = quote(f"/home/a/{ODD}")
    assert quoted.startswith("'") and quoted.endswith("'") and quoted.count("'") == 2
    assert "\\" not in quoted


def test_a_line_break_in_a_path_is_refused() -> None:
    with pytest.raises(SshConfigError, match="control character"):
        quote("/tmp/a\nHost *")


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    app = typer.Typer()
    app.callback()(cli._root)
    for name, function in cli._COMMANDS.items():
        app.command(name=name)(function)
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.output


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's own config directory, in tmp_path."""
    monkeypatch.setattr(profile_mod, "user_dir", lambda: tmp_path / "user-default")
    monkeypatch.delenv("SPA_CLIENT_DIR", raising=False)
    return tmp_path / "user-default"


def proxy_line(output: str) -> str:
    return next(line for line in output.splitlines() if "ProxyCommand" in line)


def test_a_profile_found_through_the_environment_is_named_in_the_proxycommand(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SPA_CLIENT_DIR set in this shell only: the ProxyCommand must carry it."""
    elsewhere = tmp_path / ODD
    ProfileStore(elsewhere).save("srv", ENROLLMENT)
    code, out = run("ssh-config", "srv", env={"SPA_CLIENT_DIR": str(elsewhere)})
    assert code == 0, out
    argv = as_ssh_runs_it(proxy_line(out))
    assert argv[1:3] == ["--config-dir", str(elsewhere)]


def test_a_relative_config_dir_is_written_absolute(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ProfileStore(tmp_path / "rel").save("srv", ENROLLMENT)
    monkeypatch.chdir(tmp_path)
    code, out = run("--config-dir", "rel", "ssh-config", "srv")
    assert code == 0, out
    assert as_ssh_runs_it(proxy_line(out))[1:3] == ["--config-dir", str(tmp_path / "rel")]


def test_the_default_directory_is_left_out(home: Path) -> None:
    ProfileStore(home).save("srv", ENROLLMENT)
    for args in (("ssh-config", "srv"), ("--config-dir", str(home), "ssh-config", "srv")):
        code, out = run(*args)
        assert code == 0, out
        assert "--config-dir" not in proxy_line(out)


def test_the_program_is_named_by_its_absolute_path_unless_it_is_the_one_on_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    program = tmp_path / "venv bin" / "spa-client"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(program)])
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cli._program_path() == str(program)
    monkeypatch.setenv("PATH", str(program.parent))
    assert cli._program_path() == "spa-client"
    assert shlex.split(proxy_command(cli._program_path(), None))[0] == "spa-client"
