"""A small GeoIP country database made by the tests (never a download)."""

from __future__ import annotations

from pathlib import Path

from mmdb_writer import MMDBWriter
from netaddr import IPSet


def make_country_db(path: Path, networks: dict[str, str]) -> Path:
    """network (CIDR) -> ISO country code, written in MaxMind DB format with
    GeoLite2-Country's record layout."""
    writer = MMDBWriter(ip_version=6, database_type="GeoLite2-Country", ipv4_compatible=True)
    for network, code in networks.items():
        writer.insert_network(IPSet([network]),
                              {"country": {"iso_code": code, "names": {"en": code}}})
    writer.to_db_file(str(path))
    return path
