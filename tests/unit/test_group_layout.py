"""A group's key names, its client records against the config's view of a
client, TTLs under a controlled clock, and the claim policy (spa.group;
docs/groups.md)."""

from __future__ import annotations

import ast
import ipaddress
import json
from pathlib import Path

import pytest

from spa.core.errors import AFTER_AUTHENTICATION, Reason
from spa.core.keys import derive_keys
from spa.core.wire import NONCE_SIZE
from spa.group import clients as group_clients
from spa.group import layout
from spa.group.clients import GroupClient, client_record, decode_client, group_client
from spa.group.codec import RecordError, utc_seconds
from spa.group.layout import GroupNameError, KeyRef, Kind
from spa.group.policy import (
    DEFAULT_ON_STORE_DOWN,
    LOCAL_ONLY_RISK,
    ClaimResult,
    OnStoreDown,
    Verdict,
    decide,
    decide_otp,
    parse_on_store_down,
)
from spa.group.records import MAX_TTL, MEMBER_SKEW, LeaseRecord, claim_ttl, claim_until, lease_ttl
from spa.server import config as config_mod
from spa.server.config import ClientEntry, ServerConfig, client_policy
from tests.unit.test_core_purity import BANNED, BANNED_CALLS, imported_names

SID = bytes.fromhex("5350412d746573742d7365727665722e")
OTHER_SID = bytes(16)
SECRET = bytes(range(32, 64))
OLD = bytes(range(64, 96))
NONCE = bytes(range(NONCE_SIZE))
V4 = ipaddress.ip_address("203.0.113.7")
V6 = ipaddress.ip_address("2001:db8::1")


# ---- names -----------------------------------------------------------------

BAD_NAMES = [
    "", "/", "..", ".", "a/b", "a/../b", "../x", "g\n", "g ", " g", "-g", "_g", "g\x00",
    "g\\h", "a" * 200, "grüppe", "g\u200b", "g%2fh", "Ǆ", "١٢٣",
    "\uff47\uff52\uff4f\uff55\uff50",  # "group" in fullwidth letters
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_bad_name_is_refused_everywhere(name: str) -> None:
    for check in (layout.check_group, layout.check_member, layout.check_client):
        with pytest.raises(GroupNameError):
            check(name)
    with pytest.raises(GroupNameError):
        layout.client_key("g1", name)
    with pytest.raises(GroupNameError):
        layout.client_key(name, "alice")


def test_name_lengths_are_bounded_at_their_limits() -> None:
    assert layout.check_group("g" * layout.MAX_GROUP_NAME)
    with pytest.raises(GroupNameError):
        layout.check_group("g" * (layout.MAX_GROUP_NAME + 1))
    assert layout.check_member("m" * layout.MAX_MEMBER_NAME)
    with pytest.raises(GroupNameError):
        layout.check_member("m" * (layout.MAX_MEMBER_NAME + 1))
    assert layout.check_client("c" * 64)
    with pytest.raises(GroupNameError):
        layout.check_client("c" * 65)


def test_group_names_are_lower_case_and_member_names_may_be_host_names() -> None:
    with pytest.raises(GroupNameError):
        layout.check_group("Prod")
    with pytest.raises(GroupNameError):
        layout.check_group("prod.eu")
    assert layout.check_member("knock-1.example.org") == "knock-1.example.org"
    assert layout.check_client("alice@laptop.1") == "alice@laptop.1"


def test_an_error_quotes_at_most_a_short_prefix_of_a_name() -> None:
    with pytest.raises(GroupNameError) as info:
        layout.check_client("x/" * 5000)
    assert len(str(info.value)) < 200 and "\n" not in str(info.value)


# ---- keys ------------------------------------------------------------------

def test_the_keys_of_a_group() -> None:
    assert layout.group_prefix("g1") == "/spa/groups/g1/"
    assert layout.meta_key("g1") == "/spa/groups/g1/meta"
    assert layout.client_key("g1", "alice") == "/spa/groups/g1/clients/alice"
    assert layout.revoked_key("g1", "alice") == "/spa/groups/g1/revoked/alice"
    assert layout.activated_key("g1", "alice") == "/spa/groups/g1/activated/alice"
    assert layout.member_key("g1", "m1") == "/spa/groups/g1/members/m1"
    assert layout.lease_key("g1", "alice", V6, "ssh") == (
        "/spa/groups/g1/leases/alice/2001:db8::1/ssh")
    assert layout.claim_key("g1", "alice", NONCE) == (
        "/spa/groups/g1/claims/alice/000102030405060708090a0b0c0d0e0f1011121314151617")


def test_a_claim_key_depends_on_exactly_group_client_and_nonce() -> None:
    key = layout.claim_key("g1", "alice", NONCE)
    assert layout.claim_key("g1", "alice", bytes(NONCE)) == key  # the same at every member
    other_nonce = NONCE[:-1] + b"\xff"
    assert len({key, layout.claim_key("g2", "alice", NONCE), layout.claim_key("g1", "bob", NONCE),
                layout.claim_key("g1", "alice", other_nonce)}) == 4
    for nonce in (b"", NONCE[:-1], NONCE + b"\0"):
        with pytest.raises(GroupNameError):
            layout.claim_key("g1", "alice", nonce)


def test_prefixes_never_reach_another_group_or_client() -> None:
    assert not layout.client_key("g10", "alice").startswith(layout.group_prefix("g1"))
    assert not layout.claim_key("g1", "alice.b", NONCE).startswith(
        layout.client_claims_prefix("g1", "alice"))
    assert not layout.lease_key("g1", "alice2", V4, "ssh").startswith(
        layout.client_leases_prefix("g1", "alice"))
    assert layout.lease_key("g1", "alice", V4, "ssh").startswith(
        layout.client_leases_prefix("g1", "alice"))
    assert layout.client_key("g1", "alice").startswith(layout.kind_prefix("g1", Kind.CLIENT))
    with pytest.raises(GroupNameError):
        layout.kind_prefix("g1", Kind.META)


def test_parse_key_inverts_every_key_function() -> None:
    cases = {
        layout.meta_key("g1"): KeyRef(Kind.META, ()),
        layout.client_key("g1", "a.b"): KeyRef(Kind.CLIENT, ("a.b",)),
        layout.revoked_key("g1", "a"): KeyRef(Kind.REVOKED, ("a",)),
        layout.activated_key("g1", "a"): KeyRef(Kind.ACTIVATED, ("a",)),
        layout.member_key("g1", "m.example"): KeyRef(Kind.MEMBER, ("m.example",)),
        layout.lease_key("g1", "a", V6, "ssh"): KeyRef(Kind.LEASE, ("a", "2001:db8::1", "ssh")),
        layout.claim_key("g1", "a", NONCE): KeyRef(Kind.CLAIM, ("a", NONCE.hex())),
        layout.otp_claim_key("g1", "a", 0): KeyRef(Kind.CLAIM, ("a", "otp-0")),
        layout.otp_claim_key("g1", "a", 60_000_000): KeyRef(Kind.CLAIM, ("a", "otp-60000000")),
    }
    for key, ref in cases.items():
        assert layout.parse_key("g1", key) == ref


@pytest.mark.parametrize("key", [
    "/spa/groups/g2/meta", "/spa/groups/g1", "/spa/groups/g1/", "/spa/groups/g1/meta/x",
    "/spa/groups/g1/other/a", "/spa/groups/g1/clients/", "/spa/groups/g1/clients/a/b",
    "/spa/groups/g1/clients/..", "/spa/groups/g1/leases/a/2001:DB8::1/ssh",
    "/spa/groups/g1/leases/a/203.0.113.007/ssh", "/spa/groups/g1/leases/a/fe80::1%eth0/ssh",
    "/spa/groups/g1/leases/a/203.0.113.7/SSH", "/spa/groups/g1/leases/a/203.0.113.7",
    "/spa/groups/g1/claims/a/" + NONCE.hex().upper(), "/spa/groups/g1/claims/a/00",
    "/spa/groups/g1/claims/a/" + NONCE.hex() + "/x", "/spa/groups/g1/members/m/../x",
    "/spa/groups/g1/claims/a/otp-", "/spa/groups/g1/claims/a/otp-01",
    "/spa/groups/g1/claims/a/otp--1", "/spa/groups/g1/claims/a/otp-1000000000000",
    "/spa/groups/g1/claims/a/OTP-1", "/spa/groups/g1/claims/a/otp-1/x",
    "spa/groups/g1/meta",
])
def test_parse_key_refuses_what_no_key_function_makes(key: str) -> None:
    with pytest.raises(GroupNameError):
        layout.parse_key("g1", key)


# ---- TTLs under a controlled clock -----------------------------------------

NOW = 1_800_000_000.0


@pytest.mark.parametrize(("until", "now", "ttl"), [
    (NOW + 30, NOW, 30), (NOW + 30.001, NOW, 31), (NOW + 29.999, NOW, 30),
    (NOW + 0.001, NOW, 1), (NOW, NOW, 1), (NOW - 100, NOW, 1), (NOW + 1, NOW + 0.5, 1),
    (NOW + MAX_TTL, NOW, MAX_TTL),
])
def test_lease_ttl_rounds_up_and_is_at_least_one(until: float, now: float, ttl: int) -> None:
    assert lease_ttl(until, now) == ttl


def test_lease_ttl_refuses_what_etcd_cannot_hold() -> None:
    for until, now in ((float("inf"), NOW), (float("nan"), NOW), (NOW, float("nan")),
                       (NOW + MAX_TTL + 1, NOW)):
        with pytest.raises(ValueError, match="TTL"):
            lease_ttl(until, now)


def test_a_lease_record_ttl_is_its_end_from_now() -> None:
    lease = LeaseRecord("alice", V4, "ssh", "tcp", 22, NOW + 300.5, "m1")
    assert lease.ttl(NOW) == 301
    assert lease.ttl(NOW + 300) == 1


def test_a_claim_lasts_while_any_member_could_accept_its_packet() -> None:
    window = 30.0
    # a packet sent at NOW, claimed as it arrives, and as late as the window allows
    assert claim_until(NOW, window) == NOW + window + MEMBER_SKEW
    assert claim_ttl(NOW, NOW, window) == 30 + MEMBER_SKEW
    assert claim_ttl(NOW, NOW + window, window) == MEMBER_SKEW
    # a packet from a clock ahead by the whole window: the longest claim
    assert claim_ttl(NOW + window, NOW, window) == 2 * 30 + MEMBER_SKEW
    assert claim_ttl(NOW, NOW + 0.5, window, skew=0) == 30  # 29.5 rounded up
    assert claim_ttl(NOW, NOW + window, window, skew=0) == 1  # never 0: etcd's minimum
    for window, skew in ((0.0, 5.0), (30.0, -1.0)):
        with pytest.raises(ValueError, match="positive window"):
            claim_ttl(NOW, NOW, window, skew)


# ---- client records against the config's view -------------------------------

ENTRY = ClientEntry("alice", SECRET, ("ssh", "https"), allow_other_address=True,
                    enrolled="2026-12-06T00:14:18Z", enroll_by="2026-12-07T00:00:00Z",
                    otp_secret="JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", endpoint="knock.example:62201",
                    old_secret=OLD, old_until="2026-12-06T01:00:00Z",
                    sources=("203.0.113.0/24", "2001:db8::/48"))


def test_a_group_client_decides_as_the_config_does() -> None:
    client = decode_client(client_record(ENTRY, SID), SID)
    assert client.policy() == client_policy(ENTRY)
    revoked = ClientEntry("alice", SECRET, ENTRY.services, **{
        k: getattr(ENTRY, k) for k in ("allow_other_address", "enroll_by", "sources")},
        revoked=True)
    assert client.policy(revoked=True) == client_policy(revoked)


def test_a_group_client_holds_the_keys_the_verifier_would_derive() -> None:
    client = decode_client(client_record(ENTRY, SID), SID)
    config = ServerConfig(path=config_mod.DEFAULT_CONFIG, server_id=SID,
                          clients={"alice": ENTRY})
    grace_end = utc_seconds(ENTRY.old_until)
    for now in (grace_end - 1.0, float(grace_end)):
        secrets = config.secrets(now)
        assert client.key_sets(now) == {name: derive_keys(secret, SID)
                                        for name, secret in secrets.items()}
        assert client.tag_keys(now) == {name: keys.tag_key
                                        for name, keys in client.key_sets(now).items()}
    assert len(client.key_sets(grace_end - 1.0)) == 2 and len(client.key_sets(grace_end)) == 1
    assert group_clients.OLD_KEY == config_mod.OLD_KEY
    assert group_clients.KIND_SPA == config_mod.KIND_SPA


def test_a_client_record_is_bound_to_its_server_id() -> None:
    data = client_record(ENTRY, SID)
    with pytest.raises(RecordError, match="another group"):
        decode_client(data, OTHER_SID)
    assert client_record(ENTRY, OTHER_SID) != data
    assert decode_client(client_record(ENTRY, OTHER_SID), OTHER_SID).keys == derive_keys(
        SECRET, OTHER_SID)


def test_the_repr_of_a_group_client_shows_no_key() -> None:
    client = group_client(ENTRY, SID)
    shown = repr(client) + str(client)
    assert "alice" in shown
    assert ENTRY.otp_secret not in shown and "tag_key" not in shown


def test_what_a_group_cannot_hold_is_refused_with_one_line() -> None:
    fwknop = ClientEntry("old", b"", ("ssh",), kind="fwknop", fwknop_key=b"k" * 32,
                         fwknop_hmac_key=b"h" * 64)
    bad = [fwknop, ClientEntry("alice", SECRET[:-1], ("ssh",)),
           ClientEntry("alice", SECRET, ("ssh",), enroll_by="tomorrow"),
           ClientEntry("alice", SECRET, ("ssh",), enroll_by="2026-02-30T00:00:00Z"),
           ClientEntry("alice", SECRET, ("ssh",), otp_secret="not base32!"),
           ClientEntry("alice", SECRET, ("ssh",), sources=("203.0.113.7",))]  # not canonical
    for entry in bad:
        with pytest.raises(RecordError) as info:
            client_record(entry, SID)
        assert "\n" not in str(info.value)
    with pytest.raises(RecordError):
        client_record(ENTRY, SID[:-1])


def test_a_record_carries_over_what_the_config_tolerates() -> None:
    loose = ClientEntry("alice", SECRET, ("ssh", "ssh"), enrolled="long ago",
                        old_secret=OLD, old_until="")  # an old secret without an end: unused
    client = group_client(loose, SID)
    assert client.services == ("ssh",)
    assert client.enrolled is None and client.old_keys is None and client.old_until is None
    assert json.loads(client_record(loose, SID))["old"] is None


def test_keys_and_their_end_go_together() -> None:
    keys = derive_keys(SECRET, SID)
    with pytest.raises(RecordError):
        GroupClient("alice", SID, keys, ("ssh",), old_keys=keys)
    with pytest.raises(RecordError):
        GroupClient("alice", SID, keys, ("ssh",), old_until=5)


def test_utc_seconds_reads_what_format_utc_writes() -> None:
    for when in (0, 1_796_516_058, 951_782_400, 4_107_542_399):  # 2000-02-29, 2100-02-28
        assert utc_seconds(config_mod.format_utc(when)) == when
    for text in ("2026-12-06T00:14:18", "2026-12-06 00:14:18Z", "2026-13-01T00:00:00Z",
                 "2100-02-29T00:00:00Z", "2026-12-06T24:00:00Z", "1969-12-31T23:59:59Z",
                 "\uff12026-12-06T00:14:18Z", "2026-12-06T00:14:18Z\n"):
        with pytest.raises(RecordError):
            utc_seconds(text)


# ---- when a claim cannot be made -------------------------------------------

@pytest.mark.parametrize(("result", "mode", "verdict"), [
    (ClaimResult.CREATED, OnStoreDown.FAIL_CLOSED, Verdict.GRANT),
    (ClaimResult.CREATED, OnStoreDown.LOCAL_ONLY, Verdict.GRANT),
    (ClaimResult.EXISTS, OnStoreDown.FAIL_CLOSED, Verdict.REFUSE_REPLAY),
    (ClaimResult.EXISTS, OnStoreDown.LOCAL_ONLY, Verdict.REFUSE_REPLAY),
    (ClaimResult.UNREACHABLE, OnStoreDown.FAIL_CLOSED, Verdict.REFUSE_UNREACHABLE),
    (ClaimResult.UNREACHABLE, OnStoreDown.LOCAL_ONLY, Verdict.GRANT_UNCLAIMED),
])
def test_only_the_claimer_grants_and_a_down_store_fails_closed_by_default(
        result: ClaimResult, mode: OnStoreDown, verdict: Verdict) -> None:
    assert decide(result, mode) is verdict


def test_verdicts_carry_the_reasons_events_and_metrics_count() -> None:
    assert DEFAULT_ON_STORE_DOWN is OnStoreDown.FAIL_CLOSED
    assert decide(ClaimResult.UNREACHABLE, DEFAULT_ON_STORE_DOWN).reason is (
        Reason.GROUP_UNREACHABLE)
    assert Verdict.REFUSE_REPLAY.reason is Reason.REPLAY  # spa_replays counts it
    # an authenticator step another member used: as on one server
    assert decide_otp(ClaimResult.EXISTS, OnStoreDown.LOCAL_ONLY).reason is Reason.OTP_REUSED
    for result in ClaimResult:
        if result is not ClaimResult.EXISTS:
            for mode in OnStoreDown:
                assert decide_otp(result, mode) is decide(result, mode)
    assert [v for v in Verdict if v.granted] == [Verdict.GRANT, Verdict.GRANT_UNCLAIMED]
    assert all((v.reason is None) == v.granted for v in Verdict)
    assert str(Reason.GROUP_UNREACHABLE) == "group_unreachable"
    # an authenticated client's source is never taken for a scanner's
    assert Reason.GROUP_UNREACHABLE in AFTER_AUTHENTICATION


def test_the_store_down_option_parses_and_names_its_risk() -> None:
    assert parse_on_store_down("fail_closed") is OnStoreDown.FAIL_CLOSED
    assert parse_on_store_down("local_only") is OnStoreDown.LOCAL_ONLY
    for text in ("", "LOCAL_ONLY", "local-only", "off", "x" * 1000):
        with pytest.raises(ValueError, match="on_store_down") as info:
            parse_on_store_down(text)
        assert "fail_closed or local_only" in str(info.value) and len(str(info.value)) < 200
    assert "another" in LOCAL_ONLY_RISK and "window" in LOCAL_ONLY_RISK


# ---- the group's core is pure ----------------------------------------------

GROUP_DIR = Path(__file__).resolve().parents[2] / "spa" / "group"
PURE = ("__init__.py", "layout.py", "codec.py", "records.py", "clients.py", "policy.py",
        "rbac.py")
ETCD_LIBRARIES = {"etcd", "etcd3", "aetcd", "grpc", "pyetcd"}


def _runtime_imports(tree: ast.Module) -> list[str]:
    """Imported module names, leaving out `if TYPE_CHECKING:` blocks (types only)."""
    kept = [node for node in tree.body if not (
        isinstance(node, ast.If) and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING")]
    return imported_names(ast.Module(body=kept, type_ignores=[]))


@pytest.mark.parametrize("name", PURE)
def test_the_group_core_does_no_io_and_imports_no_etcd_library(name: str) -> None:
    path = GROUP_DIR / name
    tree = ast.parse(path.read_text(), filename=str(path))
    for imported in _runtime_imports(tree):
        top = imported.split(".")[0]
        assert imported not in BANNED and top not in BANNED, f"{name} imports {imported}"
        assert top not in ETCD_LIBRARIES, f"{name} imports {imported}"
        if top == "spa":
            assert imported.startswith(("spa.core", "spa.group")), f"{name} imports {imported}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            assert called not in BANNED_CALLS, f"{name}:{node.lineno} calls {called}()"


def test_the_purity_check_sees_a_runtime_import_and_not_a_typing_one() -> None:
    tree = ast.parse("from typing import TYPE_CHECKING\nimport time\n"
                     "if TYPE_CHECKING:\n    from spa.server.config import ClientEntry\n")
    names = _runtime_imports(tree)
    assert "time" in names and "spa.server.config" not in names
