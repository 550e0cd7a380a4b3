"""contrib/server.toml.example (shipped in the Debian package) never drifts
from the loader: every option is in it, each with its default, and the file
(with its commented-out settings put in) loads with spa/server/config.py."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from spa.server import config as config_mod
from spa.server.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "contrib" / "server.toml.example"
SHOWN = "#~ "  # a setting shown commented out


def uncommented(text: str) -> str:
    return "\n".join(line.removeprefix(SHOWN) for line in text.splitlines()) + "\n"


def keys_set(text: str) -> set[str]:
    return set(re.findall(r"^(?:#~ )?([a-z_]+) = ", text, re.MULTILINE))


def test_the_example_names_every_option_the_loader_knows() -> None:
    text = EXAMPLE.read_text()
    known = (config_mod._SERVER_KEYS | config_mod._SERVICE_KEYS | config_mod._CLIENT_KEYS
             | {"listen", "database"})
    assert keys_set(text) == known
    for section in ("[server]", "[metrics]", "[geoip]", "[dashboard]", "[services.ssh]",
                    "#~ [clients."):
        assert section in text


def test_each_setting_has_a_comment_line_above_it() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^(?:#~ )?[a-z_]+ = ", line) and line.split(" = ")[0].lstrip("#~ ") not in (
                "protocol", "port", "default_duration", "max_duration", "services", "kind"):
            above = lines[number - 1]
            assert above.startswith("# "), f"line {number + 1}: {line!r} has no comment"


def test_the_example_loads_and_says_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(uncommented(EXAMPLE.read_text()))
    path.chmod(0o600)
    loaded = config_mod.load(path)
    defaults = config_mod.ServerConfig(path=path, server_id=bytes(16))
    for field in dataclasses.fields(config_mod.ServerConfig):
        if field.name != "clients":
            assert getattr(loaded, field.name) == getattr(defaults, field.name), field.name
    assert sorted(loaded.clients) == ["alice-laptop", "old-fwknop-user"]
    assert loaded.clients["alice-laptop"].sources == ("203.0.113.0/24", "2001:db8::/48")


def test_as_shipped_it_is_not_a_config_to_copy(tmp_path: Path) -> None:
    """Without init's server_id it does not load: nobody runs a server with
    the example's."""
    path = tmp_path / "server.toml"
    path.write_text(EXAMPLE.read_text())
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="has no server_id; create the file with: spa-server"):
        config_mod.load(path)
