"""dbus-next work-arounds (scistreamd/dbus_compat.py) that need no bus."""

from __future__ import annotations

from pathlib import Path

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
