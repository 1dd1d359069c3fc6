#!/usr/bin/env python3
"""`make demo`'s WebSocket client: connects to ws://HOST:PORT/PATH, sends one text message,
prints the reply, closes. Standard library only."""
import base64
import os
import socket
import struct
import sys

host, port, path, message = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.create_connection((host, port), timeout=10)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
f = s.makefile("rb")
status = f.readline().decode().strip()
while f.readline() not in (b"\r\n", b""):
    pass
if " 101 " not in status + " ":
    sys.exit(f"websocket upgrade refused: {status}")
data, mask = message.encode(), os.urandom(4)
s.sendall(bytes([0x81, 0x80 | len(data)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
head = f.read(2)
length = head[1] & 0x7F
if length == 126:
    length = struct.unpack(">H", f.read(2))[0]
print(f.read(length).decode())
s.sendall(bytes([0x88, 0x80]) + os.urandom(4))
