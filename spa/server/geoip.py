"""Country lookup for `stats` and the dashboard, from a GeoIP database file the
admin already has ([geoip] database = "/var/lib/GeoIP/GeoLite2-Country.mmdb").

MaxMind DB format (MaxMind's GeoLite2/GeoIP2 Country or City, DB-IP's lite
files), read through MaxMind's own reader.  Nothing is ever downloaded: a
server may have no internet, and an update schedule is the admin's choice
(Debian's geoipupdate package does it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spa.server.errors import LocalError

UNKNOWN = "-"  # no database, an address it does not cover, or not an address


class Countries:
    """address -> ISO 3166 country code (or UNKNOWN); caches per address."""

    def __init__(self, path: Path | None) -> None:
        self._reader: Any = None
        self._cache: dict[str, str] = {}
        if path is None:
            return
        import maxminddb  # only when configured: a server without [geoip] never loads it

        try:
            self._reader = maxminddb.open_database(str(path))
        except FileNotFoundError:
            raise LocalError(f"GeoIP database {path} does not exist; install one (Debian: "
                             "geoipupdate) or remove [geoip] from the config") from None
        except PermissionError:
            raise LocalError(f"cannot read GeoIP database {path}: permission denied") from None
        except (OSError, ValueError, maxminddb.InvalidDatabaseError):
            raise LocalError(f"GeoIP database {path} is not a MaxMind DB file; use a .mmdb "
                             "country or city database") from None

    @property
    def enabled(self) -> bool:
        return self._reader is not None

    def country(self, address: str | None) -> str:
        if self._reader is None or not address:
            return UNKNOWN
        found = self._cache.get(address)
        if found is None:
            found = self._cache[address] = self._lookup(address)
        return found

    def _lookup(self, address: str) -> str:
        try:
            record = self._reader.get(address)
        except ValueError:  # not an address (a folded row's source is None, never this)
            return UNKNOWN
        if not isinstance(record, dict):
            return UNKNOWN
        for key in ("country", "registered_country"):
            entry = record.get(key)
            if isinstance(entry, dict) and isinstance(entry.get("iso_code"), str):
                return str(entry["iso_code"])
        return UNKNOWN

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
