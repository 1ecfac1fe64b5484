#!/usr/bin/env python3
"""Clients that read their socket but never open their HTTP/2 window, and the server
memory they hold (issue 20, item 2). Each opens an ADS stream with
SETTINGS_INITIAL_WINDOW_SIZE 0 and subscribes to the config's extension configs (written
by this script: 100 of 10 KB, a 1 MB response); then the config changes once.
Usage: bench/zero-window.py write CONFIG | bench/zero-window.py run XDS_PORT SERVER_PID CONFIG [CLIENTS]
"""
import socket
import struct
import sys
import threading
import time

ECDS = b"type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
PATH = b"/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
NAMES = [f"e{i}" for i in range(100)]


def config(tag):
    out = ["version: 1", "extension_configs:"]
    for n in NAMES:
        out.append(f"  - name: {n}")
        out.append("    typed_config:")
        out.append('      "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation')
        out.append(f'      mutations: {{ response_mutations: [ {{ append: {{ header: {{ key: x-plugin, value: "{tag}-{"x" * 10000}" }} }} }} ] }}')
    return "\n".join(out) + "\n"


def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(num, payload):
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def frame(ty, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([ty, flags]) + struct.pack(">I", stream) + payload


def literal(name, value):
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))


def client(port, k, resets):
    s = socket.create_connection(("127.0.0.1", port))
    # SETTINGS_INITIAL_WINDOW_SIZE (0x4) = 0; never a WINDOW_UPDATE.
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, struct.pack(">HI", 4, 0)))
    block = literal(b":method", b"POST") + literal(b":scheme", b"http") + literal(b":path", PATH)
    s.sendall(frame(1, 4, 1, block))
    req = field(2, field(1, f"stuck-{k}".encode())) + b"".join(field(3, n.encode()) for n in NAMES) + field(4, ECDS)
    s.sendall(frame(0, 0, 1, b"\x00" + struct.pack(">I", len(req)) + req))
    buf = b""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return
            buf += data
            while len(buf) >= 9:
                n = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + n:
                    break
                if buf[3] == 3:
                    resets.append(k)
                buf = buf[9 + n:]
    except OSError:
        pass


def main():
    if sys.argv[1] == "write":
        open(sys.argv[2], "w").write(config("v0"))
        return
    port, pid, path = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    clients = int(sys.argv[5]) if len(sys.argv) > 5 else 500
    before = rss_kib(pid)
    resets = []
    for k in range(clients):
        threading.Thread(target=client, args=(port, k, resets), daemon=True).start()
    time.sleep(4)
    held = rss_kib(pid)
    open(path, "w").write(config("v1"))
    time.sleep(4)
    after = rss_kib(pid)
    print(f"{clients} zero-window clients, a 1 MB response each: server RSS {before // 1024} MB before, "
          f"{held // 1024} MB with them, {after // 1024} MB after one more config; {len(set(resets))} streams reset")


if __name__ == "__main__":
    main()
