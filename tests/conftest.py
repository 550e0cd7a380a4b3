"""Shared test setup: hypothesis profiles and a small world of keys and clients.

Profiles (choose with --hypothesis-profile NAME or HYPOTHESIS_PROFILE):
- dev (default): quick, for the edit-test loop.
- ci: thousands of examples for the fuzz and round-trip properties, bounded
  by a per-example deadline so the whole suite stays well under 20 minutes
  on two cores.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=200, deadline=None)
settings.register_profile(
    "ci",
    max_examples=3000,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
