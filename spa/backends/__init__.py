"""Firewall backends: one lifecycle (STYLE principle 6)."""
