"""A fixed little world for fwknop compatibility tests: the vectors' keys,
compat clients, a policy, a packet maker (spa.core.fwknop.seal), and files
in memory for reading fwknopd's (spa.server.fwknopd_files.Files)."""

from __future__ import annotations

import base64
import ipaddress
import itertools
import json
from pathlib import Path
from typing import Any

from spa.core.fwknop import FwknopKeys, Message, SpaData, plaintext, seal
from spa.core.fwknop_verify import CompatVerifier, HmacBudget
from spa.core.policy import DEFAULT_SERVICES, ClientPolicy, Policy

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "fwknop.json").read_text())
KEYS = FwknopKeys(base64.b64decode(VECTORS["rijndael_key_base64"]),
                  base64.b64decode(VECTORS["hmac_key_base64"]))
SHORT_KEYS = FwknopKeys(base64.b64decode(VECTORS["short_rijndael_key_base64"]),
                        base64.b64decode(VECTORS["hmac_key_base64"]))
OTHER_KEYS = FwknopKeys(bytes([7]) * 32, bytes([8]) * 64)
SOURCE = ipaddress.IPv4Address("198.51.100.7")  # the vectors' -a address
POLICY = Policy(dict(DEFAULT_SERVICES), {
    "oldphone": ClientPolicy("oldphone", frozenset({"ssh", "https"})),
    "shortkey": ClientPolicy("shortkey", frozenset({"ssh"})),
    "other": ClientPolicy("other", frozenset({"ssh"}), allow_other_address=True),
})
CLIENTS = {"oldphone": KEYS, "shortkey": SHORT_KEYS, "other": OTHER_KEYS}
NOW = 1_800_000_000
_SALTS = itertools.count(1)


def vector(name: str) -> dict[str, Any]:
    return next(v for v in VECTORS["vectors"] if v["name"] == name)


def compat(**kwargs: Any) -> CompatVerifier:
    """A verifier with no budget in the way (the budget has tests of its own)."""
    kwargs.setdefault("budget", HmacBudget(max_hmacs=10**9, per_source=10**9,
                                           per_trusted=10**9))
    return CompatVerifier(CLIENTS, POLICY, **kwargs)


def packet(keys: FwknopKeys = KEYS, *, now: int = NOW, ports: tuple[tuple[str, int], ...] = (
        ("tcp", 22),), allow: str = "0.0.0.0", kind: Message = Message.ACCESS,
           timeout: int = 0, hmac_name: str | None = "sha256", digest: str = "sha256",
           nat: tuple[str, int] | None = None) -> bytes:
    """A packet as fwknop's client makes it, with a fresh deterministic salt."""
    salt = next(_SALTS).to_bytes(8, "big")
    data = SpaData(f"{next(_SALTS):016d}", "tester", now, "3.0.0", kind,
                   ipaddress.IPv4Address(allow), ports, timeout, nat)
    return seal(plaintext(data, digest=digest), keys, salt=salt, hmac_name=hmac_name)


class FakeFiles:
    """Files in memory: path -> bytes, and directories' listings."""

    def __init__(self, files: dict[str, str | bytes | OSError],
                 dirs: dict[str, list[str]] | None = None) -> None:
        self.files = files
        self.dirs = dirs or {}

    def read(self, path: Path) -> bytes:
        found = self.files.get(str(path))
        if found is None:
            raise FileNotFoundError(2, "No such file or directory")
        if isinstance(found, OSError):
            raise found
        return found.encode("latin-1") if isinstance(found, str) else found

    def list_dir(self, path: Path) -> list[str]:
        if str(path) not in self.dirs:
            raise FileNotFoundError(2, "No such file or directory")
        return self.dirs[str(path)]
