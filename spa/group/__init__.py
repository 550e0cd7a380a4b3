"""Membership of a group on etcd: several spa-server members share one client
table and replay state (issue 18).  kv.py is the I/O edge (an interface, its
errors and values); memory.py its fake; etcd.py the real store."""
