"""Unit tests of scistreamd.systemd: what the daemon asks the bus to send it."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, List

from dbus_next import Message, MessageType

from scistreamd.systemd import Systemd


class FakeBus:
    """Records the calls; answers each with an empty method return."""

    def __init__(self) -> None:
        self.sent: List[Message] = []
        self.handlers: List[Callable[[Message], Any]] = []

    def add_message_handler(self, handler: Callable[[Message], Any]) -> None:
        self.handlers.append(handler)

    async def call(self, msg: Message) -> Message:
        self.sent.append(msg)
        body = [1] if msg.member == "AddMatch" else []
        return Message(message_type=MessageType.METHOD_RETURN, reply_serial=1,
                       signature="u" if body else "", body=body)


def test_unit_changes_are_asked_for_the_unit_interface_only() -> None:
    """The monitor needs a unit's state changes, which come on the Unit interface;
    the Service/Socket interfaces' changes of every start would only be parsed."""
    bus = FakeBus()
    asyncio.run(Systemd(bus).setup())  # type: ignore[arg-type]
    rules = [m.body[0] for m in bus.sent if m.member == "AddMatch"]
    changed = [r for r in rules if "member='PropertiesChanged'" in r]
    assert len(changed) == 1
    assert "arg0='org.freedesktop.systemd1.Unit'" in changed[0]
    assert "path_namespace='/org/freedesktop/systemd1/unit'" in changed[0]
    assert any("member='JobRemoved'" in r for r in rules)
    assert any("member='UnitRemoved'" in r for r in rules)
