"""Runs inside the client namespace for bench_latency.py.

    python latency_probe.py SPEC.json
SPEC: {"server": ip, "knock_port": n, "service_port": n, "timeout": s,
       "interval": s (optional: knock i is sent no sooner than i * interval),
       "until": Unix time (optional: no knock is sent after it; knocks not
                sent are left out of the results),
       "uri": spa1://... (optional: each knock is made just before it is sent,
              so that runs longer than the 30 s window stay fresh; the
              payloads given are then ignored),
       "duration": s (optional, with uri: the lease each knock asks for; 60),
       "reuse_after": s (optional: a source knocks again only this long after
                      its last knock, so its last lease has ended; 0),
       "times": true (optional: print {"results": [...], "sent": [Unix time
                      each knock was sent, ...]} instead of the list),
       "knocks": [[source_ip, payload_hex], ...]}
For each knock: send the payload from its source address, then try TCP
connects to the service from that same address (non-blocking, 0.2 ms
polls) until one completes.  Prints a JSON list of milliseconds (null when
the port did not open within the timeout).
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time
from pathlib import Path


def opened(source: str, server: str, port: int) -> bool:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((source, 0))
        sock.setblocking(False)
        sock.connect_ex((server, port))
        _, writable, _ = select.select([], [sock], [], 0.0002)
        return bool(writable) and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    finally:
        sock.close()


def fresh_knock(uri: str, duration: int) -> bytes:
    import os

    from spa.core.uri import parse
    from spa.core.wire import NONCE_SIZE, Action
    from spa_client.knock import make_packet

    return make_packet(parse(uri), Action.OPEN, "ssh", duration=duration, address=None,
                       now=time.time(), nonce=os.urandom(NONCE_SIZE))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    results: list[float | None] = []
    sent: list[float] = []
    interval = float(spec.get("interval", 0))
    uri = spec.get("uri")
    until = spec.get("until")
    duration, reuse_after = int(spec.get("duration", 60)), float(spec.get("reuse_after", 0))
    last: dict[str, float] = {}
    begin = time.perf_counter()
    for index, (source, payload) in enumerate(spec["knocks"]):
        pause = max(begin + index * interval, last.get(source, 0) + reuse_after
                    ) - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        if until is not None and time.time() >= until:
            break
        last[source] = time.perf_counter()
        data = fresh_knock(uri, duration) if uri else bytes.fromhex(payload)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((source, 0))
            started = time.perf_counter()
            udp.sendto(data, (spec["server"], spec["knock_port"]))
            sent.append(time.time())
        deadline = started + spec["timeout"]
        took = None
        while time.perf_counter() < deadline:
            if opened(source, spec["server"], spec["service_port"]):
                took = (time.perf_counter() - started) * 1000
                break
        results.append(took)
    print(json.dumps({"results": results, "sent": sent} if spec.get("times") else results))


if __name__ == "__main__":
    main()
