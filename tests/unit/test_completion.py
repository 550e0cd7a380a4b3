"""Shell completion (spa.completion): the committed scripts complete in a real
bash, the programs answer the shells' questions from their own command tree,
and `completion SHELL` prints the committed script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer._click.shell_completion import CompletionItem

from spa import completion
from spa.core.keys import MASTER_SECRET_SIZE, SERVER_ID_SIZE
from spa.core.uri import Enrollment, ServiceRef
from spa_client.profile import ProfileStore

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PROGRAMS = {"spa-server": "spa.cli", "spa-client": "spa_client.cli"}


def programs_installed() -> None:
    if not all((BIN / program).is_file() for program in PROGRAMS):
        pytest.skip(f"spa-server and spa-client are not installed in {BIN} (pip install -e .)")


def bash_complete(line: str, env: dict[str, str] | None = None) -> list[str]:
    """COMPREPLY after TAB at the end of `line`, with the committed script sourced
    in a real bash (the programs found on PATH, as a user's shell finds them)."""
    programs_installed()
    program = line.split()[0]
    script = ROOT / "contrib" / "completion" / f"{program}.bash"
    words = line.split(" ")
    func = "_" + program.replace("-", "_") + "_completion"
    quoted = " ".join(f"'{word}'" for word in words)
    shell = (f"source {script}\nCOMP_WORDS=({quoted})\nCOMP_CWORD={len(words) - 1}\n"
             f"{func} {program} '{words[-1]}' '{words[-2]}'\n"
             'printf "%s\\n" "${COMPREPLY[@]}"\n')
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", shell], text=True,
                          capture_output=True, timeout=60, check=False,
                          env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
                               **(env or {})})
    assert done.returncode == 0, done.stderr
    return [word for word in done.stdout.split("\n") if word]


def answer(program: str, shell: str, line: str, env: dict[str, str] | None = None) -> str:
    """What `program` answers the `shell` script's question for `line`."""
    words = line.split(" ")
    done = subprocess.run([sys.executable, "-c", f"from {PROGRAMS[program]} import main; main()"],
                          text=True, capture_output=True, timeout=60, check=False,
                          env={**os.environ, **(env or {}), "COMP_WORDS": line,
                               "COMP_CWORD": str(len(words) - 1),
                               completion.env_var(program): f"complete_{shell}"})
    assert (done.returncode, done.stderr) == (0, "")
    return done.stdout


@pytest.fixture
def profiles(tmp_path: Path) -> dict[str, str]:
    """Two profiles: box (ssh, imaps) and web (https); the variable that finds them."""
    store = ProfileStore(tmp_path)
    secret, server_id = bytes(MASTER_SECRET_SIZE), bytes(SERVER_ID_SIZE)
    store.save("box", Enrollment("192.0.2.10", 62201, server_id, "alice", secret,
                                 (ServiceRef("ssh", "tcp", 22), ServiceRef("imaps", "tcp", 993))))
    store.save("web", Enrollment("198.51.100.7", 62201, server_id, "alice", secret,
                                 (ServiceRef("https", "tcp", 443),)))
    return {"SPA_CLIENT_DIR": str(tmp_path)}


def test_bash_completes_a_server_command() -> None:
    assert bash_complete("spa-server enr") == ["enroll"]
    assert bash_complete("spa-server clients s") == ["set"]
    assert "--service" in bash_complete("spa-server enroll alice --ser")


def test_bash_completes_client_commands_and_the_completion_shells() -> None:
    assert bash_complete("spa-client op") == ["open"]
    assert bash_complete("spa-client completion ") == ["bash", "zsh"]
    assert bash_complete("spa-server completion z") == ["zsh"]


def test_bash_offers_the_services_then_the_profiles_for_open(
        profiles: dict[str, str]) -> None:
    assert bash_complete("spa-client open ", profiles) == ["https", "imaps", "ssh"]
    assert bash_complete("spa-client open i", profiles) == ["imaps"]
    assert bash_complete("spa-client open ssh ", profiles) == ["box"]  # web has no ssh
    assert bash_complete("spa-client close https ", profiles) == ["web"]
    assert bash_complete("spa-client forget ", profiles) == ["box", "web"]


def test_client_completion_reads_the_config_dir_typed_on_the_line(
        profiles: dict[str, str], tmp_path: Path) -> None:
    line = f"spa-client --config-dir {profiles['SPA_CLIENT_DIR']} open ssh "
    assert bash_complete(line, {"SPA_CLIENT_DIR": str(tmp_path / "none")}) == ["box"]


def test_client_completion_skips_what_it_cannot_read(profiles: dict[str, str]) -> None:
    (Path(profiles["SPA_CLIENT_DIR"]) / "profiles" / "web.toml").chmod(0o644)  # refused
    (Path(profiles["SPA_CLIENT_DIR"]) / "profiles" / "bad.toml").write_text("uri = 1")
    os.chmod(Path(profiles["SPA_CLIENT_DIR"]) / "profiles" / "bad.toml", 0o600)
    assert bash_complete("spa-client forget ", profiles) == ["box"]
    assert bash_complete("spa-client forget ", {"SPA_CLIENT_DIR": "/nonexistent"}) == []


def test_zsh_gets_each_value_with_its_help(profiles: dict[str, str]) -> None:
    assert answer("spa-client", "zsh", "spa-client open ssh ", profiles) == \
        "plain\nbox\nalice at 192.0.2.10:62201\n"
    assert answer("spa-server", "zsh", "spa-server completion b") == "plain\nbash\n_\n"
    assert answer("spa-server", "zsh", "spa-server ena") == "\n"  # nothing: the script's _files
    out = answer("spa-server", "zsh", "spa-server enr").split("\n")
    assert out[:3] == ["plain", "enroll", "Enroll a client: create its secret and..."]


def test_a_colon_in_a_described_value_is_escaped_for_zsh() -> None:
    item = CompletionItem("a:b", help="two\n lines")
    assert completion.ZshComplete.format_completion(None, item) == "plain\na\\:b\ntwo lines"  # type: ignore[arg-type]
    item = CompletionItem("a:b")
    assert completion.ZshComplete.format_completion(None, item) == "plain\na:b\n_"  # type: ignore[arg-type]


@pytest.mark.parametrize("program", sorted(PROGRAMS))
@pytest.mark.parametrize("shell", completion.SHELLS)
def test_completion_command_prints_the_committed_script(program: str, shell: str) -> None:
    done = subprocess.run([sys.executable, "-c", f"from {PROGRAMS[program]} import main; main()",
                           "completion", shell], text=True, capture_output=True, timeout=60,
                          check=False)
    assert (done.returncode, done.stderr) == (0, "")
    name = f"{program}.bash" if shell == "bash" else f"_{program}"
    assert done.stdout == (ROOT / "contrib" / "completion" / name).read_text()
    assert done.stdout == completion.script(program, shell)


def test_completion_of_another_shell_is_one_line_and_status_2() -> None:
    done = subprocess.run([sys.executable, "-c", "from spa.cli import main; main()",
                           "completion", "fish"], text=True, capture_output=True, timeout=60,
                          check=False)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "spa-server: error: shell 'fish': bash or zsh\n"


@pytest.mark.parametrize("name", ["_spa-server", "_spa-client"])
def test_the_zsh_scripts_parse(name: str) -> None:
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed (apt-get install zsh)")
    done = subprocess.run(["zsh", "-n", str(ROOT / "contrib" / "completion" / name)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")
