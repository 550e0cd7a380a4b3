"""The iptables backend's pieces that need no root: comments, the variant
check, the refusal on an nf_tables host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spa.backends.iptables import IptablesBackend, active_variant, grant_comment, parse_comment
from spa.server.errors import LocalError


def test_comment_round_trip() -> None:
    assert parse_comment(grant_comment("ssh", 1800000000.25)) == ("ssh", 1800000000.25)
    assert parse_comment(grant_comment("my-svc_2", 5.0)) == ("my-svc_2", 5.0)
    assert parse_comment("not ours") is None
    assert parse_comment("spa:ssh:soon") is None


def fake_iptables(tmp_path: Path, version_line: str) -> str:
    program = tmp_path / "iptables"
    program.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    program.chmod(0o755)
    return str(tmp_path)


def test_variant_is_read_from_the_iptables_on_path(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", fake_iptables(tmp_path, "iptables v1.8.9 (nf_tables)"))
    assert active_variant() == "nf_tables"
    monkeypatch.setenv("PATH", fake_iptables(tmp_path, "iptables v1.8.9 (legacy)"))
    assert active_variant() == "legacy"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert active_variant() is None


def test_refuses_to_start_on_an_nf_tables_host(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", fake_iptables(tmp_path, "iptables v1.8.9 (nf_tables)")
                       + os.pathsep + os.environ["PATH"])
    with pytest.raises(LocalError, match=r"nf_tables variant.*--backend nftables") as info:
        IptablesBackend.create()
    assert "\n" not in str(info.value)


IPSET_XML = """<ipsets>
<ipset name="spa_drops_v4"><type>hash:ip,port</type><header><counters/></header>
<members>
<member><elem>198.51.100.7,tcp:22</elem><timeout>590</timeout><packets>3</packets><bytes>180</bytes></member>
<member><elem>198.51.100.7,tcp:443</elem><timeout>590</timeout><packets>2</packets><bytes>120</bytes></member>
<member><elem>2001:db8::5,udp:53</elem><timeout>12</timeout><packets>7</packets><bytes>9</bytes></member>
<member><elem>broken</elem><packets>1</packets></member>
</members></ipset></ipsets>"""


def test_drop_counters_are_read_from_ipset_xml() -> None:
    from spa.backends.iptables import parse_ipset_xml

    assert parse_ipset_xml(IPSET_XML) == {("198.51.100.7", 22): 3, ("198.51.100.7", 443): 2,
                                          ("2001:db8::5", 53): 7}
    assert parse_ipset_xml("<ipsets></ipsets>") == {}
    with pytest.raises(ValueError, match="not ipset XML"):
        parse_ipset_xml("ipset v7.17: The set with the given name does not exist")


def test_without_ipset_drops_are_not_counted_and_the_log_says_how_to_fix_it() -> None:
    import subprocess

    def missing(*args: str) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError("ipset")

    def refusing(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(["ipset", *args], 1, "",
                                           "ipset v7.17: Kernel error received: "
                                           "Operation not permitted\n")

    for fake, expected in ((missing, "install it: apt-get install ipset"),
                           (refusing, "Operation not permitted")):
        logs: list[str] = []
        backend = IptablesBackend(object(), ipset=fake, log=logs.append)
        assert backend._make_drop_sets() is False
        assert len(logs) == 1 and logs[0].startswith("warning dropped attempts are not "
                                                     "counted") and expected in logs[0]
        assert backend.drops() == {}
