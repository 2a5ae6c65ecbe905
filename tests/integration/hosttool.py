"""Small tools the integration tests run *inside* a test bed host.

    python3 /run/testbed/src/tests/integration/hosttool.py dbus METHOD SIG JSON \
                                                 [--path P] [--iface I]
    ... dbus-many < JSON                         [[METHOD, SIG, BODY, PATH, IFACE], ...] on one
                                                 connection; a JSON list of results, each with
                                                 "endpoints_after": ListEndpoints after the call
    ... echo PORT [--tag T] [--count-file F]     line echo server (run it as a unit)
    ... sink PORT OUT                            sha256 of one connection's bytes -> OUT
    ... send HOST PORT NBYTES                    random bytes; prints their sha256
    ... request HOST PORT TEXT [--timeout S]     one line out, reply (or EOF/RESET) printed
    ... reply PORT RESPONSE [--cert C --key K] [--first]
                                                 a server answering every connection with the
                                                 fixed RESPONSE (Python escapes), over TLS with
                                                 --cert/--key; --first: before reading anything
    ... watch PATH_NAMESPACE [--until PROP=JSON|member:NAME] [--timeout S]
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
import time

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


async def _call_on(bus, method: str, sig: str, body, path: str, iface: str) -> dict:
    from dbus_next import Message, MessageType

    types = _split_sig(sig) if sig else []
    body = [_variants(t, v) for t, v in zip(types, body)]
    reply = await bus.call(Message(destination=BUS, path=path, interface=iface, member=method,
                                   signature=sig, body=body))
    if reply.message_type == MessageType.ERROR:
        return {"error": reply.error_name, "message": reply.body[0] if reply.body else ""}
    return {"reply": _plain(reply.body)}


async def dbus_call(method: str, sig: str, body, path: str, iface: str) -> dict:
    from dbus_next import BusType
    from dbus_next.aio import MessageBus

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        return await _call_on(bus, method, sig, body, path, iface)
    finally:
        bus.disconnect()


async def dbus_many(calls) -> list:
    """Several calls on one connection (one process start instead of one per call)."""
    from dbus_next import BusType
    from dbus_next.aio import MessageBus

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    results = []
    try:
        for method, sig, body, path, iface in calls:
            result = await _call_on(bus, method, sig, body, path, iface)
            after = await _call_on(bus, "ListEndpoints", "", [], "/org/scistream/Tunnel1",
                                   "org.scistream.Tunnel1.Manager")
            result["endpoints_after"] = after.get("reply", after)
            results.append(result)
    finally:
        bus.disconnect()
    return results


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


def reply(port: int, response: str, cert: str, key: str, first: bool, host: str) -> None:
    """Answer each connection with ``response`` and close: a peer that is not scistreamd.

    Without ``first`` the request is read up to its blank line (or 64 KiB, or a
    5 s pause) before the answer goes out, as an HTTP server would do.
    """
    import codecs
    import ssl

    data = codecs.decode(response, "unicode_escape").encode("latin-1")
    ctx = None
    if cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
    srv = socket.create_server((host, port))

    def serve(conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            s = ctx.wrap_socket(conn, server_side=True) if ctx else conn
            with s:
                if not first:
                    got = b""
                    while b"\r\n\r\n" not in got and len(got) < 65536:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        got += chunk
                s.sendall(data)
        except (OSError, ValueError):
            pass  # the client gave up or spoke no TLS: nothing to answer

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


async def watch(path_namespace: str, until: str, timeout: float) -> int:
    """Print scistreamd's signals below ``path_namespace``; stop at ``until`` or ``timeout``.

    READY is printed once the match rule is in place, so a caller can act
    only then and be sure no signal of its action is missed.
    """
    from dbus_next import BusType, Message, MessageType
    from dbus_next.aio import MessageBus

    member = until[len("member:"):] if until.startswith("member:") else ""
    prop, _, want_text = ("", "", "") if member or not until else until.partition("=")
    want = json.loads(want_text) if prop else None
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    done = asyncio.get_running_loop().create_future()

    def handler(msg):
        below = msg.path == path_namespace or msg.path.startswith(path_namespace.rstrip("/") + "/")
        if msg.message_type != MessageType.SIGNAL or not below:
            return None
        body = _plain(msg.body)
        print(json.dumps({"path": msg.path, "interface": msg.interface, "member": msg.member,
                          "body": body}), flush=True)
        if done.done():
            return None
        wanted_member = bool(member) and msg.member == member
        wanted_value = (bool(prop) and msg.member == "PropertiesChanged"
                        and body[1].get(prop, object()) == want)
        if wanted_member or wanted_value:
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
        return 3 if until else 0
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
    sub.add_parser("dbus-many")
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
    rp = sub.add_parser("reply")
    rp.add_argument("port", type=int)
    rp.add_argument("response")
    rp.add_argument("--cert", default="")
    rp.add_argument("--key", default="")
    rp.add_argument("--first", action="store_true")
    rp.add_argument("--host", default="0.0.0.0")
    w = sub.add_parser("watch")
    w.add_argument("path_namespace")
    w.add_argument("--until", default="", help="PROP=JSON: stop at a PropertiesChanged setting it; "
                   "member:NAME: stop at the first NAME signal")
    w.add_argument("--timeout", type=float, default=30)
    a = p.parse_args()
    if a.cmd == "dbus":
        print(json.dumps(asyncio.run(dbus_call(a.method, a.sig, json.loads(a.body), a.path,
                                               a.iface))))
    elif a.cmd == "dbus-many":
        print(json.dumps(asyncio.run(dbus_many(json.load(sys.stdin)))))
    elif a.cmd == "echo":
        echo(a.port, a.tag, a.count_file, a.host)
    elif a.cmd == "sink":
        sink(a.port, a.out, a.host)
    elif a.cmd == "send":
        send(a.host, a.port, a.nbytes)
    elif a.cmd == "request":
        return request(a.host, a.port, a.text, a.timeout)
    elif a.cmd == "reply":
        reply(a.port, a.response, a.cert, a.key, a.first, a.host)
    elif a.cmd == "watch":
        return asyncio.run(watch(a.path_namespace, a.until, a.timeout))
    return 0


# --------------------------------------------------------------------------
# Long-lived and load tools (tests/integration/test_hostile.py, test_load.py).
#
#   ... dbusbatch                    JSON lines in, JSON lines out, one bus connection:
#                                    a line {"method", "sig", "body", "path"?, "iface"?} is one
#                                    call; a line [call, ...] runs those calls concurrently and
#                                    answers a list. Body values follow the signature; a variant
#                                    is ["sig", value], "ay" a list of ints. First line: READY.
#   ... peerhttp HOST PORT [--cert C --key K]
#                                    JSON lines in, JSON lines out: one TLS connection (test CA)
#                                    and one raw HTTP request per line (see _peer_request);
#                                    --cert/--key: the client certificate to present.
#   ... peerslow HOST PORT --MODE N  slow/garbage clients of the peer port (see peer_slow).
#   ... flood HOST PORT N            N TCP connections at once, held until a line on stdin.
#   ... echoloop PORT [--host H]     multi-line echo server (long-lived connections), counting.
#   ... echoload HOST PORT[,PORT..]  many round trips through a tunnel; one JSON line of counts.

CA_FILE = "/etc/scistream/peer-ca.crt"


def _to_dbus(t, value):
    """A JSON value as dbus-next wants it for SignatureType ``t``."""
    from dbus_next import Variant
    from dbus_next.signature import SignatureTree

    if t.token == "v":
        sig, inner = value
        return Variant(sig, _to_dbus(SignatureTree(sig).types[0], inner))
    if t.token == "a":
        child = t.children[0]
        if child.token == "y":
            return bytes(value)
        if child.token == "{":
            kt, vt = child.children
            return {_to_dbus(kt, k if kt.token in "sog" else json.loads(k)): _to_dbus(vt, v)
                    for k, v in value.items()}
        return [_to_dbus(child, x) for x in value]
    if t.token == "(":
        return [_to_dbus(c, x) for c, x in zip(t.children, value)]
    return value


def _jsonable(v):
    from dbus_next import Variant

    if isinstance(v, Variant):
        return [v.signature, _jsonable(v.value)]
    if isinstance(v, (bytes, bytearray)):
        return list(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


async def _batch_call(bus, call: dict) -> dict:
    from dbus_next import Message, MessageType
    from dbus_next.signature import SignatureTree

    try:
        sig = call.get("sig", "")
        types = SignatureTree(sig).types if sig else []
        body = [_to_dbus(t, v) for t, v in zip(types, call.get("body", []))]
        msg = Message(destination=call.get("dest", BUS),
                      path=call.get("path", "/org/scistream/Tunnel1"),
                      interface=call.get("iface", "org.scistream.Tunnel1.Manager"),
                      member=call["method"], signature=sig, body=body)
    except Exception as e:  # the test's own mistake, reported apart from the daemon's answers
        return {"client_error": f"{type(e).__name__}: {e}"}
    reply = await bus.call(msg)
    if reply.message_type == MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        return {"error": reply.error_name, "message": text}
    return {"reply": _jsonable(reply.body)}


async def dbus_batch() -> int:
    from dbus_next import BusType
    from dbus_next.aio import MessageBus

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    loop = asyncio.get_running_loop()
    print("READY", flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        if not line.strip():
            continue
        req = json.loads(line)
        if isinstance(req, list):
            out = await asyncio.gather(*(_batch_call(bus, c) for c in req))
            print(json.dumps(list(out)), flush=True)
        else:
            print(json.dumps(await _batch_call(bus, req)), flush=True)
    bus.disconnect()
    return 0


def _tls_context(cert: str = "", key: str = ""):
    import ssl

    ctx = ssl.create_default_context(cafile=CA_FILE)
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx


def _peer_request(host: str, port: int, req: dict, cert: str = "", key: str = "") -> dict:
    """One raw HTTP request on a new TLS connection.

    ``req``: "method", "path" (text), "headers" [[name, value], ...], "body" (text) or
    "body_b64"; "length": "auto" (default: a Content-Length for the body), null (none)
    or a literal value; "raw_b64" replaces the whole request. Answer: {"status",
    "headers", "body"} or {"closed": "EOF"|"RESET"|"TIMEOUT"|..., "detail"}.
    """
    import base64
    import http.client
    import ssl

    if "raw_b64" in req:
        data = base64.b64decode(req["raw_b64"])
    else:
        body = (base64.b64decode(req["body_b64"]) if "body_b64" in req
                else req.get("body", "").encode())
        head = f"{req.get('method', 'GET')} {req.get('path', '/')} HTTP/1.1\r\n"
        head += f"Host: {host}:{port}\r\n"
        for name, value in req.get("headers", []):
            head += f"{name}: {value}\r\n"
        length = req.get("length", "auto")
        if length == "auto":
            head += f"Content-Length: {len(body)}\r\n"
        elif length is not None:
            head += f"Content-Length: {length}\r\n"
        data = head.encode("utf-8", "surrogateescape") + b"\r\n" + body
    raw = socket.create_connection((host, port), timeout=req.get("timeout", 60))
    try:
        s = _tls_context(cert, key).wrap_socket(raw, server_hostname=host)
    except ssl.SSLError as e:
        raw.close()
        return {"closed": "TLS", "detail": str(e)}
    except OSError as e:
        raw.close()
        return {"closed": type(e).__name__, "detail": str(e)}
    with s:
        try:
            s.sendall(data)
        except OSError as e:
            # The server may answer (413) and close before reading everything.
            sent_error = f"{type(e).__name__}: {e}"
        else:
            sent_error = ""
        resp = http.client.HTTPResponse(s, method=req.get("method", "GET"))
        try:
            resp.begin()
            text = resp.read()
        except socket.timeout:
            return {"closed": "TIMEOUT", "detail": sent_error}
        except (http.client.RemoteDisconnected, http.client.IncompleteRead) as e:
            return {"closed": "EOF", "detail": f"{type(e).__name__}: {e} {sent_error}"}
        except ConnectionResetError as e:
            return {"closed": "RESET", "detail": f"{e} {sent_error}"}
        except (http.client.HTTPException, OSError) as e:
            return {"closed": type(e).__name__, "detail": f"{e} {sent_error}"}
        return {"status": resp.status, "headers": dict(resp.getheaders()),
                "body": text.decode("utf-8", "replace"), "send_error": sent_error}


def peer_http(host: str, port: int, cert: str = "", key: str = "") -> int:
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(_peer_request(host, port, json.loads(line), cert, key)),
                  flush=True)
    return 0


def _until_closed(s: socket.socket, guard: float, trickle: bytes = b"",
                  interval: float = 1.0) -> dict:
    """Wait for the server to close ``s`` (sending ``trickle`` a byte per interval meanwhile).

    Returns {"ended": "closed"|"reset"|"still-open", "sent": n, "received": n}; "still-open"
    means the client's own guard ran out: the server never cut the connection.
    """
    import select
    import time

    deadline = time.monotonic() + guard
    sent = received = 0
    while time.monotonic() < deadline:
        if trickle:
            try:
                s.send(trickle[sent % len(trickle):sent % len(trickle) + 1])
                sent += 1
            except OSError:
                return {"ended": "reset", "sent": sent, "received": received}
        r, _, _ = select.select([s], [], [], interval if trickle else
                                max(0.0, deadline - time.monotonic()))
        if r:
            try:
                data = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return {"ended": "reset", "sent": sent, "received": received}
            except OSError as e:
                return {"ended": f"error {e}", "sent": sent, "received": received}
            if not data:
                return {"ended": "closed", "sent": sent, "received": received}
            received += len(data)
    return {"ended": "still-open", "sent": sent, "received": received}


def peer_slow(host: str, port: int, modes: dict, guard: float, interval: float) -> int:
    """Hostile clients at once, each in a thread; READY once all are connected.

    tls_trickle: TLS handshake, then an endless header, one byte per interval;
    tcp_trickle: random bytes one per interval (a never-ending ClientHello);
    tcp_silent: connect, send nothing; tls_silent: handshake, send nothing;
    garbage: 4 KiB random bytes, then wait. One JSON line per client when it
    ends, then {"done": N}.
    """
    import contextlib
    import ssl

    socks = []
    for mode, n in modes.items():
        for i in range(n):
            raw = socket.create_connection((host, port), timeout=30)
            if mode.startswith("tls_"):
                s = _tls_context().wrap_socket(raw, server_hostname=host)
            else:
                s = raw
            s.setblocking(True)
            s.settimeout(None)
            socks.append((mode, i, s))
    print("READY", flush=True)
    lock = threading.Lock()

    def run(mode: str, i: int, s) -> None:
        trickle = b""
        if mode == "tls_trickle":
            trickle = b"GET /v1/health HTTP/1.1\r\nX-Slow: " + b"a" * 100000
        elif mode == "tcp_trickle":
            trickle = b"\x16\x03\x01\x02\x00" + os.urandom(100000)
        elif mode == "garbage":
            with contextlib.suppress(OSError):
                s.sendall(os.urandom(4096))
        try:
            if isinstance(s, ssl.SSLSocket):
                # Raw reads: the TLS layer's close_notify/EOF shows as readable.
                res = _until_closed_tls(s, guard, trickle, interval)
            else:
                res = _until_closed(s, guard, trickle, interval)
        finally:
            s.close()
        with lock:
            print(json.dumps({"mode": mode, "i": i, **res}), flush=True)

    threads = [threading.Thread(target=run, args=x) for x in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"done": len(threads)}), flush=True)
    return 0


def _until_closed_tls(s, guard: float, trickle: bytes, interval: float) -> dict:
    import select
    import ssl
    import time

    deadline = time.monotonic() + guard
    sent = received = 0
    while time.monotonic() < deadline:
        if trickle:
            try:
                s.send(trickle[sent:sent + 1])
                sent += 1
            except (ssl.SSLError, OSError):
                return {"ended": "reset", "sent": sent, "received": received}
        r, _, _ = select.select([s], [], [], interval if trickle else
                                max(0.0, deadline - time.monotonic()))
        if r or s.pending():
            try:
                data = s.recv(65536)
            except ssl.SSLWantReadError:
                continue
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                return {"ended": "reset", "sent": sent, "received": received}
            except OSError as e:
                return {"ended": f"error {e}", "sent": sent, "received": received}
            if not data:
                return {"ended": "closed", "sent": sent, "received": received}
            received += len(data)
    return {"ended": "still-open", "sent": sent, "received": received}


def flood(host: str, port: int, n: int, guard: float) -> int:
    """N connections opened at once and held (sending nothing) until a line on stdin.

    Prints {"connected": c, "failed": f}, then after the stdin line
    {"closed_by_server": k, "open": m} (k: already cut by the server, counted
    without waiting) and closes them all.
    """
    import select

    socks: list = []
    failed = []
    lock = threading.Lock()

    def connect() -> None:
        try:
            s = socket.create_connection((host, port), timeout=guard)
        except OSError as e:
            with lock:
                failed.append(str(e))
            return
        with lock:
            socks.append(s)

    threads = [threading.Thread(target=connect) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"connected": len(socks), "failed": len(failed),
                      "errors": sorted(set(failed))[:5]}), flush=True)
    sys.stdin.readline()
    closed = 0
    for s in socks:
        r, _, _ = select.select([s], [], [], 0)
        if r:
            try:
                if not s.recv(1024):
                    closed += 1
            except OSError:
                closed += 1
        s.close()
    print(json.dumps({"closed_by_server": closed, "open": len(socks) - closed}), flush=True)
    return 0


def reflood(host: str, port: int, n: int, source: str, guard: float) -> int:
    """N plain TCP connections that never send a byte, each reopened as soon as the
    server closes it, until a line on stdin.

    Prints {"connected": c} once all N were opened once, then after the stdin
    line {"reopened": k} (how often the server had closed one) and stops.
    """
    stop = threading.Event()
    opened = threading.Semaphore(0)
    reopened = [0]
    lock = threading.Lock()

    def one() -> None:
        first = True
        while not stop.is_set():
            try:
                s = socket.socket()
                if source:
                    s.bind((source, 0))
                s.settimeout(guard)
                s.connect((host, port))
            except OSError:
                s.close()
                time.sleep(0.01)
                continue
            if first:
                opened.release()
                first = False
            s.settimeout(0.2)
            try:
                while not stop.is_set():
                    try:
                        if not s.recv(1024):
                            break
                    except socket.timeout:
                        continue
            except OSError:
                pass
            s.close()
            if not stop.is_set():
                with lock:
                    reopened[0] += 1

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for _ in range(n):
        opened.acquire()
    print(json.dumps({"connected": n}), flush=True)
    sys.stdin.readline()
    stop.set()
    for t in threads:
        t.join(guard)
    print(json.dumps({"reopened": reopened[0]}), flush=True)
    return 0


def dead_peer(port: int) -> int:
    """Accepts TCP connections and never answers; each stdin line gets
    {"open": connections open now, "most": most open at once, "total": accepted}."""
    srv = socket.create_server(("0.0.0.0", port), backlog=256)
    state = {"open": 0, "most": 0, "total": 0}
    lock = threading.Lock()

    def hold(conn: socket.socket) -> None:
        try:
            while conn.recv(4096):
                pass
        except OSError:
            pass
        conn.close()
        with lock:
            state["open"] -= 1

    def accept() -> None:
        while True:
            conn, _ = srv.accept()
            with lock:
                state["open"] += 1
                state["total"] += 1
                state["most"] = max(state["most"], state["open"])
            threading.Thread(target=hold, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print("READY", flush=True)
    for _line in sys.stdin:
        with lock:
            print(json.dumps(state), flush=True)
    return 0


def echo_loop(port: int, tag: str, count_file: str, host: str) -> None:
    """Echo every line (with ``tag``) until the client closes; counts connections."""
    srv = socket.create_server((host, port), backlog=256)
    count = 0
    lock = threading.Lock()

    def serve(conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rwb")
            for line in f:
                f.write(tag.encode() + line)
                f.flush()

    while True:
        conn, _ = srv.accept()
        with lock:
            count += 1
            if count_file:
                tmp = count_file + ".tmp"
                with open(tmp, "w") as fh:
                    fh.write(str(count))
                os.replace(tmp, count_file)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


class _Line:
    """One client connection that does line round trips."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.f = self.sock.makefile("rwb")

    def trip(self, text: str, tag: str) -> str:
        """'' if the echo came back right, else what went wrong."""
        try:
            self.f.write(text.encode() + b"\n")
            self.f.flush()
            got = self.f.readline()
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        want = (tag + text + "\n").encode()
        return "" if got == want else f"got {got[:80]!r}, want {want[:80]!r}"

    def close(self) -> None:
        import contextlib

        with contextlib.suppress(OSError):  # a broken connection was already counted
            self.f.close()
        self.sock.close()


def echo_load(host: str, ports: list, tag: str, sequential: int, hold: int, churn: int,
              timeout: float) -> int:
    """Round trips through a tunnel; prints one JSON object of counts (and first failures).

    sequential: N connections one after another, one line each;
    hold/churn: ``hold`` connections stay open while ``churn`` short ones
    come and go; every long one echoes at the start, after each quarter of
    the churn, and at the end ("hold_rounds": which long ones answered in
    each round). Connection i goes to ports[i % len(ports)].
    """
    import secrets

    res = {"sequential_ok": 0, "sequential_bad": 0, "hold_ok": 0, "hold_bad": 0,
           "churn_ok": 0, "churn_bad": 0, "hold_rounds": [], "failures": []}

    def note(kind: str, what: str) -> None:
        res[kind + "_bad"] += 1
        if len(res["failures"]) < 10:
            res["failures"].append(f"{kind}: {what}")

    def one(kind: str, i: int) -> None:
        try:
            c = _Line(host, ports[i % len(ports)], timeout)
        except OSError as e:
            note(kind, f"#{i} connect: {e}")
            return
        try:
            err = c.trip(f"{kind}-{i}-{secrets.token_hex(8)}", tag)
        finally:
            c.close()
        if err:
            note(kind, f"#{i} {err}")
        else:
            res[kind + "_ok"] += 1

    for i in range(sequential):
        one("sequential", i)

    longs = {}
    for j in range(hold):
        try:
            longs[j] = _Line(host, ports[j % len(ports)], timeout)
        except OSError as e:
            note("hold", f"connect #{j}: {e}")

    def long_round(r: int) -> None:
        answered = []
        for j, c in longs.items():
            err = c.trip(f"hold-{j}-round{r}-{secrets.token_hex(4)}", tag)
            if err:
                note("hold", f"#{j} round {r}: {err}")
            else:
                res["hold_ok"] += 1
                answered.append(j)
        res["hold_rounds"].append(answered)

    if longs:
        long_round(0)
        quarter = max(1, churn // 4)
        for i in range(churn):
            one("churn", i)
            if (i + 1) % quarter == 0:
                long_round((i + 1) // quarter)
        long_round(99)
        for c in longs.values():
            c.close()
    print(json.dumps(res), flush=True)
    return 0


def _extra_main(argv) -> int:
    p = argparse.ArgumentParser(prog="hosttool.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("dbusbatch")
    ph = sub.add_parser("peerhttp")
    ph.add_argument("host")
    ph.add_argument("port", type=int)
    ph.add_argument("--cert", default="")
    ph.add_argument("--key", default="")
    ps = sub.add_parser("peerslow")
    ps.add_argument("host")
    ps.add_argument("port", type=int)
    for mode in ("tls_trickle", "tcp_trickle", "tcp_silent", "tls_silent", "garbage"):
        ps.add_argument("--" + mode.replace("_", "-"), type=int, default=0, dest=mode)
    ps.add_argument("--guard", type=float, default=180)
    ps.add_argument("--interval", type=float, default=1.0)
    fl = sub.add_parser("flood")
    fl.add_argument("host")
    fl.add_argument("port", type=int)
    fl.add_argument("n", type=int)
    fl.add_argument("--guard", type=float, default=60)
    el = sub.add_parser("echoloop")
    el.add_argument("port", type=int)
    el.add_argument("--tag", default="")
    el.add_argument("--count-file", default="")
    el.add_argument("--host", default="0.0.0.0")
    rf = sub.add_parser("reflood")
    rf.add_argument("host")
    rf.add_argument("port", type=int)
    rf.add_argument("n", type=int)
    rf.add_argument("--source", default="")
    rf.add_argument("--guard", type=float, default=60)
    dp = sub.add_parser("deadpeer")
    dp.add_argument("port", type=int)
    ld = sub.add_parser("echoload")
    ld.add_argument("host")
    ld.add_argument("ports", help="PORT[,PORT...]: connections go round-robin over them")
    ld.add_argument("--tag", default="")
    ld.add_argument("--sequential", type=int, default=0)
    ld.add_argument("--hold", type=int, default=0)
    ld.add_argument("--churn", type=int, default=0)
    ld.add_argument("--timeout", type=float, default=60)
    a = p.parse_args(argv)
    if a.cmd == "dbusbatch":
        return asyncio.run(dbus_batch())
    if a.cmd == "peerhttp":
        return peer_http(a.host, a.port, a.cert, a.key)
    if a.cmd == "peerslow":
        modes = {m: getattr(a, m) for m in ("tls_trickle", "tcp_trickle", "tcp_silent",
                                            "tls_silent", "garbage") if getattr(a, m)}
        return peer_slow(a.host, a.port, modes, a.guard, a.interval)
    if a.cmd == "flood":
        return flood(a.host, a.port, a.n, a.guard)
    if a.cmd == "reflood":
        return reflood(a.host, a.port, a.n, a.source, a.guard)
    if a.cmd == "deadpeer":
        return dead_peer(a.port)
    if a.cmd == "echoloop":
        echo_loop(a.port, a.tag, a.count_file, a.host)
        return 0
    return echo_load(a.host, [int(x) for x in a.ports.split(",")], a.tag, a.sequential,
                     a.hold, a.churn, a.timeout)


EXTRA_COMMANDS = ("dbusbatch", "peerhttp", "peerslow", "flood", "echoloop", "echoload",
                  "reflood", "deadpeer")


if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1] in EXTRA_COMMANDS:
        sys.exit(_extra_main(sys.argv[1:]))
    sys.exit(main())
