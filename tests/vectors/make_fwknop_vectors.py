"""Make tests/vectors/fwknop.json with the real fwknop client (Debian's
fwknop-client 2.6.10): each vector is a packet `fwknop --test` printed, the
command that made it, and what spa-server must do with it.  Run again only
to add vectors (each run makes new packets: salts and random values differ):

    python3 tests/vectors/make_fwknop_vectors.py > tests/vectors/fwknop.json
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import time

RIJNDAEL = base64.b64encode(bytes(range(32))).decode()  # the vectors' keys: fixed, public
HMAC = base64.b64encode(bytes(range(32, 96))).decode()
SHORT = base64.b64encode(b"shortkey").decode()  # 8 bytes: legacy IV mode differs
BASE = ["fwknop", "-D", "192.0.2.1", "-U", "vector", "--test", "--verbose"]
KEYS = ["--key-base64-rijndael", RIJNDAEL, "--key-base64-hmac", HMAC]

VECTORS = [
    ("access", ["-A", "tcp/22", "-a", "198.51.100.7", *KEYS, "--use-hmac"], "accepted"),
    ("source_ip", ["-A", "tcp/22", "-s", *KEYS, "--use-hmac"], "accepted"),
    ("client_timeout", ["-A", "tcp/22", "-a", "198.51.100.7", "-f", "120", *KEYS,
                        "--use-hmac"], "accepted"),
    ("two_ports", ["-A", "tcp/22,tcp/443", "-a", "198.51.100.7", *KEYS, "--use-hmac"],
     "accepted"),
    ("digest_sha512", ["-A", "tcp/22", "-a", "198.51.100.7", "-m", "sha512", *KEYS,
                       "--use-hmac"], "accepted"),
    # (no HMAC key: given one, the client adds an HMAC even without --use-hmac)
    ("no_hmac", ["-A", "tcp/22", "-a", "198.51.100.7", "--key-base64-rijndael", RIJNDAEL],
     "no_hmac"),
    ("hmac_md5", ["-A", "tcp/22", "-a", "198.51.100.7", *KEYS, "--use-hmac",
                  "--hmac-digest-type", "md5"], "weak_hmac"),
    ("hmac_sha1", ["-A", "tcp/22", "-a", "198.51.100.7", *KEYS, "--use-hmac",
                   "--hmac-digest-type", "sha1"], "weak_hmac"),
    ("digest_md5", ["-A", "tcp/22", "-a", "198.51.100.7", "-m", "md5", *KEYS, "--use-hmac"],
     "weak_digest"),
    ("hmac_sha512", ["-A", "tcp/22", "-a", "198.51.100.7", *KEYS, "--use-hmac",
                     "--hmac-digest-type", "sha512"], "other_hmac"),
    ("command", ["--server-cmd", "touch /tmp/pwned", "-a", "198.51.100.7", *KEYS,
                 "--use-hmac"], "command_message"),
    ("nat", ["-A", "tcp/22", "-a", "198.51.100.7", "-N", "10.0.0.2:22", *KEYS, "--use-hmac"],
     "nat_message"),
    ("legacy_iv", ["-A", "tcp/22", "-a", "198.51.100.7", "-M", "legacy",
                   "--key-base64-rijndael", SHORT],  # the client refuses legacy with an HMAC
     "legacy_iv"),
    ("old", ["-A", "tcp/22", "-a", "198.51.100.7", "--time-offset-minus", "300s", *KEYS,
             "--use-hmac"], "stale"),
]


def run(argv: list[str], home: str) -> dict[str, object]:
    out = subprocess.run(argv, capture_output=True, text=True, check=True,
                         env={**os.environ, "HOME": home}).stdout
    packet = re.search(r"Final SPA Data: (\S+)", out)
    stamp = re.search(r"Timestamp: (\d+)", out)
    assert packet is not None and stamp is not None, out
    # made_at: the clock when it was made (the server's `now` in the tests)
    return {"packet": packet.group(1), "timestamp": int(stamp.group(1)),
            "made_at": int(time.time())}


def main() -> None:
    version = subprocess.run(["fwknop", "--version"], capture_output=True, text=True,
                             env={**os.environ, "HOME": tempfile.mkdtemp()}).stdout.split("\n")[-2]
    vectors = []
    with tempfile.TemporaryDirectory() as home:
        for name, args, expect in VECTORS:
            argv = BASE + args
            vectors.append({"name": name, "command": " ".join(argv), "expect": expect,
                            **run(argv, home)})
    json.dump({"made_by": version, "rijndael_key_base64": RIJNDAEL,
               "short_rijndael_key_base64": SHORT, "hmac_key_base64": HMAC,
               "vectors": vectors}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
