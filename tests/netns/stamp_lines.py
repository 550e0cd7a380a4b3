"""Run a command; print each line it writes, after the wall clock (seconds,
microseconds) at which the line was read.  `stamp_lines.py nft monitor`
timestamps every nftables commit in the namespace it runs in."""

from __future__ import annotations

import subprocess
import sys
import time


def main() -> None:
    proc = subprocess.Popen(["stdbuf", "-oL", *sys.argv[1:]], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    print(f"{time.time():.6f} # started", flush=True)
    try:
        for line in proc.stdout:
            print(f"{time.time():.6f} {line.rstrip()}", flush=True)
    except KeyboardInterrupt:  # the caller's end of the trace
        pass
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
