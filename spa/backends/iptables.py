"""The iptables backend (placeholder until it lands in this release)."""

from __future__ import annotations

from spa.backends.base import Backend
from spa.server.errors import LocalError


class IptablesBackend:
    @classmethod
    def create(cls) -> Backend:
        raise LocalError("the iptables backend is not in this release yet; use --backend "
                         "nftables")
