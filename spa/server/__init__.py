"""The daemon: edges around the pure core (config, state, events, sockets)."""
