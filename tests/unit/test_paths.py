"""Paths (issue 16): where init puts the state when not told, a relative
state_dir, the instance a templated unit runs, and --help naming each
path's environment variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from spa.backends.names import DEFAULT_NAMES
from spa.server import admin
from spa.server.config import DEFAULT_STATE_DIR, default_state_dir, load
from spa.server.errors import LocalError
from spa.server.runner import check_unit_instance


def test_init_beside_a_config_outside_etc_keeps_the_state_next_to_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A try-out without /etc needs no root: init --config ./server.toml puts
    the state in ./server-state (absolute in the file), and says so."""
    from spa.cli import app

    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(app, ["--config", "./server.toml", "init", "--backend", "memory"])
    assert done.exit_code == 0, done.output
    config = load(tmp_path / "server.toml")
    assert config.state_dir == tmp_path / "server-state"
    assert f"state in {tmp_path / 'server-state'} ([server] state_dir)" in done.output
    assert not (tmp_path / "server-state").exists()  # made by the first command that needs it
    assert config.names == DEFAULT_NAMES


def test_the_system_config_keeps_var_lib_spa_and_an_instance_gets_its_own() -> None:
    assert default_state_dir(Path("/etc/spa/server.toml")) == DEFAULT_STATE_DIR
    assert default_state_dir(Path("/etc/spa/site1.toml"), "site1") == Path("/var/lib/spa/site1")
    assert default_state_dir(Path("/srv/x/site2.toml")) == Path("/srv/x/site2-state")


def test_a_relative_state_dir_is_beside_the_config_file_wherever_the_command_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "conf" / "server.toml"
    path.parent.mkdir()
    admin.init(path, listen_port=62201, backend="memory", state_dir=tmp_path, force=False)
    text = path.read_text().replace(f'state_dir = "{tmp_path}"', 'state_dir = "state"')
    path.write_text(text)
    monkeypatch.chdir("/")
    assert load(path).state_dir == tmp_path / "conf" / "state"
    monkeypatch.chdir(tmp_path / "conf")
    assert load(Path("server.toml")).state_dir == tmp_path / "conf" / "state"


def test_init_with_an_instance_writes_it_and_its_state_dir(tmp_path: Path) -> None:
    path = tmp_path / "site1.toml"
    admin.init(path, listen_port=62202, backend="memory", state_dir=None, force=False,
               instance="site1")
    config = load(path)
    assert config.instance == "site1" and config.names.table == "spa_site1"
    assert config.state_dir == tmp_path / "site1-state"
    with pytest.raises(LocalError, match="--instance 'hold'"):
        admin.init(tmp_path / "x.toml", listen_port=1, backend="memory", state_dir=None,
                   force=False, instance="hold")


def test_a_templated_unit_refuses_a_config_of_another_instance_in_one_line(
        tmp_path: Path) -> None:
    path = tmp_path / "site1.toml"
    admin.init(path, listen_port=62202, backend="memory", state_dir=None, force=False)
    config = load(path)
    check_unit_instance(config, {})  # not run by the templated unit: any instance
    with pytest.raises(LocalError) as info:
        check_unit_instance(config, {"SPA_INSTANCE": "site1"})
    assert 'spa-server@site1.service runs it, but its [server] instance is \'\': set ' \
        'instance = "site1"' in str(info.value)
    check_unit_instance(load(path), {"SPA_INSTANCE": ""})


def test_help_names_the_environment_variable_of_every_path() -> None:
    from spa.cli import app

    done = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "SPA_SERVER_CONFIG" in done.output
    from spa_client.cli import app as client_app

    done = CliRunner().invoke(client_app, ["--help"], env={"COLUMNS": "200"})
    assert "SPA_CLIENT_DIR" in done.output


def test_the_paths_table_names_every_default_path_and_its_override() -> None:
    """docs/install.md, "Paths", is the one place: each default the code has
    is in it, with the option or variable that moves it."""
    from spa.server.config import DEFAULT_CONFIG
    from spa.server.fwknopd_files import DEFAULT_ACCESS, DEFAULT_CONF
    from spa.server.state import RUN_DIR
    from spa_client.profile import ENV_DIR

    docs = Path(__file__).resolve().parents[2] / "docs" / "install.md"
    table = docs.read_text().split("## 10. Paths", 1)[1]
    for needed in (str(DEFAULT_CONFIG), "SPA_SERVER_CONFIG", "--config FILE",
                   str(DEFAULT_STATE_DIR), "[server] state_dir", "--state-dir", str(RUN_DIR),
                   str(DEFAULT_ACCESS), str(DEFAULT_CONF), "--access FILE", "--conf FILE", ENV_DIR,
                   "--config-dir DIR", "~/.config/spa-client", "NAME-state"):
        assert f"{needed}" in table, needed
