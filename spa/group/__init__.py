"""Membership of a group of servers on etcd (issue 18; docs/groups.md).

`layout` names the keys under one prefix per group, `records` encodes and
decodes what is stored at them, `policy` decides what a member does when a
nonce claim cannot be made.  All three are pure: no etcd library, no socket,
no clock; the etcd edge (`kv`) and the daemon pass values in.
"""
