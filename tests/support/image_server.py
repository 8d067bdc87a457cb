"""A tiny HTTP server for URL-fetch tests (127.0.0.1 unless told otherwise):
an image, redirects, a huge body, a trickle, text, a 404. It counts every
request it receives."""
from __future__ import annotations

import gzip
import http.server
import io
import threading
import time

from PIL import Image


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()
# 50 MB of zeros, gzipped to about 50 kB: inflated whole, it would be the bomb
GZIP_BOMB = gzip.compress(b"\0" * 50_000_000, 9)


class ImageServer:
    def __init__(self, huge_bytes: int = 300_000, port: int = 0, host: str = "127.0.0.1"):
        self.hits = 0
        self.huge_bytes = huge_bytes
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code, body=b"", headers=()):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                if not any(k == "Content-Length" for k, _ in headers):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                outer.hits += 1
                path = self.path
                if path == "/img.png":
                    self._send(200, PNG, [("Content-Type", "image/png")])
                elif path.startswith("/redirect/"):
                    n = int(path.rsplit("/", 1)[1])
                    target = "/img.png" if n == 0 else f"/redirect/{n - 1}"
                    self._send(302, headers=[("Location", target)])
                elif path.startswith("/redirect-to/"):  # another host's image
                    host = path.split("/", 2)[2]
                    self._send(302, headers=[("Location", f"http://{host}/img.png")])
                elif path == "/to-file":
                    self._send(302, headers=[("Location", "file:///etc/passwd")])
                elif path == "/huge":  # no Content-Length: only counting catches it
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(b"\0" * outer.huge_bytes)
                elif path == "/declared-huge":
                    self._send(200, b"\0" * 10, [("Content-Length", str(10**12))])
                elif path == "/slow":
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for _ in range(40):
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                        time.sleep(0.1)
                elif path == "/trickle-headers":  # a header byte every 0.2 s: no read ever times out
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    try:
                        for _ in range(300):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.2)
                    except OSError:  # the client shut its socket
                        pass
                elif path == "/gzip-bomb":
                    self._send(200, GZIP_BOMB, [("Content-Type", "image/png"), ("Content-Encoding", "gzip"),
                                                ("Content-Length", str(len(GZIP_BOMB)))])
                elif path == "/text":
                    self._send(200, b"hello, not an image", [("Content-Type", "text/plain")])
                else:
                    self._send(404, b"missing")

        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.host = host
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str, host: str | None = None) -> str:
        port = "" if self.port == 80 else f":{self.port}"
        return f"http://{host or self.host}{port}{path}"

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
