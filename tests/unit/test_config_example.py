"""contrib/server.toml.example (shipped in the Debian package) never drifts
from the loader: every option is in it, each with its default, and the file
(with its commented-out settings put in) loads with spa/server/config.py."""

from __future__ import annotations

import dataclasses
import os
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


PLACEHOLDER = re.compile(r'^((?:#~ )?([a-z_]+) = )"(A+)"$', re.MULTILINE)  # zero bytes
KEYS = {"server_id", "secret", "old_secret", "fwknop_key", "fwknop_hmac_key"}


def with_random_keys(text: str, *, keep: str = "") -> str:
    """The example, each placeholder key (but those named `keep`) replaced
    by random bytes of its size."""
    def fresh(found: re.Match[str]) -> str:
        if found.group(2) == keep:
            return found.group(0)
        size = len(config_mod.b64decode(found.group(3), len(found.group(3)) * 3 // 4, "key"))
        return f'{found.group(1)}"{config_mod.b64encode(os.urandom(size))}"'

    return PLACEHOLDER.sub(fresh, text)


def test_the_example_loads_and_says_the_defaults(tmp_path: Path) -> None:
    """With its settings put in and a random key for each placeholder."""
    path = tmp_path / "server.toml"
    path.write_text(with_random_keys(uncommented(EXAMPLE.read_text())))
    path.chmod(0o600)
    loaded = config_mod.load(path)
    defaults = config_mod.ServerConfig(path=path, server_id=loaded.server_id)
    for field in dataclasses.fields(config_mod.ServerConfig):
        if field.name not in ("clients", "services"):
            assert getattr(loaded, field.name) == getattr(defaults, field.name), field.name
    gateway = loaded.services["db-ssh"]  # the one service shown commented out
    assert {**loaded.services, "db-ssh": None} == {**defaults.services, "db-ssh": None}
    assert (str(gateway.host), gateway.port, gateway.listen_port) == ("10.20.0.5", 22, 2222)
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


def test_every_key_it_shows_is_a_placeholder_no_server_loads(tmp_path: Path) -> None:
    """Review of issue 16, F8: "remove the '#~ ' to use one" put a key of
    zero bytes, known to everyone, into a working config.  Each one shown
    is refused in one line naming it and what to do instead."""
    text = uncommented(EXAMPLE.read_text())
    shown = {found.group(2) for found in PLACEHOLDER.finditer(text)}
    assert shown == KEYS
    path = tmp_path / "server.toml"
    for key in sorted(KEYS):
        path.write_text(with_random_keys(text, keep=key))
        path.chmod(0o600)
        with pytest.raises(ConfigError, match=rf"] {key} is all zero bytes \(the example's "
                           r"placeholder, a key anyone knows\); \w"):
            config_mod.load(path)
