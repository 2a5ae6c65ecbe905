"""Unit tests of scistreamd.busclient, checked against dbus-next's own wire codec."""

from __future__ import annotations

import socket
import threading
from typing import Any, List

import pytest
from dbus_next import Message as NextMessage
from dbus_next import MessageType
from dbus_next import Variant as NextVariant
from dbus_next._private.marshaller import Marshaller
from dbus_next._private.unmarshaller import Unmarshaller
from hypothesis import given, settings
from hypothesis import strategies as st

from scistreamd import busclient as bc

# (signature, our values, dbus-next's values) for every shape the CLI sends or reads.
CASES = [
    ("s", ["192.168.150.1"], ["192.168.150.1"]),
    ("saqua{sv}", ["10.0.0.1", [5000, 5001], 2, {"peer": bc.Variant("s", "x")}],
     ["10.0.0.1", [5000, 5001], 2, {"peer": NextVariant("s", "x")}]),
    ("sasaqua{sv}", ["u", ["a:1", "b:2"], [], 1, {}], ["u", ["a:1", "b:2"], [], 1, {}]),
    ("a(ssas)o", [[["a", "b", ["c"]], ["d", "e", []]], "/x/y"],
     [[["a", "b", ["c"]], ["d", "e", []]], "/x/y"]),
    ("ybnqiuxtd", [255, True, -2, 3, -4, 5, -6, 7, 1.5], [255, True, -2, 3, -4, 5, -6, 7, 1.5]),
    ("a{sa{sv}}", [{"i": {"n": bc.Variant("t", 9), "s": bc.Variant("as", ["a"])}}],
     [{"i": {"n": NextVariant("t", 9), "s": NextVariant("as", ["a"])}}]),
    ("g", ["a{sv}"], ["a{sv}"]),
    ("v", [bc.Variant("(su)", ["x", 1])], [NextVariant("(su)", ["x", 1])]),
]


def _plain(value: Any) -> Any:
    if hasattr(value, "signature") and hasattr(value, "value"):
        return ("variant", value.signature, _plain(value.value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@pytest.mark.parametrize("sig,ours,theirs", CASES)
def test_marshal_is_byte_identical_to_dbus_next(sig: str, ours: List[Any],
                                                theirs: List[Any]) -> None:
    m = Marshaller(sig, theirs)
    m.marshall()
    assert bc.marshal(sig, ours) == bytes(m.buffer)
    assert _plain(bc.unmarshal(sig, bytes(m.buffer))) == _plain(theirs)


def test_call_encoding_is_read_back_by_dbus_next() -> None:
    data = bc.encode_call(7, "org.scistream.Tunnel1", "/org/scistream/Tunnel1",
                          "org.scistream.Tunnel1.Manager", "InboundRequest", "saqua{sv}",
                          ["10.0.0.1", [5000], 1, {"k": bc.Variant("s", "v")}])
    msg = Unmarshaller(_Stream(data)).unmarshall()
    assert (msg.serial, msg.destination, msg.path, msg.interface, msg.member) == (
        7, "org.scistream.Tunnel1", "/org/scistream/Tunnel1",
        "org.scistream.Tunnel1.Manager", "InboundRequest")
    assert msg.signature == "saqua{sv}"
    assert _plain(msg.body) == ["10.0.0.1", [5000], 1, {"k": ("variant", "s", "v")}]


def test_replies_and_errors_from_dbus_next_decode() -> None:
    ret = NextMessage(message_type=MessageType.METHOD_RETURN, reply_serial=3, serial=9,
                      signature="sao", body=["uid", ["/a", "/b"]])
    msg = bc.decode_message(ret._marshall())
    assert (msg.type, msg.reply_serial, msg.body) == (bc.METHOD_RETURN, 3, ["uid", ["/a", "/b"]])
    err = NextMessage(message_type=MessageType.ERROR, reply_serial=4, serial=10,
                      error_name="org.scistream.Tunnel1.Error.NotFound", signature="s",
                      body=["no such tunnel"])
    msg = bc.decode_message(err._marshall())
    with pytest.raises(bc.BusError) as info:
        bc.result(msg)
    assert (info.value.name, info.value.message) == ("org.scistream.Tunnel1.Error.NotFound",
                                                     "no such tunnel")


def test_big_endian_messages_decode() -> None:
    # A hand-built big-endian reply (the specification allows either byte order):
    # header fields REPLY_SERIAL=5 (u) and SIGNATURE="u", body uint32 258.
    fields = (b"\x05\x01u\x00" + b"\x00\x00\x00\x05" +  # (y=5, v=u:5)
              b"\x08\x01g\x00" + b"\x01u\x00")          # (y=8, v=g:"u")
    head = b"B\x02\x00\x01" + (4).to_bytes(4, "big") + (1).to_bytes(4, "big")
    head += len(fields).to_bytes(4, "big") + fields
    head += b"\0" * (-len(head) % 8)
    msg = bc.decode_message(head + (258).to_bytes(4, "big"))
    assert (msg.reply_serial, msg.body) == (5, [258])


@pytest.mark.parametrize("sig,values,error", [
    ("s", [3], TypeError), ("u", ["3"], TypeError), ("b", [1], TypeError),
    ("as", ["abc"], TypeError), ("a{sv}", [{"k": "not a variant"}], TypeError),
    ("(su)", [["x"]], TypeError), ("s", ["a\0b"], ValueError), ("ss", ["one"], TypeError),
    ("a{", [{}], bc.ProtocolError), ("()", [[]], bc.ProtocolError), ("z", [1], bc.ProtocolError),
])
def test_bad_values_are_refused_before_anything_is_sent(sig: str, values: List[Any],
                                                        error: type) -> None:
    with pytest.raises(error):
        bc.marshal(sig, values)


@pytest.mark.parametrize("data", [
    b"", b"l\x02", b"X" * 16, b"l\x02\x00\x02" + b"\0" * 12,
    # claims a 1 GiB body
    b"l\x02\x00\x01" + (1 << 30).to_bytes(4, "little") + b"\1\0\0\0" + b"\0\0\0\0",
])
def test_garbage_from_the_bus_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(bc.ProtocolError):
        if len(data) >= 16:
            bc._message_length(data[:16])
        bc.decode_message(data)


def test_truncated_values_are_protocol_errors() -> None:
    whole = bc.marshal("sas", ["hello", ["a", "b"]])
    for cut in range(1, len(whole)):
        try:
            bc.unmarshal("sas", whole[:cut])
        except bc.ProtocolError:
            continue
        raise AssertionError(f"{cut} bytes of {len(whole)} decoded without complaint")


@pytest.mark.parametrize("address,path", [
    ("unix:path=/run/dbus/system_bus_socket", "/run/dbus/system_bus_socket"),
    ("unix:abstract=/tmp/dbus-x,guid=01", "\0/tmp/dbus-x"),
    ("tcp:host=h,port=1;unix:path=/a%20b", "/a b"),
])
def test_addresses(address: str, path: str) -> None:
    assert bc.unix_socket_path(address) == path


@pytest.mark.parametrize("address", ["", "tcp:host=h,port=1", "unix:foo", "unix:guid=1",
                                     "unix:path=%zz"])
def test_unusable_addresses(address: str) -> None:
    with pytest.raises(bc.InvalidAddress):
        bc.unix_socket_path(address)


def test_signals_and_foreign_replies_are_skipped_and_pipelined_replies_matched(tmp_path) -> None:
    """A scripted bus: authentication, Hello, then replies out of order with a
    signal and a reply to somebody else's serial in between."""
    path = str(tmp_path / "bus")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def reply(serial: int, sig: str, body: List[Any]) -> bytes:
        return NextMessage(message_type=MessageType.METHOD_RETURN, reply_serial=serial,
                           serial=100 + serial, signature=sig, body=body)._marshall()

    def serve() -> None:
        conn, _ = server.accept()
        got = b""
        while b"BEGIN\r\n" not in got:
            got += conn.recv(4096)
            if b"AUTH EXTERNAL" in got and b"OK" not in got:
                conn.sendall(b"OK 0123456789abcdef0123456789abcdef\r\n")
                got += b"OK"
        conn.sendall(reply(1, "s", [":1.42"]))
        signal = NextMessage(message_type=MessageType.SIGNAL, path="/org/freedesktop/DBus",
                             interface="org.freedesktop.DBus", member="NameAcquired",
                             serial=5, signature="s", body=[":1.42"])._marshall()
        conn.recv(65536)  # the two pipelined calls
        conn.sendall(signal + reply(77, "s", ["not ours"]) + reply(3, "u", [3]) +
                     reply(2, "s", ["two"]))
        conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        conn = bc.connect(f"unix:path={path}", timeout=5)
        assert conn.unique_name == ":1.42"
        a = conn.send_call("d.e", "/p", "i.f", "A")
        b = conn.send_call("d.e", "/p", "i.f", "B", "s", ["x"])
        got = conn.replies([a, b])
        assert (bc.result(got[a]), bc.result(got[b])) == (["two"], [3])
        conn.close()
    finally:
        thread.join(5)
        server.close()


class _Stream:
    """The file-like object dbus-next's Unmarshaller reads from."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, n: int) -> bytes:
        out, self.data = self.data[:n], self.data[n:]
        return out


_text = st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                max_size=8)
_basic = st.one_of(
    st.tuples(st.just("s"), _text),
    st.tuples(st.just("u"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("x"), st.integers(-2**63, 2**63 - 1)),
    st.tuples(st.just("b"), st.booleans()),
    st.tuples(st.just("y"), st.integers(0, 255)),
    st.tuples(st.just("q"), st.integers(0, 2**16 - 1)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_basic, min_size=1, max_size=6), st.lists(_text, max_size=4))
def test_round_trip_and_agreement_with_dbus_next(items, strings) -> None:
    sig = "".join(t for t, _ in items) + "asa{sv}"
    values = [v for _, v in items] + [strings, {s: bc.Variant("s", s) for s in strings}]
    data = bc.marshal(sig, values)
    assert _plain(bc.unmarshal(sig, data)) == _plain(values)
    theirs = [v for _, v in items] + [strings, {s: NextVariant("s", s) for s in strings}]
    m = Marshaller(sig, theirs)
    m.marshall()
    assert data == bytes(m.buffer)
