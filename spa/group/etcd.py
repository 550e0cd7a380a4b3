"""kv.KV over a real etcd v3 cluster, through etcd's JSON gateway with
etcd3gw (the choice and its figures: docs/benchmarks.md, "etcd clients").

Invariants:
- TLS both ways: the CA file verifies the members; the client certificate
  and key prove this member to them (etcd runs with --client-cert-auth).
- etcd's gateway does not let a certificate's Common Name name the RBAC user
  (etcd 3.4 answers 400 to a gateway request whose certificate has a CN), so
  the member's certificate carries no CN and its RBAC identity is a user and
  password, traded for a token (sent again when etcd says it expired).  The
  password never reaches a message, a log or argv.
- Every call has a deadline (timeout seconds per endpoint); an endpoint that
  cannot answer (refused, timed out, no leader) is left for the next one in
  the list, and when none answers the call raises StoreUnavailableError, so a
  cluster without quorum fails a call within len(endpoints) * timeout.
- get_prefix reads in pages of `page_keys` keys (etcd's range `limit`, the
  next page from the key after the last one), every page after the first
  pinned at the first page's revision: one consistent snapshot, as one range
  would give, without one answer of the whole group (68 MB of JSON at 10^5
  clients) or the memory etcd and we need for it.  If etcd compacts past
  that revision before the last page, the read starts again at a new
  revision (READ_ATTEMPTS in all), then raises StoreError, which the member
  takes as any failed read: it keeps what it has and reads again later.
  get_prefixes reads several prefixes so, in turn, every page of every one
  at the first page's revision (a member's start: the kinds it needs, one
  snapshot).
  The next page is fetched on a thread while the caller's on_page has the
  last one (the member decodes its records there: the read waits on etcd's
  gateway far more than on Python, so the two overlap).
- A claim's transaction (create, create_many: the one call on a group
  knock's path) goes on kept-alive TLS connections of its own, the request
  in one send (_Lean: a few per endpoint, one per claim thread at a time), not
  through requests and etcd3gw: a third of the CPU a call, measured in
  benchmarks/group_etcd_commit.py.  Same TLS (our CA, our certificate),
  same deadline, same token; a failure is the same Etcd3Exception etcd3gw
  raises, so failover, a fresh token and the retry after a failed endpoint
  are the other calls'.  A kept-alive connection the peer has closed is
  opened anew before it is used (as urllib3 does), never retried after.
- A claim's transaction goes to etcd's leader first when the member knows
  which configured endpoint that is (spa.group.leader: learned off the
  knock's path, on a thread of its own, from etcd's maintenance status and
  member list; forgotten when the leader fails a call or an answer carries a
  newer raft term).  Until then, and when the leader is not a configured
  endpoint, the configured order; failover from there is every call's.
- A watch runs in its own thread, reconnects to the next endpoint from the
  revision after the last one delivered, and never delivers an event twice
  nor skips one: the keys of one revision (a transaction, a lease's keys
  deleted with it) are each an event, and etcd sends a revision's events in
  one response, so a stream restarts at a whole revision.
  If its callback raises, or etcd has compacted the revision it needs, the
  watch ends (ended() says why) rather than go on past an event.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import etcd3gw
import requests
from etcd3gw import exceptions as gw_errors
from requests.adapters import HTTPAdapter

from spa.group.kv import (
    Delete,
    Event,
    EventKind,
    Item,
    LeaseExpiredError,
    PageCallback,
    Put,
    StoreError,
    StorePermissionError,
    StoreUnavailableError,
    WatchLostError,
    check_batch,
    check_prefixes,
)
from spa.group.leader import Leader, leader_index, term_of

T = TypeVar("T")

# gRPC status codes etcd's gateway puts in its error bodies
_DEADLINE_EXCEEDED, _NOT_FOUND, _PERMISSION_DENIED, _OUT_OF_RANGE = 4, 5, 7, 11
_UNAVAILABLE, _UNAUTHENTICATED = 14, 16
_RECONNECT_PAUSE = 0.2  # seconds between watch reconnections (doubles up to 2 s)
PAGE_KEYS = 5000  # keys a get_prefix page holds: ~3.4 MB of JSON for client records
# (at 10^5 clients measured as fast as one range or faster: docs/scale.md)
READ_ATTEMPTS = 3  # a get_prefix started again this often while compactions overtake it


@dataclass(frozen=True, slots=True)
class EtcdAccess:
    """Where the cluster is and how this member proves itself."""

    endpoints: tuple[str, ...]  # https://host:port, tried in this order
    ca_file: Path
    cert_file: Path
    key_file: Path
    user: str | None = None
    password: str | None = None  # secret: never in a message
    timeout: float = 2.0  # seconds for one call on one endpoint
    watch_idle: float = 30.0  # seconds without a byte before a watch reconnects

    def __repr__(self) -> str:
        return f"EtcdAccess(endpoints={self.endpoints!r}, user={self.user!r})"


class _UnreachableError(Exception):
    """This endpoint could not answer: try the next one."""


class _ExpiredTokenError(Exception):
    """The auth token is no longer valid: authenticate again."""


class _CompactedError(StoreError):
    """etcd no longer holds the revision a read asked for."""


class _WatchEndedError(Exception):
    """The watch cannot go on (its `lost` says why)."""


class _Deadline(HTTPAdapter):
    """Every request on the session gets a deadline, also where the library
    passes none (etcd3gw 2.0.0, Debian 12's, calls without a timeout)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._timeout = timeout

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: float | tuple[float, float] | tuple[float, None] | None = None,
             verify: bool | str = True,
             cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
             proxies: Mapping[str, str] | None = None) -> requests.Response:
        return super().send(request, stream=stream,
                            timeout=self._timeout if timeout is None else timeout,
                            verify=verify, cert=cert, proxies=proxies)


# etcd3gw's answers to an HTTP status (its client module's table)
_BY_STATUS: dict[int, type[gw_errors.Etcd3Exception]] = {
    500: gw_errors.InternalServerError, 503: gw_errors.ConnectionFailedError,
    408: gw_errors.ConnectionTimeoutError, 504: gw_errors.ConnectionTimeoutError,
    412: gw_errors.PreconditionFailedError}


class _Lean:
    """POSTs to one endpoint on kept-alive TLS connections (one per thread at
    a time; as many as threads ask at once).  The request, its headers and
    its body, goes in one send(): http.client sends them in two (two TLS
    records, two TCP segments), and etcd's gateway then reads the headers,
    waits and reads the body; one send made the call 0.1-0.4 ms p50 faster
    and its CPU ~10% lower (benchmarks/group_etcd_paths.py, figures in
    docs/benchmarks.md).  The answer is read by
    http.client's HTTPResponse; http.client's HTTPSConnection connects (TLS,
    TCP_NODELAY, the deadline)."""

    def __init__(self, host: str, port: int, access: EtcdAccess) -> None:
        self._host, self._port = host, port
        self._access = access
        self._context: ssl.SSLContext | None = None  # made at the first call
        self._timeout = access.timeout
        self._idle: list[http.client.HTTPSConnection] = []
        self._lock = threading.Lock()

    def post(self, path: str, body: dict[str, Any], token: str | None) -> Any:
        """etcd's JSON answer; raises what etcd3gw's post raises."""
        request = self._request(path, json.dumps(body).encode(), token)
        conn = self._take()
        try:
            if conn.sock is None:
                conn.connect()
            sock = conn.sock
            sock.sendall(request)
            response = http.client.HTTPResponse(sock, method="POST")
            response.begin()
            data = response.read()
        except TimeoutError as e:
            conn.close()
            raise gw_errors.ConnectionTimeoutError(str(e)) from None
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise gw_errors.ConnectionFailedError(type(e).__name__) from None
        if response.will_close:
            conn.close()
        else:
            with self._lock:
                self._idle.append(conn)
        if response.status != 200:
            error = _BY_STATUS.get(response.status, gw_errors.Etcd3Exception)
            raise error(data.decode(errors="replace"), response.reason)
        try:
            return json.loads(data)
        except ValueError:
            raise gw_errors.ConnectionFailedError("etcd's answer is not JSON") from None

    def _request(self, path: str, body: bytes, token: str | None) -> bytes:
        """The whole request, as http.client would write it (in one piece).
        Raises ConnectionFailedError for a token that is no header value."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{self._port}",
                 "Accept-Encoding: identity", "Content-Type: application/json",
                 f"Content-Length: {len(body)}"]
        if token:
            if not (token.isascii() and token.isprintable()):
                raise gw_errors.ConnectionFailedError("etcd's token is not a header value")
            lines.append(f"Authorization: {token}")
        return "\r\n".join((*lines, "", "")).encode() + body

    def _tls(self) -> ssl.SSLContext:
        """Our CA only, our certificate (as the requests session's)."""
        access = self._access
        try:
            context = ssl.create_default_context(cafile=str(access.ca_file))
            context.load_cert_chain(str(access.cert_file), str(access.key_file))
        except (OSError, ssl.SSLError) as e:
            raise gw_errors.ConnectionFailedError(f"TLS files: {type(e).__name__}") from None
        return context

    def _take(self) -> http.client.HTTPSConnection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
                if conn is None and self._context is None:
                    self._context = self._tls()
                context = self._context
            if conn is None:
                return http.client.HTTPSConnection(self._host, self._port, context=context,
                                                   timeout=self._timeout)
            if conn.sock is not None and not select.select([conn.sock], [], [], 0)[0]:
                return conn  # idle and still open (readable now: closed by the peer)
            conn.close()


def _host_port(url: str) -> tuple[str, int]:
    """https://host:port (an IPv6 host in brackets) -> (host, port)."""
    host, _, port = url.partition("://")[2].rstrip("/").rpartition(":")
    return host.strip("[]"), int(port)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, end) every key under prefix."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\0"
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def _op(op: Put | Delete) -> dict[str, Any]:
    """One operation of a transaction's branch, as etcd's gateway takes it."""
    if isinstance(op, Delete):
        return {"request_delete_range": {"key": _b64(op.key)}}
    put: dict[str, Any] = {"key": _b64(op.key), "value": _b64(op.value)}
    if op.lease:
        put["lease"] = str(op.lease)
    return {"request_put": put}


def _item(kv: dict[str, Any]) -> Item:
    return Item(base64.b64decode(kv["key"]), base64.b64decode(kv.get("value", "")),
                int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))


def _refusal(e: gw_errors.Etcd3Exception, op: str) -> Exception:
    """The exception for etcd's error answer to op."""
    try:
        body = json.loads(e.detail_text or "")
        code, message = int(body.get("code", -1)), str(body.get("error", ""))
    except (ValueError, AttributeError):
        code, message = -1, (e.detail_text or type(e).__name__).strip()[:200]
    if isinstance(e, gw_errors.ConnectionFailedError | gw_errors.ConnectionTimeoutError):
        return _UnreachableError(message or type(e).__name__)
    if code in (_UNAVAILABLE, _DEADLINE_EXCEEDED) or "no leader" in message:
        return _UnreachableError(message)
    if code == _UNAUTHENTICATED:
        return _ExpiredTokenError(message)
    if code == _OUT_OF_RANGE and "compacted" in message:
        return _CompactedError(f"etcd refused {op}: {message}")
    if code == _PERMISSION_DENIED:
        return StorePermissionError(f"etcd refused {op}: permission denied (this member's "
                                     "role does not cover the key)")
    if code == _NOT_FOUND and "lease" in message:
        return LeaseExpiredError(f"etcd refused {op}: the lease has expired or was revoked")
    return StoreError(f"etcd refused {op}: {message or 'HTTP error'}")


class EtcdStore:
    """kv.KV on an etcd v3 cluster (3.4 or later)."""

    def __init__(self, access: EtcdAccess, *, page_keys: int = PAGE_KEYS,
                 leader_first: bool = True) -> None:
        """leader_first: send claims to etcd's leader once it is known (the
        module's invariants); off, the configured order as for every call."""
        if not access.endpoints:
            raise ValueError("no etcd endpoints")
        if page_keys < 1:
            raise ValueError("page_keys must be at least 1")
        self._access = access
        self._page_keys = page_keys
        self._clients = [self._client(url) for url in access.endpoints]
        # the claims' transactions (the module's invariants), by client (held
        # here too: an id is only that client's while it lives)
        self._lean = {id(client): (client, _Lean(*_host_port(url), access))
                      for url, client in zip(access.endpoints, self._clients, strict=True)}
        self._authed: set[int] = set()
        self._current = 0
        self._lock = threading.Lock()
        self._leader = Leader(len(access.endpoints) if leader_first else 0)
        self._spawn: Callable[[Callable[[], None]], None] = _in_thread  # tests: at once
        self._clock: Callable[[], float] = time.monotonic

    def _client(self, url: str) -> etcd3gw.Etcd3Client:
        scheme = url.partition("://")[0]
        host, port = _host_port(url)
        session = requests.Session()
        session.trust_env = False  # no proxy nor CA bundle from the environment: ours only
        session.mount("https://", _Deadline(self._access.timeout))
        session.verify = str(self._access.ca_file)
        session.cert = (str(self._access.cert_file), str(self._access.key_file))
        client = etcd3gw.Etcd3Client(host=host, port=port, protocol=scheme,
                                     timeout=self._access.timeout, api_path="/v3/")
        client.session = session  # set after: Debian 12's etcd3gw 2.0.0 takes no session=
        return client

    # -- calls with failover -------------------------------------------------

    def _call(self, op: str, fn: Callable[[etcd3gw.Etcd3Client], T],
              start: int | None = None) -> T:
        """fn on the current endpoint (or `start`), then on each other one
        while they cannot answer.  Raises StoreUnavailableError when none
        can."""
        count = len(self._clients)
        start = self._current if start is None else start
        reasons = []
        for step in range(count):
            index = (start + step) % count
            client = self._clients[index]
            try:
                return self._on(index, client, op, fn)
            except _UnreachableError as e:
                reasons.append(f"{self._access.endpoints[index]}: {str(e)[:80]}")
                self._current = (index + 1) % count
                self._leader.lost(index)
        raise StoreUnavailableError(f"etcd could not {op}: no endpoint answered in "
                               f"{self._access.timeout:g} s ({'; '.join(reasons)})")

    def _on(self, index: int, client: etcd3gw.Etcd3Client, op: str,
            fn: Callable[[etcd3gw.Etcd3Client], T]) -> T:
        for _ in range(2):  # a second time after a fresh token
            try:
                self._authenticate(index, client)
                return fn(client)
            except gw_errors.Etcd3Exception as e:
                error = _refusal(e, op)
            except requests.RequestException as e:
                error = _UnreachableError(type(e).__name__)
            if isinstance(error, _ExpiredTokenError):
                self._authed.discard(index)
                continue
            raise error
        raise _UnreachableError("the auth token was refused twice")

    def _authenticate(self, index: int, client: etcd3gw.Etcd3Client) -> None:
        access = self._access
        if access.user is None or index in self._authed:
            return
        client.session.headers.pop("Authorization", None)
        try:
            answer = client.post(client.get_url("/auth/authenticate"),
                                 json={"name": access.user, "password": access.password or ""})
        except gw_errors.Etcd3Exception as e:
            error = _refusal(e, "authenticate")
            if isinstance(error, _UnreachableError):
                raise error from None
            raise StoreError(f"etcd refused user {access.user!r}: check its password file "
                             "and that the user exists (docs/install.md, 'A group on "
                             "etcd')") from None
        client.session.headers["Authorization"] = str(answer["token"])
        self._authed.add(index)

    # -- the interface --------------------------------------------------------

    def get(self, key: bytes) -> Item | None:
        answer = self._call("read a key", lambda c: c.post(
            c.get_url("/kv/range"), json={"key": _b64(key)}))
        kvs = answer.get("kvs", [])
        return _item(kvs[0]) if kvs else None

    def get_prefix(self, prefix: bytes, on_page: PageCallback | None = None
                   ) -> tuple[list[Item], int]:
        """In pages at one revision, the next page fetched (on a thread of
        its own) while on_page has this one (see the module's invariants).
        Raises StoreError (and its kinds) as every call; StoreError too when
        compactions overtook READ_ATTEMPTS reads."""
        return self.get_prefixes((prefix,), on_page)

    def get_prefixes(self, prefixes: Sequence[bytes], on_page: PageCallback | None = None
                     ) -> tuple[list[Item], int]:
        """get_prefix of each prefix in turn, every page of every prefix at
        the first page's revision (one snapshot); started again as a whole
        when a compaction overtakes it.  Raises ValueError (see
        kv.check_prefixes), StoreError as get_prefix."""
        check_prefixes(prefixes)
        with ThreadPoolExecutor(1, thread_name_prefix="etcd-page") as fetcher:
            for _ in range(READ_ATTEMPTS):
                try:
                    return self._read_pages(prefixes, on_page, fetcher)
                except _CompactedError:
                    continue
        raise StoreError(f"etcd could not read the prefix in {READ_ATTEMPTS} attempts: "
                         "each time a compaction removed its revision before the last page "
                         "(raise the compaction retention above a member's start)")

    def _read_pages(self, prefixes: Sequence[bytes], on_page: PageCallback | None,
                    fetcher: ThreadPoolExecutor) -> tuple[list[Item], int]:
        bodies: list[dict[str, Any]] = [
            {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)),
             "limit": str(self._page_keys)} for prefix in prefixes]
        items: list[Item] = []
        revision = 0
        at = 0  # the prefix being read
        pending: Future[dict[str, Any]] | None = fetcher.submit(self._range, dict(bodies[0]))
        while pending is not None:
            answer = pending.result()
            kvs = answer.get("kvs", [])
            pending = None
            if not revision:  # the snapshot's: every later page is read at it
                revision = int(answer["header"]["revision"])
                for body in bodies:
                    body["revision"] = str(revision)
            if answer.get("more") and kvs:  # the next page is on its way meanwhile
                bodies[at]["key"] = _b64(base64.b64decode(kvs[-1]["key"]) + b"\0")
                pending = fetcher.submit(self._range, dict(bodies[at]))
            elif at + 1 < len(bodies):  # or the next prefix's first
                at += 1
                pending = fetcher.submit(self._range, dict(bodies[at]))
            page = [_item(kv) for kv in kvs]
            items += page
            if on_page is not None:
                try:
                    on_page(page)
                except BaseException:
                    if pending is not None:
                        pending.cancel()
                    raise
        items.sort(key=lambda i: i.key)  # etcd's order within a prefix (one pass if sorted)
        return items, revision

    def _range(self, body: dict[str, Any]) -> dict[str, Any]:
        """One page of a get_prefix (a method of its own: tests step in
        between pages)."""
        answer: dict[str, Any] = self._call("read a prefix", lambda c: c.post(
            c.get_url("/kv/range"), json=body))
        return answer

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        answer = self._call("write a key", lambda c: c.post(c.get_url("/kv/put"), json=body))
        return int(answer["header"]["revision"])

    def delete(self, key: bytes) -> bool:
        answer = self._call("delete a key", lambda c: c.post(
            c.get_url("/kv/deleterange"), json={"key": _b64(key)}))
        return int(answer.get("deleted", 0)) > 0

    def _txn(self, c: etcd3gw.Etcd3Client, txn: dict[str, Any]) -> Any:
        """A transaction on c's endpoint, lean (see the module's invariants)."""
        held = self._lean.get(id(c))
        if held is None or held[0] is not c:  # a client set from outside (tests)
            answer = c.post(c.get_url("/kv/txn"), json=txn)
        else:
            token = c.session.headers.get("Authorization")
            answer = held[1].post(urlsplit(c.get_url("/kv/txn")).path, txn,
                                  None if token is None else str(token))
        self._leader.seen_term(term_of(answer))  # an election: learn the leader again
        return answer

    def create(self, key: bytes, value: bytes, lease: int = 0) -> bool:
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        txn = {"compare": [{"key": _b64(key), "result": "EQUAL", "target": "CREATE",
                            "create_revision": "0"}],
               "success": [{"request_put": put}],
               "failure": [{"request_range": {"key": _b64(key)}}]}
        attempts = 0

        def once(c: etcd3gw.Etcd3Client) -> bool:
            nonlocal attempts
            attempts += 1
            answer = self._txn(c, txn)
            if answer.get("succeeded", False):
                return True
            if attempts == 1:
                return False
            # a retry after an endpoint failed: the first attempt may have
            # landed; the key holding exactly our value and lease is ours
            found = answer.get("responses", [{}])[0].get("response_range", {}).get("kvs", [])
            return bool(found) and _item(found[0]).value == value and \
                _item(found[0]).lease == lease
        return self._claim("claim a key", once)

    def create_many(self, creates: Sequence[Put],
                    writes: Sequence[Put | Delete] = ()) -> frozenset[bytes]:
        check_batch(creates, writes)
        txn = {"compare": [{"key": _b64(op.key), "result": "EQUAL", "target": "CREATE",
                            "create_revision": "0"} for op in creates],
               "success": [_op(op) for op in (*creates, *writes)],
               "failure": [{"request_range": {"key": _b64(op.key)}} for op in creates]}
        attempts = 0

        def once(c: etcd3gw.Etcd3Client) -> frozenset[bytes]:
            nonlocal attempts
            attempts += 1
            answer = self._txn(c, txn)
            if answer.get("succeeded", False):
                return frozenset()
            found = [_item(kvs[0]) for kvs in (
                r.get("response_range", {}).get("kvs", []) for r in answer.get("responses", []))
                if kvs]
            if not found:  # never, from etcd: a failed compare means a key is there
                raise StoreError("etcd refused claim keys: the transaction failed with no "
                                 "key there")
            ours = {(op.key, op.value, op.lease) for op in creates}
            if attempts > 1 and len(found) == len(creates) and all(
                    (i.key, i.value, i.lease) in ours for i in found):
                return frozenset()  # a retry after an endpoint failed: the first landed
            return frozenset(i.key for i in found)
        return self._claim("claim keys", once)

    def _claim(self, op: str, fn: Callable[[etcd3gw.Etcd3Client], T]) -> T:
        """A claim's call: at the leader first when it is known (learning
        it, if due, on a thread of its own: never on the knock's path)."""
        if self._leader.should_learn(self._clock()):
            self._spawn(self._learn_leader)
        return self._call(op, fn, self._leader.first(self._current))

    def _learn_leader(self) -> None:
        """Ask etcd which member leads and map it to a configured endpoint
        (spa.group.leader); a failure leaves the configured order."""
        try:
            status = self._call("find etcd's leader", lambda c: c.post(
                c.get_url("/maintenance/status"), json={}))
            members = self._call("list etcd's members", lambda c: c.post(
                c.get_url("/cluster/member/list"), json={}))
            index = leader_index(self._access.endpoints, status, members)
        except (StoreError, AttributeError, TypeError, ValueError):
            # (the last three: answers not shaped as etcd's; a raise here would
            # end the learning thread with the learning never done)
            self._leader.failed(self._clock())
            return
        self._leader.learned(index, term_of(status), self._clock())

    def grant(self, ttl: int) -> int:
        answer = self._call("grant a lease", lambda c: c.post(
            c.get_url("/lease/grant"), json={"TTL": str(ttl), "ID": "0"}))
        return int(answer["ID"])

    def keep_alive(self, lease: int) -> int:
        answer = self._call("renew a lease", lambda c: c.post(
            c.get_url("/lease/keepalive"), json={"ID": str(lease)}))
        ttl = int(answer.get("result", {}).get("TTL", 0))
        if ttl <= 0:
            raise LeaseExpiredError(f"lease {lease:x} has expired or was revoked")
        return ttl

    def revoke(self, lease: int) -> None:
        with contextlib.suppress(LeaseExpiredError):  # already gone: what revoke wants
            self._call("revoke a lease", lambda c: c.post(
                c.get_url("/kv/lease/revoke"), json={"ID": str(lease)}))

    def watch_prefix(self, prefix: bytes, start_revision: int,
                     callback: Callable[[Event], None]) -> EtcdWatch:
        return self.watch_range(prefix, _prefix_end(prefix), start_revision, callback)

    def watch_range(self, start: bytes, end: bytes, start_revision: int,
                    callback: Callable[[Event], None]) -> EtcdWatch:
        if end != b"\0" and end <= start:
            raise ValueError("a watch's range must end after its start")
        # etcd answers a forbidden watch by cancelling it on its stream, which
        # the watch thread would take for a lost connection: ask first, with a
        # read of at most one key (StorePermissionError, StoreUnavailableError)
        self._call("watch a range", lambda c: c.post(
            c.get_url("/kv/range"), json={"key": _b64(start), "limit": "1",
                                          "keys_only": True, "count_only": True,
                                          "range_end": _b64(end)}))
        return EtcdWatch(self, start, end, start_revision, callback)

    # -- for the watch ---------------------------------------------------------

    def _watch_client(self) -> tuple[int, etcd3gw.Etcd3Client]:
        index = self._current
        client = self._clients[index]
        try:
            self._authenticate(index, client)
        except _UnreachableError:
            self._current = (index + 1) % len(self._clients)
            raise
        return index, client

    def _skip(self, index: int) -> None:
        if self._current == index:
            self._current = (index + 1) % len(self._clients)


class EtcdWatch:
    """A watch of the keys in [start, end) in a thread of its own (see the
    module's invariants)."""

    def __init__(self, store: EtcdStore, start: bytes, end: bytes, start_revision: int,
                 callback: Callable[[Event], None]) -> None:
        self._store = store
        self._start = start
        self._range_end = end
        self._next = start_revision
        self._callback = callback
        self._stop = threading.Event()
        self._response: requests.Response | None = None
        self.lost: WatchLostError | None = None
        self._thread = threading.Thread(target=self._run, name="etcd-watch", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            _shut(response)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def ended(self) -> WatchLostError | None:
        return self.lost

    def _run(self) -> None:
        pause = _RECONNECT_PAUSE
        while not self._stop.is_set():
            try:
                index, client = self._store._watch_client()
                if self._stream(client):
                    pause = _RECONNECT_PAUSE  # it delivered: the endpoint was fine
                else:
                    self._store._skip(index)
            except _WatchEndedError:
                self._stop.set()
                return
            except (_UnreachableError, StoreError, requests.RequestException, ValueError, OSError):
                pass
            except Exception:
                if self._stop.is_set():  # cancel() closed the response under the reader
                    return  # (http.client then fails on its fp: AttributeError)
                raise
            self._stop.wait(pause)
            pause = min(pause * 2, 2.0)

    def _stream(self, client: etcd3gw.Etcd3Client) -> bool:
        """One watch stream until it ends; whether it delivered anything."""
        request = {"create_request": {
            "key": _b64(self._start), "range_end": _b64(self._range_end),
            "start_revision": str(self._next)}}
        access = self._store._access
        response = client.session.post(client.get_url("/watch"), json=request, stream=True,
                                       timeout=(access.timeout, access.watch_idle))
        self._response = response
        delivered = False
        floor = self._next  # this stream starts here: every event from it is new
        try:
            if response.status_code != 200:
                return False
            for line in response.iter_lines():
                if self._stop.is_set():
                    return delivered
                if not line.strip():
                    continue
                result = json.loads(line).get("result", {})
                compacted = int(result.get("compact_revision", 0))
                if compacted:
                    self._end(f"revision {self._next} has been compacted (the oldest kept is "
                              f"{compacted})")
                if result.get("canceled"):
                    return delivered  # etcd ended it otherwise: connect again
                for raw in result.get("events", []):
                    event = _event(raw)
                    if event.mod_revision < floor:
                        continue  # seen before a reconnection
                    # (not `< self._next`: a transaction's keys, or a lease's
                    # deleted with it, share one revision, each an event)
                    self._next = event.mod_revision + 1
                    delivered = True
                    try:
                        self._callback(event)
                    except Exception as e:  # end the watch: never skip an event
                        self._end(f"the watch on {self._start!r} ended: its callback raised "
                                  f"{type(e).__name__}")
            return delivered
        finally:
            response.close()
            self._response = None


    def _end(self, why: str) -> None:
        self.lost = WatchLostError(why)
        raise _WatchEndedError(why)


def _event(raw: dict[str, Any]) -> Event:
    kind = EventKind.DELETE if raw.get("type") == "DELETE" else EventKind.PUT
    item = _item(raw["kv"])
    return Event(kind, item.key, item.value if kind is EventKind.PUT else b"",
                 item.mod_revision)


def _shut(response: requests.Response) -> None:
    """Wake a thread blocked reading the response: shut its socket down."""
    try:
        fd = response.raw._fp.fileno()  # type: ignore[union-attr]
        sock = socket.socket(fileno=socket.dup(fd))
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    except (AttributeError, OSError, ValueError):
        pass
    response.close()


def _in_thread(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, name="etcd-leader", daemon=True).start()


def endpoints_of(text: Sequence[str]) -> tuple[str, ...]:
    """Endpoints as given (`https://host:port`), checked for the scheme."""
    found = tuple(t.strip() for t in text if t.strip())
    for url in found:
        if not url.startswith("https://"):
            raise ValueError(f"etcd endpoint {url!r} is not https://host:port")
    return found
