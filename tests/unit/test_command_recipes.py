"""The recipes of docs/backends.md: each [command] table loads, and each
script in contrib/command/ sends the requests the page says, checked with
stand-ins for curl, aws and firewall-cmd that record their arguments (the
products themselves are not here: the page says so)."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from spa.backends.cmdspec import parse_spec, render, values
from spa.core.policy import Service

ROOT = Path(__file__).resolve().parents[2]
SSH = Service("ssh", "tcp", 22, 30, 3600)
A = ipaddress.ip_address("192.0.2.7")
B = ipaddress.ip_address("2001:db8::9")
STUB = """#!/bin/sh
printf '%s\\n' "$(basename "$0") $*" >> "$STUB_LOG"
case "$*" in *-X*) echo '{"status":"done"}' ;; *) echo "$STUB_ANSWER" ;; esac
"""


def recipes() -> dict[str, dict[str, object]]:
    """script name -> its [command] table, from the page."""
    text = (ROOT / "docs/backends.md").read_text()
    found = {}
    for block in re.findall(r"```toml\n(.*?)```", text, re.S):
        table = tomllib.loads(block).get("command")
        if table is not None:
            found[Path(table["allow"][0]).name] = table
    return found


def run(tmp_path: Path, script: str, argv: list[str], answer: str = "[]") -> list[str]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name in ("curl", "aws", "firewall-cmd"):
        (bindir / name).write_text(STUB)
        (bindir / name).chmod(0o755)
    log = tmp_path / "log"
    log.write_text("")
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "STUB_LOG": str(log), "STUB_ANSWER": answer}
    done = subprocess.run([str(ROOT / "contrib/command" / script), *argv[1:]], env=env,
                          capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 0, done.stderr
    return [*log.read_text().splitlines(), *(f"out {line}" for line in done.stdout.split())]


def test_every_recipe_loads_and_renders() -> None:
    found = recipes()
    assert sorted(found) == ["aws-sg.sh", "firewalld.sh", "opnsense.sh", "python3",
                             "router-allow", "routeros.sh"]
    for table in found.values():
        spec = parse_spec(table)
        filled = values(A, SSH, until=1300.0, now=1000.0)
        assert "192.0.2.7" in render(spec.allow, filled)


@pytest.mark.skipif(not os.path.exists("/usr/bin/jq"), reason="needs jq")
def test_each_recipe_sends_the_documented_requests(tmp_path: Path) -> None:
    tables = recipes()
    def argv(script: str, kind: str, address: object = A) -> list[str]:
        spec = parse_spec(tables[script])
        template = {"allow": spec.allow, "remove": spec.remove, "list": spec.list}[kind]
        filled = values(address, SSH, until=1300.0, now=1000.0)  # type: ignore[arg-type]
        return render(template, filled)

    calls = run(tmp_path, "routeros.sh", argv("routeros.sh", "allow"))
    assert calls[0].endswith("-G https://192.0.2.1/rest/ip/firewall/address-list "
                             "--data-urlencode list=spa-ssh --data-urlencode address=192.0.2.7")
    assert calls[1].endswith('-X PUT https://192.0.2.1/rest/ip/firewall/address-list --data '
                             '{"list":"spa-ssh","address":"192.0.2.7","timeout":"300s",'
                             '"comment":"spa"}')
    calls = run(tmp_path, "routeros.sh", argv("routeros.sh", "allow", B), '[{".id":"*1A"}]')
    assert calls[1].endswith('-X PATCH https://192.0.2.1/rest/ipv6/firewall/address-list/*1A '
                             '--data {"timeout":"300s"}')
    calls = run(tmp_path, "routeros.sh", argv("routeros.sh", "remove"), '[{".id":"*1A"}]')
    assert calls[1].endswith("-X DELETE https://192.0.2.1/rest/ip/firewall/address-list/*1A")
    assert run(tmp_path, "routeros.sh", argv("routeros.sh", "list"),
               '[{"address":"192.0.2.7"}]')[-2:] == ["out 192.0.2.7", "out 192.0.2.7"]

    calls = run(tmp_path, "opnsense.sh", argv("opnsense.sh", "allow"))
    assert calls[0].endswith('-X POST -H content-type: application/json --data '
                             '{"address":"192.0.2.7"} '
                             "https://192.0.2.1/api/firewall/alias_util/add/spa_ssh")
    calls = run(tmp_path, "opnsense.sh", argv("opnsense.sh", "remove"))
    assert calls[0].endswith("https://192.0.2.1/api/firewall/alias_util/delete/spa_ssh")
    assert run(tmp_path, "opnsense.sh", argv("opnsense.sh", "list"),
               '{"rows":[{"ip":"192.0.2.7"}]}')[-1] == "out 192.0.2.7"

    calls = run(tmp_path, "aws-sg.sh", argv("aws-sg.sh", "allow"))
    assert calls == ["aws ec2 authorize-security-group-ingress --group-id sg-0123456789abcdef0 "
                     "--ip-permissions IpProtocol=tcp,FromPort=22,ToPort=22,"
                     "IpRanges=[{CidrIp=192.0.2.7/32,Description=spa}]"]
    calls = run(tmp_path, "aws-sg.sh", argv("aws-sg.sh", "remove", B))
    assert calls == ["aws ec2 revoke-security-group-ingress --group-id sg-0123456789abcdef0 "
                     "--ip-permissions IpProtocol=tcp,FromPort=22,ToPort=22,"
                     "Ipv6Ranges=[{CidrIpv6=2001:db8::9/128,Description=spa}]"]

    calls = run(tmp_path, "firewalld.sh", argv("firewalld.sh", "allow"), "")
    rule = ('rule family="ipv4" source address="192.0.2.7" port port="22" protocol="tcp" '
            "accept")
    assert calls == [f"firewall-cmd --quiet --zone=public --remove-rich-rule={rule}",
                     f"firewall-cmd --quiet --zone=public --add-rich-rule={rule} "
                     "--timeout=300s"]


def test_the_example_configs_command_table_loads() -> None:
    text = (ROOT / "contrib/server.toml.example").read_text()
    block = text.split("# [command]\n", 1)[1].split("\n\n", 1)[0]
    table = tomllib.loads("\n".join(line.removeprefix("# ") for line in block.splitlines()))
    spec = parse_spec(table)
    assert Path(spec.allow[0]).name in recipes() and spec.journal == ""
