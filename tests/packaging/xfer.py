#!/usr/bin/python3
"""A byte-exact TCP transfer for the install test, run inside the booted hosts.

    xfer.py sink PORT OUT                 accept one connection, read to EOF
    xfer.py source HOST PORT STOP OUT     send random data until the file STOP exists

Both write {"bytes": N, "sha256": HEX} to OUT when done (atomically); the sink
also keeps OUT.progress up to date, so the test can see data arrive while it
upgrades the package. Standard library only: the hosts have just python3.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time

CHUNK = 1 << 16
#: Paced so the transfer spans the upgrade without eating the CPU (bytes/s).
RATE = 4 << 20


def _write(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def sink(port: int, out: str) -> None:
    srv = socket.create_server(("0.0.0.0", port))
    conn, _peer = srv.accept()
    srv.close()
    digest = hashlib.sha256()
    total = 0
    last = 0.0
    while True:
        data = conn.recv(CHUNK)
        if not data:
            break
        digest.update(data)
        total += len(data)
        now = time.monotonic()
        if now - last > 0.1:
            _write(f"{out}.progress", {"bytes": total})
            last = now
    _write(f"{out}.progress", {"bytes": total})
    _write(out, {"bytes": total, "sha256": digest.hexdigest()})
    conn.close()


def source(host: str, port: int, stop: str, out: str) -> None:
    conn = socket.create_connection((host, port), timeout=30)
    digest = hashlib.sha256()
    total = 0
    start = time.monotonic()
    while not os.path.exists(stop):
        data = os.urandom(CHUNK)
        conn.sendall(data)
        digest.update(data)
        total += len(data)
        ahead = total / RATE - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
    conn.shutdown(socket.SHUT_WR)
    # The sink closes only after reading everything: wait for that.
    conn.settimeout(60)
    while conn.recv(CHUNK):
        pass
    conn.close()
    _write(out, {"bytes": total, "sha256": digest.hexdigest()})


def main(argv: list) -> int:
    if len(argv) == 3 and argv[0] == "sink":
        sink(int(argv[1]), argv[2])
    elif len(argv) == 5 and argv[0] == "source":
        source(argv[1], int(argv[2]), argv[3], argv[4])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
