#!/usr/bin/env python3
"""Many idle connections to the xDS port, and whether the server still answers (issue 20,
items 3 and 4): opens N TCP connections that never send a byte, then times /healthz on the
admin port and a new xDS connection's HTTP/2 SETTINGS, and counts the server's open files.
Usage: bench/idle-connections.py XDS_PORT ADMIN_PORT SERVER_PID [N] [--speak]
(--speak: each sends the HTTP/2 preface and SETTINGS first, then nothing.)
"""
import os
import resource
import socket
import sys
import time


def timed(f):
    started = time.monotonic()
    try:
        f()
        return f"{(time.monotonic() - started) * 1000:.0f} ms"
    except OSError as e:
        return f"failed after {time.monotonic() - started:.1f} s ({e.__class__.__name__})"


def healthz(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.settimeout(60)
    s.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
    if not s.recv(64).startswith(b"HTTP/1.1 200"):
        raise OSError("not 200")


def xds_settings(port):
    # From another loopback address than the idle ones (as another proxy would be).
    s = socket.create_connection(("127.0.0.1", port), timeout=60, source_address=("127.0.0.2", 0))
    s.settimeout(60)
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    head = s.recv(9)
    if len(head) < 9 or head[3] != 4:
        raise OSError("no SETTINGS")


def main():
    xds, admin, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 19_000
    speak = "--speak" in sys.argv
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    idle = []
    for _ in range(n):
        try:
            c = socket.create_connection(("127.0.0.1", xds), timeout=5)
            if speak:
                c.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            idle.append(c)
        except OSError:
            break
    time.sleep(1)
    files = len(os.listdir(f"/proc/{pid}/fd"))
    print(f"{len(idle)} idle connections{' (preface sent)' if speak else ''}; server holds {files} files; "
          f"/healthz {timed(lambda: healthz(admin))}; a new xDS connection's SETTINGS (from 127.0.0.2) {timed(lambda: xds_settings(xds))}")


if __name__ == "__main__":
    main()
