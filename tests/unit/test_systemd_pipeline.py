"""systemd.Systemd.start_transient with resets: one round trip, in order, errors by name."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Optional

import pytest
from dbus_next import Message, MessageType

from scistreamd.systemd import MANAGER, MAX_INFLIGHT, NO_SUCH_UNIT, Systemd, SystemdError

JOB = "/org/freedesktop/systemd1/job/7"


class FakeBus:
    """Records what is written, in order; replies only when told (``answer``)."""

    def __init__(self, errors: Optional[Dict[str, str]] = None) -> None:
        self.sent: List[Message] = []
        self.pending: List[asyncio.Future] = []
        self.errors = errors or {}  # unit name -> error name of its ResetFailedUnit

    async def call(self, msg: Message) -> Message:
        msg.serial = len(self.sent) + 1
        self.sent.append(msg)  # written in the call's first step, as dbus-next does
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        await fut
        if msg.member == "ResetFailedUnit" and msg.body[0] in self.errors:
            return Message.new_error(msg, self.errors[msg.body[0]], "no")
        if msg.member == "StartTransientUnit":
            return Message.new_method_return(msg, "o", [JOB])
        return Message.new_method_return(msg)

    def answer(self) -> None:
        for fut in self.pending:
            if not fut.done():
                fut.set_result(None)


def job_removed(result: str) -> Message:
    return Message.new_signal("/org/freedesktop/systemd1", MANAGER, "JobRemoved", "uoss",
                              [7, JOB, "r.service", result])


async def started(bus: FakeBus, sd: Systemd, **kw: Any) -> str:
    task = asyncio.ensure_future(sd.start_transient("r.service", [], timeout=5, **kw))
    for _ in range(5):
        await asyncio.sleep(0)
    # Every call is out before any reply came back: one round trip.
    sent_before_replies = [(m.member, m.body[0]) for m in bus.sent]
    bus.answer()
    for _ in range(5):
        await asyncio.sleep(0)
    sd._on_message(job_removed("done"))
    result = await task
    assert sent_before_replies == [(m.member, m.body[0]) for m in bus.sent]
    return result


def test_resets_go_out_before_the_start_in_one_round_trip() -> None:
    async def go() -> None:
        bus = FakeBus()
        sd = Systemd(bus)  # type: ignore[arg-type]
        assert await started(bus, sd, reset_failed=["r.service", "r.socket"]) == "done"
        assert [(m.member, m.body[0]) for m in bus.sent] == [
            ("ResetFailedUnit", "r.service"), ("ResetFailedUnit", "r.socket"),
            ("StartTransientUnit", "r.service")]
        assert sd._inflight._value == MAX_INFLIGHT  # every slot given back
    asyncio.run(go())


def test_a_unit_that_is_not_loaded_needs_no_reset() -> None:
    async def go() -> None:
        bus = FakeBus({"r.socket": NO_SUCH_UNIT})
        sd = Systemd(bus)  # type: ignore[arg-type]
        assert await started(bus, sd, reset_failed=["r.service", "r.socket"]) == "done"
    asyncio.run(go())


def test_a_refused_reset_is_an_error_by_its_name() -> None:
    async def go() -> None:
        bus = FakeBus({"r.service": "org.freedesktop.DBus.Error.AccessDenied"})
        sd = Systemd(bus)  # type: ignore[arg-type]
        with pytest.raises(SystemdError) as err:
            await started(bus, sd, reset_failed=["r.service"])
        assert err.value.name == "org.freedesktop.DBus.Error.AccessDenied"
        assert sd._inflight._value == MAX_INFLIGHT
    asyncio.run(go())


def test_without_resets_only_the_start_is_sent() -> None:
    async def go() -> None:
        bus = FakeBus()
        sd = Systemd(bus)  # type: ignore[arg-type]
        assert await started(bus, sd) == "done"
        assert [m.member for m in bus.sent] == ["StartTransientUnit"]
    asyncio.run(go())


def test_pipelines_never_deadlock_on_the_inflight_slots() -> None:
    """Many pipelines at once, more slots wanted than exist: each still gets all of its
    slots in turn, and every message goes out in its own pipeline's order."""
    async def go() -> None:
        bus = FakeBus()
        sd = Systemd(bus)  # type: ignore[arg-type]
        msgs = [[sd._manager_msg("ResetFailedUnit", "s", [f"u{i}-{k}"]) for k in range(3)]
                for i in range(MAX_INFLIGHT)]
        tasks = [asyncio.ensure_future(sd._pipeline(m)) for m in msgs]
        for _ in range(10_000):  # a deadlock fails here instead of hanging
            if all(t.done() for t in tasks):
                break
            await asyncio.sleep(0)
            bus.answer()
        assert all(t.done() for t in tasks), "pipelines deadlocked on the in-flight slots"
        sent = [m.body[0] for m in bus.sent]
        for i in range(MAX_INFLIGHT):
            mine = [s for s in sent if s.startswith(f"u{i}-")]
            assert mine == [f"u{i}-0", f"u{i}-1", f"u{i}-2"]
        assert len(sent) == 3 * MAX_INFLIGHT
        assert all(r.message_type is MessageType.METHOD_RETURN
                   for t in tasks for r in t.result())
        assert sd._inflight._value == MAX_INFLIGHT
    asyncio.run(go())
