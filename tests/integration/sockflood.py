"""Helpers run inside a test-bed host for tests/integration/test_security_relay.py.

    sockflood.py flood HOST PORT N [--source IP] [--timeout S]
        N TCP connections opened at once (non-blocking) and held idle, sending
        nothing. Prints READY, then {"connected", "timed_out", "refused", "errors"}.
        Then on each stdin line "check": {"open", "closed_by_server"} (a closed one
        has EOF or an error pending); on "close" (or EOF): closes all and exits.
    sockflood.py stream HOST PORT [--chunk BYTES]
        One connection carrying random bytes until a stdin line "stop"; then
        half-closes, waits for the peer's EOF and prints {"sha256", "bytes"}.
        Prints READY once connected. Paced (a chunk every 10 ms): an established
        transfer that lasts as long as the test wants.
    sockflood.py squat HOST PORT --seconds S
        Tries to bind and listen on HOST:PORT in a loop for S seconds (as the
        user it runs as); prints READY, then {"attempts", "got"}: how often it
        held the port. A port it gets is kept for 0.2 s and then let go.
    sockflood.py probe HOST PORT [--source IP] [--timeout S]
        One connection: {"result": "timeout" | "refused" | "closed" | "open"}
        ("closed": accepted and then closed by the server without data).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import select
import socket
import sys
import time
from typing import Dict, List


def _out(obj: object) -> None:
    print(json.dumps(obj), flush=True)


def _connect_all(host: str, port: int, n: int, source: str, timeout: float):
    pending: Dict[int, socket.socket] = {}
    done: List[socket.socket] = []
    counts = {"connected": 0, "timed_out": 0, "refused": 0}
    errors = set()
    poller = select.poll()
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        if source:
            s.bind((source, 0))
        err = s.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            counts["refused"] += 1
            errors.add(os.strerror(err))
            s.close()
            continue
        pending[s.fileno()] = s
        poller.register(s.fileno(), select.POLLOUT)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for fd, _ev in poller.poll(100):
            s = pending.pop(fd)
            poller.unregister(fd)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                counts["connected"] += 1
                done.append(s)
            else:
                counts["refused"] += 1
                errors.add(os.strerror(err))
                s.close()
    counts["timed_out"] = len(pending)
    for s in pending.values():
        s.close()
    counts["errors"] = sorted(errors)[:5]
    return done, counts


def _closed(s: socket.socket) -> bool:
    p = select.poll()  # select() cannot take descriptors past 1024
    p.register(s.fileno(), select.POLLIN)
    if not p.poll(0):
        return False
    try:
        return not s.recv(1, socket.MSG_PEEK)
    except OSError:
        return True


def flood(host: str, port: int, n: int, source: str, timeout: float) -> int:
    _out("READY")
    socks, counts = _connect_all(host, port, n, source, timeout)
    _out(counts)
    for line in sys.stdin:
        if line.strip() == "check":
            closed = sum(1 for s in socks if _closed(s))
            _out({"open": len(socks) - closed, "closed_by_server": closed})
        else:
            break
    for s in socks:
        s.close()
    return 0


def stream(host: str, port: int, chunk: int) -> int:
    h = hashlib.sha256()
    total = 0
    with socket.create_connection((host, port), timeout=60) as s:
        _out("READY")
        stop = False
        while not stop:
            data = os.urandom(chunk)
            s.sendall(data)
            h.update(data)
            total += len(data)
            if select.select([sys.stdin], [], [], 0.01)[0]:
                stop = True
                sys.stdin.readline()
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    _out({"sha256": h.hexdigest(), "bytes": total})
    return 0


def squat(host: str, port: int, seconds: float) -> int:
    _out("READY")
    attempts = got = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        attempts += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(16)
        except OSError:
            s.close()
            time.sleep(0.0005)
            continue
        got += 1
        time.sleep(0.2)
        s.close()
    _out({"attempts": attempts, "got": got})
    return 0


def probe(host: str, port: int, source: str, timeout: float) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if source:
        s.bind((source, 0))
    try:
        s.connect((host, port))
    except socket.timeout:
        _out({"result": "timeout"})
        return 0
    except OSError as e:
        _out({"result": "refused", "error": str(e)})
        return 0
    try:
        data = s.recv(1)
        _out({"result": "closed" if not data else "open"})
    except socket.timeout:
        _out({"result": "open"})
    except OSError:
        _out({"result": "closed"})
    finally:
        s.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("flood")
    f.add_argument("host")
    f.add_argument("port", type=int)
    f.add_argument("n", type=int)
    f.add_argument("--source", default="")
    f.add_argument("--timeout", type=float, default=30)
    st = sub.add_parser("stream")
    st.add_argument("host")
    st.add_argument("port", type=int)
    st.add_argument("--chunk", type=int, default=64 * 1024)
    sq = sub.add_parser("squat")
    sq.add_argument("host")
    sq.add_argument("port", type=int)
    sq.add_argument("--seconds", type=float, required=True)
    pr = sub.add_parser("probe")
    pr.add_argument("host")
    pr.add_argument("port", type=int)
    pr.add_argument("--source", default="")
    pr.add_argument("--timeout", type=float, default=3)
    a = p.parse_args()
    if a.cmd == "flood":
        return flood(a.host, a.port, a.n, a.source, a.timeout)
    if a.cmd == "stream":
        return stream(a.host, a.port, a.chunk)
    if a.cmd == "squat":
        return squat(a.host, a.port, a.seconds)
    return probe(a.host, a.port, a.source, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
