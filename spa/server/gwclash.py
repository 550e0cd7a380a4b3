"""Gateway services that would fight over one rule (refused at config load).

Invariants (docs/install.md, section 11; found by the fwknop FORCE_NAT work):
- Two gateway services never reach the same destination (protocol, host,
  port): the forward chain drops a stranger to host:port after the first
  service's accept, so the second's grants would never let anyone through.
- Two gateway services never publish the same port (protocol, listen_port):
  one DNAT rule per port; the second would never apply.
- A published port is never a port this host itself serves through spa (a
  local service, the knock port, the fwknop port): DNAT applies to every
  source, so it would take that port away from everyone.
- Host names are compared as written: two names that resolve to one address
  are not caught here (a lease's check: spa/core/gwhost.py).
- Pure: services in, one line out ("" when none clash).
"""

from __future__ import annotations

from collections.abc import Mapping

from spa.core.policy import Service


def _destination(service: Service) -> tuple[str, str, int]:
    host = service.host_name or str(service.host)
    return service.protocol, host, service.port


def gateway_clash(services: Mapping[str, Service], *, knock_ports: tuple[int, ...] = ()
                  ) -> str:
    """The first clash among `services` as "[services.B] ... [services.A] ...",
    or "" when there is none.  `knock_ports`: this host's UDP ports for knocks
    (listen_port, and fwknop_port when set)."""
    reached: dict[tuple[str, str, int], str] = {}
    published: dict[tuple[str, int], str] = {}
    local = {(s.protocol, s.port): f"[services.{name}]" for name, s in services.items()
             if not s.gateway}
    local.update({("udp", port): "[server] (knocks)" for port in knock_ports if port})
    for name, service in services.items():
        if not service.gateway:
            continue
        destination = _destination(service)
        if destination in reached:
            protocol, host, port = destination
            return (f"[services.{name}] reaches {protocol} {host} port {port} as "
                    f"[services.{reached[destination]}] does: one gateway service per "
                    "destination (the first one's drop rule would stop the second's "
                    "grants); give its clients the first service instead")
        reached[destination] = name
        if not service.listen_port:
            continue
        key = (service.protocol, service.listen_port)
        owner = published.get(key) or local.get(key)
        if owner is not None:
            return (f"[services.{name}] listen_port = {service.listen_port} is "
                    f"{service.protocol} port {service.listen_port} of {owner} already (a "
                    "published port is forwarded for every source): choose a port "
                    "nothing else on this host uses")
        published[key] = f"[services.{name}]"
    return ""
