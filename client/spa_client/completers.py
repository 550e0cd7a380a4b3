"""What a TAB offers for spa-client's SERVICE and HOST arguments.

Read from the enrolled profiles (the --config-dir typed on the line, else
the default directory); a profile that cannot be read is skipped and any
other problem offers nothing: completion never prints an error.  See
spa.completion for how the shell asks.
"""

from __future__ import annotations

from pathlib import Path

import typer

from spa_client.profile import Profile, ProfileError, ProfileStore, default_dir


def _profiles(ctx: typer.Context) -> list[Profile]:
    given = ctx.find_root().params.get("config_dir")
    store = ProfileStore(Path(given) if given else default_dir())
    found = []
    try:
        names = store.names()
    except OSError:
        return []
    for name in names:
        try:
            found.append(store.load(name))
        except (ProfileError, OSError, ValueError):
            continue
    return found


def services(ctx: typer.Context, incomplete: str) -> list[tuple[str, str]]:
    """Service names the profiles offer, each with where: "tcp/22 at host"."""
    offered: dict[str, list[str]] = {}
    for profile in _profiles(ctx):
        for ref in profile.enrollment.services:
            offered.setdefault(ref.name, []).append(
                f"{ref.protocol}/{ref.port} at {profile.name}")
    return [(name, ", ".join(where)) for name, where in sorted(offered.items())
            if name.startswith(incomplete)]


def hosts(ctx: typer.Context, incomplete: str) -> list[tuple[str, str]]:
    """Profile names (those offering the SERVICE already typed, if any)."""
    service = ctx.params.get("service")
    found = []
    for profile in _profiles(ctx):
        e = profile.enrollment
        if service and all(ref.name != service for ref in e.services):
            continue
        if profile.name.startswith(incomplete):
            found.append((profile.name, f"{e.client} at {e.host}:{e.port}"))
    return found
