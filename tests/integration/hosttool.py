"""Small tools the integration tests run *inside* a test bed host.

    python3 /run/testbed/src/tests/integration/hosttool.py dbus METHOD SIG JSON [--path P] [--iface I]
    ... echo PORT [--tag T] [--count-file F]     line echo server (run it as a unit)
    ... sink PORT OUT                            sha256 of one connection's bytes -> OUT
    ... send HOST PORT NBYTES                    random bytes; prints their sha256
    ... request HOST PORT TEXT [--timeout S]     one line out, reply (or EOF/RESET) printed
    ... watch PATH_NAMESPACE [--until PROP=JSON] [--timeout S]
                                                 signals of scistreamd below PATH_NAMESPACE,
                                                 one JSON object a line after a READY line

``dbus`` prints one JSON object: {"reply": [...]} or {"error": NAME, "message": TEXT}.
In JSON bodies a variant is written ["sig", value] and D-Bus structs as lists.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import sys
import threading

BUS = "org.scistream.Tunnel1"


def _variants(sig: str, value):
    """Wrap a{sv} values given as ["sig", value] into dbus_next Variants (top level only)."""
    from dbus_next import Variant

    if sig == "a{sv}" and isinstance(value, dict):
        return {k: Variant(v[0], v[1]) for k, v in value.items()}
    return value


def _split_sig(sig: str):
    from dbus_next.signature import SignatureTree

    return [t.signature for t in SignatureTree(sig).types]


def _plain(v):
    from dbus_next import Variant

    if isinstance(v, Variant):
        return _plain(v.value)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


async def dbus_call(method: str, sig: str, body, path: str, iface: str) -> dict:
    from dbus_next import BusType, Message, MessageType
    from dbus_next.aio import MessageBus

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    types = _split_sig(sig) if sig else []
    body = [_variants(t, v) for t, v in zip(types, body)]
    reply = await bus.call(Message(destination=BUS, path=path, interface=iface, member=method,
                                   signature=sig, body=body))
    bus.disconnect()
    if reply.message_type == MessageType.ERROR:
        return {"error": reply.error_name, "message": reply.body[0] if reply.body else ""}
    return {"reply": _plain(reply.body)}


def echo(port: int, tag: str, count_file: str, host: str) -> None:
    srv = socket.create_server((host, port), reuse_port=False)
    count = 0

    def serve(conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rwb")
            line = f.readline()
            f.write(tag.encode() + line)
            f.flush()

    while True:
        conn, _ = srv.accept()
        count += 1
        if count_file:
            with open(count_file, "w") as fh:
                fh.write(str(count))
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def sink(port: int, out: str, host: str) -> None:
    srv = socket.create_server((host, port))
    conn, _ = srv.accept()
    h = hashlib.sha256()
    n = 0
    with conn:
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            h.update(data)
            n += len(data)
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(f"{h.hexdigest()} {n}\n")
    os.replace(tmp, out)


def send(host: str, port: int, nbytes: int) -> None:
    h = hashlib.sha256()
    with socket.create_connection((host, port), timeout=60) as s:
        left = nbytes
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            s.sendall(chunk)
            h.update(chunk)
            left -= len(chunk)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    print(f"{h.hexdigest()} {nbytes}")


def request(host: str, port: int, text: str, timeout: float) -> int:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(text.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except socket.timeout:
        print("TIMEOUT")
        return 3
    except ConnectionResetError:
        print("RESET")
        return 2
    except ConnectionRefusedError:
        print("REFUSED")
        return 2
    print(data.decode(errors="replace").strip() if data else "EOF")
    return 0 if data else 2


async def watch(path_namespace: str, until: str, timeout: float) -> int:
    """Print scistreamd's signals below ``path_namespace``; stop at ``until`` or ``timeout``.

    READY is printed once the match rule is in place, so a caller can act
    only then and be sure no signal of its action is missed.
    """
    from dbus_next import BusType, Message, MessageType
    from dbus_next.aio import MessageBus

    prop, _, want_text = until.partition("=")
    want = json.loads(want_text) if prop else None
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    done = asyncio.get_running_loop().create_future()

    def handler(msg):
        if msg.message_type != MessageType.SIGNAL or not (
                msg.path == path_namespace or msg.path.startswith(path_namespace.rstrip("/") + "/")):
            return None
        body = _plain(msg.body)
        print(json.dumps({"path": msg.path, "interface": msg.interface, "member": msg.member,
                          "body": body}), flush=True)
        if (prop and msg.member == "PropertiesChanged" and not done.done()
                and body[1].get(prop, object()) == want):
            done.set_result(True)
        return None

    bus.add_message_handler(handler)
    rule = f"type='signal',sender='{BUS}',path_namespace='{path_namespace}'"
    reply = await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                   interface="org.freedesktop.DBus", member="AddMatch",
                                   signature="s", body=[rule]))
    if reply.message_type == MessageType.ERROR:
        print(f"AddMatch failed: {reply.error_name}", file=sys.stderr)
        return 1
    print("READY", flush=True)
    try:
        await asyncio.wait_for(asyncio.shield(done), timeout)
    except asyncio.TimeoutError:
        print("TIMEOUT", flush=True)
        return 3 if prop else 0
    finally:
        bus.disconnect()
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dbus")
    d.add_argument("method")
    d.add_argument("sig")
    d.add_argument("body")
    d.add_argument("--path", default="/org/scistream/Tunnel1")
    d.add_argument("--iface", default="org.scistream.Tunnel1.Manager")
    e = sub.add_parser("echo")
    e.add_argument("port", type=int)
    e.add_argument("--tag", default="")
    e.add_argument("--count-file", default="")
    e.add_argument("--host", default="0.0.0.0")
    k = sub.add_parser("sink")
    k.add_argument("port", type=int)
    k.add_argument("out")
    k.add_argument("--host", default="0.0.0.0")
    s = sub.add_parser("send")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("nbytes", type=int)
    r = sub.add_parser("request")
    r.add_argument("host")
    r.add_argument("port", type=int)
    r.add_argument("text")
    r.add_argument("--timeout", type=float, default=10)
    w = sub.add_parser("watch")
    w.add_argument("path_namespace")
    w.add_argument("--until", default="", help="PROP=JSON: stop at a PropertiesChanged with it")
    w.add_argument("--timeout", type=float, default=30)
    a = p.parse_args()
    if a.cmd == "dbus":
        print(json.dumps(asyncio.run(dbus_call(a.method, a.sig, json.loads(a.body), a.path,
                                               a.iface))))
    elif a.cmd == "echo":
        echo(a.port, a.tag, a.count_file, a.host)
    elif a.cmd == "sink":
        sink(a.port, a.out, a.host)
    elif a.cmd == "send":
        send(a.host, a.port, a.nbytes)
    elif a.cmd == "request":
        return request(a.host, a.port, a.text, a.timeout)
    elif a.cmd == "watch":
        return asyncio.run(watch(a.path_namespace, a.until, a.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
