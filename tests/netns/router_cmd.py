"""The admin's program for the command backend's namespace tests: what
/usr/local/bin/router-allow would be, talking to the router's API
(tests/netns/router_agent.py).

router_cmd.py URL HANG_FILE allow|remove ADDRESS SERVICE
router_cmd.py URL HANG_FILE list SERVICE
Exits 0 when the router did it.  If HANG_FILE names SERVICE, an allow for it
hangs (a router that stopped answering).
"""

from __future__ import annotations

import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode


def main(argv: list[str]) -> int:
    url, hang_file, verb, *rest = argv
    service = rest[-1]
    try:
        hang = Path(hang_file).read_text().split()
    except OSError:
        hang = []
    if verb == "allow" and service in hang:
        time.sleep(60)
    path = {"allow": "/add", "remove": "/del", "list": "/list"}[verb]
    query = {"set": service} if verb == "list" else {"set": service, "address": rest[0]}
    with urllib.request.urlopen(f"{url}{path}?{urlencode(query)}", timeout=5) as answer:
        sys.stdout.write(answer.read().decode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
