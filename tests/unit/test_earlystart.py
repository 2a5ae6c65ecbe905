"""Manager.inbound_request with option early (earlystart.py), with the fakes of test_manager:
answered while the relay starts, its key claimable meanwhile, and every way the
start can end afterwards (done, failed, released first, re-armed meanwhile)
returning everything and telling settled() how it ended."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable, Tuple

import pytest

from scistreamd.errors import InvalidArgument, NotFound, RelayFailed
from scistreamd.model import Endpoint, Role, State
from scistreamd.peerident import PeerIdentity

from .test_manager import S2, Bed, run, systemd_error

OWNER = "token:alice"
WHO = PeerIdentity("192.168.150.2:40000")


def gate(result: str = "done") -> Tuple[asyncio.Event, Callable[[], Awaitable[Any]]]:
    """A relay start job that ends (with ``result``) when the event is set."""
    go = asyncio.Event()

    async def job() -> Any:
        await go.wait()
        return result
    return go, job


async def early(bed: Bed) -> Endpoint:
    return await bed.m.inbound_request("192.168.150.1", [7000], 2, {"early": True},
                                       owner=OWNER)


async def settle(bed: Bed) -> None:
    for _ in range(20):  # the start's task runs its last steps
        await asyncio.sleep(0)
    assert bed.m._early == {}


def test_answered_while_starting_claimable_then_active(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        done, job = gate()
        bed.systemd.script.add("start_transient", job)
        ep = await early(bed)
        assert ep.state is State.STARTING and ep.uid in bed.m._early
        bed.assert_holds(ep)  # ports, keys, state and object exist already
        doc = await bed.m.claim(ep.uid, WHO, ep.listeners)
        assert doc["psk"] == bed.psk(ep) and ep.claimant_ip == S2
        assert bed.systemd.names("set_properties") == [ep.socket_unit]
        assert ep.state is State.STARTING  # the claim did not wait for the start
        waiter = asyncio.ensure_future(bed.m.settled(ep.uid, OWNER))
        await asyncio.sleep(0)
        assert not waiter.done()
        done.set()
        await waiter  # no failure
        await settle(bed)
        assert ep.state is State.ACTIVE and ep.claimed_by == "192.168.150.2:40000"
        bed.assert_holds(ep)
        await bed.m.settled(ep.uid, OWNER)  # over: answers at once
        await bed.m.release(ep.uid)
        bed.assert_clean()
    run(go)


def test_start_failing_after_the_answer_rolls_back_and_is_told(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        done, job = gate("failed")
        bed.systemd.script.add("start_transient", job)
        ep = await early(bed)
        await bed.m.claim(ep.uid, WHO, ep.listeners)
        done.set()
        with pytest.raises(RelayFailed, match="could not open the listeners"):
            await bed.m.settled(ep.uid, OWNER)
        await settle(bed)
        bed.assert_clean()
        # Another owner hears nothing of it; a late claim hears why the uid is gone.
        await bed.m.settled(ep.uid, "token:mallory")
        with pytest.raises(NotFound, match="failed to start, and the inbound side rolled it"):
            await bed.m.claim(ep.uid, WHO, ep.listeners)
        # The ports are free again.
        again = await bed.m.inbound_request("192.168.150.1", [7000], 2, {})
        assert again.listeners == ep.listeners
    run(go)


def test_early_must_be_a_boolean(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        with pytest.raises(InvalidArgument, match="early must be a boolean"):
            await bed.m.inbound_request("192.168.150.1", [7000], 1, {"early": "yes"})
        bed.assert_clean()
        ep = await bed.m.inbound_request("192.168.150.1", [7000], 1, {"early": False})
        assert ep.state is State.ACTIVE and bed.m._early == {}
    run(go)


def test_start_refused_before_the_answer_raises_and_leaves_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        bed.systemd.script.add("start_transient", systemd_error())
        with pytest.raises(RelayFailed, match="systemd refused to start"):
            await early(bed)
        bed.assert_clean()
        assert bed.m._early == {} and len(bed.m._start_failures) == 0
    run(go)


def test_release_while_starting_wins_and_nothing_is_returned_twice(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        done, job = gate("canceled")  # what systemd says of a start its unit's stop ended
        bed.systemd.script.add("start_transient", job)
        ep = await early(bed)
        (gone,) = await bed.m.release(ep.uid)
        assert gone is ep
        bed.assert_clean()
        # A new endpoint takes the same ports before the old start ends.
        other = await bed.m.inbound_request("192.168.150.1", [7000], 2, {})
        done.set()
        with pytest.raises(NotFound, match="released while its relay started"):
            await bed.m.settled(ep.uid, OWNER)
        await settle(bed)
        bed.assert_holds(other)  # the old start's end freed none of its ports
        assert other.state is State.ACTIVE
    run(go)


def test_rearm_while_starting_waits_for_the_start(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        done, job = gate()
        bed.systemd.script.add("start_transient", job)
        ep = await early(bed)
        rearm = asyncio.ensure_future(bed.m.rearm(ep.uid))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not rearm.done() and bed.systemd.names("stop") == []
        done.set()
        assert (await rearm) is ep
        assert ep.key_generation == 2 and ep.state is State.ACTIVE
        bed.assert_holds(ep)
    run(go)


def test_a_claim_of_a_starting_endpoint_needs_an_early_start(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await bed.m.inbound_request("192.168.150.1", [7000], 1, {})
        ep.state = State.STARTING  # as a start that is not early, while it runs
        with pytest.raises(Exception, match="is starting, not active"):
            await bed.m.claim(ep.uid, WHO, ep.listeners)
        assert ep.claimed_by == "" and (ep.uid, Role.INBOUND) in bed.m.endpoints
    run(go)
