"""Gateway services that would fight over one rule are refused at load
(spa/server/gwclash.py): each case once as a clash, once as its nearest
config that is fine."""

from __future__ import annotations

from pathlib import Path

import pytest

from spa.server.config import load
from spa.server.errors import ConfigError

HEAD = """
[server]
server_id = "q83vEjRWeJCrze8SNFZ4kA=="
listen_port = 62201
fwknop_port = 62202
backend = "nftables"

[services.ssh]
port = 22
default_duration = 30
max_duration = 60

[services.db]
host = "10.20.0.5"
port = 5432
default_duration = 30
max_duration = 60
"""


def config(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(HEAD + extra)
    path.chmod(0o600)
    return path


SECOND = """
[services.db2]
host = "{host}"
port = {port}
protocol = "{protocol}"
default_duration = 30
max_duration = 60
"""


@pytest.mark.parametrize(("host", "port", "protocol", "refused"), [
    ("10.20.0.5", 5432, "tcp", True),  # the same destination
    ("10.20.0.5", 5433, "tcp", False),  # another port of that host
    ("10.20.0.6", 5432, "tcp", False),  # another host
    ("10.20.0.5", 5432, "udp", False),  # another protocol
])
def test_two_gateway_services_never_reach_one_destination(
        tmp_path: Path, host: str, port: int, protocol: str, refused: bool) -> None:
    path = config(tmp_path, SECOND.format(host=host, port=port, protocol=protocol))
    if refused:
        with pytest.raises(ConfigError, match=r"\[services\.db2\] reaches tcp 10\.20\.0\.5 "
                           r"port 5432 as \[services\.db\] does"):
            load(path)
    else:
        assert load(path).services["db2"].port == port


PUBLISHED = """
[services.web]
host = "10.20.0.7"
port = 80
listen_port = {listen_port}
protocol = "{protocol}"
default_duration = 30
max_duration = 60

[services.web2]
host = "10.20.0.8"
port = 80
listen_port = 8080
default_duration = 30
max_duration = 60
"""


@pytest.mark.parametrize(("listen_port", "protocol", "owner"), [
    (8080, "tcp", r"\[services\.web\]"),  # another gateway service publishes it
    (22, "tcp", r"\[services\.ssh\]"),  # this host's own ssh
    (62201, "udp", r"\[server\] \(knocks\)"),  # the knock port
    (62202, "udp", r"\[server\] \(knocks\)"),  # the fwknop port
    (8081, "tcp", ""),
    (22, "udp", ""),  # tcp/22 is ssh's, udp/22 is free
])
def test_a_published_port_is_nobody_elses(tmp_path: Path, listen_port: int, protocol: str,
                                         owner: str) -> None:
    path = config(tmp_path, PUBLISHED.format(listen_port=listen_port, protocol=protocol))
    if owner and listen_port == 8080:
        with pytest.raises(ConfigError, match=r"\[services\.web2\] listen_port = 8080 is tcp "
                           r"port 8080 of \[services\.web\] already"):
            load(path)
    elif owner:
        with pytest.raises(ConfigError, match=rf"\[services\.web\] listen_port = {listen_port} "
                           rf"is {protocol} port {listen_port} of {owner} already"):
            load(path)
    else:
        assert load(path).services["web"].listen_port == listen_port
