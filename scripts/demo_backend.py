#!/usr/bin/env python3
"""A tiny app for `make demo`: answers every request with its name; /healthz answers 503 while
the file given as the third argument exists (so the demo can fail a health check)."""
import http.server
import os
import sys

name, port, down_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/healthz" and os.path.exists(down_file):
            code, body = 503, b"unhealthy\n"
        else:
            code, body = 200, f"hello from {name}\n".encode()
        self.send_response(code)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
