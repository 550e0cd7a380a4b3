"""Importing fwknopd's stanzas: every refusal with its reason, what is dropped
and said, names, services, the port, matching by key (a second plan is
empty), the cap, and an imported client's packets accepted by the real
compat verifier.  Hand-written stanzas; no key ever in what is printed."""

from __future__ import annotations

import base64
import ipaddress
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from spa.core.fwknop import FwknopKeys, Message, SpaData, plaintext, seal
from spa.core.fwknop_verify import MAX_CLIENTS, CompatAccepted, CompatVerifier, HmacBudget
from spa.core.policy import DEFAULT_SERVICES, Policy, Service
from spa.core.verify import Refused
from spa.server import admin
from spa.server import config as config_mod
from spa.server.admin_fwknop import import_fwknopd
from spa.server.config import KIND_FWKNOP, ClientEntry, ServerConfig
from spa.server.errors import LocalError
from spa.server.fwknop_import import (
    ImportPlan,
    Known,
    Outcome,
    client_names,
    fwknopd_port,
    plan,
    render,
)
from spa.server.fwknop_stanza import judge
from spa.server.fwknopd_files import FwknopdConf, Stanza, read_access
from spa.store.clients import CLIENTS_DB, ClientStore
from tests.fwknop_world import FakeFiles

NOW = 1_800_000_000
RIJNDAEL = bytes(range(1, 33))
HMAC = bytes(range(100, 164))
KEY_B64 = base64.b64encode(RIJNDAEL).decode()
HMAC_B64 = base64.b64encode(HMAC).decode()
KEYS = f"KEY_BASE64 {KEY_B64}\nHMAC_KEY_BASE64 {HMAC_B64}\n"
SECRETS = (KEY_B64, HMAC_B64, KEY_B64[:16], HMAC_B64[:16], "correct horse")
CONFIG = ServerConfig(Path("/etc/spa/server.toml"), server_id=bytes(16), listen_port=62202)
NO_CONF = FwknopdConf(Path("/etc/fwknop/fwknopd.conf"), {}, found=True)
EMPTY = Known((), {})
NOBODY = 65534


def stanzas(text: str, **files: str) -> list[Stanza]:
    return read_access(Path("/etc/fwknop/access.conf"), FakeFiles(
        {"/etc/fwknop/access.conf": text, **files}))


def one(body: str, source: str = "ANY") -> Stanza:
    return stanzas(f"SOURCE {source}\n{body}")[0]


def other_keys(n: int) -> str:
    return (f"KEY_BASE64 {base64.b64encode(bytes([n]) * 32).decode()}\n"
            f"HMAC_KEY_BASE64 {base64.b64encode(bytes([n + 1]) * 64).decode()}\n")


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, text


@pytest.mark.parametrize(("body", "fragment"), [
    ("OPEN_PORTS tcp/22\nGPG_DECRYPT_ID ABCD1234\nGPG_DECRYPT_PW correct horse\n"
     f"HMAC_KEY_BASE64 {HMAC_B64}\n", "GnuPG only (GPG_DECRYPT_ID, GPG_DECRYPT_PW)"),
    (f"OPEN_PORTS tcp/22\nKEY_BASE64 {KEY_B64}\n", "no HMAC key (HMAC_KEY_BASE64)"),
    (f"OPEN_PORTS tcp/22\nKEY correct horse\nHMAC_KEY_BASE64 {HMAC_B64}\n",
     "KEY is a passphrase in clear, not KEY_BASE64: write KEY_BASE64 with the output of "
     "`printf %s 'THE-KEY' | base64 -w0`"),
    (f"OPEN_PORTS tcp/22\nKEY_BASE64 {KEY_B64}\nHMAC_KEY correct horse\n",
     "HMAC_KEY is a passphrase in clear, not HMAC_KEY_BASE64"),
    (f"OPEN_PORTS tcp/22\nKEY_BASE64 not*base64!\nHMAC_KEY_BASE64 {HMAC_B64}\n",
     "KEY_BASE64 at /etc/fwknop/access.conf:3 is not base64"),
    (f"OPEN_PORTS tcp/22\nKEY_BASE64 __CHANGEME__\nHMAC_KEY_BASE64 {HMAC_B64}\n",
     "KEY_BASE64: still fwknop's placeholder __CHANGEME__"),
    (f"OPEN_PORTS tcp/22\nKEY_BASE64 {base64.b64encode(bytes(33)).decode()}\n"
     f"HMAC_KEY_BASE64 {HMAC_B64}\n", "KEY_BASE64 decodes to 33 bytes"),
    (f"OPEN_PORTS tcp/22\nKEY_BASE64 {KEY_B64}\nHMAC_KEY_BASE64 {KEY_B64}\n",
     "are the same key"),
    (f"OPEN_PORTS tcp/22\n{KEYS}HMAC_DIGEST_TYPE SHA512\n",
     "HMAC_DIGEST_TYPE SHA512: the compat listener takes HMAC-SHA256 only"),
    (f"OPEN_PORTS tcp/22\n{KEYS}HMAC_DIGEST_TYPE md5\n", "HMAC_DIGEST_TYPE md5"),
    (f"OPEN_PORTS tcp/22\n{KEYS}ENCRYPTION_MODE legacy\n",
     "ENCRYPTION_MODE legacy: fwknop's legacy IV mode is refused (legacy_iv)"),
    (f"OPEN_PORTS tcp/22\n{KEYS}ENCRYPTION_MODE CTR\n",
     "ENCRYPTION_MODE CTR: only CBC, fwknop's default, is served"),
    (f"OPEN_PORTS tcp/22\n{KEYS}FORCE_NAT 192.168.10.2 22\n",
     "FORCE_NAT without ENABLE_IPT_FORWARDING or ENABLE_IPT_LOCAL_NAT in fwknopd.conf"),
    (f"OPEN_PORTS tcp/22\n{KEYS}FORCE_MASQUERADE Y\nFORWARD_ALL y\n",
     "FORWARD_ALL: fwknopd forwarded every port and protocol"),
    (f"OPEN_PORTS tcp/22\n{KEYS}FORCE_MASQUERADE Y\nFORWARD_ALL y\n",
     "FORCE_MASQUERADE: fwknopd rewrote the forwarded connection's source; spa does no SNAT"),
    (f"OPEN_PORTS tcp/22\n{KEYS}CMD_CYCLE_OPEN /bin/true\nCMD_CYCLE_CLOSE NONE\n",
     "CMD_CYCLE_OPEN: fwknopd runs a command for each knock"),
    (f"OPEN_PORTS tcp/22\n{KEYS}ACCESS_EXPIRE 01/31/2020\n",
     "expired on 2020-01-31 (ACCESS_EXPIRE): fwknopd refuses it already"),
    (f"OPEN_PORTS tcp/22\n{KEYS}ACCESS_EXPIRE 12/31/2099\n",
     "ACCESS_EXPIRE 2099-12-31: a client here cannot end on a date"),
    (f"OPEN_PORTS tcp/22\n{KEYS}ACCESS_EXPIRE_EPOCH 4102444800\n",
     "ACCESS_EXPIRE 2100-01-01"),
    (f"OPEN_PORTS tcp/22\n{KEYS}ACCESS_EXPIRE soon\n", "ACCESS_EXPIRE 'soon': not a date"),
    (f"OPEN_PORTS tcp/22\n{KEYS}DESTINATION 192.0.2.10\n",
     "DESTINATION 192.0.2.10: fwknopd took this client's packets only sent to those"),
    (KEYS, "no OPEN_PORTS: fwknopd let this client open any port it named"),
    (f"OPEN_PORTS tcp/22, icmp/8\n{KEYS}", "OPEN_PORTS 'icmp/8': not tcp/PORT or udp/PORT"),
    (f"OPEN_PORTS tcp/0\n{KEYS}", "OPEN_PORTS 'tcp/0'"),
    (f"OPEN_PORTS tcp/22\nRESTRICT_PORTS tcp/22\n{KEYS}",
     "RESTRICT_PORTS takes away every port of OPEN_PORTS"),
    (f"OPEN_PORTS tcp/22\n{KEYS}FW_ACCESS_TIMEOUT 9999999999\n",
     "FW_ACCESS_TIMEOUT '9999999999': not a number of seconds"),
])
def test_every_refusal_says_why_and_never_quotes_a_key(body: str, fragment: str) -> None:
    judged = judge(one(body), now=NOW)
    assert judged.keys is None
    assert any(fragment in reason for reason in judged.reasons), judged.reasons
    assert_no_secret(*judged.reasons, *judged.notes)
    made = plan([one(body)], NO_CONF, CONFIG, EMPTY, now=NOW)
    assert made.stanzas[0].outcome is Outcome.SKIPPED and not made.entries
    assert_no_secret(*render(made, dry_run=False))


def test_a_bad_source_is_refused_with_the_fix() -> None:
    for source, fragment in (("10.0.0.300", "SOURCE '10.0.0.300' is not an address"),
                             ("::ffff:10.0.0.0/104", "IPv4-mapped")):
        judged = judge(one(f"OPEN_PORTS tcp/22\n{KEYS}", source), now=NOW)
        assert any(fragment in reason for reason in judged.reasons), judged.reasons


@pytest.mark.parametrize(("body", "fragment"), [
    ("REQUIRE_USERNAME alice\n", "fwknop's username field is not authenticated"),
    ("REQUIRE_SOURCE_ADDRESS Y\n", "REQUIRE_SOURCE_ADDRESS: not enforced"),
    ("REQUIRE_SOURCE yes\n", "REQUIRE_SOURCE_ADDRESS: not enforced"),
    ("ENABLE_CMD_EXEC Y\nCMD_EXEC_USER nobody\n", "command execution (ENABLE_CMD_EXEC)"),
    ("GPG_DECRYPT_ID ABCD1234\nGPG_DECRYPT_PW correct horse\n",
     "GnuPG (GPG_DECRYPT_ID, GPG_DECRYPT_PW): its GnuPG packets are refused gpg_mode"),
    ("LATER_FEATURE Y\n", "unknown setting LATER_FEATURE: ignored (fwknopd ignores it too)"),
    ("DISABLE_DNAT Y\n", "DISABLE_DNAT: it only touched NAT requests (fwknop -N)"),
    ("ENCRYPTION_MODE cbc\nHMAC_DIGEST_TYPE sha256\nDESTINATION ANY\nENABLE_CMD_EXEC N\n", ""),
])
def test_what_cannot_be_kept_but_costs_nothing_is_dropped_and_said(body: str,
                                                                   fragment: str) -> None:
    judged = judge(one(f"OPEN_PORTS tcp/22\n{KEYS}{body}"), now=NOW)
    assert judged.reasons == ()
    assert judged.keys == FwknopKeys(RIJNDAEL, HMAC)
    if fragment:
        assert any(fragment in note for note in judged.notes), judged.notes
    else:
        assert judged.notes == ()
    assert_no_secret(*judged.notes)


def test_sources_ports_and_timeouts_as_fwknopd_reads_them() -> None:
    judged = judge(one(f"OPEN_PORTS tcp/22, UDP/53,tcp/22, tcp/80\nRESTRICT_PORTS tcp/80\n"
                       f"{KEYS}FW_ACCESS_TIMEOUT 600\nMAX_FW_TIMEOUT 120\n",
                       "203.0.113.7/24, 10.0.0.0/255.0.0.0,2001:db8::/48"), now=NOW)
    assert judged.sources == ("203.0.113.0/24", "10.0.0.0/8", "2001:db8::/48")
    assert judged.notes == ("SOURCE 203.0.113.7/24 read as 203.0.113.0/24, as fwknopd reads "
                            "it",)
    assert judged.ports == (("tcp", 22), ("udp", 53))
    assert judged.timeouts == (120, 120)  # MAX_FW_TIMEOUT wins, as in fwknopd
    defaults = judge(one(f"OPEN_PORTS tcp/22\n{KEYS}FW_ACCESS_TIMEOUT 0\n",
                         "192.0.2.1, any"), now=NOW)
    assert (defaults.sources, defaults.timeouts) == ((), (30, 300))


def test_names_come_from_the_username_the_file_or_the_source_and_are_unique() -> None:
    files = FakeFiles({"/etc/fwknop/access.conf": "SOURCE ANY\nREQUIRE_USERNAME Alice Smith\n"
                       "SOURCE 203.0.113.0/24\nSOURCE ANY\nSOURCE ANY\n"
                       "%include_folder /etc/fwknop/users.d\nSOURCE fe80::/10\n",
                       "/etc/fwknop/users.d/bob.conf": "SOURCE ANY\n"},
                      dirs={"/etc/fwknop/users.d": ["bob.conf"]})
    names = client_names(read_access(Path("/etc/fwknop/access.conf"), files))
    assert names == ["Alice-Smith", "fwknop-203.0.113.0-24", "fwknop-any", "fwknop-any-2",
                     "bob", "fwknop-fe80-10"]


def two_stanzas() -> list[Stanza]:
    return stanzas(f"SOURCE 203.0.113.0/24\nREQUIRE_USERNAME alice\nOPEN_PORTS tcp/22, "
                   f"tcp/2222\n{KEYS}FW_ACCESS_TIMEOUT 60\n\n"
                   f"SOURCE ANY\nOPEN_PORTS tcp/2222, udp/53\n{other_keys(7)}")


def test_ports_map_onto_the_services_there_or_new_ones() -> None:
    made = plan(two_stanzas(), NO_CONF, CONFIG, EMPTY, now=NOW)
    alice, anyone = made.stanzas
    assert alice.services == ((("tcp", 22), "ssh", False), (("tcp", 2222), "tcp-2222", True))
    assert anyone.services == ((("tcp", 2222), "tcp-2222", False), (("udp", 53), "udp-53", True))
    assert made.services == (Service("tcp-2222", "tcp", 2222, 60, 300),
                             Service("udp-53", "udp", 53, 30, 300))
    assert any("tcp/22 opens ssh for 30 s, at most 300 s (fwknopd: 60 s" in note
               for note in alice.notes)
    assert any("tcp/2222 opens tcp-2222 for 60 s" in note for note in anyone.notes)
    assert [e.services for e in made.entries] == [("ssh", "tcp-2222"), ("tcp-2222", "udp-53")]
    entry = made.entries[0]
    assert (entry.name, entry.kind, entry.secret, entry.sources) == (
        "alice", KIND_FWKNOP, b"", ("203.0.113.0/24",))
    assert (entry.fwknop_key, entry.fwknop_hmac_key) == (RIJNDAEL, HMAC)
    assert not entry.allow_other_address
    assert made.fwknop_port == 62201  # fwknopd's default, ours elsewhere
    taken = replace(CONFIG, services={**DEFAULT_SERVICES,
                                      "tcp-2222": Service("tcp-2222", "tcp", 2223, 1, 1)})
    assert plan(two_stanzas(), NO_CONF, taken, EMPTY, now=NOW).services[0].name == "tcp-2222-2"


def imported(made: ImportPlan) -> Known:
    return Known(tuple(made.entries), {e.name: e for e in made.entries})


def test_a_stanza_is_matched_by_its_hmac_key_so_a_second_plan_changes_nothing() -> None:
    first = plan(two_stanzas(), NO_CONF, CONFIG, EMPTY, now=NOW)
    config = replace(CONFIG, fwknop_port=62201, services={
        **CONFIG.services, **{s.name: s for s in first.services}})
    renamed = Known(tuple(replace(e, name=e.name + "-x") for e in first.entries), {})
    again = plan(two_stanzas(), NO_CONF, config, renamed, now=NOW + 60)
    assert [p.outcome for p in again.stanzas] == [Outcome.ALREADY, Outcome.ALREADY]
    assert [p.name for p in again.stanzas] == ["alice-x", "fwknop-any-x"]
    assert not again.changes and not again.services and not again.fwknop_port
    text = render(again, dry_run=False)
    assert "already imported as alice-x (the store holds its HMAC key): unchanged" in "\n".join(
        text)
    assert text[-1] == "nothing to change: every stanza that can be is imported"
    changed = Known((replace(first.entries[0], sources=(), revoked=True),), {})
    notes = plan(two_stanzas()[:1], NO_CONF, config, changed, now=NOW).stanzas[0].notes
    assert any("alice knocks from anywhere, not what SOURCE says now" in n for n in notes)
    assert any("alice is revoked: left so" in n for n in notes)


def test_a_taken_name_is_not_imported_again_nor_its_keys_under_another() -> None:
    moved = ClientEntry("alice", bytes(32), ("ssh",))  # moved to spa1://: keys gone
    twice = stanzas(f"SOURCE ANY\nREQUIRE_USERNAME alice\nOPEN_PORTS tcp/22\n{KEYS}"
                    f"SOURCE 192.0.2.0/24\nOPEN_PORTS tcp/22\n{KEYS}")
    made = plan(twice, NO_CONF, CONFIG, Known((), {"alice": moved}), now=NOW)
    assert [p.outcome for p in made.stanzas] == [Outcome.SKIPPED, Outcome.SKIPPED]
    assert "the name alice is taken by a client with other keys (kind spa)" in \
        made.stanzas[0].reasons[0]
    assert "the same HMAC key as the stanza at /etc/fwknop/access.conf:1 (alice)" in \
        made.stanzas[1].reasons[0]
    assert not made.entries


def test_the_same_key_twice_in_the_file_makes_one_client() -> None:
    made = plan(stanzas(f"SOURCE 10.0.0.0/8\nOPEN_PORTS tcp/22\n{KEYS}"
                        f"SOURCE ANY\nOPEN_PORTS tcp/443\n{KEYS}"), NO_CONF, CONFIG, EMPTY,
                now=NOW)
    assert [p.outcome for p in made.stanzas] == [Outcome.NEW, Outcome.SKIPPED]
    assert [e.name for e in made.entries] == ["fwknop-10.0.0.0-8"]


def test_the_compat_clients_cap_holds_for_an_import() -> None:
    full = Known(tuple(ClientEntry(f"c{i}", b"", ("ssh",), kind=KIND_FWKNOP,
                                   fwknop_key=bytes([1]) * 32,
                                   fwknop_hmac_key=i.to_bytes(4, "big") * 16)
                       for i in range(MAX_CLIENTS)), {})
    with pytest.raises(LocalError, match=f"would make {MAX_CLIENTS + 1} fwknop clients"):
        plan(two_stanzas()[:1], NO_CONF, CONFIG, full, now=NOW)


@pytest.mark.parametrize(("settings", "port"), [
    ({}, 62201),
    ({"ENABLE_UDP_SERVER": "Y", "UDPSERV_PORT": "40000"}, 40000),
    ({"ENABLE_UDP_SERVER": "Y"}, 62201),
    ({"ENABLE_NFQ_CAPTURE": "Y", "NFQ_PORT": "40002"}, 40002),
    ({"PCAP_FILTER": "udp dst port 12345"}, 12345),
    ({"PCAP_FILTER": "udp port 1 or udp port 2"}, 0),
    ({"PCAP_FILTER": "tcp port 62201"}, 0),
    ({"ENABLE_UDP_SERVER": "Y", "UDPSERV_PORT": "0"}, 0),
])
def test_fwknopds_port_comes_from_its_settings(settings: dict[str, str], port: int) -> None:
    assert fwknopd_port(FwknopdConf(NO_CONF.path, settings, True))[0] == port


def test_fwknop_port_is_set_only_when_unset_and_never_on_listen_port() -> None:
    body = two_stanzas()[:1]
    assert plan(body, NO_CONF, CONFIG, EMPTY, now=NOW).fwknop_port == 62201
    clash = plan(body, NO_CONF, replace(CONFIG, listen_port=62201), EMPTY, now=NOW)
    assert clash.fwknop_port == 0 and clash.entries
    assert "fwknopd's port 62201 is listen_port here" in clash.port_line
    assert "then run this again to set fwknop_port = 62201" in clash.port_line
    other = plan(body, NO_CONF, replace(CONFIG, fwknop_port=40000), EMPTY, now=NOW)
    assert other.fwknop_port == 0 and "fwknop_port is 40000 here, not 62201" in other.port_line
    unknown = plan(body, FwknopdConf(NO_CONF.path, {"PCAP_FILTER": "udp"}, True), CONFIG,
                   EMPTY, now=NOW)
    assert unknown.fwknop_port == 0 and "names no one UDP port" in unknown.port_line
    debian = plan(stanzas("SOURCE ANY\nKEY_BASE64 __CHANGEME__\nHMAC_KEY_BASE64 __CHANGEME__\n"),
                  NO_CONF, CONFIG, EMPTY, now=NOW)
    assert not debian.changes and debian.port_line == "fwknop_port not set: no stanza to serve"


def test_fwknopd_conf_settings_we_do_not_carry_are_said() -> None:
    conf = FwknopdConf(NO_CONF.path, {"ENABLE_SPA_PACKET_AGING": "N", "ENABLE_TCP_SERVER": "Y",
                                      "ENABLE_IPT_FORWARDING": "Y", "BLACKLIST": "192.0.2.0/24",
                                      "ACCESS_FOLDER": "/etc/fwknop/access.d"}, True)
    notes = "\n".join(plan(two_stanzas(), conf, CONFIG, EMPTY, now=NOW).notes)
    for fragment in ("ENABLE_SPA_PACKET_AGING N: fwknopd took packets of any age",
                     "ENABLE_TCP_SERVER: SPA over TCP is not served",
                     "ENABLE_IPT_FORWARDING: a client's NAT request (fwknop -N HOST:PORT) "
                     "is served only when HOST:PORT is a gateway service it may open",
                     "BLACKLIST 192.0.2.0/24: not carried over",
                     "ACCESS_FOLDER /etc/fwknop/access.d: fwknopd reads that"):
        assert fragment in notes
    aged = plan(two_stanzas(), NO_CONF, CONFIG, EMPTY, now=NOW).notes
    assert aged == ("MAX_SPA_PACKET_AGE 120: here the window is 30 s either way ([server] "
                    "window, for both protocols): a client whose clock is further off is "
                    "refused stale or future",)
    absent = plan(two_stanzas(), FwknopdConf(NO_CONF.path, {}, False), CONFIG, EMPTY, now=NOW)
    assert absent.notes[0] == "no /etc/fwknop/fwknopd.conf: fwknopd's defaults assumed"


def test_the_plan_reads_the_same_dry_or_not_and_names_every_client() -> None:
    made = plan(two_stanzas(), NO_CONF, CONFIG, EMPTY, now=NOW)
    wet, dry = render(made, dry_run=False), render(made, dry_run=True)
    assert dry[0].startswith("dry run: nothing is changed")
    assert [line.replace("would import", "imported").replace("would add", "add")
            .replace("would set", "set").replace(" to import", " imported")
            for line in dry[1:]] == wet
    text = "\n".join(wet)
    assert "stanzas: 2 imported: alice, fwknop-any; 0 already imported; 0 not imported" in text
    assert "set fwknop_port = 62201 under [server]" in text
    assert "restart spa-server" in text and "`spa-server clients` prints" in text
    assert_no_secret(text)


def test_an_imported_client_is_served_by_the_compat_verifier() -> None:
    made = plan(two_stanzas()[:1], NO_CONF, CONFIG, EMPTY, now=NOW)
    entry = made.entries[0]
    services = {**CONFIG.services, **{s.name: s for s in made.services}}
    verifier = CompatVerifier({entry.name: FwknopKeys(entry.fwknop_key, entry.fwknop_hmac_key)},
                              Policy(services, {entry.name: config_mod.client_policy(entry)}),
                              budget=HmacBudget(max_hmacs=10**6, per_source=10**6))

    def knock(ports: tuple[tuple[str, int], ...], salt: int) -> bytes:
        data = SpaData(f"{salt:016d}", "alice", NOW, "3.0.0", Message.ACCESS,
                       ipaddress.IPv4Address("0.0.0.0"), ports)  # fwknop -s
        return seal(plaintext(data), FwknopKeys(RIJNDAEL, HMAC), salt=salt.to_bytes(8, "big"))

    accepted = verifier.verify(knock((("tcp", 22), ("tcp", 2222)), 1), "203.0.113.9", NOW)
    assert isinstance(accepted, CompatAccepted) and accepted.client == "alice"
    assert [d.service.name for d in accepted.decisions] == ["ssh", "tcp-2222"]
    outside = verifier.verify(knock((("tcp", 22),), 2), "198.51.100.9", NOW)
    assert isinstance(outside, Refused) and outside.reason.value == "source_not_allowed"
    https = verifier.verify(knock((("tcp", 443),), 3), "203.0.113.9", NOW)
    assert isinstance(https, Refused) and https.reason.value == "service_not_allowed"


def test_adding_services_keeps_the_builtin_ones_and_the_admins_comments(
        tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(f'# mine, keep me\n[server]\nserver_id = "{"B" * 22}"\nlisten_port = 62202\n'
                    "fwknop_port = 0 # off for now\nstate_dir = \"/x\"\n\n[services]\n")
    path.chmod(0o600)
    assert set(config_mod.load(path).services) == {"ssh", "https"}  # built in
    made = Service("tcp-2222", "tcp", 2222, 60, 300)
    config_mod.add_services(path, [made], fwknop_port=62201)
    config = config_mod.load(path)
    assert dict(config.services) == {**DEFAULT_SERVICES, "tcp-2222": made}
    assert config.fwknop_port == 62201
    text = path.read_text()
    assert text.startswith("# mine, keep me\n")
    before = path.read_bytes()
    config_mod.add_services(path, [made], fwknop_port=62201)  # as it is: kept
    assert path.read_bytes() == before
    with pytest.raises(LocalError, match=r"\[services.tcp-2222\] exists with other settings"):
        config_mod.add_services(path, [replace(made, port=2223)])
    with pytest.raises(LocalError, match="fwknop_port is 62201 now"):
        config_mod.add_services(path, [], fwknop_port=40000)
    fresh = tmp_path / "fresh" / "server.toml"
    fresh.parent.mkdir()
    fresh.write_text(f'[server]\nserver_id = "{"B" * 22}"\nlisten_port = 62202\n')
    fresh.chmod(0o600)
    with pytest.raises(LocalError, match="is listen_port too"):  # checked before written
        config_mod.add_services(fresh, [], fwknop_port=62202)
    assert config_mod.load(fresh).fwknop_port == 0


def test_root_edits_the_config_as_root_and_the_store_as_its_owner() -> None:
    """The config is root's and the store the daemon user's: the import writes
    each as its owner (the store's uid switch must not cover the config edit)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the state directory belongs to nobody")
    top = Path(tempfile.mkdtemp(prefix="spa-import-", dir="/tmp"))
    try:
        top.chmod(0o711)
        etc, state = top / "etc", top / "state"
        etc.mkdir(mode=0o700)
        state.mkdir(mode=0o700)
        os.chown(state, NOBODY, NOBODY)
        config = etc / "server.toml"
        admin.init(config, listen_port=62202, backend="memory", state_dir=state, force=False)
        access = etc / "access.conf"
        access.write_text(f"SOURCE ANY\nOPEN_PORTS tcp/2222\n{KEYS}")
        made = import_fwknopd(config, access, etc / "fwknopd.conf", conf_given=False,
                              dry_run=False, now=NOW)
        assert [e.name for e in made.entries] == ["fwknop-any"]
        assert os.geteuid() == 0
        loaded = config_mod.load(config)
        assert loaded.fwknop_port == 62201 and "tcp-2222" in loaded.services
        assert config.stat().st_uid == 0 and (state / CLIENTS_DB).stat().st_uid == NOBODY
        with ClientStore.open_as_owner(state, create=False) as store:
            assert [e.name for e in store.of_kind(KIND_FWKNOP)] == ["fwknop-any"]
    finally:
        shutil.rmtree(top)
