"""dbus-next work-arounds (scistreamd/dbus_compat.py) that need no bus."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

import pytest
from dbus_next import Message, MessageFlag, MessageType

from scistreamd.dbus_compat import PeerAnswers, read_machine_id

MID = "0123456789abcdef0123456789abcdef"


def _peer_call(member: str, sig: str = "", body=(), flags=MessageFlag.NONE) -> Message:
    return Message(destination="org.scistream.Tunnel1", path="/org/scistream/Tunnel1",
                   interface="org.freedesktop.DBus.Peer", member=member, signature=sig,
                   body=list(body), serial=7, flags=flags)


def test_read_machine_id_takes_the_first_valid_file(tmp_path: Path):
    bad, good = tmp_path / "bad", tmp_path / "good"
    bad.write_text("not-an-id\n")
    good.write_text(MID + "\n")
    assert read_machine_id([tmp_path / "absent", bad, good]) == MID
    assert read_machine_id([tmp_path / "absent", bad]) is None


def test_peer_answers_get_machine_id_and_ping(tmp_path: Path):
    (tmp_path / "machine-id").write_text(MID + "\n")
    peer = PeerAnswers([tmp_path / "machine-id"])
    reply = peer.reply(_peer_call("GetMachineId"))
    assert reply.message_type == MessageType.METHOD_RETURN
    assert (reply.signature, reply.body, reply.reply_serial) == ("s", [MID], 7)
    reply._marshall(False)  # a body dbus-next can send (0.2.3 built one it could not)
    ping = peer.reply(_peer_call("Ping"))
    assert ping.message_type == MessageType.METHOD_RETURN and ping.body == []


def test_peer_fails_by_name(tmp_path: Path):
    peer = PeerAnswers([tmp_path / "absent"])
    err = peer.reply(_peer_call("GetMachineId"))
    assert err.error_name == "org.freedesktop.DBus.Error.Failed"
    assert "machine-id" in err.body[0]
    for member, sig, body in (("Pong", "", []), ("Ping", "s", ["x"])):
        err = peer.reply(_peer_call(member, sig, body))
        assert err.error_name == "org.freedesktop.DBus.Error.UnknownMethod"
        err._marshall(False)


def test_peer_leaves_other_calls_alone_and_honours_no_reply(tmp_path: Path):
    peer = PeerAnswers([tmp_path / "absent"])
    other = Message(destination="x.y", path="/", interface="org.freedesktop.DBus.Properties",
                    member="Get", signature="ss", body=["a", "b"], serial=3)
    assert peer.reply(other) is None
    assert peer.reply(_peer_call("Ping", flags=MessageFlag.NO_REPLY_EXPECTED)) is True


def _unconnected_bus(tmp_path: Path):
    """A dbus-next MessageBus whose socket reaches a listener that never answers
    (the constructor connects the socket; nothing is sent until connect())."""
    import socket

    from dbus_next.aio import MessageBus

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "bus"))
    server.listen(1)
    return MessageBus(bus_address=f"unix:path={tmp_path / 'bus'}"), server


def test_export_quietly_exports_without_a_signal(tmp_path: Path) -> None:
    import asyncio

    import pytest
    from dbus_next.service import ServiceInterface

    from scistreamd.dbus_compat import export_quietly

    path = "/org/scistream/Tunnel1/endpoint/x"

    async def go() -> None:  # the aio bus wants a running loop
        bus, server = _unconnected_bus(tmp_path)
        try:
            sent: list = []
            bus.send = sent.append  # type: ignore[method-assign]
            export_quietly(bus, path, ServiceInterface("org.scistream.Test"))
            assert sent == []
            # dbus-next knows it as exported: a second export of it is refused ...
            with pytest.raises(ValueError):
                bus.export(path, ServiceInterface("org.scistream.Test"))
            with pytest.raises(ValueError):
                export_quietly(bus, path, ServiceInterface("org.scistream.Test"))
            # ... and unexport works on it as on any exported object.
            bus.unexport(path)
            assert path not in bus._path_exports
        finally:
            bus.disconnect()
            server.close()

    asyncio.run(go())


def test_tunnel_api_announces_endpoints_only_once_it_asks_for_its_name() -> None:
    from scistreamd.dbus_api import TunnelApi
    from scistreamd.model import Endpoint, HostPort, Role, parse_ip
    from scistreamd.traffic import Traffic

    class Bus:
        def __init__(self) -> None:
            self._path_exports: dict = {}
            self.exported: list = []

        def add_message_handler(self, handler: object) -> None:
            pass

        def export(self, path: str, obj: object) -> None:
            self.exported.append(path)

    class Manager:
        def traffic(self, ep: object) -> Traffic:
            return Traffic()

    def ep(uid: str) -> Endpoint:
        ip = parse_ip("192.168.150.1", "ip")
        return Endpoint(uid=uid, role=Role.INBOUND, listeners=(HostPort(ip, 5100),),
                        targets=(HostPort(ip, 5300),), num_conn=1, created_at=1.0)

    bus = Bus()
    api = TunnelApi(bus)  # type: ignore[arg-type]
    api.manager = Manager()  # type: ignore[assignment]
    adopted = ep("5aadb09f-9322-4064-b9fa-fd96ecd2e7ea")
    api.endpoint_added(adopted)  # before the name: exported, no InterfacesAdded
    assert bus.exported == [] and len(bus._path_exports) == 1
    api.announcing = True
    new = ep("6aadb09f-9322-4064-b9fa-fd96ecd2e7ea")
    api.endpoint_added(new)
    assert len(bus.exported) == 1 and bus.exported[0] not in bus._path_exports


def test_patched_writer_marks_a_failed_send_retrieved_and_ends_the_bus() -> None:
    """A send that fails (the bus went away: EPIPE) ends the bus through _finalize; the
    message's future, which nobody may await (a signal), logs no "Future exception was
    never retrieved" (its exception is still raised to an awaiter)."""
    import asyncio
    import queue
    import types

    from dbus_next.aio import message_bus as mb

    from scistreamd.dbus_compat import patch_dbus_next_writer

    patch_dbus_next_writer()
    if not getattr(mb._MessageWriter, "_eagain_safe", False):
        pytest.skip("this dbus-next release is not patched")
    loop = asyncio.new_event_loop()
    try:
        fut = loop.create_future()
        ended: List[BaseException] = []

        class Sock:
            def send(self, data: Any) -> int:
                raise BrokenPipeError(32, "Broken pipe")

        messages: queue.Queue = queue.Queue()
        messages.put((b"message", None, fut))
        writer = types.SimpleNamespace(
            buf=None, messages=messages, sock=Sock(), unix_fds=None, negotiate_unix_fd=False,
            loop=loop, fd=-1, bus=types.SimpleNamespace(_finalize=ended.append))
        mb._MessageWriter.write_callback(writer)
        assert isinstance(ended[0], BrokenPipeError)
        assert fut.done() and fut._log_traceback is False  # nothing logged when collected
        assert isinstance(fut.exception(), BrokenPipeError)  # an awaiter still gets it
    finally:
        loop.close()
