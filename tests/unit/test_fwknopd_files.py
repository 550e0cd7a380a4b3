"""Reading fwknopd's files as fwknopd reads them: Debian's real access.conf and
fwknopd.conf (committed copies, tests/data/fwknop/), hand-written lines,
includes, and the files that are not fwknopd's (one line each, no key)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from spa.server.errors import LocalError
from spa.server.fwknop_import import fwknopd_port
from spa.server.fwknop_stanza import judge
from spa.server.fwknopd_files import (
    DiskFiles,
    Stanza,
    read_access,
    read_conf,
    split_line,
)
from tests.fwknop_world import FakeFiles

DATA = Path(__file__).resolve().parents[1] / "data" / "fwknop"
DEBIAN_ACCESS = DATA / "debian-access.conf"
DEBIAN_CONF = DATA / "debian-fwknopd.conf"
# the MD5 sums dpkg records for fwknop-server 2.6.10-16's conffiles
DEBIAN_MD5 = {DEBIAN_ACCESS: "b36c9b2403bb0653e3c0706a1eb066b2",
              DEBIAN_CONF: "5eb608cd8fdec5fcb72c2f234c79cb07"}
KEY = "c2VjcmV0LXJpam5kYWVsLWtleS0zMi1ieXRlcy1sb25nIQ=="  # never to be echoed


def access(text: str) -> list[Stanza]:
    return read_access(Path("/etc/fwknop/access.conf"), FakeFiles(
        {"/etc/fwknop/access.conf": text}))


def test_the_committed_copies_are_debians_files() -> None:
    for path, md5 in DEBIAN_MD5.items():
        assert hashlib.md5(path.read_bytes()).hexdigest() == md5, path


def test_debians_access_conf_is_one_stanza_still_holding_the_placeholders() -> None:
    stanzas = read_access(DEBIAN_ACCESS, DiskFiles())
    assert len(stanzas) == 1
    stanza = stanzas[0]
    assert (stanza.source, stanza.where.line, stanza.root) == ("ANY", 204, True)
    assert stanza.names() == ["KEY_BASE64", "HMAC_KEY_BASE64"]
    assert stanza.get("KEY_BASE64") == stanza.get("HMAC_KEY_BASE64") == "__CHANGEME__"
    judged = judge(stanza, now=0)
    assert judged.keys is None
    assert "placeholder __CHANGEME__" in judged.reasons[0]
    assert "KEY_BASE64 and HMAC_KEY_BASE64" in judged.reasons[0]
    assert any("no OPEN_PORTS" in reason for reason in judged.reasons)


def test_debians_fwknopd_conf_sets_nothing_so_fwknopd_listens_on_62201() -> None:
    conf = read_conf(DEBIAN_CONF, DiskFiles(), required=True)
    assert conf.found and conf.settings == {}
    port, how = fwknopd_port(conf)
    assert port == 62201 and "PCAP_FILTER 'udp port 62201', its default" in how


def test_the_system_files_when_present_read_as_the_copies() -> None:
    system = Path("/etc/fwknop/access.conf")
    try:
        system.read_bytes()
    except OSError as exc:
        pytest.skip(f"no readable {system} ({exc.strerror}): the committed copy is tested")
    here = read_access(system, DiskFiles())
    assert [s.names() for s in here] == [s.names() for s in read_access(DEBIAN_ACCESS,
                                                                        DiskFiles())]


def test_lines_are_read_as_fwknopd_reads_them() -> None:
    assert split_line("# SOURCE ANY") is None
    assert split_line(";SOURCE ANY") is None
    assert split_line("   ") is None
    assert split_line("SOURCE: ANY") == ("SOURCE", "ANY")
    assert split_line("OPEN_PORTS\ttcp/22, udp/53 ;comment") == ("OPEN_PORTS", "tcp/22, udp/53")
    assert split_line("  FW_ACCESS_TIMEOUT   60  \r") == ("FW_ACCESS_TIMEOUT", "60")
    assert split_line("KEY_BASE64") == ("KEY_BASE64", "")
    stanzas = access("OPEN_PORTS tcp/1\nSOURCE ANY\nOPEN_PORTS tcp/22\nOPEN_PORTS tcp/23\n"
                     f"KEY_BASE64 {KEY}\nKEY passphrase\n\nSOURCE 10.0.0.0/8\n")
    assert [s.source for s in stanzas] == ["ANY", "10.0.0.0/8"]
    first = stanzas[0]
    assert first.get("OPEN_PORTS") == "tcp/23"  # the last one given
    last_key = first.last("KEY", "KEY_BASE64")
    assert last_key is not None and last_key.name == "KEY"  # one key, two spellings
    assert "passphrase" not in repr(first) and KEY not in repr(first)
    assert stanzas[1].settings == ()


def test_includes_folders_and_keys_files_are_read_in_place() -> None:
    files = FakeFiles({
        "/etc/fwknop/access.conf": "SOURCE ANY\nOPEN_PORTS tcp/22\n%include extra.conf\n"
                                   "FW_ACCESS_TIMEOUT 60\n%include_folder /etc/fwknop/users.d\n",
        "/etc/fwknop/extra.conf": "SOURCE 10.0.0.0/8\n%include_keys /root/keys.conf\n",
        "/root/keys.conf": f"KEY_BASE64 {KEY}\nOPEN_PORTS tcp/1\nHMAC_KEY_BASE64 {KEY}\n",
        "/etc/fwknop/users.d/bob.conf": "SOURCE 192.0.2.0/24\n",
        "/etc/fwknop/users.d/alice.conf": "SOURCE 198.51.100.0/24\n",
    }, dirs={"/etc/fwknop/users.d": ["bob.conf", "notes.txt", "alice.conf"]})
    stanzas = read_access(Path("/etc/fwknop/access.conf"), files)
    assert [(s.source, s.root, s.where.file.name) for s in stanzas] == [
        ("ANY", True, "access.conf"), ("10.0.0.0/8", False, "extra.conf"),
        ("198.51.100.0/24", False, "alice.conf"), ("192.0.2.0/24", False, "bob.conf")]
    # after an %include the including file's stanza goes on, as in fwknopd
    assert stanzas[0].get("FW_ACCESS_TIMEOUT") == "60"
    # %include_keys takes the keys only
    assert stanzas[1].names() == ["KEY_BASE64", "HMAC_KEY_BASE64"]


def test_includes_deeper_than_three_files_are_refused() -> None:
    files = FakeFiles({"/a.conf": "SOURCE ANY\n%include /a.conf\n"})
    with pytest.raises(LocalError, match=r"/a.conf:2: %include more than 3 files deep"):
        read_access(Path("/a.conf"), files)


@pytest.mark.parametrize(("files", "fragment"), [
    ({}, "access file /etc/fwknop/access.conf does not exist"),
    ({"/etc/fwknop/access.conf": PermissionError(13, "Permission denied")},
     "permission denied (fwknopd keeps it 0600 root: run as root)"),
    ({"/etc/fwknop/access.conf": IsADirectoryError(21, "Is a directory")}, "is a directory"),
    ({"/etc/fwknop/access.conf": b"SOURCE ANY\n\0\x7fELF"}, "is not a text file"),
    ({"/etc/fwknop/access.conf": b"x" * (4 << 20) + b"x"}, "is over 4 MB"),
    ({"/etc/fwknop/access.conf": "PCAP_FILTER udp port 62201\n"},
     "has no SOURCE line: not an fwknopd access.conf"),
    ({"/etc/fwknop/access.conf": "SOURCE ANY\nKEY_BASE64\n"},
     "access.conf:2: KEY_BASE64 has no value (fwknopd refuses this file too)"),
    ({"/etc/fwknop/access.conf": f"SOURCE ANY\n{KEY}\n"},
     "access.conf:2: the setting on line 2 has no value"),
    ({"/etc/fwknop/access.conf": "SOURCE ANY\n%include_folder /nowhere\n"},
     "cannot read the folder /nowhere"),
    ({"/etc/fwknop/access.conf": "SOURCE ANY\n%include /gone.conf\n"},
     "access file /gone.conf does not exist"),
])
def test_a_file_fwknopd_would_not_read_is_one_line_without_a_key(
        files: dict[str, str | bytes | OSError], fragment: str) -> None:
    with pytest.raises(LocalError) as raised:
        read_access(Path("/etc/fwknop/access.conf"), FakeFiles(files))
    message = str(raised.value)
    assert fragment in message and "\n" not in message
    assert KEY not in message


def test_fwknopd_conf_is_told_from_an_access_conf_and_may_be_absent() -> None:
    path = Path("/etc/fwknop/fwknopd.conf")
    absent = read_conf(path, FakeFiles({}), required=False)
    assert not absent.found and fwknopd_port(absent)[0] == 62201
    with pytest.raises(LocalError, match=r"config file /etc/fwknop/fwknopd.conf does not exist"):
        read_conf(path, FakeFiles({}), required=True)
    with pytest.raises(LocalError, match=r"SOURCE belongs in an access.conf"):
        read_conf(path, FakeFiles({str(path): "SOURCE ANY\n"}), required=True)
    with pytest.raises(LocalError, match=r"sets nothing fwknopd.conf has"):
        read_conf(path, FakeFiles({str(path): "[server]\nlisten_port = 1\n"}), required=True)
    conf = read_conf(path, FakeFiles({str(path): "# mine\nPCAP_FILTER   udp dst port 40001;\n"
                                                 "MAX_SPA_PACKET_AGE 60;\nNO_SUCH_THING 1\n"}),
                     required=True)
    assert conf.settings == {"PCAP_FILTER": "udp dst port 40001", "MAX_SPA_PACKET_AGE": "60"}
    assert fwknopd_port(conf)[0] == 40001
