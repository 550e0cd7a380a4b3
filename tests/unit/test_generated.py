"""The man pages and completion scripts in contrib/ are what the command
definitions make now (spa.generated), the man pages cover every command and
option, and they render without a warning."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer.main

from spa import generated, manpage
from spa.server.config import DEFAULT_CONFIG, DEFAULT_STATE_DIR

ROOT = Path(__file__).resolve().parents[2]
MAN_PAGES = ("contrib/man/spa-server.8", "contrib/man/spa-client.1")


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    return generated.render_all()


def test_committed_files_are_what_the_generator_makes_now(files: dict[str, str]) -> None:
    assert sorted(files) == sorted([*MAN_PAGES, "contrib/completion/spa-server.bash",
                                    "contrib/completion/_spa-server",
                                    "contrib/completion/spa-client.bash",
                                    "contrib/completion/_spa-client"])
    differ = generated.stale(ROOT, files)
    if differ:
        pytest.fail(f"{', '.join(differ)} out of date; regenerate with: "
                    f".venv/bin/{generated.COMMAND}", pytrace=False)


def test_the_drift_check_can_fail(files: dict[str, str], tmp_path: Path) -> None:
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    assert generated.stale(tmp_path, files) == []
    page = tmp_path / MAN_PAGES[0]
    page.write_text(page.read_text().replace("\\-\\-listen\\-port", "\\-\\-port"))
    (tmp_path / "contrib/completion/_spa-client").unlink()
    assert generated.stale(tmp_path, files) == [MAN_PAGES[0], "contrib/completion/_spa-client"]


def test_the_output_does_not_depend_on_when_or_where(files: dict[str, str],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setenv("SPA_CLIENT_DIR", str(tmp_path))
    assert generated.render_all() == files
    assert all(str(tmp_path) not in text for text in files.values())


def _commands(app: Any, program: str) -> list[tuple[str, Any, Any]]:
    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name=program)
    return [(program, root, ctx)] + [(c_ctx.command_path, c, c_ctx)
                                     for c, c_ctx in manpage._walk(root, ctx)]


@pytest.mark.parametrize("page", ["server", "client"])
def test_the_man_page_names_every_command_option_and_argument(page: str,
                                                              files: dict[str, str]) -> None:
    made = (generated.server_page if page == "server" else generated.client_page)("0")
    text = files[MAN_PAGES[0] if page == "server" else MAN_PAGES[1]]
    commands = _commands(made.app, made.program)
    assert len(commands) >= (18 if page == "server" else 10)
    for path, command, ctx in commands:
        if path != made.program:
            assert f'.SS "{manpage.escape(path)} ' in text, path
        for param in command.get_params(ctx):
            if param.param_type_name == "argument":
                name = manpage._metavar(param, ctx).strip("[]")
                assert f"\\fI{manpage.escape(name)}\\fR" in text, path
            elif "--help" not in param.opts:
                for name in param.opts:
                    assert f"\\fB{manpage.escape(name)}\\fR" in text, (path, name)
                if param.help:
                    first = " ".join(param.help.split()[:2])
                    assert manpage.escape(first) in text.replace("\n", " "), (path, first)


def test_the_server_page_lists_its_variables_and_files(files: dict[str, str]) -> None:
    text = files[MAN_PAGES[0]]
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "ENVIRONMENT",
                    "FILES", "EXIT STATUS", "SEE ALSO"):
        assert f"\n.SH {section}\n" in text
    environment = text.split(".SH ENVIRONMENT")[1].split(".SH FILES")[0]
    assert "SPA_SERVER_CONFIG" in environment  # from --config's envvar=
    assert manpage.escape(str(DEFAULT_CONFIG)) in text.split(".SH FILES")[1]
    assert manpage.escape(str(DEFAULT_STATE_DIR)) in text.split(".SH FILES")[1]
    assert '.TH "SPA\\-SERVER" "8"' in text
    assert "SPA_CLIENT_DIR" in files[MAN_PAGES[1]].split(".SH ENVIRONMENT")[1]


def test_roff_escapes_dashes_backslashes_and_leading_dots() -> None:
    assert manpage.escape("--from a\\b") == "\\-\\-from a\\eb"
    assert manpage.escape("\\[dashboard] listen") == "[dashboard] listen"  # typer's rich escape
    lines = manpage.fill("word " * 30 + ".fwknoprc first")
    assert all(len(line) <= 80 for line in lines)
    assert manpage.fill(".fwknoprc stanza") == ["\\&.fwknoprc stanza"]
    assert manpage.fill("'quoted' text") == ["\\&'quoted' text"]
    assert manpage.fill("   ") == []


@pytest.mark.parametrize("page", MAN_PAGES)
def test_the_man_page_renders_without_warnings(page: str) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (apt-get install groff-base)")
    done = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(ROOT / page)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    if shutil.which("lexgrog"):  # man-db reads the NAME line for whatis and apropos
        done = subprocess.run(["lexgrog", str(ROOT / page)], capture_output=True, text=True,
                              timeout=60, check=False)
        program = Path(page).stem
        assert done.stdout.strip() == (f'{ROOT / page}: "{program} - single-packet '
                                       f'authorization {program.removeprefix("spa-")}"')
    if shutil.which("mandoc"):
        done = subprocess.run(["mandoc", "-Tlint", "-Wwarning", str(ROOT / page)],
                              capture_output=True, text=True, timeout=60, check=False)
        # the one warning: no date in .TH (a date would change the page every day)
        warnings = [line for line in done.stdout.splitlines() if "missing date" not in line]
        assert warnings == []


def test_registering_the_client_commands_again_adds_none_twice() -> None:
    from spa_client import cli

    cli.register_commands(["open"])
    cli.register_commands([])
    cli.register_commands([])
    names = [str(info.name) for info in cli.app.registered_commands]
    assert sorted(names) == sorted(cli._COMMANDS)
