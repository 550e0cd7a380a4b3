"""A compact client record, on paper: bytes a record takes now against a
binary form, and what etcd's JSON gateway sends a member's start for each
(issue 18; docs/scale.md, "A member's start").  The record format is not
changed: this script only sizes an idea.

The compact form sized here (one byte of version and flags first):

    version+flags 1 | keys 96 | [old keys 96, until 5] | [enroll_by 5]
    | [enrolled 5] | services: count 1, each length 1 + name
    | sources: count 1, each family+prefix 2 + address 4 or 16
    | [otp secret: length 1 + raw bytes]

and neither the name (the key holds it) nor the server id (the group's:
every record of a group has the same one; a 4-byte check of it would do,
counted).  Times are 5 bytes (seconds to year 36812).  A client's record is
generated as benchmarks/group_scale.py does (random_entry: 1-3 services,
half with a code, a fifth with two networks, 5% mid-rotation).

    .venv/bin/python benchmarks/compact_record.py [--clients 2000]

Prints: mean bytes now (JSON: the value in etcd) and compact; the key; what
one record costs in the gateway's answer (its key and value in base64 inside
JSON, with the fields etcd adds); and the same for 10^5 and 10^6 clients.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import random
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from group_scale import GROUP, random_entry  # noqa: E402

from spa.group import layout  # noqa: E402
from spa.group.clients import GroupClient, encode_client, group_client  # noqa: E402

SERVER_CHECK = 4  # bytes of the server id kept as a check (the full id: 16)
TIME = 5  # bytes of a Unix time in seconds


def compact_size(client: GroupClient) -> int:
    """Bytes of the compact form described in the module's docstring."""
    size = 1 + SERVER_CHECK + 96
    if client.old_keys is not None:
        size += 96 + TIME
    size += TIME if client.enroll_by is not None else 0
    size += TIME if client.enrolled is not None else 0
    size += 1 + sum(1 + len(service) for service in client.services)
    size += 1 + sum(2 + ipaddress.ip_network(text).network_address.packed.__len__()
                    for text in client.sources)
    if client.otp_secret:
        size += 1 + len(base64.b32decode(client.otp_secret, casefold=True))
    return size


def gateway_bytes(key: bytes, value: bytes) -> int:
    """One key-value as etcd 3.4's gateway writes it in a range's answer."""
    kv = {"key": base64.b64encode(key).decode(), "create_revision": "123456",
          "mod_revision": "123456", "version": "1", "value": base64.b64encode(value).decode()}
    return len(json.dumps(kv, separators=(",", ":"))) + 1  # the comma between kvs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=18)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    now = time.time()
    server_id = rng.randbytes(16)
    clients = [group_client(random_entry(i, rng, now), server_id) for i in range(args.clients)]
    now_bytes = [len(encode_client(c)) for c in clients]
    compact = [compact_size(c) for c in clients]
    keys = [layout.client_key(GROUP, c.name).encode() for c in clients]
    wire_now = [gateway_bytes(k, encode_client(c)) for k, c in zip(keys, clients, strict=True)]
    wire_compact = [gateway_bytes(k, bytes(n)) for k, n in zip(keys, compact, strict=True)]
    print(f"{args.clients:,} random clients (group_scale.random_entry), bytes a record:")
    for what, now_, small in (("value (in etcd)", now_bytes, compact),
                              ("key + value in the gateway's JSON", wire_now, wire_compact)):
        print(f"  {what:34} now {statistics.mean(now_):6.0f} (min {min(now_)}, max "
              f"{max(now_)})   compact {statistics.mean(small):6.0f} (min {min(small)}, "
              f"max {max(small)})   ratio {statistics.mean(small) / statistics.mean(now_):.2f}")
    print(f"  key {statistics.mean(len(k) for k in keys):.0f} bytes (the same in both)")
    for count in (10**5, 10**6):
        print(f"  {count:>9,} clients: a start reads {statistics.mean(wire_now) * count / 1e6:,.0f}"
              f" MB of JSON now, {statistics.mean(wire_compact) * count / 1e6:,.0f} MB compact; "
              f"etcd holds {statistics.mean(now_bytes) * count / 1e6:,.0f} MB of values now, "
              f"{statistics.mean(compact) * count / 1e6:,.0f} MB compact")


if __name__ == "__main__":
    main()
