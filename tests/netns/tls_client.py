"""A TLS client that keeps one connection open for the namespace tests.

    python tls_client.py HOST PORT [TIMEOUT]
Prints "connected" once the handshake is done (or "failed ..." and exits 1),
then sends every line read from standard input and prints the reply.
"""

from __future__ import annotations

import socket
import ssl
import sys


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
        conn = context.wrap_socket(raw)
    except OSError as exc:
        print(f"failed {type(exc).__name__}", flush=True)
        return 1
    print("connected", flush=True)
    reader = conn.makefile("rb")
    for line in sys.stdin:
        try:
            conn.sendall(line.encode())
            reply = reader.readline().decode().strip()
        except OSError as exc:
            print(f"failed {type(exc).__name__}", flush=True)
            return 1
        print(reply or "failed eof", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
