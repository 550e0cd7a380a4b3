"""Membership of a group of servers on etcd (issue 18; docs/groups.md):
several spa-server members share one client table and replay state.

Pure (no etcd library, no socket, no clock): `layout` names the keys under
one prefix per group, `codec` and `records` encode and decode what is stored
at them, `clients` turns a client into the derived keys a member holds,
`policy` decides what a member does when a nonce claim cannot be made.
The I/O edge: `kv` (the interface, its errors and values), `memory` (its
fake, with a clock argument), `etcd` (the real store over etcd's JSON
gateway).
"""
