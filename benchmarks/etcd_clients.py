"""Python clients for etcd v3, measured against a real local etcd (issue 18).

For each candidate: latency (p50 / p99 in ms) of put, get, a create-if-absent
transaction, a lease grant, and the delay from a put until a prefix watch
delivers its event; then whether it can authenticate to etcd's RBAC by the
Common Name of a TLS client certificate (etcd started with
--client-cert-auth, auth enabled, a user per CN without a password).

Each candidate runs in its own virtualenv (its own dependencies), one etcd per
run on loopback ports of its own, in a temporary data directory:

    python3 -m venv /tmp/v-etcd3gw && /tmp/v-etcd3gw/bin/pip install etcd3gw
    /tmp/v-etcd3gw/bin/python benchmarks/etcd_clients.py etcd3gw [--ops 300]

Candidates: etcd3gw (etcd's JSON gateway over requests), etcd-sdk-python
(module pyetcd, gRPC), etcd3 (gRPC, last release 2020: needs protobuf<4 to
import), aetcd (gRPC, asyncio).  Needs etcd, etcdctl and openssl (Debian's
etcd-server, etcd-client, openssl).  Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import json
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CANDIDATES = ("etcd3gw", "etcd-sdk-python", "etcd3", "aetcd")


def need_tools(program: str) -> None:
    """Exit with one line unless etcd, etcdctl and openssl (make_certs) are
    here: what a benchmark on a loopback etcd (`etcd`) needs."""
    for tool in ("etcd", "etcdctl", "openssl"):
        if shutil.which(tool) is None:
            sys.exit(f"{program}: error: needs {tool} (apt install etcd-server etcd-client "
                     "openssl)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run(*argv: str) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


@contextmanager
def etcd(root: Path, tls: Path | None = None) -> Iterator[int]:
    """One etcd member on loopback; its client port.  With `tls` (a directory
    from make_certs): https, client certificates required."""
    client, peer = _free_port(), _free_port()
    scheme = "https" if tls else "http"
    argv = ["etcd", "--name", "b", "--data-dir", str(root / "data"),
            "--listen-client-urls", f"{scheme}://127.0.0.1:{client}",
            "--advertise-client-urls", f"{scheme}://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"b=http://127.0.0.1:{peer}", "--log-level", "error"]
    if tls:
        argv += ["--client-cert-auth", "--trusted-ca-file", str(tls / "ca.crt"),
                 "--cert-file", str(tls / "server.crt"), "--key-file", str(tls / "server.key")]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "etcd.log", "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", client), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((root / "etcd.log").read_text()[-500:]) from None
                time.sleep(0.05)
        time.sleep(0.5)  # elected (a single member elects itself at once)
        yield client
    finally:
        proc.kill()
        proc.wait()


def make_certs(d: Path) -> None:
    """A throwaway CA, a server certificate for 127.0.0.1, client
    certificates for CN=root and CN=member-a."""
    d.mkdir()
    _run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", "/CN=bench-ca", "-days", "1", "-keyout", str(d / "ca.key"),
         "-out", str(d / "ca.crt"))
    # the server's certificate serves as a client too: the gateway inside
    # etcd dials etcd's own gRPC port with it
    server = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth"
    for name, ext in (("server", server),
                      ("root", "extendedKeyUsage=clientAuth"),
                      ("member-a", "extendedKeyUsage=clientAuth"),
                      ("member-nocn", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        subject = "/O=bench member" if name == "member-nocn" else f"/CN={name}"
        _run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-subj", subject, "-keyout", str(d / f"{name}.key"),
             "-out", str(d / f"{name}.csr"))
        _run("openssl", "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"),
             "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
             "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.crt"))


def enable_cn_auth(port: int, d: Path) -> None:
    """Users root and member-a (no passwords: the certificate's CN names
    them); member-a may read and write /spa/groups/a/ only."""
    ctl = ["etcdctl", f"--endpoints=https://127.0.0.1:{port}", f"--cacert={d / 'ca.crt'}",
           f"--cert={d / 'root.crt'}", f"--key={d / 'root.key'}"]
    _run(*ctl, "user", "add", "root", "--no-password")
    _run(*ctl, "user", "grant-role", "root", "root")
    _run(*ctl, "role", "add", "member-a")
    _run(*ctl, "role", "grant-permission", "member-a", "--prefix=true", "readwrite",
         "/spa/groups/a/")
    _run(*ctl, "user", "add", "member-a", "--no-password")
    _run(*ctl, "user", "grant-role", "member-a", "member-a")
    subprocess.run([*ctl, "user", "add", "member-p", "--interactive=true"], check=True,
                   input="bench-password\nbench-password\n", capture_output=True, text=True)
    _run(*ctl, "user", "grant-role", "member-p", "member-a")
    _run(*ctl, "auth", "enable")
    _run(*ctl, "put", "/spa/groups/a/probe", "yes")


class Ops:
    """The five operations, over one candidate library."""

    put: Callable[[str, str], None]
    get: Callable[[str], bytes | None]
    create: Callable[[str, str], bool]
    lease: Callable[[int], object]
    watch: Callable[[str, Callable[[str], None]], Callable[[], None]]
    close: Callable[[], None] = staticmethod(lambda: None)


def ops_etcd3gw(port: int, tls: Path | None) -> Ops:
    lib: Any = importlib.import_module("etcd3gw")
    kw: dict[str, Any] = {}
    if tls:
        kw = {"protocol": "https", "ca_cert": str(tls / "ca.crt"),
              "cert_cert": str(tls / "member-a.crt"), "cert_key": str(tls / "member-a.key")}
    c = lib.client(host="127.0.0.1", port=port, timeout=5, api_path="/v3/", **kw)
    c.session.trust_env = False  # our CA, not the environment's REQUESTS_CA_BUNDLE
    o = Ops()
    o.put = lambda k, v: c.put(k, v)
    o.get = lambda k: (c.get(k) or [None])[0]
    o.create = lambda k, v: bool(c.create(k, v))
    o.lease = lambda ttl: c.lease(ttl)

    def watch(prefix: str, seen: Callable[[str], None]) -> Callable[[], None]:
        events, cancel = c.watch_prefix(prefix)

        def pump() -> None:
            for ev in events:
                seen(ev["kv"]["key"].decode())
        threading.Thread(target=pump, daemon=True).start()
        time.sleep(0.3)  # the stream is open
        cancel_fn: Callable[[], None] = cancel
        return cancel_fn
    o.watch = watch
    return o


def _ops_grpc_sync(lib: Any, port: int, tls: Path | None) -> Ops:
    kw: dict[str, Any] = {}
    if tls:
        kw = {"ca_cert": str(tls / "ca.crt"), "cert_cert": str(tls / "member-a.crt"),
              "cert_key": str(tls / "member-a.key")}
    c = lib.client(host="127.0.0.1", port=port, timeout=5, **kw)
    o = Ops()
    o.put = lambda k, v: c.put(k, v)
    o.get = lambda k: c.get(k)[0]

    def create(k: str, v: str) -> bool:
        ok, _ = c.transaction(compare=[c.transactions.create(k) == 0],
                              success=[c.transactions.put(k, v)], failure=[])
        return bool(ok)
    o.create = create
    o.lease = lambda ttl: c.lease(ttl)

    def watch(prefix: str, seen: Callable[[str], None]) -> Callable[[], None]:
        def callback(response: Any) -> None:
            for ev in getattr(response, "events", []):
                seen(ev.key.decode())
        watch_id = c.add_watch_prefix_callback(prefix, callback)
        time.sleep(0.3)
        return lambda: c.cancel_watch(watch_id)
    o.watch = watch
    o.close = c.close
    return o


def ops_aetcd(port: int, tls: Path | None) -> Ops:
    if tls:
        raise NotImplementedError("aetcd 1.0.0 opens only insecure gRPC channels: no TLS")
    lib: Any = importlib.import_module("aetcd")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)
    c = lib.Client(host="127.0.0.1", port=port, timeout=5)
    run(c.connect())
    o = Ops()
    o.put = lambda k, v: run(c.put(k.encode(), v.encode()))

    def get(k: str) -> bytes | None:
        got = run(c.get(k.encode()))
        return None if got is None else bytes(got.value)
    o.get = get

    def create(k: str, v: str) -> bool:
        t = c.transactions
        ok, _ = run(c.transaction(compare=[t.create(k.encode()) == 0],
                                  success=[t.put(k.encode(), v.encode())], failure=[]))
        return bool(ok)
    o.create = create
    o.lease = lambda ttl: run(c.lease(ttl))

    def watch(prefix: str, seen: Callable[[str], None]) -> Callable[[], None]:
        async def pump() -> None:
            async for ev in await c.watch_prefix(prefix.encode()):
                seen(ev.kv.key.decode())
        future = asyncio.run_coroutine_threadsafe(pump(), loop)
        time.sleep(0.3)
        def cancel() -> None:
            future.cancel()
        return cancel
    o.watch = watch
    o.close = lambda: run(c.close())
    return o


def make_ops(name: str, port: int, tls: Path | None = None) -> Ops:
    if name == "etcd3gw":
        return ops_etcd3gw(port, tls)
    if name == "etcd-sdk-python":
        return _ops_grpc_sync(importlib.import_module("pyetcd"), port, tls)
    if name == "etcd3":
        return _ops_grpc_sync(importlib.import_module("etcd3"), port, tls)
    if name == "aetcd":
        return ops_aetcd(port, tls)
    raise SystemExit(f"unknown candidate {name} (one of {', '.join(CANDIDATES)})")


def _time(n: int, op: Callable[[int], object]) -> list[float]:
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        op(i)
        samples.append(time.perf_counter() - t0)
    return samples


def _pct(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{statistics.median(ordered) * 1e3:6.2f} {p99 * 1e3:7.2f}"


def latencies(name: str, port: int, n: int) -> dict[str, list[float]]:
    o = make_ops(name, port)
    try:
        for i in range(20):  # warm the connection
            o.put(f"/warm/{i}", "x")
        out = {
            "put": _time(n, lambda i: o.put(f"/p/{i}", "v" * 100)),
            "get": _time(n, lambda i: o.get(f"/p/{i}")),
            "create (claimed)": _time(n, lambda i: o.create(f"/c/{i}", "me")),
            "create (taken)": _time(n, lambda i: o.create(f"/c/{i}", "other")),
            "lease grant": _time(n, lambda i: o.lease(30)),
        }
        assert o.create("/c/0", "x") is False
        assert o.create("/c/new", "x") is True
        arrived: queue.Queue[tuple[str, float]] = queue.Queue()
        cancel = o.watch("/w/", lambda key: arrived.put((key, time.perf_counter())))
        delays = []
        for i in range(n):
            t0 = time.perf_counter()
            o.put(f"/w/{i}", "v")
            key, t1 = arrived.get(timeout=10)
            assert key == f"/w/{i}", key
            delays.append(t1 - t0)
        out["watch delivery"] = delays
        cancel()
        return out
    finally:
        o.close()


def cn_auth(name: str, root: Path) -> str:
    """Whether the candidate, holding member-a's certificate, is let read
    /spa/groups/a/probe by etcd's RBAC."""
    certs = root / "certs"
    make_certs(certs)
    with etcd(root / "tls", tls=certs) as port:
        enable_cn_auth(port, certs)
        try:
            o = make_ops(name, port, certs)
            value = o.get("/spa/groups/a/probe")
            o.close()
        except NotImplementedError as e:
            return f"no: {e}"
        except Exception as e:  # the library's own error type
            detail = getattr(e, "detail_text", None) or str(e)
            return f"no: {type(e).__name__}: {detail.strip()[:120]}"
        return "yes" if value == b"yes" else f"no: read {value!r}"


def password_auth(root: Path) -> str:
    """etcd3gw with a certificate without CN and user member-p's password
    (the way left through the gateway): may it read /spa/groups/a/probe?"""
    lib: Any = importlib.import_module("etcd3gw")
    certs = root / "pw-certs"
    make_certs(certs)
    with etcd(root / "pw", tls=certs) as port:
        enable_cn_auth(port, certs)
        c = lib.client(host="127.0.0.1", port=port, protocol="https", api_path="/v3/",
                       ca_cert=str(certs / "ca.crt"), cert_cert=str(certs / "member-nocn.crt"),
                       cert_key=str(certs / "member-nocn.key"), timeout=5)
        c.session.trust_env = False
        try:
            token = c.post(c.get_url("/auth/authenticate"),
                           json={"name": "member-p", "password": "bench-password"})["token"]
            c.session.headers["Authorization"] = token
            value = c.get("/spa/groups/a/probe")
        except Exception as e:
            return f"no: {type(e).__name__}: {str(e)[:120]}"
        return "yes" if value == [b"yes"] else f"no: read {value!r}"


def gateway_cn_probe(root: Path) -> str:
    """The same read as a plain HTTPS POST to etcd's JSON gateway with
    member-a's certificate: what any gateway client meets."""
    import ssl
    certs = root / "probe-certs"
    make_certs(certs)
    with etcd(root / "probe", tls=certs) as port:
        enable_cn_auth(port, certs)
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        ctx.load_cert_chain(str(certs / "member-a.crt"), str(certs / "member-a.key"))
        body = json.dumps({"key": base64.b64encode(b"/spa/groups/a/probe").decode()}).encode()
        req = urllib.request.Request(f"https://127.0.0.1:{port}/v3/kv/range", data=body)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
                return f"HTTP {resp.status}: {resp.read()[:120]!r}"
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}: {e.read()[:120]!r}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidate", choices=[*CANDIDATES, "gateway-probe"])
    parser.add_argument("--ops", type=int, default=300)
    args = parser.parse_args()
    need_tools("etcd_clients")
    with tempfile.TemporaryDirectory(prefix="etcd-bench-") as tmp:
        root = Path(tmp)
        if args.candidate == "gateway-probe":
            print(gateway_cn_probe(root))
            return
        with etcd(root / "plain") as port:
            figures = latencies(args.candidate, port, args.ops)
        print(f"{args.candidate}: {args.ops} operations each, ms (p50 p99)")
        for op, samples in figures.items():
            print(f"  {op:18} {_pct(samples)}")
        print(f"  CN auth (TLS client cert -> RBAC user): {cn_auth(args.candidate, root)}")
        if args.candidate == "etcd3gw":
            print(f"  password auth (TLS client cert without CN): {password_auth(root)}")


if __name__ == "__main__":
    main()
