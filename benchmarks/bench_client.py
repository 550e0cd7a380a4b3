"""Client start to port open (issue 6, benchmark 5).

A pair of namespaces: spa-server (capture mode, nftables) with a TCP service
on port 22 behind its firewall, and a client namespace where the real
`spa-client open ssh srv` runs --runs times, each timed from just before the
process starts to its exit with status 0 (`open` exits 0 only once the port
accepts a connection).  Each run needs a fresh grant: after it, `spa-client
close` ends the lease and the driver waits until a connect fails again.  The
timing loop runs inside the client namespace (no `ip netns exec` in the
figures).  Beside it, in the same run: `python -c pass` (the interpreter's
floor) and `spa-client --help`.  Then `python -X importtime` of the entry
point, its largest imports by cumulative time.  Needs root.

    .venv/bin/python benchmarks/bench_client.py [--runs 50]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_latency import SERVER, Site, percentile, start_spa

from spa.netns import can_make_namespaces

DRIVER = r"""
import json, socket, subprocess, sys, time
spec = json.loads(sys.argv[1])
client, config_dir, server = spec["client"], spec["config_dir"], spec["server"]

def port_open():
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((server, 22)) == 0

def timed(argv):
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    took = (time.perf_counter() - t0) * 1000
    return took if done.returncode == 0 else None, done.stderr.strip()

results = {"pass": [], "help": [], "open": [], "errors": []}
for _ in range(spec["runs"]):
    results["pass"].append(timed([spec["python"], "-c", "pass"])[0])
    results["help"].append(timed([client, "--help"])[0])
    assert not port_open(), "the port is open before the knock"
    took, err = timed([client, "--config-dir", config_dir, "open", "ssh", "srv"])
    results["open"].append(took)
    if took is None:
        results["errors"].append(err)
    subprocess.run([client, "--config-dir", config_dir, "close", "ssh", "srv"],
                   capture_output=True)
    deadline = time.monotonic() + 5
    while port_open() and time.monotonic() < deadline:
        time.sleep(0.02)
print(json.dumps(results))
"""


def importtime(client: Path, top: int) -> list[tuple[int, str]]:
    """(cumulative us, module) for the entry point's largest imports."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import spa_client.cli"],
                          capture_output=True, text=True, cwd=tempfile.gettempdir(),
                          check=True)
    rows = []
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    return sorted(rows, reverse=True)[:top]


def summary(values: list[float | None]) -> str:
    ok = [v for v in values if v is not None]
    if not ok:
        return "none succeeded"
    return (f"p50 {statistics.median(ok):7.1f}  p90 {percentile(ok, 0.9):7.1f}  "
            f"max {max(ok):7.1f} ms  ({len(ok)}/{len(values)} ok)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    reason = can_make_namespaces()
    if reason is not None:
        print(f"bench_client: {reason}", file=sys.stderr)
        return 2
    client = Path(sys.executable).parent / "spa-client"
    root = Path(tempfile.mkdtemp(prefix="spa-bench-client-"))
    root.chmod(0o711)  # the daemon runs as a service user: it must get through
    site = Site(root, 0)
    try:
        start_spa(site, 0, "capture")
        assert site.spa_uri is not None
        config_dir = root / "client"
        subprocess.run([str(client), "--config-dir", str(config_dir), "enroll", site.spa_uri,
                        "--name", "srv"], check=True, capture_output=True)
        spec = {"client": str(client), "config_dir": str(config_dir), "server": SERVER,
                "runs": args.runs, "python": sys.executable}
        done = site.cli.run(sys.executable, "-c", DRIVER, json.dumps(spec), timeout=900)
        results = json.loads(done.stdout)
    finally:
        site.close()
        shutil.rmtree(root, ignore_errors=True)
    print(f"spa-client start to exit, {args.runs} runs each, timed inside the client namespace")
    print(f"  python -c pass          {summary(results['pass'])}")
    print(f"  spa-client --help       {summary(results['help'])}")
    print(f"  spa-client open ssh srv {summary(results['open'])}")
    for error in results["errors"][:3]:
        print(f"    failed: {error}")
    print("largest imports of spa_client.cli (cumulative us, module):")
    for micros, module in importtime(client, 15):
        print(f"  {micros:>8}  {module}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
