"""The compat listener with fakes (memory backend, fake source and clock):
the config's port rules, enroll --fwknop, its grants and legacy marks, the
replay cache across a restart, the move to spa1://."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from spa.core.errors import Reason
from spa.core.fwknop import FwknopKeys, Message
from spa.core.fwknop_verify import CompatAccepted
from spa.core.uri import parse as parse_uri
from spa.core.verify import Refused
from spa.server import admin, admin_fwknop
from spa.server import config as config_mod
from spa.server.compat import CompatListener
from spa.server.errors import ConfigError, LocalError
from spa.server.sources import FakeSource
from tests.fwknop_world import packet
from tests.server_world import World

SOURCE = "198.51.100.7"


def compat_world(tmp_path: Path, listen_port: int = 62202) -> World:
    """A world whose config has fwknop_port = 62201 (and listen_port as given)."""
    world = World(tmp_path)
    world.init()
    text = world.config_path.read_text().replace(
        "listen_port = 62201", f"listen_port = {listen_port}\nfwknop_port = 62201")
    world.config_path.write_text(text)
    return world


def start(world: World) -> tuple[CompatListener, FakeSource]:
    server = world.start()
    source = FakeSource()
    listener = CompatListener(server, source)
    listener.start()
    return listener, source


def keys_of(made: admin_fwknop.FwknopEnrollment) -> FwknopKeys:
    return FwknopKeys(made.rijndael, made.hmac)


def test_the_compat_port_may_not_be_ours(tmp_path: Path) -> None:
    world = compat_world(tmp_path, listen_port=62201)
    with pytest.raises(ConfigError, match="fwknop_port = 62201 is listen_port too") as caught:
        config_mod.load(world.config_path)
    assert "\n" not in str(caught.value)
    assert config_mod.load(compat_world(tmp_path / "b").config_path).fwknop_port == 62201


def test_enroll_fwknop_needs_the_listener_and_prints_what_clients_read(tmp_path: Path) -> None:
    off = World(tmp_path / "off")
    off.init()
    with pytest.raises(LocalError, match="compat listener is off; set fwknop_port = 62201"):
        admin_fwknop.enroll(off.config_path, "oldphone", ["ssh"], "192.0.2.1")
    world = compat_world(tmp_path)
    made = admin_fwknop.enroll(world.config_path, "oldphone", ["ssh"], "192.0.2.1")
    assert len(made.rijndael) == 32 and len(made.hmac) == 64  # as fwknop --key-gen
    qr = made.qr_text()
    assert re.fullmatch(r"KEY_BASE64:\S+ HMAC_KEY_BASE64:\S+", qr)
    assert base64.b64decode(qr.split()[0].split(":", 1)[1]) == made.rijndael
    stanza = made.fwknoprc()
    assert "[oldphone]" in stanza and "SPA_SERVER_PORT     62201" in stanza
    assert "ACCESS              tcp/22" in stanza and "HMAC_DIGEST_TYPE    sha256" in stanza
    assert base64.b64encode(made.rijndael).decode() not in repr(made)


def test_an_fwknop_client_of_a_gateway_service_knocks_for_its_published_port(
        tmp_path: Path) -> None:
    """enroll --fwknop for a gateway service: .fwknoprc's ACCESS names the
    published port, and that knock (or `fwknop -N 10.20.0.5:22 --nat-port
    2222`) grants the gateway service."""
    world = compat_world(tmp_path)
    with world.config_path.open("a") as config:
        config.write('\n[services.db-ssh]\nprotocol = "tcp"\nport = 22\ndefault_duration = 30\n'
                     'max_duration = 300\nhost = "10.20.0.5"\nlisten_port = 2222\n')
    made = admin_fwknop.enroll(world.config_path, "router", ["db-ssh"], "192.0.2.1",
                               now=world.clock.now)
    assert "ACCESS              tcp/2222\n" in made.fwknoprc()
    listener, _ = start(world)
    now = int(world.clock.now)
    plain = listener.handle([(packet(keys_of(made), now=now, ports=(("tcp", 2222),)), SOURCE,
                              0)])[0]
    assert isinstance(plain, CompatAccepted)
    assert set(world.backend.grants) == {(plain.source, "db-ssh")}
    nat = listener.handle([(packet(keys_of(made), now=now, ports=(("tcp", 2222),),
                                   kind=Message.NAT_ACCESS, nat=("10.20.0.5", 22)), SOURCE,
                            0)])[0]
    assert isinstance(nat, CompatAccepted)
    assert [d.service.name for d in nat.decisions] == ["db-ssh"]


def knocked_once(tmp_path: Path) -> tuple[World, CompatListener, bytes]:
    """A started world with one fwknop client, and a knock of it (not yet sent)."""
    world = compat_world(tmp_path)
    made = admin_fwknop.enroll(world.config_path, "oldphone", ["ssh"], "192.0.2.1",
                               now=world.clock.now)
    listener, _ = start(world)
    return world, listener, packet(keys_of(made), now=int(world.clock.now))


def test_a_compat_knock_opens_and_everything_it_does_is_legacy(tmp_path: Path) -> None:
    world, listener, knock = knocked_once(tmp_path)
    result = listener.handle([(knock, SOURCE, 0)])[0]
    assert isinstance(result, CompatAccepted)
    assert set(world.backend.grants) == {(result.source, "ssh")}
    assert listener.handle([(knock, SOURCE, 0)]) == [Refused(Reason.REPLAY, "oldphone")]
    outcomes = {(e.outcome, e.reason, e.legacy) for e in world.events()}
    assert ("accepted", None, True) in outcomes
    assert ("lease_start", None, True) in outcomes
    assert ("refused", "replay", True) in outcomes
    assert not any(e.legacy is False and e.outcome in ("accepted", "refused")
                   for e in world.events())


def test_a_restart_within_the_window_still_refuses_the_replay(tmp_path: Path) -> None:
    world, listener, knock = knocked_once(tmp_path)
    assert isinstance(listener.handle([(knock, SOURCE, 0)])[0], CompatAccepted)
    listener.close()
    world.clock.advance(5)
    again, _ = start(world)
    assert again.handle([(knock, SOURCE, 0)]) == [Refused(Reason.REPLAY, "oldphone")]


def test_a_client_enrolled_while_it_runs_is_served_and_our_clients_are_not(
        tmp_path: Path) -> None:
    world = compat_world(tmp_path)
    world.enroll("alice", "ssh")
    listener, _ = start(world)
    assert listener.verifier.clients == []
    made = admin_fwknop.enroll(world.config_path, "late", ["ssh"], "192.0.2.1",
                               now=world.clock.now)
    listener._last_poll = -1e9
    listener._housekeeping()
    assert listener.verifier.clients == ["late"]
    result = listener.handle([(packet(keys_of(made), now=int(world.clock.now)), SOURCE, 0)])
    assert isinstance(result[0], CompatAccepted)


def test_rotate_moves_an_fwknop_client_to_spa1(tmp_path: Path) -> None:
    world = compat_world(tmp_path)
    made = admin_fwknop.enroll(world.config_path, "oldphone", ["ssh"], "192.0.2.1",
                               now=world.clock.now)
    assert admin_fwknop.move_command("oldphone", "192.0.2.1") == (
        "spa-server rotate oldphone --grace 0 --endpoint 192.0.2.1 --qr")
    uri = admin.rotate(world.config_path, "oldphone", grace=0, now=world.clock.now)
    enrollment = parse_uri(uri)
    assert (enrollment.host, enrollment.port, enrollment.client) == ("192.0.2.1", 62202,
                                                                   "oldphone")
    listener, _ = start(world)
    assert listener.verifier.clients == []  # its fwknop keys stopped
    stale = packet(keys_of(made), now=int(world.clock.now))
    assert listener.handle([(stale, SOURCE, 0)]) == [Refused(Reason.UNKNOWN_SENDER)]
