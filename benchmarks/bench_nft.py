"""Per-operation cost of a firewall change: libnftables in process against
the `nft` program, side by side in one run, inside a network namespace this
script creates and deletes.  Needs root.

    .venv/bin/python benchmarks/bench_nft.py [--ops 200]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import statistics
import subprocess
import sys
import time

CHILD = "--child"


def measure(ops: int) -> None:
    from spa.backends.libnft import LibNft, NftProgram
    from spa.backends.nftables import NftablesBackend
    from spa.core.policy import DEFAULT_SERVICES

    ssh = DEFAULT_SERVICES["ssh"]
    results = {}
    for runner in (LibNft(), NftProgram()):
        backend = NftablesBackend(runner)
        now = time.time()
        backend.start(DEFAULT_SERVICES, now=now)
        count = ops if runner.name == "libnftables" else max(20, ops // 10)
        samples = []
        for i in range(count):
            address = ipaddress.ip_address(f"198.18.{i // 250}.{i % 250 + 1}")
            started = time.perf_counter()
            backend.allow(address, ssh, now + 30, now=now)
            samples.append((time.perf_counter() - started) * 1000)
        results[runner.name] = samples
    print(f"{'runner':<12} {'ops':>5} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8}")
    for name, samples in results.items():
        ordered = sorted(samples)
        print(f"{name:<12} {len(samples):>5} {statistics.median(samples):>8.3f} "
              f"{ordered[int(0.9 * (len(ordered) - 1))]:>8.3f} {statistics.fmean(samples):>8.3f}")
    ratio = statistics.median(results["nft"]) / statistics.median(results["libnftables"])
    print(f"the nft program is {ratio:.0f}x slower per change (median against median)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=200)
    parser.add_argument(CHILD, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.ops)
        return 0
    if os.geteuid() != 0:
        print("needs root (it creates a network namespace)", file=sys.stderr)
        return 2
    name = f"spa-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        return subprocess.run(["ip", "netns", "exec", name, sys.executable, __file__, CHILD,
                               "--ops", str(args.ops)], check=False).returncode
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


if __name__ == "__main__":
    sys.exit(main())
