"""The packet path's kernel side: eBPF programs and their maps (classic BPF
and the sources still live in spa.server.capture and spa.server.sources)."""
