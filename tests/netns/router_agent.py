"""The router's side, for the command backend's namespace tests: a tiny HTTP
API (as RouterOS's REST API would be) in the router namespace that adds,
removes and lists addresses of a real nftables set per service.

Run as root in the router namespace: router_agent.py LISTEN_ADDRESS PORT.
GET /add?set=ssh&address=A, /del?..., /list?set=ssh (one address a line).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


def nft(*words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nft", *words], capture_output=True, text=True, check=False)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        name = "allowed_" + query.get("set", "")
        if url.path == "/list":
            done = nft("-j", "list", "set", "inet", "gate", name)
            found = [] if done.returncode else [
                elem for item in json.loads(done.stdout)["nftables"] if "set" in item
                for elem in item["set"].get("elem", [])]
            self._answer(200 if not done.returncode else 500, "".join(f"{a}\n" for a in found))
            return
        address = str(ipaddress.ip_address(query.get("address", "")))
        verb = {"/add": "add", "/del": "delete"}[url.path]
        done = nft(verb, "element", "inet", "gate", name, "{", address, "}")
        missing = verb == "delete" and "No such file" in done.stderr  # gone: nothing to do
        self._answer(200 if done.returncode == 0 or missing else 500, done.stderr)

    def _answer(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler)
    print("listening", flush=True)
    server.serve_forever()
