"""--version on both programs (spa.about): the package's version from its
metadata ("unknown" without any), the URI scheme and the packet format's
version byte; exit status 0."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest
from typer.testing import CliRunner

from spa import about
from spa.core.uri import SCHEME
from spa.core.wire import VERSION

PROGRAMS = {"spa-server": "spa.cli", "spa-client": "spa_client.cli"}


def test_version_line_names_the_program_the_version_and_the_protocol() -> None:
    assert about.version_line("spa-server", "1.2.3") == \
        "spa-server 1.2.3 (protocol spa1, wire version 1)"
    assert f"protocol {SCHEME}, wire version {VERSION})" in about.version_line("x")


def test_a_missing_distribution_is_unknown_not_a_crash() -> None:
    assert about.package_version("spa-no-such-distribution") == "unknown"
    assert about.package_version() == metadata.version("spa")


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_version_flag_prints_one_line_and_exits_0(program: str) -> None:
    done = subprocess.run([sys.executable, "-c", f"from {PROGRAMS[program]} import main; main()",
                           "--version"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (f"{program} {metadata.version('spa')} (protocol {SCHEME}, "
                           f"wire version {VERSION})\n")


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_version_from_a_source_tree_without_metadata_says_unknown(
        program: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    module = __import__(PROGRAMS[program], fromlist=["app"])
    if program == "spa-client":
        module.register_commands([])
    result = CliRunner().invoke(module.app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"{program} unknown (protocol spa1, wire version {VERSION})\n"
