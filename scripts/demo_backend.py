#!/usr/bin/env python3
"""A tiny app for `make demo`: `demo_backend.py NODE PORT DOWN_FILE [REGION]`. Answers HTTP
requests with "hello from NODE (REGION)", echoes WebSocket messages prefixed with the same, and
answers /healthz with 503 while DOWN_FILE exists (so the demo can fail a health check). The demo
reads the node and region from each answer to show which instance, in which region, served it.
Standard library only."""
import base64
import hashlib
import http.server
import os
import struct
import sys

name, port, down_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
region = sys.argv[4] if len(sys.argv) > 4 else "?"
who = f"{name} ({region})"
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def read_frame(rfile):
    head = rfile.read(2)
    if len(head) < 2:
        return None, None
    opcode, length = head[0] & 0x0F, head[1] & 0x7F
    if length == 126:
        length = struct.unpack(">H", rfile.read(2))[0]
    elif length == 127:
        length = struct.unpack(">Q", rfile.read(8))[0]
    mask = rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
    data = bytes(b ^ mask[i % 4] for i, b in enumerate(rfile.read(length)))
    return opcode, data


def write_frame(wfile, opcode, data):
    n = len(data)
    head = bytes([0x80 | opcode]) + (bytes([n]) if n < 126 else bytes([126]) + struct.pack(">H", n))
    wfile.write(head + data)
    wfile.flush()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        if self.path == "/healthz" and os.path.exists(down_file):
            code, body = 503, b"unhealthy\n"
        else:
            code, body = 200, f"hello from {who}\n".encode()
        self.send_response(code)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def websocket(self):
        accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] + GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            opcode, data = read_frame(self.rfile)
            if opcode is None or opcode == 8:
                write_frame(self.wfile, 8, b"")
                break
            if opcode == 1:
                write_frame(self.wfile, 1, f"{who} echoes: ".encode() + data)
        self.close_connection = True

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
