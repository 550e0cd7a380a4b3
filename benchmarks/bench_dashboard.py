"""Dashboard: ms per view at 10^2..10^5 clients, in process (Starlette's
TestClient, no network): the overview, the overview right after an enroll
(the store's version moved; the enroll itself is not timed), the clients
page (first page, a name filter, a state filter from the middle), a
client's page and the activity page; and the memory one overview after an
enroll takes.  A view the code under test does not
have shows `-`.  The store is filled by one bulk transaction; one client in
ten is revoked, one in ten pending, one in twenty expired.

    .venv/bin/python benchmarks/bench_dashboard.py [--sizes 100,1000,10000,100000]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import nacl.pwhash
from starlette.testclient import TestClient

from spa.server import admin, webauth
from spa.server.config import ClientEntry
from spa.server.dashboard import Dashboard, make_app
from spa.store.clients import ClientStore

PASSWORD = "benchmark password"
REPEATS = 5  # views timed per kind and size (the median is printed)
NOW = 1_800_000_000.0  # 2027-01-15: pending clients' enroll_by lies after it, expired before


def _entry(i: int) -> ClientEntry:
    enroll_by = ("2030-01-01T00:00:00Z" if i % 10 == 1 else
                 "2020-01-01T00:00:00Z" if i % 20 == 2 else "")
    return ClientEntry(f"client-{i:06d}", os.urandom(32), ("ssh",), revoked=i % 10 == 0,
                       enrolled="2026-01-01T00:00:00Z", enroll_by=enroll_by,
                       endpoint="knock.example.org")


def _median_ms(view: Callable[[], object], repeats: int,
               before: Callable[[], object] = lambda: None) -> float:
    """The median time of `view`, each after an untimed `before`."""
    samples = []
    for _ in range(repeats):
        before()
        began = time.perf_counter()
        view()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples) * 1e3


def _peak_mb(view: Callable[[], object], before: Callable[[], object]) -> float:
    """The most memory Python held during one `view` (after an untimed
    `before`) beyond what it held when the view began, MB (tracemalloc)."""
    before()
    tracemalloc.start()
    try:
        view()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak / 1e6


def bench_size(size: int, repeats: int) -> str:
    top = Path(tempfile.mkdtemp(prefix="spa-bench-dash-"))
    try:
        config = top / "server.toml"
        admin.init(config, listen_port=62201, backend="memory", state_dir=top / "state",
                   force=False)
        state = top / "state"
        state.mkdir(mode=0o700, exist_ok=True)
        with ClientStore.open(state, create=True) as store:
            store.add_many((_entry(i) for i in range(size)), at=0.0)
        webauth.save(state, webauth.make_credentials(
            PASSWORD, opslimit=nacl.pwhash.argon2id.OPSLIMIT_MIN,
            memlimit=nacl.pwhash.argon2id.MEMLIMIT_MIN))
        dash = Dashboard(config, clock=lambda: NOW, log=lambda line: None)
        with TestClient(make_app(dash), base_url="http://127.0.0.1:9713") as http:
            found = re.search(r'name="csrf" value="([0-9a-f]+)"', http.get("/login").text)
            assert found is not None
            http.post("/login", data={"csrf": found.group(1), "password": PASSWORD})
            added = iter(range(size, size + repeats + 1))

            def get(path: str) -> Callable[[], object]:
                def view() -> object:
                    answer = http.get(path)
                    assert answer.status_code in (200, 404), (path, answer.status_code)
                    return answer.status_code
                return view

            def enroll() -> None:
                with ClientStore.open(state, create=False) as store:
                    store.add(_entry(next(added)), at=1.0)

            middle = f"client-{size // 2:06d}"
            paths = ["/", "", "/clients", "/clients?match=77",
                     f"/clients?state=pending&after={middle}", f"/clients/{middle}",
                     "/activity"]  # "": the overview after an enroll
            cells = []
            for path in paths:
                if path and http.get(path).status_code == 404:
                    cells.append(f"{'-':>9}")  # no such view in the code under test
                    continue
                timed = _median_ms(get(path or "/"), repeats,
                                   before=(lambda: None) if path else enroll)
                cells.append(f"{timed:9.1f}")
            cells.append(f"{_peak_mb(get('/'), enroll):9.1f}")
        return f"{size:>7} " + " ".join(cells)
    finally:
        shutil.rmtree(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,10000,100000")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args()
    print(f"ms per view (median of {args.repeats}), in process (TestClient); MB: Python's "
          "peak memory during one overview after an enroll (tracemalloc)")
    print(f"{'clients':>7} {'overview':>9} {'+enroll':>9} {'clients':>9} {'match':>9} "
          f"{'pending':>9} {'client':>9} {'activity':>9} {'MB':>9}")
    for size in (int(s) for s in args.sizes.split(",")):
        print(bench_size(size, args.repeats), flush=True)


if __name__ == "__main__":
    main()
