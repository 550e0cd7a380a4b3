"""Print the namespace's nftables tables each time they change (polled
every INTERVAL seconds through libnftables, stamped with the wall clock):
when the hold table came and went, for a gate test's failure message."""

from __future__ import annotations

import sys
import time

from spa.backends.libnft import LibNft


def main() -> None:
    interval = float(sys.argv[1])
    nft = LibNft()
    print(f"{time.time():.6f} # polling", flush=True)
    last = None
    try:
        while True:
            tables = " ".join(sorted(line.split()[2] for line in
                                     nft.list_text("list tables").splitlines() if line.strip()))
            if tables != last:
                print(f"{time.time():.6f} tables: {tables}", flush=True)
                last = tables
            time.sleep(interval)
    except KeyboardInterrupt:  # the caller's end of the poll
        pass


if __name__ == "__main__":
    main()
