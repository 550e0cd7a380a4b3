"""Admin commands for fwknop clients: enroll one, show the way off fwknop.

- `enroll` makes a compat client with fresh keys as `fwknop --key-gen` does
  (a 32-byte Rijndael key, a 64-byte HMAC key) and returns what its user
  needs: the `.fwknoprc` stanza for the fwknop CLI and the text Fwknop2 and
  fwknop-gui scan (`KEY_BASE64:... HMAC_KEY_BASE64:...`).  Keys are printed
  for the admin to hand over (as our URIs are), never logged.
- `move` turns a compat client into one of ours: a new spa1:// enrollment
  (same name, services, rights), its fwknop keys dropped at once.
- `import_fwknopd` makes compat clients of fwknopd's access.conf stanzas
  (the plan: spa.server.fwknop_import); a dry run reads the store without
  making or moving anything.
"""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from spa.core.keys import MASTER_SECRET_SIZE
from spa.core.uri import Enrollment, ServiceRef, is_valid_client_name, render
from spa.server import config as config_mod
from spa.server.admin import open_store, parse_endpoint
from spa.server.config import KIND_FWKNOP, KIND_SPA, ClientEntry, ServerConfig
from spa.server.errors import LocalError
from spa.server.fwknop_import import ImportPlan, Known, client_names, plan
from spa.server.fwknopd_files import DiskFiles, Files, read_access, read_conf
from spa.server.gwroute import RouteOf, kernel_route, own_host_problem
from spa.store.clients import CLIENTS_DB, ClientStore

RIJNDAEL_KEY_SIZE = 32  # what fwknop --key-gen makes
HMAC_KEY_SIZE = 64


@dataclass(frozen=True, slots=True, repr=False)
class FwknopEnrollment:
    name: str
    host: str
    port: int
    access: tuple[str, ...]  # "tcp/22", ...
    rijndael: bytes
    hmac: bytes

    def qr_text(self) -> str:
        """What Fwknop2 (Android) and fwknop-gui read from a QR code."""
        return f"KEY_BASE64:{_b64(self.rijndael)} HMAC_KEY_BASE64:{_b64(self.hmac)}"

    def fwknoprc(self) -> str:
        """The stanza for ~/.fwknoprc: then `fwknop -n NAME` knocks."""
        return "\n".join([
            f"[{self.name}]",
            f"SPA_SERVER          {self.host}",
            f"SPA_SERVER_PORT     {self.port}",
            f"ACCESS              {','.join(self.access)}",
            "ALLOW_IP            source",
            f"KEY_BASE64          {_b64(self.rijndael)}",
            f"HMAC_KEY_BASE64     {_b64(self.hmac)}",
            "USE_HMAC            Y",
            "HMAC_DIGEST_TYPE    sha256",
            "",
        ])


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def access_of(config: ServerConfig, services: list[str]) -> tuple[str, ...]:
    """fwknop's ACCESS for the services: the port of this host each is knocked
    for (a gateway service's published port, else its port), as the compat
    listener maps a knock."""
    return tuple(f"{config.services[s].protocol}/{config.services[s].client_port}"
                 for s in services)


def enroll(path: Path, name: str, services: list[str], endpoint: str, *,
           now: float | None = None) -> FwknopEnrollment:
    """A compat client with new keys.  Raises LocalError (a bad name, an
    unknown service, the compat listener off)."""
    config = config_mod.load(path)
    if not config.fwknop_port:
        raise LocalError(f"the fwknop compat listener is off; set fwknop_port = "
                         f"{config_mod.FWKNOP_PORT} under [server] in {path} (and listen_port "
                         "to another port), then enroll again")
    if not is_valid_client_name(name):
        raise LocalError(f"client name {name!r}: use letters, digits, '.', '_', '@', '-' "
                         "(at most 64, starting with a letter or digit)")
    unique = list(dict.fromkeys(services))
    unknown = [s for s in unique if s not in config.services]
    if not unique or unknown:
        raise LocalError(f"name services it may open with --service (known: "
                         f"{', '.join(sorted(config.services))})")
    host, _ = parse_endpoint(endpoint, config.fwknop_port)
    when = time.time() if now is None else now
    keys = os.urandom(RIJNDAEL_KEY_SIZE), os.urandom(HMAC_KEY_SIZE)
    with open_store(config, now=when) as store:
        store.add(ClientEntry(name, b"", tuple(unique), enrolled=config_mod.format_utc(when),
                              endpoint=endpoint.strip(), kind=KIND_FWKNOP,
                              fwknop_key=keys[0], fwknop_hmac_key=keys[1]), at=when)
    return FwknopEnrollment(name, host, config.fwknop_port, access_of(config, unique), *keys)


def move_command(name: str, endpoint: str) -> str:
    """The one command that moves a compat client to our protocol."""
    where = f" --endpoint {endpoint}" if endpoint else " --endpoint HOST"
    return f"spa-server rotate {name} --grace 0{where} --qr"


def move(store: ClientStore, config: ServerConfig, entry: ClientEntry, *,
         endpoint: str | None, now: float) -> str:
    """A compat client becomes one of ours (`spa-server rotate` of an fwknop
    client): a new secret, its fwknop keys dropped at once, its new URI
    returned.  Raises LocalError."""
    if endpoint:
        host, port = parse_endpoint(endpoint, config.listen_port)
    elif entry.endpoint:
        host, port = parse_endpoint(entry.endpoint, config.listen_port)[0], config.listen_port
    else:
        raise LocalError(f"give --endpoint HOST[:PORT] for {entry.name}'s new URI")
    secret = os.urandom(MASTER_SECRET_SIZE)
    store.put(replace(entry, kind=KIND_SPA, secret=secret, fwknop_key=b"",
                      fwknop_hmac_key=b"", endpoint=endpoint or entry.endpoint), at=now)
    refs = tuple(ServiceRef(s, config.services[s].protocol, config.services[s].client_port)
                 for s in entry.services if s in config.services)
    return render(Enrollment(host, port, config.server_id, entry.name, secret, refs))


def import_fwknopd(path: Path, access: Path, conf: Path, *, conf_given: bool, dry_run: bool,
                   now: float, files: Files | None = None,
                   route: RouteOf | None = None) -> ImportPlan:
    """Import fwknopd's stanzas as compat clients (spa.server.fwknop_import);
    with `dry_run` only plan.  Writes the services and fwknop_port first,
    then the clients in one transaction, so a failure between leaves
    nothing a second run does not finish.  A FORCE_NAT address that is this
    machine's own (`route`: the kernel's, a fake in tests) stops it before
    anything is written.  Raises LocalError."""
    reader = DiskFiles() if files is None else files
    config = config_mod.load(path)
    stanzas = read_access(access, reader)
    fwknopd = read_conf(conf, reader, required=conf_given)
    names = client_names(stanzas)
    if dry_run:
        made = plan(stanzas, fwknopd, config, _known_now(config, names), now=now)
        _refuse_own_hosts(made, route)
        return made
    with open_store(config, now=now) as store:
        known = Known(tuple(store.of_kind(KIND_FWKNOP)),
                      {name: entry for name in names if (entry := store.get(name)) is not None})
    made = plan(stanzas, fwknopd, config, known, now=now)
    _refuse_own_hosts(made, route)
    # outside the store's block: root writes the store as its owner, the config as root
    if made.services or made.fwknop_port:
        config_mod.add_services(path, made.services, fwknop_port=made.fwknop_port)
    if not made.entries:
        return made
    with open_store(config, now=now) as store:
        added = store.add_missing(made.entries, at=now)
    if added != len(made.entries):
        raise LocalError(f"{len(made.entries) - added} of the names were enrolled by another "
                         "command meanwhile; run import-fwknop again")
    return made


def _refuse_own_hosts(made: ImportPlan, route: RouteOf | None) -> None:
    """Raises LocalError when a gateway service the import adds has this
    machine's own address as its host (spa.server.gwroute says why)."""
    for service in made.services:
        if service.host is not None and own_host_problem({service.name: service},
                                                         route or kernel_route):
            raise LocalError(f"FORCE_NAT {service.host} {service.port}: {service.host} is an "
                             "address of this machine, and a gateway service's DNAT to it "
                             "would be open to everyone; fix FORCE_NAT to name the internal "
                             "host (or delete it to open the port here), then run again; "
                             "nothing was changed")


def _known_now(config: ServerConfig, names: list[str]) -> Known:
    """What the store holds, read without making or moving anything (a dry run)."""
    entries = dict(config.clients)  # not moved into the store yet
    if (config.state_dir / CLIENTS_DB).exists():
        with ClientStore.open_as_owner(config.state_dir, create=False) as store:
            entries.update({e.name: e for e in store.of_kind(KIND_FWKNOP)})
            entries.update({name: e for name in names if (e := store.get(name)) is not None})
    return Known(tuple(e for e in entries.values() if e.kind == KIND_FWKNOP),
                 {name: entries[name] for name in names if name in entries})
