"""A loopback HTTP proxy that answers every request late: a stand-in for a slow tracker server.

    proxy = SlowProxy("http://127.0.0.1:5000", delay_s=2.0).start()
    MlflowClient(tracking_uri=proxy.url)   # every call now takes >= 2 s
    proxy.answer_late_s = 3.0              # the server stores each request, the answer comes 3 s later
    proxy.stop()
"""

from __future__ import annotations

import http.client
import http.server
import threading
import time
import urllib.parse

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "host"}


class SlowProxy:
    """Forwards every request to ``upstream`` after sleeping ``delay_s``.

    Args:
      upstream: ``http://host:port`` of the real server.
      delay_s: added latency per request, before it reaches the server.
      answer_late_s: added latency after the server answered (the request took effect, the client
        does not know yet); may be changed while the proxy runs.
      port: port to listen on (0 = any free port).
    """

    def __init__(self, upstream: str, *, delay_s: float = 2.0, answer_late_s: float = 0.0, port: int = 0) -> None:
        parsed = urllib.parse.urlparse(upstream)
        self.upstream_host = parsed.hostname or "127.0.0.1"
        self.upstream_port = parsed.port or 80
        self.delay_s = delay_s
        self.answer_late_s = answer_late_s
        self.requests = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                proxy.requests += 1
                time.sleep(proxy.delay_s)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                time.sleep(proxy.answer_late_s)
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_HEADERS and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="slow-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> SlowProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
