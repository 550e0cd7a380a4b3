"""Make tests/vectors/group_v1.json: a client record as a group stores it in
etcd (its keys derived for the group's server id, its master secret left
behind), a claim key and a group meta record.  Frozen once made;
docs/groups.md describes the records and tests/unit/test_vectors.py checks
the file against spa.group.

    .venv/bin/python -m tests.vectors.make_group > tests/vectors/group_v1.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

from spa.core.keys import derive_keys
from spa.group.clients import client_record
from spa.group.layout import claim_key
from spa.group.records import GroupMeta, encode_meta
from spa.server.config import ClientEntry

SERVER_ID = bytes.fromhex("5350412d746573742d7365727665722e")  # "SPA-test-server."
SECRET = bytes(range(0x20, 0x40))
OLD_SECRET = bytes(range(0x40, 0x60))
NONCE = bytes(range(0x60, 0x78))
FIELDS: dict[str, Any] = {
    "name": "alice", "services": ["ssh", "https"], "allow_other_address": False,
    "enrolled": "2026-12-06T00:14:18Z", "enroll_by": "2026-12-13T00:00:00Z",
    "otp_secret": "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", "endpoint": "knock.example.org:62201",
    "old_until": "2026-12-06T01:00:00Z", "sources": ["203.0.113.0/24", "2001:db8::/48"],
}


def _keys(secret: bytes) -> dict[str, str]:
    keys = derive_keys(secret, SERVER_ID)
    return {"tag": keys.tag_key.hex(), "cipher": keys.cipher_key.hex(),
            "mac": keys.mac_key.hex()}


def main() -> None:
    entry = ClientEntry(FIELDS["name"], SECRET, tuple(FIELDS["services"]),
                        allow_other_address=FIELDS["allow_other_address"],
                        enrolled=FIELDS["enrolled"], enroll_by=FIELDS["enroll_by"],
                        otp_secret=FIELDS["otp_secret"], endpoint=FIELDS["endpoint"],
                        old_secret=OLD_SECRET, old_until=FIELDS["old_until"],
                        sources=tuple(FIELDS["sources"]))
    vector = {
        "comment": ("A group's records in etcd (docs/groups.md, 'Records'). 'client': the "
                    "entry's fields and secrets (hex) in, the record's exact bytes out, with "
                    "the keys it must hold (hex) for server_id; the record holds neither "
                    "secret.  'claim': the key of a packet's nonce.  'meta': a group record.  "
                    "Made by tests/vectors/make_group.py."),
        "server_id": SERVER_ID.hex(),
        "client": {
            "entry": FIELDS, "secret": SECRET.hex(), "old_secret": OLD_SECRET.hex(),
            "keys": _keys(SECRET), "old_keys": _keys(OLD_SECRET),
            "record": client_record(entry, SERVER_ID).decode("ascii"),
        },
        "claim": {"group": "prod", "client": "alice", "nonce": NONCE.hex(),
                  "key": claim_key("prod", "alice", NONCE)},
        "meta": {"group": "prod", "created": 1_796_516_058,
                 "record": encode_meta(GroupMeta("prod", SERVER_ID, 1_796_516_058)
                                       ).decode("ascii")},
    }
    json.dump(vector, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
