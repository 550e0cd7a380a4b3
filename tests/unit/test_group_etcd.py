"""EtcdStore's own logic without an etcd: the prefix range, how etcd's error
answers map to our errors, failover between endpoints, a fresh token when
etcd says the old one expired, and a create retried after an endpoint failed
(the contract and the cluster tests run it against a real etcd)."""

from __future__ import annotations

import base64
import dataclasses
import http.server
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from etcd3gw import exceptions as gw
from hypothesis import given
from hypothesis import strategies as st

from spa.group import etcd
from spa.group.etcd import EtcdAccess, EtcdStore
from spa.group.kv import (
    Delete,
    LeaseExpiredError,
    Put,
    StoreError,
    StorePermissionError,
    StoreUnavailableError,
    WatchLostError,
)

PASSWORD = "s3cret-password-value"


@given(st.binary(min_size=1, max_size=6), st.binary(max_size=8))
def test_the_prefix_range_holds_exactly_the_keys_under_the_prefix(prefix: bytes,
                                                                  key: bytes) -> None:
    end = etcd._prefix_end(prefix)
    inside = prefix <= key and (end == b"\0" or key < end)
    assert inside == key.startswith(prefix)


def _answer(code: int, message: str, status: type[gw.Etcd3Exception] = gw.Etcd3Exception
            ) -> gw.Etcd3Exception:
    return status(json.dumps({"error": message, "message": message, "code": code}))


@pytest.mark.parametrize(("error", "expected"), [
    (_answer(7, "etcdserver: permission denied"), StorePermissionError),
    (_answer(5, "etcdserver: requested lease not found"), LeaseExpiredError),
    (_answer(14, "etcdserver: request timed out"), etcd._UnreachableError),
    (_answer(4, "context deadline exceeded"), etcd._UnreachableError),
    (_answer(2, "etcdserver: no leader"), etcd._UnreachableError),
    (_answer(16, "etcdserver: invalid auth token"), etcd._ExpiredTokenError),
    (gw.ConnectionFailedError("refused"), etcd._UnreachableError),
    (gw.ConnectionTimeoutError("read timed out"), etcd._UnreachableError),
    (gw.Etcd3Exception("CommonName of client sending a request against gateway will be "
                       "ignored and not used as expected\n"), StoreError),
    (_answer(3, "etcdserver: key is not provided"), StoreError),
])
def test_etcds_answers_map_to_our_errors(error: gw.Etcd3Exception, expected: type) -> None:
    mapped = etcd._refusal(error, "read a key")
    assert type(mapped) is expected


class Stub:
    """An Etcd3Client stand-in: each post() pops the next scripted answer
    (a dict, or an exception to raise)."""

    def __init__(self, *answers: dict[str, Any] | Exception) -> None:
        self.answers = list(answers)
        self.paths: list[str] = []
        self.bodies: list[Any] = []
        self.session = type("S", (), {"headers": {}})()

    def get_url(self, path: str) -> str:
        return path

    def post(self, url: str, json: Any = None) -> Any:
        self.paths.append(url)
        self.bodies.append(json)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _store(*stubs: Stub, user: str | None = None, page_keys: int = etcd.PAGE_KEYS,
           leader_first: bool = False) -> EtcdStore:
    """A store on scripted endpoints (leader first off: learning the leader
    would take the scripts' answers; the leader's own tests turn it on)."""
    access = EtcdAccess(tuple(f"https://10.0.0.{i}:2379" for i in range(1, len(stubs) + 1)),
                        Path("ca.crt"), Path("m.crt"), Path("m.key"), user=user,
                        password=PASSWORD if user else None)
    store = EtcdStore(access, page_keys=page_keys, leader_first=leader_first)
    store._clients = list(stubs)  # type: ignore[arg-type]
    return store


HEADER = {"header": {"revision": "9"}}


def _page(revision: int, keys: list[bytes], more: bool) -> dict[str, Any]:
    return {"header": {"revision": str(revision)}, "more": more,
            "kvs": [{"key": etcd._b64(k), "value": etcd._b64(k * 2), "mod_revision": "3"}
                    for k in keys]}


COMPACTED = _answer(11, "etcdserver: mvcc: required revision has been compacted")


def test_a_prefix_is_read_in_pages_pinned_at_the_first_pages_revision() -> None:
    stub = Stub(_page(9, [b"p/a", b"p/b"], True), _page(12, [b"p/b\x00", b"p/c"], True),
                _page(12, [b"p/d"], False))
    items, revision = _store(stub, page_keys=2).get_prefix(b"p/")
    assert revision == 9
    assert [i.key for i in items] == [b"p/a", b"p/b", b"p/b\x00", b"p/c", b"p/d"]
    end = etcd._b64(b"p0")
    assert stub.bodies == [
        {"key": etcd._b64(b"p/"), "range_end": end, "limit": "2"},
        {"key": etcd._b64(b"p/b\x00"), "range_end": end, "limit": "2", "revision": "9"},
        {"key": etcd._b64(b"p/c\x00"), "range_end": end, "limit": "2", "revision": "9"}]


def test_several_prefixes_are_read_in_turn_every_page_at_the_first_pages_revision() -> None:
    stub = Stub(_page(9, [b"q/a"], True), _page(12, [b"q/b"], False),
                _page(12, [], False), _page(12, [b"m"], False))
    pages: list[list[bytes]] = []
    items, revision = _store(stub, page_keys=1).get_prefixes(
        (b"q/", b"r/", b"m"), lambda page: pages.append([i.key for i in page]))
    assert revision == 9
    assert [i.key for i in items] == [b"m", b"q/a", b"q/b"]  # in key order
    assert pages == [[b"q/a"], [b"q/b"], [], [b"m"]]
    assert [(b["key"], b.get("revision")) for b in stub.bodies] == [
        (etcd._b64(b"q/"), None), (etcd._b64(b"q/a\x00"), "9"), (etcd._b64(b"r/"), "9"),
        (etcd._b64(b"m"), "9")]
    assert [b["range_end"] for b in stub.bodies[1:]] == [
        etcd._b64(b"q0"), etcd._b64(b"r0"), etcd._b64(b"n")]


def test_several_prefixes_overtaken_by_a_compaction_are_all_read_again() -> None:
    stub = Stub(_page(9, [b"q/a"], False), COMPACTED, _page(15, [b"q/a"], False),
                _page(15, [b"r/a"], False))
    items, revision = _store(stub, page_keys=1).get_prefixes((b"q/", b"r/"))
    assert (revision, [i.key for i in items]) == (15, [b"q/a", b"r/a"])
    assert [b["key"] for b in stub.bodies] == [etcd._b64(k) for k in (b"q/", b"r/", b"q/",
                                                                        b"r/")]


@pytest.mark.parametrize("prefixes", [(), (b"q/", b"q/a/"), (b"q/a/", b"q/")])
def test_prefixes_none_or_one_under_another_are_refused(prefixes: tuple[bytes, ...]) -> None:
    stub = Stub()
    with pytest.raises(ValueError, match="prefix"):
        _store(stub).get_prefixes(prefixes)
    assert stub.bodies == []


def test_a_paged_read_overtaken_by_a_compaction_starts_afresh_then_gives_up() -> None:
    stub = Stub(_page(9, [b"p/a"], True), COMPACTED, _page(15, [b"p/a"], True),
                _page(15, [b"p/b"], False))
    items, revision = _store(stub, page_keys=1).get_prefix(b"p/")
    assert (revision, [i.key for i in items]) == (15, [b"p/a", b"p/b"])
    assert "revision" not in stub.bodies[2]  # the new attempt's first page: today's revision
    always = Stub(*[answer for n in range(etcd.READ_ATTEMPTS)
                    for answer in (_page(9 + n, [b"p/a"], True), COMPACTED)])
    with pytest.raises(StoreError, match="compaction") as caught:
        _store(always, page_keys=1).get_prefix(b"p/")
    assert type(caught.value) is StoreError  # what the member handles: it reads again later
    assert always.answers == []


def test_a_call_fails_over_to_the_next_endpoint_and_stays_there() -> None:
    first = Stub(gw.ConnectionFailedError("refused"))
    second = Stub({**HEADER}, {**HEADER})
    store = _store(first, second)
    assert store.put(b"k", b"v") == 9
    assert store.put(b"k", b"v") == 9
    assert first.paths == ["/kv/put"]  # tried once, then left
    assert second.paths == ["/kv/put", "/kv/put"]


def test_when_no_endpoint_answers_the_call_raises_unavailable() -> None:
    store = _store(Stub(gw.ConnectionFailedError("refused")),
                   Stub(_answer(14, "etcdserver: request timed out")))
    with pytest.raises(StoreUnavailableError, match="no endpoint answered"):
        store.get(b"k")


def test_an_expired_token_is_renewed_once_and_the_call_repeated() -> None:
    stub = Stub({"token": "t1"}, _answer(16, "etcdserver: invalid auth token"),
                {"token": "t2"}, {**HEADER, "kvs": []})
    store = _store(stub, user="a-1")
    assert store.get(b"k") is None
    assert stub.paths == ["/auth/authenticate", "/kv/range", "/auth/authenticate", "/kv/range"]
    assert stub.session.headers["Authorization"] == "t2"


def test_a_refused_login_names_the_user_never_the_password() -> None:
    store = _store(Stub(_answer(3, "etcdserver: authentication failed, invalid user ID "
                                   "or password")), user="a-1")
    with pytest.raises(StoreError) as caught:
        store.get(b"k")
    assert "a-1" in str(caught.value)
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(store._access)


def _txn(succeeded: bool, value: bytes | None = None) -> dict[str, Any]:
    kvs = [] if value is None else [{"key": base64.b64encode(b"k").decode(),
                                     "value": base64.b64encode(value).decode(),
                                     "mod_revision": "5"}]
    return {**HEADER, "succeeded": succeeded,
            "responses": [] if succeeded else [{"response_range": {"kvs": kvs}}]}


@pytest.mark.parametrize(("second", "claimed"), [
    (_txn(True), True),  # the first attempt never landed
    (_txn(False, b"mine"), True),  # it landed before the endpoint failed: ours
    (_txn(False, b"theirs"), False),  # someone else's
])
def test_a_create_retried_after_a_failed_endpoint(second: dict[str, Any],
                                                  claimed: bool) -> None:
    store = _store(Stub(gw.ConnectionTimeoutError("read timed out")), Stub(second))
    assert store.create(b"k", b"mine") is claimed


def test_a_first_create_that_finds_the_key_taken_is_not_a_claim_even_with_our_value(
        ) -> None:
    store = _store(Stub(_txn(False, b"mine")))
    assert store.create(b"k", b"mine") is False


def _many_failed(*values: bytes | None, lease: int = 0) -> dict[str, Any]:
    """etcd's answer to a create_many whose compare failed: one range per key."""
    def found(i: int, value: bytes | None) -> dict[str, Any]:
        if value is None:
            return {"response_range": {}}  # the gateway leaves empty fields out
        kv = {"key": base64.b64encode(b"k%d" % i).decode(),
              "value": base64.b64encode(value).decode(), "mod_revision": "5"}
        if lease:
            kv["lease"] = str(lease)
        return {"response_range": {"kvs": [kv]}}
    return {**HEADER, "responses": [found(i, v) for i, v in enumerate(values)]}


class Recording(Stub):
    def post(self, url: str, json: Any = None) -> Any:
        self.sent = json
        return super().post(url, json)


def test_create_many_sends_one_txn_of_compares_puts_deletes_and_ranges() -> None:
    stub = Recording({**HEADER, "succeeded": True})
    store = _store(stub)
    assert store.create_many([Put(b"k0", b"a", 7), Put(b"k1", b"b", 7)],
                             [Put(b"l0", b"r", 9), Delete(b"l1")]) == frozenset()
    txn = stub.sent
    assert stub.paths == ["/kv/txn"]
    assert [c["target"] for c in txn["compare"]] == ["CREATE", "CREATE"]
    assert {c["create_revision"] for c in txn["compare"]} == {"0"}
    assert [next(iter(op)) for op in txn["success"]] == [
        "request_put", "request_put", "request_put", "request_delete_range"]
    assert [op["request_put"]["lease"] for op in txn["success"][:3]] == ["7", "7", "9"]
    assert len(txn["failure"]) == 2


def test_create_many_names_the_keys_etcd_found_taken() -> None:
    store = _store(Stub(_many_failed(None, b"theirs", None)))
    assert store.create_many([Put(b"k0", b"a"), Put(b"k1", b"b"), Put(b"k2", b"c")]) == {b"k1"}


@pytest.mark.parametrize(("second", "taken"), [
    ({**HEADER, "succeeded": True}, set()),  # the first attempt never landed
    (_many_failed(b"a", b"b", lease=7), set()),  # it landed before the endpoint failed
    (_many_failed(b"a", None, lease=7), {b"k0"}),  # one key someone else's: not all ours
    (_many_failed(b"a", b"b", lease=8), {b"k0", b"k1"}),  # their lease: theirs
])
def test_a_create_many_retried_after_a_failed_endpoint(second: dict[str, Any],
                                                       taken: set[bytes]) -> None:
    store = _store(Stub(gw.ConnectionTimeoutError("read timed out")), Stub(second))
    assert store.create_many([Put(b"k0", b"a", 7), Put(b"k1", b"b", 7)]) == taken


def test_a_first_create_many_finding_our_values_is_not_a_claim() -> None:
    store = _store(Stub(_many_failed(b"a", b"b", lease=7)))
    assert store.create_many([Put(b"k0", b"a", 7), Put(b"k1", b"b", 7)]) == {b"k0", b"k1"}


class _Stream:
    """A watch's response from etcd's gateway: the lines it streams, then its end."""

    status_code = 200

    def __init__(self, lines: list[dict[str, Any]]) -> None:
        self.lines = lines

    def iter_lines(self) -> list[bytes]:
        return [json.dumps(e).encode() for e in self.lines]

    def close(self) -> None:
        pass


def _event(key: bytes, revision: int) -> dict[str, Any]:
    """A watch event of `key` put at `revision`, as the gateway gives it."""
    return {"kv": {"key": base64.b64encode(key).decode(),
                   "value": base64.b64encode(b"v").decode(), "mod_revision": str(revision)}}


def test_a_watch_delivers_every_event_of_one_revision_once() -> None:
    streams = [[{"result": {"events": [_event(b"/p/1", 3), _event(b"/p/2", 3)]}}],
               # a reconnection: etcd replays from the revision asked for (4 here)
               [{"result": {"events": [_event(b"/p/3", 4), _event(b"/p/4", 4),
                                       _event(b"/p/5", 5)]}}]]
    seen: list[bytes] = []
    done = threading.Event()

    def post(*args: Any, **kwargs: Any) -> _Stream:
        if not streams:
            done.set()
            raise OSError("no more streams")
        return _Stream(streams.pop(0))

    stub = Stub({**HEADER})  # the permission probe
    stub.session = type("S", (), {"headers": {}, "post": post})()
    store = _store(stub)
    watch = store.watch_prefix(b"/p/", 3, lambda e: seen.append(e.key))
    try:
        assert done.wait(10)
    finally:
        watch.cancel()
    assert seen == [b"/p/1", b"/p/2", b"/p/3", b"/p/4", b"/p/5"]


def test_a_watch_whose_callback_raises_ends_instead_of_skipping() -> None:
    events = [{"result": {"created": True}},
              {"result": {"events": [
                  {"kv": {"key": base64.b64encode(b"/p/1").decode(),
                          "value": base64.b64encode(b"x").decode(), "mod_revision": "3"}},
                  {"kv": {"key": base64.b64encode(b"/p/2").decode(),
                          "value": base64.b64encode(b"y").decode(), "mod_revision": "4"}}]}}]

    class Response:
        status_code = 200

        def iter_lines(self) -> list[bytes]:
            return [json.dumps(e).encode() for e in events]

        def close(self) -> None:
            pass

    class StreamStub(Stub):
        session: Any

    stub = StreamStub({**HEADER})  # the permission probe
    stub.session = type("S", (), {"headers": {},
                                  "post": lambda *a, **k: Response()})()
    store = _store(stub)
    seen: list[bytes] = []

    def callback(event: Any) -> None:
        seen.append(event.key)
        raise RuntimeError("the group's handler failed")

    watch = store.watch_prefix(b"/p/", 1, callback)
    watch._thread.join(timeout=10)
    assert not watch._thread.is_alive()
    assert seen == [b"/p/1"]  # the second event is not delivered past the failure
    lost = watch.ended()
    assert isinstance(lost, WatchLostError)
    assert "RuntimeError" in str(lost)


def test_a_cancelled_watch_ends_quietly_when_its_response_is_closed_under_the_reader(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """cancel() closes the response while the watch thread reads it: http.client
    then raises AttributeError (its fp is gone); the thread ends, nothing escapes."""
    reading, closed = threading.Event(), threading.Event()

    class Response:
        status_code = 200
        raw = None  # _shut finds no socket and closes the response

        def iter_lines(self) -> Any:
            reading.set()
            assert closed.wait(10)
            raise AttributeError("'NoneType' object has no attribute 'read'")
            yield b""  # a generator, as requests' is

        def close(self) -> None:
            closed.set()

    class StreamStub(Stub):
        session: Any

    stub = StreamStub({**HEADER})
    stub.session = type("S", (), {"headers": {}, "post": lambda *a, **k: Response()})()
    escaped: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    watch = _store(stub).watch_prefix(b"/p/", 1, lambda event: None)
    assert reading.wait(10)
    watch.cancel()
    assert not watch._thread.is_alive()
    assert escaped == []
    assert watch.ended() is None  # cancelled, not lost


def test_a_watch_gives_each_event_of_a_revision_and_none_twice_after_reconnecting() -> None:
    """A transaction's keys share one revision: each is an event.  The
    stream that replays them after a reconnection gives only what is new."""
    streams: list[list[dict[str, Any]]] = [  # the first ends (a lost connection), the
        # second replays from revision 3
        [{"result": {"created": True}},
         {"result": {"events": [_event(b"/p/a", 3), _event(b"/p/b", 3), _event(b"/p/c", 3)]}}],
        [{"result": {"created": True}},
         {"result": {"events": [_event(b"/p/a", 3), _event(b"/p/b", 3), _event(b"/p/c", 3)]}},
         {"result": {"events": [_event(b"/p/d", 4), _event(b"/p/e", 4)]}}]]
    asked: list[str] = []
    done = threading.Event()

    def post(*args: Any, **kwargs: Any) -> _Stream:
        asked.append(kwargs["json"]["create_request"]["start_revision"])
        if len(asked) > len(streams):
            done.set()
            return _Stream([])
        return _Stream(streams[len(asked) - 1])

    class StreamStub(Stub):
        session: Any

    stub = StreamStub({**HEADER})
    stub.session = type("S", (), {"headers": {}, "post": staticmethod(post)})()
    seen: list[tuple[bytes, int]] = []
    watch = _store(stub).watch_prefix(b"/p/", 3, lambda e: seen.append((e.key, e.mod_revision)))
    try:
        assert done.wait(10)
    finally:
        watch.cancel()
    assert seen == [(b"/p/a", 3), (b"/p/b", 3), (b"/p/c", 3), (b"/p/d", 4), (b"/p/e", 4)]
    assert asked[:3] == ["3", "4", "5"]


# ---- the lean transaction path (http.client, kept alive) against a TLS server ----


class _Gateway(http.server.BaseHTTPRequestHandler):
    """etcd's gateway as far as a txn goes: answers the scripted status and
    body, and counts the TLS connections it accepted."""

    protocol_version = "HTTP/1.1"  # keep-alive
    script: ClassVar[list[tuple[int, dict[str, Any], bool]]] = []  # (status, body, close)
    seen: ClassVar[list[tuple[str, str | None, Any]]] = []  # (path, token, body)
    connections: ClassVar[list[int]] = []  # one a connection accepted

    def setup(self) -> None:
        super().setup()
        _Gateway.connections.append(1)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Gateway.seen.append((self.path, self.headers.get("Authorization"), body))
        status, answer, close = _Gateway.script.pop(0)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = close

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[EtcdAccess, int]]:
    """A TLS server on loopback that asks for our client certificate."""
    from tests.etcd_world import Pki

    pki = Pki(tmp_path)
    crt, key = pki.issue("gw", cn=None, ips=("127.0.0.1",), server=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_file))
    context.load_cert_chain(str(crt), str(key))
    context.verify_mode = ssl.CERT_REQUIRED  # as etcd's --client-cert-auth
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    _Gateway.script, _Gateway.seen, _Gateway.connections = [], [], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    access = EtcdAccess((f"https://127.0.0.1:{port}",), pki.ca_file, crt, key, timeout=2.0)
    try:
        yield access, port
    finally:
        server.shutdown()
        server.server_close()


def test_a_claims_txn_goes_over_one_kept_alive_tls_connection_with_the_token(
        gateway: tuple[EtcdAccess, int]) -> None:
    access, _ = gateway
    store = EtcdStore(access)
    store._clients[0].session.headers["Authorization"] = "tok-1"
    _Gateway.script += [(200, {**HEADER, "succeeded": True}, False)] * 3
    assert store.create(b"k", b"v", 7) is True
    assert store.create_many([Put(b"k1", b"a", 7)], [Put(b"l1", b"r", 9)]) == frozenset()
    assert store.create(b"k2", b"v") is True
    assert [(path, token) for path, token, _ in _Gateway.seen] == [("/v3/kv/txn", "tok-1")] * 3
    assert _Gateway.seen[1][2]["success"][1]["request_put"]["lease"] == "9"
    assert len(_Gateway.connections) == 1  # kept alive


def test_a_connection_the_gateway_closed_is_opened_anew_and_errors_map_as_etcd3gws(
        gateway: tuple[EtcdAccess, int]) -> None:
    access, _ = gateway
    store = EtcdStore(access)
    _Gateway.script += [(200, {**HEADER, "succeeded": True}, True),
                        (200, {**HEADER, "succeeded": False,
                               "responses": [{"response_range": {}}]}, False),
                        (500, {"error": "etcdserver: permission denied", "code": 7}, False),
                        (503, {"error": "etcdserver: no leader", "code": 14}, False)]
    assert store.create(b"k", b"v") is True
    assert store.create(b"k", b"v") is False  # taken (a fresh connection: the last closed)
    assert len(_Gateway.connections) == 2
    with pytest.raises(StorePermissionError):
        store.create(b"k", b"v")
    with pytest.raises(StoreUnavailableError):  # the only endpoint has no leader
        store.create(b"k", b"v")


def test_a_claims_txn_to_an_endpoint_that_is_not_there_fails_over(
        gateway: tuple[EtcdAccess, int]) -> None:
    access, _ = gateway
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nowhere = f"https://127.0.0.1:{unused.getsockname()[1]}"  # bound, never listening
        store = EtcdStore(dataclasses.replace(access, endpoints=(nowhere, *access.endpoints)),
                          leader_first=False)  # the script answers the txn only
        _Gateway.script += [(200, {**HEADER, "succeeded": True}, False)]
        assert store.create(b"k", b"v") is True
        assert store._current == 1  # and stays on the one that answered


def test_a_claims_request_goes_in_one_piece_headers_and_body(tmp_path: Path) -> None:
    """One send: the gateway's first read (one TLS record) holds the whole
    request (http.client's two sends would give it the headers alone)."""
    from tests.etcd_world import Pki

    pki = Pki(tmp_path)
    crt, key = pki.issue("gw", cn=None, ips=("127.0.0.1",), server=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_file))
    context.load_cert_chain(str(crt), str(key))
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    firsts: list[bytes] = []

    def serve() -> None:
        with context.wrap_socket(listener.accept()[0], server_side=True) as conn:
            for _ in range(2):
                threading.Event().wait(0.3)  # every record of the request has arrived
                firsts.append(conn.recv(65536))  # one read: one TLS record at most
                answer = json.dumps({**HEADER, "succeeded": True}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        access = EtcdAccess((f"https://127.0.0.1:{listener.getsockname()[1]}",), pki.ca_file,
                            crt, key, timeout=2.0)
        store = EtcdStore(access)
        store._clients[0].session.headers["Authorization"] = "tok-9"
        assert store.create(b"k", b"v", 7) is True
        assert store.create_many([Put(b"k1", b"a", 7)], [Delete(b"l1")]) == frozenset()
        server.join(5)
    finally:
        listener.close()
    for first in firsts:  # each: the headers, then the whole JSON body
        head, _, body = first.partition(b"\r\n\r\n")
        assert head.startswith(b"POST /v3/kv/txn HTTP/1.1\r\n")
        assert b"\r\nAuthorization: tok-9" in head
        assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)
        assert json.loads(body)["compare"][0]["target"] == "CREATE"
    assert len(firsts) == 2  # on one kept-alive connection


def test_a_token_that_is_no_header_value_is_never_sent(
        gateway: tuple[EtcdAccess, int]) -> None:
    access, _ = gateway
    store = EtcdStore(access)
    store._clients[0].session.headers["Authorization"] = "tok\r\nX-Injected: 1"
    with pytest.raises(StoreUnavailableError):
        store.create(b"k", b"v")
    assert _Gateway.seen == []
