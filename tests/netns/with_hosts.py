"""Run a command with FILE in place of /etc/hosts, for it alone:

    unshare --mount --propagation private -- \
        python with_hosts.py OUTSIDE FILE COMMAND [ARG...]

The bind mount lives in the mount namespace `unshare` made and ends with it;
the machine's /etc/hosts is never written, nor hidden from anyone else.
OUTSIDE is the caller's own mount namespace (readlink /proc/self/ns/mnt): it
refuses to mount there (run without `unshare`).
"""

from __future__ import annotations

import os
import subprocess
import sys


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit("usage: with_hosts.py OUTSIDE FILE COMMAND [ARG...]")
    outside, hosts, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    if os.readlink("/proc/self/ns/mnt") == outside:
        sys.exit("with_hosts.py: run me under unshare --mount (this is the caller's own "
                 "mount namespace)")
    subprocess.run(["mount", "--bind", hosts, "/etc/hosts"], check=True)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
