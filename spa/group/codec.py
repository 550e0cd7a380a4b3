"""The strict JSON framing every group record shares (docs/groups.md, "Records").

Invariants:
- A record is one JSON object, at most MAX_RECORD_SIZE bytes of UTF-8, with
  `"v": 1` and `"type"` naming its kind; the encoding is canonical (sorted
  keys, no spaces, ASCII only), so equal records are equal bytes.
- Decoding is strict: bytes that are not exactly what the encoder writes
  for the record they hold (canonical), anything but exactly the fields of
  its type and version, a field of the wrong JSON type (a bool is not a
  number), a duplicate key, NaN or Infinity, bytes that are not canonical
  unpadded base64url of the right size, or a time out of range raises
  RecordError, and nothing else, whatever the bytes
  (tests/property/test_group_records.py).
- A RecordError's message is one line naming the field, never quoting a
  value (a record may hold keys).
- Pure: no clock; times are numbers the caller gives.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import json
import math
import re
from collections.abc import Mapping
from typing import Any

VERSION = 1  # the records' format version; a decoder refuses any other
MAX_RECORD_SIZE = 16 * 1024  # bytes: a client record is about 700, the rest under 300
MAX_TIME = 253_402_300_799  # 9999-12-31T23:59:59Z: the last time UTC_FORMAT can write
MAX_LIST = 64  # services or sources one record may list (spa.core.sources.MAX_SOURCES)
_UTC_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})Z", re.ASCII)
_B64_RE = re.compile(r"[A-Za-z0-9_-]*")
_B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
# the canonical JSON writer (encode's settings); its C implementation re-encodes
# a decoded record in a few microseconds
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                              allow_nan=False)


class RecordError(ValueError):
    """A group record is not one this version writes.  The one error `decode_*`
    raises for any bytes; its message names the field, never a value."""


def encode(fields: Mapping[str, Any], kind: str) -> bytes:
    """The canonical bytes of a record of type `kind`."""
    record = {"v": VERSION, "type": kind, **fields}
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise RecordError("a key appears twice in one object")
    return found


def _no_constant(name: str) -> Any:
    raise RecordError(f"{name} is not a number a record may hold")


def decode(data: bytes, kind: str, fields: frozenset[str]) -> dict[str, Any]:
    """The record's fields (without `v` and `type`) after the framing checks:
    size, JSON, version, type, exactly `fields`.  Raises RecordError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RecordError("a record is bytes")
    if len(data) > MAX_RECORD_SIZE:
        raise RecordError(f"record longer than {MAX_RECORD_SIZE} bytes")
    try:
        record = json.loads(bytes(data).decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=_no_constant)
    except RecordError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        # ValueError: JSONDecodeError, and an integer of more digits than
        # Python converts; RecursionError: arrays nested thousands deep
        raise RecordError(f"{kind} record: not JSON") from None
    if not isinstance(record, dict):
        raise RecordError(f"{kind} record: not a JSON object")
    version = record.pop("v", None)
    if type(version) is not int or version != VERSION:
        raise RecordError(f"{kind} record: version is not {VERSION} (a newer server wrote it?)")
    if record.pop("type", None) != kind:
        raise RecordError(f"not a {kind} record")
    exact(record, fields, f"{kind} record")
    return record


def canonical(data: bytes, encoded: bytes, kind: str) -> None:
    """Raise RecordError unless `data` is the canonical encoding of what it
    decoded to (`encoded`): one record, one byte string, so a transaction may
    compare values.  Call it last, on a record that decoded."""
    if bytes(data) != encoded:
        raise RecordError(f"{kind} record: not in canonical form (sorted keys, no spaces, "
                          "ASCII, times as this version writes them)")


def exact(record: Mapping[str, Any], fields: frozenset[str], what: str) -> None:
    """Raise RecordError unless `record` has exactly `fields`."""
    keys = set(record)
    if keys != fields:
        missing, unknown = sorted(fields - keys), sorted(keys - fields)
        problem = f"missing {', '.join(missing)}" if missing else ""
        if unknown:
            shown = ", ".join(name[:20] for name in unknown[:3])
            problem += ("; " if problem else "") + f"unknown field {shown}"
        raise RecordError(f"{what}: {problem}")


# ---- fields ----------------------------------------------------------------

def text(record: Mapping[str, Any], name: str, most: int = 256) -> str:
    value = record[name]
    if not isinstance(value, str) or len(value) > most:
        raise RecordError(f"{name}: not a string of at most {most} characters")
    return value


def flag(record: Mapping[str, Any], name: str) -> bool:
    value = record[name]
    if not isinstance(value, bool):
        raise RecordError(f"{name}: not true or false")
    return value


def seconds(record: Mapping[str, Any], name: str) -> int:
    """A whole Unix time, 0 to MAX_TIME."""
    value = record[name]
    if type(value) is not int or not 0 <= value <= MAX_TIME:
        raise RecordError(f"{name}: not a whole Unix time up to year 9999")
    return value


def maybe_seconds(record: Mapping[str, Any], name: str) -> int | None:
    return None if record[name] is None else seconds(record, name)


def instant(record: Mapping[str, Any], name: str) -> float:
    """A Unix time with a fraction, 0 to MAX_TIME (an int is taken too)."""
    value = record[name]
    if type(value) not in (int, float) or not 0 <= value <= MAX_TIME:
        raise RecordError(f"{name}: not a Unix time up to year 9999")
    return float(value)


def check_instant(value: float, name: str) -> float:
    """Raise RecordError unless `value` is a time `instant` would read back."""
    if not (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and 0 <= value <= MAX_TIME):
        raise RecordError(f"{name}: not a Unix time up to year 9999")
    return float(value)


def strings(record: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = record[name]
    if (not isinstance(value, list) or len(value) > MAX_LIST
            or not all(isinstance(item, str) and len(item) <= 64 for item in value)):
        raise RecordError(f"{name}: not a list of at most {MAX_LIST} short strings")
    return tuple(value)


def b64(raw: bytes) -> str:
    """Unpadded base64url, as the config file and enrollment URIs write keys."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def key_bytes(record: Mapping[str, Any], name: str, size: int) -> bytes:
    """`size` bytes written as canonical unpadded base64url."""
    value = record[name]
    if isinstance(value, str) and _B64_RE.fullmatch(value):
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == size and b64(raw) == value:
            return raw
    raise RecordError(f"{name}: not {size} bytes of unpadded base64url")


def last_digits(size: int) -> frozenset[str]:
    """The base64url digits that may end the canonical text of `size` bytes:
    those whose bits past the last byte are zero."""
    unused = (-size * 8) % 6
    return frozenset(c for i, c in enumerate(_B64_ALPHABET) if i & ((1 << unused) - 1) == 0)


_LAST = {size: last_digits(size) for size in (16, 32)}


def key_bytes_or_none(value: object, size: int) -> bytes | None:
    """What key_bytes({name: value}, name, size) returns, or None where it
    raises: its check without the re-encoding (the length, the alphabet and
    the unused bits of the last digit decide canonical form).  `size` 16 or 32."""
    if (type(value) is not str or len(value) != (4 * size + 2) // 3
            or value[-1] not in _LAST[size] or _B64_RE.fullmatch(value) is None):
        return None
    padded = value.encode("ascii").translate(_URLSAFE_TO_STANDARD) + b"=" * (-len(value) % 4)
    return binascii.a2b_base64(padded)


def canonical_record(data: object) -> dict[str, Any] | None:
    """The fields of `data` (with `v` and `type`) when it is JSON in canonical
    form, as `encode` writes it (so no duplicate key, NaN or space either);
    None otherwise.  Never raises: a caller falls back to decode and its
    precise RecordError."""
    if type(data) is not bytes or len(data) > MAX_RECORD_SIZE:
        return None
    try:
        record = json.loads(data)
        if type(record) is not dict or _CANONICAL.encode(record).encode("ascii") != data:
            return None
    except (ValueError, RecursionError):  # not JSON, NaN or a huge int met by the encoder
        return None
    return record


def utc_seconds(text: str) -> int:
    """The Unix time of a UTC_FORMAT text (2026-12-06T00:14:18Z), without the
    time module.  Raises RecordError."""
    match = _UTC_RE.fullmatch(text)
    if match is None:
        raise RecordError("not a UTC time like 2026-12-06T00:14:18Z")
    year, month, day, hour, minute, second = (int(part) for part in match.groups())
    if not (year >= 1970 and 1 <= month <= 12 and hour < 24 and minute < 60 and second < 60
            and 1 <= day <= calendar.monthrange(year, month)[1]):
        raise RecordError("not a UTC time like 2026-12-06T00:14:18Z")
    return calendar.timegm((year, month, day, hour, minute, second))
