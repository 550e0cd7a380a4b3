"""Client store: enroll / revoke / rotate time per operation at 10^2..10^5
clients (bulk insert first, then single library calls on ClientStore), and
the one-time migration of a 10^4-client server.toml.

    .venv/bin/python benchmarks/bench_store.py [--sizes 100,1000,10000,100000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spa.server import admin
from spa.server import config as config_mod
from spa.server.config import ClientEntry
from spa.store import transfer
from spa.store.clients import ClientStore

OPS = 200  # single operations timed per size and kind
MIGRATE_CLIENTS = 10_000


def _entry(i: int) -> ClientEntry:
    return ClientEntry(f"client-{i:06d}", os.urandom(32), ("ssh",),
                       enrolled="2026-01-01T00:00:00Z", endpoint="knock.example.org")


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    return (f"{statistics.median(ordered) * 1e3:7.3f} "
            f"{ordered[int(len(ordered) * 0.99) - 1] * 1e3:7.3f}")


def bench_size(size: int) -> str:
    top = Path(tempfile.mkdtemp(prefix="spa-bench-store-"))
    try:
        with ClientStore.open(top, create=True) as store:
            began = time.perf_counter()
            store.add_many((_entry(i) for i in range(size)), at=0.0)
            populate = time.perf_counter() - began
            timings: dict[str, list[float]] = {"enroll": [], "revoke": [], "rotate": []}
            for k in range(OPS):
                fresh = _entry(size + k)
                began = time.perf_counter()
                store.add(fresh, at=1.0)
                timings["enroll"].append(time.perf_counter() - began)
                began = time.perf_counter()
                store.set_revoked(f"client-{k * (size // OPS):06d}", close=True, at=2.0)
                timings["revoke"].append(time.perf_counter() - began)
                began = time.perf_counter()
                store.set_secret(f"client-{(k * 7) % size:06d}", os.urandom(32),
                                 old_until="2030-01-01T00:00:00Z", at=3.0)
                timings["rotate"].append(time.perf_counter() - began)
            began = time.perf_counter()
            for _ in range(100):
                store.version()
            version = (time.perf_counter() - began) / 100
        calls = _admin_calls(top, size)
        process = _one_process(top, size)
        return (f"{size:>7} {populate:8.2f} {_ms(timings['enroll'])} {_ms(timings['revoke'])} "
                f"{_ms(timings['rotate'])} {version * 1e6:8.1f} {_ms(calls):>15} "
                f"{process * 1e3:9.0f}")
    finally:
        shutil.rmtree(top)


ADMIN_OPS = 50  # admin.enroll + revoke + rotate rounds timed per size


def _admin_calls(state: Path, size: int) -> list[float]:
    """Seconds per admin.enroll / revoke / rotate (config read, store opened
    as the owner, one statement, closed), all three kinds together."""
    config = state.parent / f"{state.name}-admin.toml"
    admin.init(config, listen_port=62201, backend="memory", state_dir=state, force=False)
    samples = []
    for k in range(ADMIN_OPS):
        name = f"admin-{k}"
        for call in (lambda: admin.enroll(config, name, ["ssh"], "knock.example.org",  # noqa: B023
                                          now=1.0),
                     lambda: admin.rotate(config, name, grace=60, now=2.0),  # noqa: B023
                     lambda: admin.revoke(config, name, now=3.0)):  # noqa: B023 (called now)
            began = time.perf_counter()
            call()
            samples.append(time.perf_counter() - began)
    config.unlink()
    return samples


def _one_process(state: Path, size: int) -> float:
    """Seconds for one real `spa-server enroll` process on that store (its
    Python start-up included)."""
    config = state.parent / f"{state.name}.toml"
    admin.init(config, listen_port=62201, backend="memory", state_dir=state, force=False)
    spa_server = Path(sys.executable).with_name("spa-server")
    began = time.perf_counter()
    subprocess.run([str(spa_server), "--config", str(config), "enroll", f"proc-{size}",
                    "--service", "ssh", "--endpoint", "knock.example.org"], check=True,
                   stdout=subprocess.DEVNULL)
    took = time.perf_counter() - began
    config.unlink()
    return took


def bench_migration(clients: int) -> str:
    top = Path(tempfile.mkdtemp(prefix="spa-bench-migrate-"))
    try:
        path = top / "etc" / "server.toml"
        admin.init(path, listen_port=62201, backend="memory", state_dir=top / "state",
                   force=False)
        (top / "state").mkdir(mode=0o700)
        text = path.read_text() + "".join(
            f'\n[clients.client-{i:06d}]\nsecret = "{config_mod.b64encode(os.urandom(32))}"\n'
            'services = ["ssh"]\nenrolled = "2026-01-01T00:00:00Z"\n' for i in range(clients))
        path.write_text(text)
        began = time.perf_counter()
        moved = transfer.migrate(path, top / "state", at=0.0)
        took = time.perf_counter() - began
        return f"migration of {moved} clients from server.toml: {took:.2f} s"
    finally:
        shutil.rmtree(top)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,1000,10000,100000")
    args = parser.parse_args()
    print(f"per operation, ms (median p99) over {OPS} ops; populate: one bulk transaction, s;"
          " version(): us; admin.*: admin.enroll/revoke/rotate, ms (median p99);"
          " process: one real `spa-server enroll`, ms")
    print(f"{'clients':>7} {'populate':>8} {'enroll':>15} {'revoke':>15} {'rotate':>15} "
          f"{'version':>8} {'admin.*':>15} {'process':>9}")
    for size in (int(s) for s in args.sizes.split(",")):
        print(bench_size(size), flush=True)
    print(bench_migration(MIGRATE_CLIENTS))


if __name__ == "__main__":
    main()
