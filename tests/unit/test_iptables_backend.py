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
