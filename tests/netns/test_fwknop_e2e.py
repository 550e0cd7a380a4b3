"""The real fwknop client (Debian's fwknop-client) against spa-server's
compat listener, in namespaces: a knock opens ssh; a replay, a packet with no
HMAC, with an MD5 HMAC, with `-m md5`, in GnuPG mode (crafted: the client
needs a key ring for one) and for a command are each refused with their reason,
every event marked legacy.  And fwknopd's access.conf imported
(`import-fwknop`): the stanza's keys open ssh, another stanza's SOURCE holds."""

from __future__ import annotations

import base64
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from spa.netns import Namespace
from spa.server.admin_fwknop import FwknopEnrollment
from tests.netns.conftest import CLI4, SRV4, Spa
from tests.netns.test_ssh_e2e import tcp_open

FWKNOP_PORT = 62201  # fwknop's default: ours moves to 62202
pytestmark = pytest.mark.skipif(shutil.which("fwknop") is None,
                                reason="needs fwknop-client (scripts/setup.sh --test installs it)")


def compat_site(spa: Spa) -> str:
    """Our port elsewhere, fwknop's on 62201, one fwknop client: its .fwknoprc stanza."""
    text = spa.config.read_text()
    text = text.replace("listen_port = 62201", f"listen_port = 62202\nfwknop_port = {FWKNOP_PORT}")
    spa.config.write_text(text)
    spa.config.chmod(0o600)
    return spa.admin("enroll", "oldphone", "--fwknop", "--service", "ssh", "--endpoint", SRV4,
                     "--uri-only").stdout


def fwknop(spa: Spa, home: Path, *args: str) -> None:
    done = spa.world.cli.run("env", f"HOME={home}", "fwknop", *args, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def send(ns: Namespace, payload: bytes) -> None:
    code = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"s.sendto(sys.argv[1].encode(),({SRV4!r},{FWKNOP_PORT}))")
    ns.run(sys.executable, "-c", code, payload.decode())


def refusals(spa: Spa, reason: str, timeout: float = 5) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = [e for e in spa.events() if e["outcome"] == "refused" and e["reason"] == reason]
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_the_real_fwknop_client_opens_ssh_and_its_bad_packets_are_refused(
        spa: Spa, tmp_path: Path) -> None:
    world = spa.world
    stanza = compat_site(spa)
    keys = dict(re.findall(r"^(KEY_BASE64|HMAC_KEY_BASE64)\s+(\S+)$", stanza, re.M))
    home = tmp_path / "home"
    home.mkdir()
    (home / ".fwknoprc").write_text(stanza)
    (home / ".fwknoprc").chmod(0o600)
    spa.start()
    assert spa.wait_for("fwknop compat listener port=62201 clients=1"), spa.lines
    assert not tcp_open(world, "cli", SRV4, 22), "ssh hidden before the knock"
    fwknop(spa, home, "-n", "oldphone", "--save-packet", str(home / "packet"))
    assert spa.wait_for("accepted action=open client=oldphone", timeout=5), spa.lines
    accepted = [line for line in spa.lines if line.startswith("accepted ")]
    assert accepted[0].endswith(" legacy"), accepted
    login = world.ssh(world.cli, SRV4, "echo via-fwknop")
    assert login.stdout.strip() == "via-fwknop", login.stderr
    assert spa.elements() == [f"svc_ssh_v4 {CLI4}"]

    send(world.cli, (home / "packet").read_text().strip().encode())  # a replay
    assert refusals(spa, "replay")[0]["client"] == "oldphone"
    rijndael = ["--key-base64-rijndael", keys["KEY_BASE64"]]
    target = ["-A", "tcp/22", "-a", CLI4, "-D", SRV4, "-p", str(FWKNOP_PORT)]
    fwknop(spa, home, *target, *rijndael)  # no HMAC key: no HMAC
    hmac = ["--key-base64-hmac", keys["HMAC_KEY_BASE64"], "--use-hmac"]
    fwknop(spa, home, *target, *rijndael, *hmac, "--hmac-digest-type", "md5")
    fwknop(spa, home, *target, *rijndael, *hmac, "-m", "md5")
    fwknop(spa, home, "--server-cmd", "touch /tmp/pwned", "-a", CLI4, "-D", SRV4,
           "-p", str(FWKNOP_PORT), *rijndael, *hmac)
    send(world.cli, b"hQ" * 260)  # GnuPG's length (the client needs a key ring to make one)
    for reason in ("no_hmac", "weak_hmac", "weak_digest", "command_message", "gpg_mode"):
        rows = refusals(spa, reason)
        assert rows, (reason, spa.lines[-20:])
        assert rows[0]["legacy"] is True or rows[0]["legacy"] == 1
        if reason != "gpg_mode":
            assert rows[0]["client"] == "oldphone", reason
    assert not Path("/tmp/pwned").exists()
    status = spa.admin("status").stdout
    assert "fwknop compat: port 62201/udp, 1 client(s)" in status
    listing = spa.admin("clients").stdout
    assert "oldphone" in listing and "(fwknop, legacy)" in listing
    assert f"spa-server rotate oldphone --grace 0 --endpoint {SRV4} --qr" in listing


def test_an_imported_stanzas_keys_open_ssh_for_the_real_fwknop_client(
        spa: Spa, tmp_path: Path) -> None:
    """fwknopd's access.conf, imported: the real client, with the stanza's keys
    in its .fwknoprc, opens ssh; another stanza's keys from outside its SOURCE
    are refused source_not_allowed; importing again while it runs changes
    nothing."""
    world = spa.world
    text = spa.config.read_text().replace("listen_port = 62201", "listen_port = 62202")
    spa.config.write_text(text)
    spa.config.chmod(0o600)
    laptop = FwknopEnrollment("oldlaptop", SRV4, FWKNOP_PORT, ("tcp/22",), os.urandom(32),
                              os.urandom(64))
    away = (base64.b64encode(os.urandom(32)).decode(), base64.b64encode(os.urandom(64)).decode())
    access, conf = tmp_path / "access.conf", tmp_path / "fwknopd.conf"
    stanza = dict(re.findall(r"^(KEY_BASE64|HMAC_KEY_BASE64)\s+(\S+)$", laptop.fwknoprc(), re.M))
    access.write_text(f"SOURCE {CLI4}/24\nOPEN_PORTS tcp/22\nREQUIRE_USERNAME oldlaptop\n"
                      f"KEY_BASE64 {stanza['KEY_BASE64']}\n"
                      f"HMAC_KEY_BASE64 {stanza['HMAC_KEY_BASE64']}\n\n"
                      f"SOURCE 192.0.2.0/24\nOPEN_PORTS tcp/22\nREQUIRE_USERNAME away\n"
                      f"KEY_BASE64 {away[0]}\nHMAC_KEY_BASE64 {away[1]}\n")
    access.chmod(0o600)
    conf.write_text(f"PCAP_FILTER udp port {FWKNOP_PORT};\n")
    command = ("import-fwknop", "--access", str(access), "--conf", str(conf))
    done = spa.admin(*command)
    assert "imported as oldlaptop: opens tcp/22 as ssh" in done.stdout, done.stdout
    assert f"set fwknop_port = {FWKNOP_PORT} under [server]" in done.stdout
    for secret in (*stanza.values(), *away):
        assert secret not in done.stdout + done.stderr
    home = tmp_path / "home"
    home.mkdir()
    (home / ".fwknoprc").write_text(laptop.fwknoprc())
    (home / ".fwknoprc").chmod(0o600)
    spa.start()
    assert spa.wait_for(f"fwknop compat listener port={FWKNOP_PORT} clients=2"), spa.lines
    assert not tcp_open(world, "cli", SRV4, 22), "ssh hidden before the knock"
    fwknop(spa, home, "-n", "oldlaptop")
    assert spa.wait_for("accepted action=open client=oldlaptop", timeout=5), spa.lines
    login = world.ssh(world.cli, SRV4, "echo imported")
    assert login.stdout.strip() == "imported", login.stderr
    fwknop(spa, home, "-A", "tcp/22", "-a", CLI4, "-D", SRV4, "-p", str(FWKNOP_PORT),
           "--key-base64-rijndael", away[0], "--key-base64-hmac", away[1], "--use-hmac")
    assert refusals(spa, "source_not_allowed")[0]["client"] == "away"
    again = spa.admin(*command)
    assert again.stdout.splitlines()[-1] == ("nothing to change: every stanza that can be is "
                                             "imported"), again.stdout
