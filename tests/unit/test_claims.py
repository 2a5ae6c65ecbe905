"""Claims that survive a claimant's crash, and key generations (issue 14, items 6 and 7).

Manager branches with the small fakes of test_manager.py (real stores on tmp_path),
plus the pure parts: the model's new fields, the peer documents, the journal line parser.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest

from scistreamd.errors import InvalidArgument, NotFound, PeerRejected
from scistreamd.hostprobe import accepted_peer
from scistreamd.model import (
    MAX_KEY_GENERATION,
    Endpoint,
    Role,
    State,
    new_uid,
    next_key_generation,
)
from scistreamd.peerident import PeerIdentity
from scistreamd.peerwire import EndpointState, PeerEndpoint
from tests.unit.test_manager import PSK, S2, Bed, inbound, outbound, run, systemd_error

S2_CERT = PeerIdentity("192.168.150.2:40000", verified=True, ips=(S2,))
#: the same certificate, claiming again from another source port
S2_AGAIN = PeerIdentity("192.168.150.2:40001", verified=True, ips=(S2,))
OTHER = PeerIdentity("192.168.150.2:40002", verified=True,
                     ips=(ipaddress.ip_address("192.168.150.99"),))
SUITES = "TLS_AES_128_GCM_SHA256"


# ------------------------------------------------------------------ repeated claims


def test_the_claimant_may_claim_again_until_connected_and_gets_a_new_key(
        tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        assert ep.key_generation == 1
        first = await bed.m.claim(ep.uid, S2_CERT, ep.listeners)
        assert first["key_generation"] == 1 and ep.claimed_identity == "IP:192.168.150.2"
        claimed_at = ep.claimed_at
        bed.systemd.calls.clear()
        second = await bed.m.claim(ep.uid, S2_AGAIN, ep.listeners)
        # A new key (the lost half may have left the old one behind), the next number.
        assert second["psk"] != first["psk"] and second["psk"] == bed.psk(ep)
        assert second["key_generation"] == ep.key_generation == 2
        assert ep.claimed_by == "192.168.150.2:40001 cert IP:192.168.150.2"
        assert ep.claimant_ip == S2 and ep.claimed_at >= claimed_at
        # Asked about the old claim: its relay's unit, its address, since its time.
        assert bed.probes.accepted_asked == [(ep.unit, S2, claimed_at)]
        # Re-keyed behind the socket, whose allow list names the claimant again.
        assert [m for m, _n in bed.systemd.calls] == ["stop", "set_properties",
                                                      "reset_failed", "start"]
        assert ep.state is State.ACTIVE and bed.m._restarting == set()
        bed.assert_holds(ep)
        # All of it persisted.
        again = bed.restart()
        await again.m.adopt()
        (kept,) = again.m.endpoints.values()
        assert (kept.key_generation, kept.claimed_identity, kept.claimant_ip) == (
            2, "IP:192.168.150.2", S2)
    run(go)


@pytest.mark.parametrize("who, why", [
    (OTHER, "already claimed by another peer"),
    # No verified certificate: no identity to compare, so never again.
    (PeerIdentity("192.168.150.2:40000"), "already claimed by another peer"),
])
def test_no_one_else_may_claim_again(tmp_path: Path, who: PeerIdentity, why: str) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        await bed.m.claim(ep.uid, who if not who.verified else S2_CERT)
        key, by = bed.psk(ep), ep.claimed_by
        with pytest.raises(PeerRejected, match=why):
            await bed.m.claim(ep.uid, who)
        assert (bed.psk(ep), ep.key_generation, ep.claimed_by) == (key, 1, by)
        assert bed.probes.accepted_asked == []  # refused before the journal is read
    run(go)


@pytest.mark.parametrize("accepted, why", [
    (True, "your relay has connected to it since the claim"),
    (OSError("journal gone"), "could not read its relay's journal"),
])
def test_a_connected_or_unknown_claim_is_settled(tmp_path: Path, accepted: object,
                                                 why: str) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        await bed.m.claim(ep.uid, S2_CERT)
        key = bed.psk(ep)
        bed.probes.accepted = accepted
        with pytest.raises(PeerRejected, match=f"{why}.*re-arm"):
            await bed.m.claim(ep.uid, S2_AGAIN)
        assert (bed.psk(ep), ep.key_generation, ep.claimed_by) == (
            key, 1, "192.168.150.2:40000 cert IP:192.168.150.2")
    run(go)


def test_a_relay_too_quiet_to_tell_settles_the_claim(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path, relay_log_level="warning")
        ep = await inbound(bed)
        await bed.m.claim(ep.uid, S2_CERT)
        with pytest.raises(PeerRejected, match="log at warning .*relay_log_level"):
            await bed.m.claim(ep.uid, S2_AGAIN)
        assert bed.probes.accepted_asked == [] and ep.key_generation == 1
    run(go)


def test_a_failed_endpoint_is_not_claimed_again(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        await bed.m.claim(ep.uid, S2_CERT)
        bed.m._set(ep, state=State.FAILED)
        with pytest.raises(PeerRejected, match="is failed, not active"):
            await bed.m.claim(ep.uid, S2_AGAIN)
    run(go)


@pytest.mark.parametrize("step, outcome", [
    ("start", "failed"),
    ("stop", systemd_error()),
    ("set_properties", systemd_error()),
])
def test_a_failed_rekey_is_refused_and_keeps_the_endpoint(tmp_path: Path, step: str,
                                                          outcome: object) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        await bed.m.claim(ep.uid, S2_CERT)
        bed.systemd.script.add(step, outcome)
        with pytest.raises(PeerRejected, match="could not re-key"):
            await bed.m.claim(ep.uid, S2_AGAIN)
        # Accounted for, no restart mark; the claim is still the first one's.
        bed.assert_holds(ep)
        assert bed.m._restarting == set()
        assert ep.claimed_by.startswith("192.168.150.2:40000")
        # The generation counts the key on disk: a claimant of the old one is told.
        assert ep.key_generation == 2
    run(go)


def test_rearm_counts_a_generation_and_forgets_the_claimant(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        await bed.m.claim(ep.uid, S2_CERT)
        await bed.m.rearm(ep.uid)
        assert ep.key_generation == 2 and ep.claimed_identity == ""
        assert any("key_generation" in c for _u, c in bed.listener.changes)
        assert (await bed.m.endpoint_state(ep.uid))["key_generation"] == 2
        doc = await bed.m.claim(ep.uid, OTHER)  # anyone may claim the new key
        assert doc["key_generation"] == 2
    run(go)


def test_a_repeated_claim_cut_short_finishes_the_restart(tmp_path: Path) -> None:
    """The peer port stops waiting (its timeout cancels the claim) while the relay
    restarts: the restart still completes under the lock, and the claimant's retry
    claims again."""
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        await bed.m.claim(ep.uid, S2_CERT)
        entered, go_on = asyncio.Event(), asyncio.Event()

        async def slow_start() -> str:
            entered.set()
            await go_on.wait()
            return "done"

        bed.systemd.script.add("start", slow_start)
        task = asyncio.ensure_future(bed.m.claim(ep.uid, S2_AGAIN))
        await entered.wait()
        task.cancel()
        await asyncio.sleep(0)
        assert not task.done()  # waits for the restart, not leaving the relay stopped
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert bed.systemd.units[ep.unit] == ("active", "running")
        assert bed.m._restarting == set() and ep.key_generation == 2
        assert ep.claimed_by.startswith("192.168.150.2:40000")  # not recorded: no answer went
        doc = await bed.m.claim(ep.uid, S2_AGAIN)
        assert doc["key_generation"] == 3 and doc["psk"] == bed.psk(ep)
        bed.assert_holds(ep)
    run(go)


# ------------------------------------------------------------------ the claimant's side


def test_outbound_records_the_generation_it_claimed(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        uid = new_uid()
        bed.peers.script.add("claim", PeerEndpoint(uid, (bed_listener(),), PSK, SUITES, 4))
        ep = await outbound(bed, uid)
        assert ep.key_generation == 4
        again = bed.restart()
        await again.m.adopt()
        assert again.m.endpoints[ep.key].key_generation == 4
    run(go)


def bed_listener():
    from scistreamd.model import parse_hostport
    return parse_hostport("192.168.150.2:6200", "listener")


def test_peer_check_fails_an_outbound_whose_peer_re_armed(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        eps = []
        for gen in (1, 1, 0, 1):
            uid = new_uid()
            bed.peers.script.add("claim",
                                 PeerEndpoint(uid, (bed_listener(),), PSK, SUITES, gen))
            eps.append(await outbound(bed, uid))
        same, rearmed, unknown_here, unknown_there = eps
        bed.peers.script.add("endpoint_state",
                             EndpointState(same.uid, "active", 1),
                             EndpointState(rearmed.uid, "active", 2),
                             EndpointState(unknown_here.uid, "active", 5),
                             EndpointState(unknown_there.uid, "active", 0))
        await bed.m.check_peers()
        assert rearmed.state is State.FAILED
        assert rearmed.detail.startswith(
            f"the peer re-armed tunnel {rearmed.uid}; make a new outbound request")
        # Equal, or a side that does not know its generation: nothing to tell.
        assert [e.state for e in (same, unknown_here, unknown_there)] == [State.ACTIVE] * 3
        # A failed endpoint is not checked again; a released peer is still told apart.
        bed.peers.script.add("endpoint_state", NotFound("gone"))
        await bed.m.check_peers()
        assert same.state is State.FAILED and "released tunnel" in same.detail
    run(go)


# ------------------------------------------------------------------ pure parts


def test_endpoint_records_key_generation_and_claimed_identity() -> None:
    ep = Endpoint.from_dict({"uid": new_uid(), "role": "inbound",
                             "listeners": ["127.0.0.1:6100"], "targets": ["10.0.0.1:7000"],
                             "num_conn": 1, "created_at": 1.0})
    assert ep.key_generation == 1 and ep.claimed_identity == ""  # a record of before
    assert "key_generation" not in ep.to_dict()  # still loads in an older daemon
    ep.key_generation, ep.claimed_identity = 7, "IP:192.168.150.2"
    back = Endpoint.from_dict(ep.to_dict())
    assert (back.key_generation, back.claimed_identity) == (7, "IP:192.168.150.2")
    out = Endpoint.from_dict(dict(ep.to_dict(), role="outbound", key_generation=0,
                                  claimed_identity=""))
    assert out.key_generation == 0 and "key_generation" not in out.to_dict()
    for bad in (-1, MAX_KEY_GENERATION + 1, True, "2", 1.5):
        with pytest.raises(InvalidArgument, match="key_generation"):
            Endpoint.from_dict(dict(ep.to_dict(), key_generation=bad))
    assert next_key_generation(1) == 2 and next_key_generation(MAX_KEY_GENERATION) == 1


def test_peer_documents_carry_the_generation() -> None:
    uid = new_uid()
    doc = PeerEndpoint(uid, (bed_listener(),), PSK, SUITES, 3).to_json()
    assert PeerEndpoint.from_json(doc).key_generation == 3
    del doc["key_generation"]  # a peer of an earlier version
    assert PeerEndpoint.from_json(doc).key_generation == 0
    state = EndpointState.from_json({"uid": uid, "state": "active", "key_generation": 9})
    assert state == EndpointState(uid, "active", 9)
    assert EndpointState.from_json({"uid": uid, "state": "active"}).key_generation == 0
    for bad in (-1, "1", None, 2**32, False):
        with pytest.raises(InvalidArgument, match="key_generation"):
            EndpointState.from_json({"uid": uid, "state": "active", "key_generation": bad})
        with pytest.raises(InvalidArgument, match="key_generation"):
            PeerEndpoint.from_json(dict(doc, key_generation=bad))


@pytest.mark.parametrize("line, ip", [
    ("LOG5[3]: Service [inbound-0] accepted connection from 192.168.150.2:45678",
     "192.168.150.2"),
    ("LOG5[0]: Service [x] accepted connection from [2001:db8::2]:4000", "2001:db8::2"),
    ("LOG5[0]: Service [x] accepted connection from 2001:db8::2:4000", "2001:db8::2"),
    ("LOG5[0]: Service [x] accepted connection from garbage", None),
    ("LOG5[0]: s_connect: connected 192.168.150.1:5300", None),
])
def test_accepted_peer_reads_stunnels_accept_line(line: str, ip: object) -> None:
    assert accepted_peer(line) == (ipaddress.ip_address(ip) if ip else None)


def test_role_defaults() -> None:
    from scistreamd.model import default_key_generation
    assert default_key_generation(Role.INBOUND) == 1
    assert default_key_generation(Role.OUTBOUND) == 0
