"""A small synchronous D-Bus client for scistreamctl: method calls and replies only.

Why not dbus-next here: importing it pulls in asyncio and its service layer,
about 45 ms of a CLI whose whole budget is ~150 ms (bench/controlplane.py).
The daemon keeps dbus-next; this module needs only the standard library.

It speaks the D-Bus wire protocol (specification 0.x, "Message Protocol"):
SASL EXTERNAL authentication over a Unix socket, Hello, method calls that can
be pipelined (send several, then collect their replies), and the marshalling
of every type the scistream API and org.freedesktop.DBus.Properties use
(basic types, arrays, dicts, structs, variants; no Unix fds). Anything the bus
sends that is not a reply to one of our calls (signals, e.g. NameAcquired) is
skipped. Every wait honours one deadline.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
NO_REPLY_EXPECTED = 0x1
MAX_MESSAGE = 128 * 1024 * 1024  # the specification's limit

# Header field codes.
_PATH, _INTERFACE, _MEMBER, _ERROR_NAME, _REPLY_SERIAL = 1, 2, 3, 4, 5
_DESTINATION, _SENDER, _SIGNATURE = 6, 7, 8
_FIELD_SIGNATURES = {_PATH: "o", _INTERFACE: "s", _MEMBER: "s", _ERROR_NAME: "s",
                     _REPLY_SERIAL: "u", _DESTINATION: "s", _SENDER: "s", _SIGNATURE: "g"}

_FIXED = {"y": "B", "b": "I", "n": "h", "q": "H", "i": "i", "u": "I", "x": "q", "t": "Q",
          "d": "d", "h": "I"}
_ALIGN = {"y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "x": 8, "t": 8, "d": 8, "h": 4,
          "s": 4, "o": 4, "g": 1, "a": 4, "(": 8, "{": 8, "v": 1}


class BusError(Exception):
    """The bus or the peer answered a call with an error."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


class ProtocolError(Exception):
    """What came over the socket is not D-Bus, or not what was asked for."""


class AuthError(ProtocolError):
    """The bus refused our authentication."""


class InvalidAddress(ValueError):
    """A bus address this client cannot use."""


class Variant:
    """A D-Bus variant: ``value`` of type ``signature`` (single complete type).

    A plain class, not a dataclass: importing dataclasses (and inspect) would
    cost the CLI ~10 ms.
    """

    __slots__ = ("signature", "value")

    def __init__(self, signature: str, value: Any) -> None:
        self.signature = signature
        self.value = value

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Variant) and self.signature == other.signature
                and self.value == other.value)

    def __repr__(self) -> str:
        return f"Variant({self.signature!r}, {self.value!r})"


# --------------------------------------------------------------------------
# signatures


def split_signature(sig: str) -> List[str]:
    """The single complete types of ``sig`` ("sa{sv}" -> ["s", "a{sv}"])."""
    out = []
    i = 0
    while i < len(sig):
        j = _complete_type_end(sig, i)
        out.append(sig[i:j])
        i = j
    return out


def _complete_type_end(sig: str, i: int) -> int:
    if i >= len(sig):
        raise ProtocolError(f"signature {sig!r} ends early")
    c = sig[i]
    if c in _FIXED or c in "sogv":
        return i + 1
    if c == "a":
        return _complete_type_end(sig, i + 1)
    if c in "({":
        close = ")" if c == "(" else "}"
        j = i + 1
        while j < len(sig) and sig[j] != close:
            j = _complete_type_end(sig, j)
        if j >= len(sig) or j == i + 1:
            raise ProtocolError(f"signature {sig!r}: unbalanced or empty {c}")
        return j + 1
    raise ProtocolError(f"signature {sig!r}: unknown type code {c!r}")


# --------------------------------------------------------------------------
# marshalling (little-endian)


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()

    def pad(self, align: int) -> None:
        self.buf.extend(b"\0" * (-len(self.buf) % align))

    def write(self, sig: str, value: Any) -> None:
        c = sig[0]
        self.pad(_ALIGN[c])
        if c in _FIXED:
            if c == "b":
                if not isinstance(value, bool):
                    raise TypeError(f"D-Bus b needs a bool, not {type(value).__name__}")
                value = int(value)
            elif c == "d":
                value = float(value)
            elif not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"D-Bus {c} needs an int, not {type(value).__name__}")
            self.buf.extend(struct.pack("<" + _FIXED[c], value))
        elif c in "so":
            data = _text(value, c)
            self.buf.extend(struct.pack("<I", len(data)) + data + b"\0")
        elif c == "g":
            data = _text(value, c)
            if len(data) > 255:
                raise ValueError("a D-Bus signature is at most 255 bytes")
            self.buf.extend(bytes([len(data)]) + data + b"\0")
        elif c == "v":
            if not isinstance(value, Variant):
                raise TypeError(f"D-Bus v needs a Variant, not {type(value).__name__}")
            if len(split_signature(value.signature)) != 1:
                raise ValueError(f"variant signature {value.signature!r} is not one type")
            self.write("g", value.signature)
            self.write(value.signature, value.value)
        elif c == "a":
            elem = sig[1:]
            at = len(self.buf)
            self.buf.extend(b"\0\0\0\0")
            self.pad(_ALIGN[elem[0]])  # padding before the first element is not counted
            start = len(self.buf)
            if elem[0] == "{":
                key_sig, val_sig = split_signature(elem[1:-1])
                if not isinstance(value, dict):
                    raise TypeError(f"D-Bus {sig} needs a dict, not {type(value).__name__}")
                for k, v in value.items():
                    self.pad(8)
                    self.write(key_sig, k)
                    self.write(val_sig, v)
            else:
                if isinstance(value, (str, dict)):
                    raise TypeError(f"D-Bus {sig} needs a list, not {type(value).__name__}")
                if elem == "y" and isinstance(value, (bytes, bytearray)):
                    self.buf.extend(value)
                else:
                    for v in value:
                        self.write(elem, v)
            struct.pack_into("<I", self.buf, at, len(self.buf) - start)
        elif c == "(":
            fields = split_signature(sig[1:-1])
            if not isinstance(value, (list, tuple)) or len(value) != len(fields):
                raise TypeError(f"D-Bus {sig} needs a sequence of {len(fields)} values")
            for f, v in zip(fields, value):
                self.write(f, v)
        else:
            raise ProtocolError(f"cannot marshal type {c!r}")


def _text(value: Any, code: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"D-Bus {code} needs a str, not {type(value).__name__}")
    data = value.encode()
    if b"\0" in data:
        raise ValueError(f"D-Bus {code} cannot contain NUL")
    return data


def marshal(sig: str, values: Sequence[Any]) -> bytes:
    types = split_signature(sig)
    if len(types) != len(values):
        raise TypeError(f"signature {sig!r} has {len(types)} values, got {len(values)}")
    w = _Writer()
    for t, v in zip(types, values):
        w.write(t, v)
    return bytes(w.buf)


# --------------------------------------------------------------------------
# unmarshalling


class _Reader:
    def __init__(self, buf: bytes, offset: int, little: bool) -> None:
        self.buf = buf
        self.pos = offset
        self.end = "<" if little else ">"

    def align(self, n: int) -> None:
        self.pos += -self.pos % n

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ProtocolError("message ends inside a value")
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        return data

    def read(self, sig: str, depth: int = 0) -> Any:
        if depth > 64:
            raise ProtocolError("values nested more than 64 deep")
        c = sig[0]
        self.align(_ALIGN[c])
        if c in _FIXED:
            fmt = self.end + _FIXED[c]
            (v,) = struct.unpack(fmt, self.take(struct.calcsize(fmt)))
            return bool(v) if c == "b" else v
        if c in "so":
            (n,) = struct.unpack(self.end + "I", self.take(4))
            data = self.take(n + 1)
            return data[:-1].decode("utf-8", "replace")
        if c == "g":
            n = self.take(1)[0]
            return self.take(n + 1)[:-1].decode("ascii", "replace")
        if c == "v":
            inner = self.read("g", depth + 1)
            if len(split_signature(inner)) != 1:
                raise ProtocolError(f"variant signature {inner!r} is not one type")
            return Variant(inner, self.read(inner, depth + 1))
        if c == "a":
            (n,) = struct.unpack(self.end + "I", self.take(4))
            if n > 64 * 1024 * 1024:
                raise ProtocolError("array longer than 64 MiB")
            elem = sig[1:]
            self.align(_ALIGN[elem[0]])
            stop = self.pos + n
            if stop > len(self.buf):
                raise ProtocolError("message ends inside an array")
            if elem[0] == "{":
                key_sig, val_sig = split_signature(elem[1:-1])
                out: Dict[Any, Any] = {}
                while self.pos < stop:
                    self.align(8)
                    k = self.read(key_sig, depth + 1)
                    out[k] = self.read(val_sig, depth + 1)
                return out
            if elem == "y":
                return self.take(n)
            items = []
            while self.pos < stop:
                items.append(self.read(elem, depth + 1))
            return items
        if c == "(":
            return [self.read(f, depth + 1) for f in split_signature(sig[1:-1])]
        raise ProtocolError(f"cannot unmarshal type {c!r}")


def unmarshal(sig: str, buf: bytes, offset: int = 0, little: bool = True) -> List[Any]:
    r = _Reader(buf, offset, little)
    return [r.read(t) for t in split_signature(sig)]


# --------------------------------------------------------------------------
# messages


class Message:
    __slots__ = ("type", "serial", "fields", "body")

    def __init__(self, mtype: int, serial: int, fields: Dict[int, Any], body: List[Any]) -> None:
        self.type = mtype
        self.serial = serial
        self.fields = fields
        self.body = body

    @property
    def reply_serial(self) -> Optional[int]:
        return self.fields.get(_REPLY_SERIAL)

    @property
    def error_name(self) -> str:
        return str(self.fields.get(_ERROR_NAME, ""))


def encode_call(serial: int, destination: str, path: str, interface: str, member: str,
                signature: str = "", body: Sequence[Any] = ()) -> bytes:
    payload = marshal(signature, body) if signature else b""
    fields = [[_PATH, Variant("o", path)], [_INTERFACE, Variant("s", interface)],
              [_MEMBER, Variant("s", member)], [_DESTINATION, Variant("s", destination)]]
    if signature:
        fields.append([_SIGNATURE, Variant("g", signature)])
    w = _Writer()
    w.buf.extend(b"l" + bytes([METHOD_CALL, 0, 1]))
    w.buf.extend(struct.pack("<II", len(payload), serial))
    w.write("a(yv)", fields)
    w.pad(8)
    return bytes(w.buf) + payload


def decode_message(data: bytes) -> Message:
    little = data[0:1] == b"l"
    if len(data) < 16 or data[0:1] not in (b"l", b"B") or data[3] != 1:
        raise ProtocolError("not a D-Bus message (bad endianness or protocol version)")
    end = "<" if little else ">"
    mtype = data[1]
    _body_len, serial = struct.unpack(end + "II", data[4:12])
    (raw_fields,) = unmarshal("a(yv)", data, 12, little)
    fields: Dict[int, Any] = {}
    for code, var in raw_fields:
        want = _FIELD_SIGNATURES.get(code)
        if want is not None and var.signature != want:
            raise ProtocolError(f"header field {code} has type {var.signature!r}")
        fields[code] = var.value
    header_len = 16 + struct.unpack(end + "I", data[12:16])[0]
    header_len += -header_len % 8
    sig = fields.get(_SIGNATURE, "")
    body = unmarshal(sig, data, header_len, little) if sig else []
    return Message(mtype, serial, fields, body)


def _message_length(head: bytes) -> int:
    """Total length of a message from its first 16 bytes."""
    if head[0:1] not in (b"l", b"B"):
        raise ProtocolError("not a D-Bus message")
    end = "<" if head[0:1] == b"l" else ">"
    body_len, _serial, fields_len = struct.unpack(end + "III", head[4:16])
    header = 16 + fields_len
    total = header + (-header % 8) + body_len
    if total > MAX_MESSAGE:
        raise ProtocolError(f"message of {total} bytes exceeds the D-Bus limit")
    return total


# --------------------------------------------------------------------------
# addresses and the connection


def unix_socket_path(address: str) -> str:
    """The socket of the first usable ``unix:`` entry of a D-Bus address.

    Abstract sockets are returned with a leading NUL, as socket.connect wants them.
    """
    problems = []
    for entry in address.split(";"):
        if not entry:
            continue
        transport, _, params = entry.partition(":")
        if transport != "unix":
            problems.append(f"transport {transport!r} is not supported (only unix)")
            continue
        kv: Dict[str, str] = {}
        for item in params.split(","):
            k, sep, v = item.partition("=")
            if not sep:
                raise InvalidAddress(f"{entry!r}: {item!r} is not key=value")
            kv[k] = _unescape(v)
        if "path" in kv:
            return kv["path"]
        if "abstract" in kv:
            return "\0" + kv["abstract"]
        problems.append(f"{entry!r} names neither path= nor abstract=")
    raise InvalidAddress("; ".join(problems) or "the address is empty")


def _unescape(value: str) -> str:
    out = bytearray()
    i = 0
    raw = value.encode()
    while i < len(raw):
        if raw[i:i + 1] == b"%":
            try:
                out.append(int(raw[i + 1:i + 3], 16))
            except ValueError:
                raise InvalidAddress(f"bad %-escape in {value!r}") from None
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode()


class Connection:
    """One authenticated connection to a bus; ``deadline`` (time.monotonic()) bounds it all."""

    def __init__(self, address: str, deadline: float) -> None:
        self.deadline = deadline
        path = unix_socket_path(address)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._buf = b""
        self._serial = 0
        try:
            self._timeout()
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.unique_name = ""

    def _timeout(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the deadline passed")
        self.sock.settimeout(left)

    def _recv(self) -> bytes:
        self._timeout()
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no answer before the deadline") from None
        if not chunk:
            raise EOFError("the bus closed the connection")
        return chunk

    def _send(self, data: bytes) -> None:
        self._timeout()
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise TimeoutError("could not send before the deadline") from None

    def _auth_line(self) -> str:
        while b"\r\n" not in self._buf:
            if len(self._buf) > 16384:
                raise AuthError("authentication reply too long")
            try:
                self._buf += self._recv()
            except EOFError:
                raise EOFError("the bus closed the connection during authentication") from None
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line.decode("ascii", "replace")

    def authenticate(self) -> None:
        uid = str(os.geteuid()).encode().hex()
        self._send(b"\0AUTH EXTERNAL " + uid.encode() + b"\r\n")
        reply = self._auth_line()
        if not reply.startswith("OK "):
            raise AuthError(f"the bus refused EXTERNAL authentication: {reply[:200]!r}")
        self._send(b"BEGIN\r\n")
        (self.unique_name,) = self.call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                        "org.freedesktop.DBus", "Hello")

    def send_call(self, destination: str, path: str, interface: str, member: str,
                  signature: str = "", body: Sequence[Any] = ()) -> int:
        self._serial += 1
        self._send(encode_call(self._serial, destination, path, interface, member, signature,
                               body))
        return self._serial

    def _read_message(self) -> Message:
        while len(self._buf) < 16:
            self._buf += self._recv()
        total = _message_length(self._buf[:16])
        while len(self._buf) < total:
            self._buf += self._recv()
        data, self._buf = self._buf[:total], self._buf[total:]
        return decode_message(data)

    def replies(self, serials: Sequence[int]) -> Dict[int, Message]:
        """The replies to ``serials`` (method returns or errors), in any order."""
        want = set(serials)
        got: Dict[int, Message] = {}
        while want:
            msg = self._read_message()
            if msg.type in (METHOD_RETURN, ERROR) and msg.reply_serial in want:
                want.discard(msg.reply_serial)
                got[msg.reply_serial] = msg
        return got

    def call(self, destination: str, path: str, interface: str, member: str,
             signature: str = "", body: Sequence[Any] = ()) -> List[Any]:
        serial = self.send_call(destination, path, interface, member, signature, body)
        return result(self.replies([serial])[serial])

    def close(self) -> None:
        self.sock.close()


def result(msg: Message) -> List[Any]:
    """A reply's body, or BusError for an error reply."""
    if msg.type == ERROR:
        text = msg.body[0] if msg.body and isinstance(msg.body[0], str) else ""
        raise BusError(msg.error_name, text)
    return msg.body


def connect(address: str, timeout: float) -> Connection:
    conn = Connection(address, time.monotonic() + timeout)
    try:
        conn.authenticate()
    except BaseException:
        conn.close()
        raise
    return conn


__all__: Tuple[str, ...] = ("AuthError", "BusError", "Connection", "InvalidAddress",
                            "ProtocolError", "Variant", "connect", "marshal", "result",
                            "unmarshal", "unix_socket_path")
