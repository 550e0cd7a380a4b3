"""fwknopd's FORCE_NAT moved to gateway mode, with the real fwknop client
(Debian's fwknop-client) in namespaces: spa-server on the gateway, a real
sshd on the internal host behind it (tests/netns/test_gateway.py's world).

    cli (fwknop) ---- gw (spa-server, import-fwknop) ---- int (sshd)
                       |
                     oth (another fwknop client)

The imported FORCE_NAT stanza's client knocks as under fwknopd (`fwknop -A
tcp/2222`), then with a NAT request (`-N INT:22 --nat-port 2222`): each time
it reaches the internal host, through the published port and routed; a NAT
request for another destination is refused nat_message.  Another fwknop
client, whose stanza opens ssh of the gateway only, knocks and still cannot
reach the internal host, by either way or by naming it with -N."""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spa.netns import Namespace
from tests.netns.conftest import REASON, Spa, World, open_site
from tests.netns.test_fwknop_e2e import refusals
from tests.netns.test_gateway import (
    CLI4,
    GW4,
    GW_OTHER4,
    INT4,
    OTHER4,
    gateway_world,
    ssh,
    tcp_open,
)

FWKNOP_PORT = 62201
LEASE = 4  # FW_ACCESS_TIMEOUT and MAX_FW_TIMEOUT: the service's durations
PUBLISHED = 2222
SERVICE = "nat-" + INT4.replace(".", "-") + "-22"
pytestmark = pytest.mark.skipif(shutil.which("fwknop") is None,
                                reason="needs fwknop-client (scripts/setup.sh --test installs it)")


@pytest.fixture(scope="module")
def gworld(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if REASON is not None:
        pytest.skip(REASON)
    with gateway_world(tmp_path_factory.mktemp("fwknop-gateway")) as world:
        yield world


@pytest.fixture
def site(gworld: World, tmp_path: Path) -> Iterator[Spa]:
    with open_site(gworld, tmp_path) as spa:
        text = spa.config.read_text().replace("listen_port = 62201", "listen_port = 62202")
        spa.config.write_text(text)
        spa.config.chmod(0o600)
        yield spa


def keys() -> tuple[str, str]:
    return (base64.b64encode(os.urandom(32)).decode(), base64.b64encode(os.urandom(64)).decode())


def fwknop(ns: Namespace, home: Path, server: str, key: tuple[str, str], *args: str) -> None:
    done = ns.run("env", f"HOME={home}", "fwknop", *args, "-D", server, "-p", str(FWKNOP_PORT),
                  "--key-base64-rijndael", key[0], "--key-base64-hmac", key[1], "--use-hmac",
                  check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def accepted(spa: Spa, client: str, count: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    prefix = f"accepted action=open client={client}"
    while sum(line.startswith(prefix) for line in list(spa.lines)) < count:
        assert time.monotonic() < deadline, spa.lines[-10:]
        time.sleep(0.05)


def test_an_imported_force_nat_stanza_lets_the_real_fwknop_client_reach_the_internal_host(
        site: Spa, tmp_path: Path) -> None:
    world = site.world
    router, other = keys(), keys()
    access, conf = tmp_path / "access.conf", tmp_path / "fwknopd.conf"
    access.write_text(f"SOURCE {CLI4}/24\nOPEN_PORTS tcp/{PUBLISHED}\nFORCE_NAT {INT4} 22\n"
                      f"REQUIRE_USERNAME oldrouter\nFW_ACCESS_TIMEOUT {LEASE}\n"
                      f"MAX_FW_TIMEOUT {LEASE}\nKEY_BASE64 {router[0]}\n"
                      f"HMAC_KEY_BASE64 {router[1]}\n\n"
                      f"SOURCE {OTHER4}/24\nOPEN_PORTS tcp/22\nREQUIRE_USERNAME neighbour\n"
                      f"KEY_BASE64 {other[0]}\nHMAC_KEY_BASE64 {other[1]}\n")
    access.chmod(0o600)
    conf.write_text(f"ENABLE_IPT_FORWARDING Y;\nPCAP_FILTER udp port {FWKNOP_PORT};\n")
    done = site.admin("import-fwknop", "--access", str(access), "--conf", str(conf))
    assert (f"imported as oldrouter: opens tcp/{PUBLISHED} as {SERVICE} (new service)"
            in done.stdout), done.stdout
    assert (f"service {SERVICE}: add tcp/22 of {INT4}, published on {PUBLISHED} ({LEASE} s, "
            f"at most {LEASE} s)") in done.stdout
    assert "imported as neighbour: opens tcp/22 as ssh" in done.stdout
    for secret in (*router, *other):
        assert secret not in done.stdout + done.stderr
    home = tmp_path / "home"
    home.mkdir()
    site.start()
    assert site.wait_for(f"fwknop compat listener port={FWKNOP_PORT} clients=2"), site.lines
    assert not tcp_open(world.cli, GW4, PUBLISHED), "the published port hidden before"
    assert not tcp_open(world.cli, INT4, 22), "and the internal host"

    # as under fwknopd: the stanza's port, DNATed to FORCE_NAT's host:port
    fwknop(world.cli, home, GW4, router, "-A", f"tcp/{PUBLISHED}", "-a", CLI4)
    accepted(site, "oldrouter", 1)
    opened = time.monotonic()
    assert ssh(world, GW4, PUBLISHED) == f"in-{INT4}", "through the published port"
    assert ssh(world, INT4) == f"in-{INT4}", "and routed to it"
    assert site.elements() == [f"svc_{SERVICE}_v4 {CLI4}"]
    assert not tcp_open(world.att, GW_OTHER4, PUBLISHED), "another address cannot"
    assert not tcp_open(world.att, INT4, 22)
    time.sleep(max(0.0, opened + LEASE + 1.2 - time.monotonic()))
    assert site.elements() == [], "the lease ended"
    assert not tcp_open(world.cli, GW4, PUBLISHED)

    # fwknop's NAT request: only the destination the service is
    fwknop(world.cli, home, GW4, router, "-A", "tcp/22", "-N", f"{INT4}:23", "--nat-port",
           str(PUBLISHED), "-a", CLI4)
    assert refusals(site, "nat_message")[0]["client"] == "oldrouter"
    assert not tcp_open(world.cli, GW4, PUBLISHED), "a wrong destination opens nothing"
    fwknop(world.cli, home, GW4, router, "-A", "tcp/22", "-N", f"{INT4}:22", "--nat-port",
           str(PUBLISHED), "-a", CLI4)
    accepted(site, "oldrouter", 2)
    assert ssh(world, GW4, PUBLISHED) == f"in-{INT4}", "a NAT request opens the service"
    assert site.elements() == [f"svc_{SERVICE}_v4 {CLI4}"]

    # another fwknop client: ssh of the gateway, never the internal host
    fwknop(world.att, home, GW_OTHER4, other, "-A", "tcp/22", "-a", OTHER4)
    accepted(site, "neighbour", 1)
    assert f"svc_ssh_v4 {OTHER4}" in site.elements(), "its own grant: ssh of the gateway"
    fwknop(world.att, home, GW_OTHER4, other, "-A", f"tcp/{PUBLISHED}", "-a", OTHER4)
    fwknop(world.att, home, GW_OTHER4, other, "-A", "tcp/22", "-N", f"{INT4}:22", "--nat-port",
           str(PUBLISHED), "-a", OTHER4)
    deadline = time.monotonic() + 5
    while sum(int(str(e["count"])) for e in refusals(site, "service_not_allowed")
              if e["client"] == "neighbour") < 2:  # refusals are counted by key
        assert time.monotonic() < deadline, site.lines[-10:]
        time.sleep(0.2)
    assert not tcp_open(world.att, GW_OTHER4, PUBLISHED), "not through the published port"
    assert not tcp_open(world.att, INT4, 22), "nor routed"
    assert f"svc_{SERVICE}_v4 {OTHER4}" not in site.elements()
