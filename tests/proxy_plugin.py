"""A proxy.py plugin for the real-proxy tests: every upstream is 127.0.0.1, every request recorded.

Loaded by the ``proxy.py`` server that :mod:`tests.test_proxy` starts (``--plugins
tests.proxy_plugin.LoopbackRecorder``). Made-up names such as ``api.example.test`` resolve to
127.0.0.1 at the proxy, so the client under test never resolves them itself; each request the proxy
parsed (``CONNECT`` lines and plain-http requests, with all their headers) is appended as one JSON
line to the file named by ``PROXY_RECORD``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from proxy.http.parser import HttpParser
from proxy.http.proxy import HttpProxyBasePlugin


class LoopbackRecorder(HttpProxyBasePlugin):
    def resolve_dns(self, host: str, port: int) -> tuple[str | None, Any]:
        return "127.0.0.1", None

    def handle_client_request(self, request: HttpParser) -> HttpParser:
        headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in (request.headers or {}).values()
        }
        line = {
            "method": (request.method or b"").decode("latin-1"),
            "host": (request.host or b"").decode("latin-1"),
            "port": request.port,
            "path": (request.path or b"").decode("latin-1"),
            "headers": headers,
            "body": (request.body or b"").decode("latin-1"),
        }
        with open(os.environ["PROXY_RECORD"], "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")
        return request
