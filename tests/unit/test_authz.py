"""Unit tests of scistreamd.authz: which calls need which action, and the two
places the check runs (inside our methods; held before dbus-next's own answers)."""

from __future__ import annotations

import asyncio
import contextvars
from types import SimpleNamespace
from typing import Dict, List

import pytest
from dbus_next import Message, MessageFlag, MessageType, Variant

from scistreamd import ENDPOINT_IFACE, ENDPOINT_PATH_PREFIX, MANAGER_IFACE, MANAGER_PATH
from scistreamd.authz import ACTION_INSPECT, ACTION_MANAGE, Authorizer
from scistreamd.errors import AccessDenied

EP_PATH = f"{ENDPOINT_PATH_PREFIX}/bd9f1a7e_2d04d7_2d11f0_2db44c_2d946dae415862_inbound"
PROPS = "org.freedesktop.DBus.Properties"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PEER = "org.freedesktop.DBus.Peer"


def call(path: str, iface: str, member: str, sig: str = "", body: list = None,
         sender: str = ":1.7") -> Message:
    return Message(path=path, interface=iface, member=member, signature=sig,
                   body=body or [], sender=sender, serial=1)


@pytest.mark.parametrize("msg,action", [
    (call("/", INTROSPECTABLE, "Introspect"), None),
    (call("/org/scistream", INTROSPECTABLE, "Introspect"), None),
    (call(MANAGER_PATH, INTROSPECTABLE, "Introspect"), ACTION_INSPECT),  # stripped if refused
    (call(EP_PATH, INTROSPECTABLE, "Introspect"), ACTION_INSPECT),
    (call("/elsewhere", INTROSPECTABLE, "Introspect"), ACTION_INSPECT),
    (call(EP_PATH, INTROSPECTABLE, "Introspect", "s", ["x"]), None),  # UnknownMethod anyway
    (call("/", PEER, "Ping"), None),
    (call(MANAGER_PATH, PEER, "GetMachineId"), None),
    (call(EP_PATH, PEER, "Ping"), ACTION_INSPECT),
    (call(MANAGER_PATH, PROPS, "Get", "ss", [MANAGER_IFACE, "Version"]), None),
    (call(MANAGER_PATH, PROPS, "GetAll", "s", [MANAGER_IFACE]), None),
    (call(EP_PATH, PROPS, "GetAll", "s", [ENDPOINT_IFACE]), ACTION_INSPECT),
    (call(MANAGER_PATH, PROPS, "GetAll", "s", [ENDPOINT_IFACE]), ACTION_INSPECT),
    (call("/", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"), ACTION_INSPECT),
    (call(MANAGER_PATH, MANAGER_IFACE, "ListEndpoints"), ACTION_INSPECT),
    (call(MANAGER_PATH, MANAGER_IFACE, "InboundRequest"), ACTION_MANAGE),
    (call(EP_PATH, ENDPOINT_IFACE, "Rearm"), ACTION_MANAGE),
])
def test_action_of(msg: Message, action: str) -> None:
    assert Authorizer.action_of(msg) == action


def reply(body: list) -> SimpleNamespace:
    return SimpleNamespace(message_type=MessageType.METHOD_RETURN, body=body)


MANAGER_XML = ('<node><interface name="org.scistream.Tunnel1.Manager"/>'
               '<node name="endpoint"/></node>')


class FakeBus:
    """The daemon's bus connection as the authorizer uses it: credentials by sender,
    and dbus-next's own answers to the calls the daemon asks itself."""

    unique_name = ":1.1"

    def __init__(self, uids: Dict[str, int]) -> None:
        self.uids = uids
        self.lookups: List[str] = []
        self.asked: List[Message] = []  # calls the daemon made to itself
        self.sent: List[Message] = []

    async def call(self, msg: Message) -> Message:
        await asyncio.sleep(0)
        if msg.destination == self.unique_name:
            self.asked.append(msg)
            msg.serial = 99  # as the bus connection numbers it on sending
            if msg.member == "Introspect":
                return Message.new_method_return(msg, "s", [MANAGER_XML])
            if msg.member == "Get":
                return Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownProperty",
                                         "no such property")
            return Message.new_method_return(msg, "a{sv}", [{"Uid": Variant("s", "x")}])
        if msg.member == "GetConnectionCredentials":
            self.lookups.append(msg.body[0])
            body = [{"UnixUserID": Variant("u", self.uids[msg.body[0]]),
                     "UnixGroupIDs": Variant("au", [])}]
            return reply(body)  # type: ignore[return-value]
        if msg.member == "NameHasOwner":
            return reply([False])  # type: ignore[return-value]
        if msg.member == "ListActivatableNames":
            return reply([[]])  # type: ignore[return-value]
        raise AssertionError(f"unexpected call {msg.member}")

    async def send(self, msg: Message) -> None:
        self.sent.append(msg)


def ours(msg: Message) -> bool:
    return msg.interface in (MANAGER_IFACE, ENDPOINT_IFACE)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_unknown_caller_of_a_dbus_next_answer_is_held_then_answered_by_asking_ourselves(
) -> None:
    async def go() -> None:
        bus = FakeBus({":1.7": 0})
        auth = Authorizer(bus, ours)  # type: ignore[arg-type]
        get_all = call(EP_PATH, PROPS, "GetAll", "s", [ENDPOINT_IFACE])
        get = call(EP_PATH, PROPS, "Get", "ss", [ENDPOINT_IFACE, "Nope"])
        get.serial = 2
        assert auth.handle(get_all) is True and auth.handle(get) is True  # both held
        await settle()
        assert bus.lookups == [":1.7"]  # one lookup for both
        # the same question, asked of the daemon's own connection
        assert [(m.path, m.interface, m.member, m.signature, m.body) for m in bus.asked] == [
            (EP_PATH, PROPS, "GetAll", "s", [ENDPOINT_IFACE]),
            (EP_PATH, PROPS, "Get", "ss", [ENDPOINT_IFACE, "Nope"])]
        # ... and its answer, or its error, goes to the caller, unchanged
        ok, err = sorted(bus.sent, key=lambda m: m.reply_serial)
        assert (ok.message_type, ok.destination, ok.reply_serial, ok.signature) == (
            MessageType.METHOD_RETURN, ":1.7", 1, "a{sv}")
        assert ok.body[0]["Uid"].value == "x"
        assert (err.message_type, err.destination, err.reply_serial, err.error_name,
                err.body) == (MessageType.ERROR, ":1.7", 2,
                              "org.freedesktop.DBus.Error.UnknownProperty",
                              ["no such property"])
        assert auth.handle(get_all) is None  # the verdict is cached now
        own = call(EP_PATH, PROPS, "GetAll", "s", [ENDPOINT_IFACE], sender=bus.unique_name)
        assert auth.handle(own) is None and bus.lookups == [":1.7"]  # our own question

    asyncio.run(go())


def test_unknown_unprivileged_caller_of_a_dbus_next_answer_is_refused() -> None:
    async def go() -> None:
        bus = FakeBus({":1.8": 1000})
        auth = Authorizer(bus, ours)  # type: ignore[arg-type]
        get_all = call(EP_PATH, PROPS, "GetAll", "s", [ENDPOINT_IFACE], sender=":1.8")
        quiet = call("/", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects",
                     sender=":1.8")
        quiet.flags = MessageFlag.NO_REPLY_EXPECTED
        assert auth.handle(get_all) is True and auth.handle(quiet) is True
        await settle()
        assert bus.asked == []  # nothing was answered for them
        assert [(m.error_name, m.destination) for m in bus.sent] == [
            (AccessDenied.dbus_name(), ":1.8")]  # and nothing sent where no reply is wanted
        again = auth.handle(get_all)  # cached "no": refused at once
        assert isinstance(again, Message) and again.error_name == AccessDenied.dbus_name()

    asyncio.run(go())


def test_the_manager_node_is_shown_without_children_to_the_unprivileged() -> None:
    async def go() -> None:
        bus = FakeBus({":1.8": 1000})
        auth = Authorizer(bus, ours)  # type: ignore[arg-type]
        intro = call(MANAGER_PATH, INTROSPECTABLE, "Introspect", sender=":1.8")
        assert auth.handle(intro) is True
        await settle()
        (answer,) = bus.sent
        assert answer.message_type == MessageType.METHOD_RETURN
        assert "org.scistream.Tunnel1.Manager" in answer.body[0]
        assert "endpoint" not in answer.body[0]
        again = auth.handle(intro)  # built once, then answered at once
        assert isinstance(again, Message) and again.body == answer.body
        assert len(bus.asked) == 1

    asyncio.run(go())


def _method_call(auth: Authorizer, msg: Message, action: str) -> asyncio.Future[None]:
    """What dbus-next does: message handlers first, then the method's task."""
    assert auth.handle(msg) is None
    return asyncio.ensure_future(auth.require(action))


def test_our_methods_check_inside_with_their_own_caller() -> None:
    async def go() -> None:
        bus = FakeBus({":1.7": 0, ":1.8": 1000})
        auth = Authorizer(bus, ours)  # type: ignore[arg-type]
        root = [_method_call(auth, call(MANAGER_PATH, MANAGER_IFACE, "InboundRequest"),
                             ACTION_MANAGE) for _ in range(3)]
        user = _method_call(auth, call(MANAGER_PATH, MANAGER_IFACE, "InboundRequest",
                                       sender=":1.8"), ACTION_MANAGE)
        await asyncio.gather(*root)  # root may
        with pytest.raises(AccessDenied, match="group 'scistream'"):
            await user
        assert sorted(bus.lookups) == [":1.7", ":1.8"]  # one lookup per caller
        refused = auth.handle(call(MANAGER_PATH, MANAGER_IFACE, "InboundRequest",
                                   sender=":1.8"))
        assert isinstance(refused, Message) and refused.message_type == MessageType.ERROR
        assert refused.error_name == AccessDenied.dbus_name()

    asyncio.run(go())


def test_a_method_run_without_a_bus_caller_is_refused() -> None:
    async def go() -> None:
        auth = Authorizer(FakeBus({}))  # type: ignore[arg-type]
        with pytest.raises(AccessDenied):
            await auth.require(ACTION_INSPECT)

    contextvars.Context().run(asyncio.run, go())
