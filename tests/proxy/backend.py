"""A small HTTP/1.1 server standing in for a machine's app, run as its own process by the tests.

``python backend.py HOST PORT NAME`` listens (keep-alive), prints ``ready PORT`` and answers:
``/`` its name; ``/health`` 200, or 500 after ``/fail`` (``/heal`` undoes it); ``/hold`` waits
until ``/release``; ``/echo`` returns the request body (sized or chunked), ``/stream`` a chunked
body of ``n`` parts; ``/headers`` the request headers as JSON. Port 0 picks a free port.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOLD_LIMIT_S = 30.0


class State:
    healthy = True
    release = threading.Event()
    name = "backend"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-backend", State.name)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/health":
            self._reply(200 if State.healthy else 500, b"ok" if State.healthy else b"failing")
        elif url.path == "/fail":
            State.healthy = False
            self._reply(200, b"now failing")
        elif url.path == "/heal":
            State.healthy = True
            self._reply(200, b"healthy")
        elif url.path == "/hold":
            State.release.wait(HOLD_LIMIT_S)
            self._reply(200, f"{State.name} released".encode())
        elif url.path == "/release":
            State.release.set()
            self._reply(200, b"released")
        elif url.path == "/headers":
            body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
            self._reply(200, body, "application/json")
        elif url.path == "/stream":
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.send_header("x-backend", State.name)
            self.end_headers()
            for index in range(int(query.get("n", ["3"])[0])):
                piece = f"part {index} from {State.name}\n".encode()
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._reply(200, State.name.encode())

    def do_POST(self) -> None:
        body = self._body()
        self._reply(200, body)


def main() -> None:
    host, port, State.name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    print(f"ready {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
