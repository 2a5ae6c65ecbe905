"""Counters (traffic.py), the endpoint JSON (endpoint_json.py) and the peer's
target health fields (peerwire.py): pure parts, no bus, no systemd."""

from __future__ import annotations

import dataclasses

import pytest

from scistreamd.endpoint_json import endpoint_json, iso_time_us, snake_case
from scistreamd.interface import COUNTER_PROPERTIES, ENDPOINT
from scistreamd.peerwire import EndpointState, parse_target_health
from scistreamd.traffic import (
    ACCEPTED,
    CONNECT_FAILED,
    CONNECTED,
    ENDED,
    Counters,
    RelayEvent,
    Traffic,
    accounting_value,
    failure_text,
    parse_relay_line,
    sum_accounting,
)

UID = "f2b98f33-a829-4032-82e5-d5f67dd60dc5"

# Lines as stunnel 5.68 wrote them into the test bed's journal.
LINES = {
    "2026.12.03 10:39:50 LOG5[1]: Service [inbound-0] accepted connection from "
    "192.168.150.2:38350": RelayEvent(ACCEPTED, 1, "192.168.150.2:38350"),
    "2026.12.03 10:39:50 LOG3[1]: s_connect: connect 192.168.150.1:5301: Connection refused "
    "(111)": RelayEvent(CONNECT_FAILED, 1, "192.168.150.1:5301", "Connection refused (111)"),
    "LOG3[12]: connect_blocking: connect 192.168.150.1:5301: Connection refused (111)":
        RelayEvent(CONNECT_FAILED, 12, "192.168.150.1:5301", "Connection refused (111)"),
    "2026.12.03 10:39:50 LOG5[1]: Connection reset: 0 byte(s) sent to TLS, 0 byte(s) sent to "
    "socket": RelayEvent(ENDED, 1),
    "2026.12.03 10:38:53 LOG5[0]: Connection closed: 0 byte(s) sent to TLS, 1000000 byte(s) "
    "sent to socket": RelayEvent(ENDED, 0),
    "2026.12.03 10:38:53 LOG5[0]: s_connect: connected 192.168.150.1:5301":
        RelayEvent(CONNECTED, 0, "192.168.150.1:5301"),
}
NOT_EVENTS = [
    "2026.12.03 10:39:50 LOG3[1]: No more addresses to connect",
    "2026.12.03 10:38:50 LOG5[ui]: Configuration successful",
    "2026.12.03 10:38:53 LOG5[0]: Service [inbound-0] connected remote server from "
    "192.168.150.1:47368",
    '2026.12.03 10:38:53 LOG5[0]: Key configured for PSK identity "x"',
    "accepted connection from 1.2.3.4:5",  # no level/connection prefix
    "LOG5[x]: Connection closed: 1 byte(s)",
    "",
    "LOG5[1]: " + "Connection closed: " + "x" * 500,  # absurdly long
]


@pytest.mark.parametrize("line, event", sorted(LINES.items()))
def test_stunnel_lines_parse(line: str, event: RelayEvent) -> None:
    assert parse_relay_line(line) == event


@pytest.mark.parametrize("line", NOT_EVENTS)
def test_other_lines_are_not_events(line: str) -> None:
    assert parse_relay_line(line) is None


@pytest.mark.parametrize("value", [None, 7, b"LOG5[1]: Connection closed: ", ["x"]])
def test_non_text_is_not_an_event(value: object) -> None:
    assert parse_relay_line(value) is None


def test_failure_text_names_the_application() -> None:
    assert failure_text("192.168.150.1:5301", "Connection refused (111)", True) == (
        "the server application at 192.168.150.1:5301 refused the connection")
    assert "inbound relay" in failure_text("192.168.150.1:5100", "Connection refused (111)",
                                           False)
    assert "did not answer" in failure_text("10.0.0.1:1", "Connection timed out (110)", True)
    assert failure_text("10.0.0.1:1", "No route to host (113)", True) == (
        "connecting to server application at 10.0.0.1:1 failed: No route to host (113)")


def ev(kind: str, conn: int, addr: str = "", reason: str = "") -> RelayEvent:
    return RelayEvent(kind, conn, addr, reason)


def test_connections_pair_by_number_per_relay_process() -> None:
    c = Counters(inbound=True)
    assert c.on_event(ev(ACCEPTED, 0), "inv1", 1)
    assert c.on_event(ev(ACCEPTED, 1), "inv1", 2)
    assert not c.on_event(ev(ACCEPTED, 1), "inv1", 2)  # the same line twice
    assert (c.active, c.total) == (2, 2)
    assert c.on_event(ev(ENDED, 0), "inv1", 3)
    assert not c.on_event(ev(ENDED, 0), "inv1", 3)  # an end without its start
    assert not c.on_event(ev(ENDED, 9), "inv1", 3)
    assert (c.active, c.total) == (1, 2)
    # A new relay process: the old one's connection died with it; numbers restart.
    assert c.on_event(ev(ACCEPTED, 0), "inv2", 4)
    assert (c.active, c.total) == (1, 3)
    assert c.relay_stopped()
    assert (c.active, c.total) == (0, 3)
    assert not c.relay_stopped()


def test_target_health_fails_and_clears() -> None:
    c = Counters(inbound=True)
    assert c.reachable == "unknown"
    assert c.on_event(ev(CONNECT_FAILED, 0, "192.168.150.1:5301", "Connection refused (111)"),
                      "i", 1_700_000_000_000_000)
    t = c.snapshot(0.0)
    assert (t.target_reachable, t.target_failures, t.last_target_failure_at) == (
        "no", 1, 1_700_000_000_000_000)
    assert t.last_target_failure == (
        "the server application at 192.168.150.1:5301 refused the connection")
    assert c.on_event(ev(CONNECTED, 1, "192.168.150.1:5301"), "i", 2)
    t = c.snapshot(0.0)
    # Cleared; the history stays.
    assert (t.target_reachable, t.target_failures) == ("yes", 1)
    assert not c.on_event(ev(CONNECTED, 2, "192.168.150.1:5301"), "i", 3)


def test_peer_reported_health() -> None:
    c = Counters(inbound=False)
    assert c.set_failure(2, "refused", 5, "no")
    assert not c.set_failure(2, "refused", 5, "no")
    assert c.snapshot(0).target_failures == 2


def test_accounting_and_rates() -> None:
    c = Counters(inbound=True)
    assert c.snapshot(0.0).rate_in == 0.0
    assert not c.on_accounting(100.0, 0, 0, None)
    assert c.on_accounting(101.0, 1000, 500, 4096)
    assert c.on_accounting(102.0, 3000, 1500)
    t = c.snapshot(102.0)
    assert (t.bytes_in, t.bytes_out, t.memory_current) == (3000, 1500, 4096)
    assert (t.rate_in, t.rate_out) == (1500.0, 750.0)
    # Samples older than the window no longer count: idle is 0.
    assert c.snapshot(200.0).rate_in == 0.0


def test_systemd_no_data_counts_zero() -> None:
    assert accounting_value(2 ** 64 - 1) == 0
    assert accounting_value(-1) == accounting_value("7") == 0
    assert accounting_value(7) == 7
    assert sum_accounting(5, 2 ** 64 - 1, 3) == 8


def test_traffic_fields_are_the_counter_properties() -> None:
    fields = {f.name for f in dataclasses.fields(Traffic)}
    assert {f for _p, f in COUNTER_PROPERTIES} == fields
    for prop, field in COUNTER_PROPERTIES:
        assert prop in ENDPOINT.properties
        assert snake_case(prop) == field
    with pytest.raises(dataclasses.FrozenInstanceError):
        Traffic().bytes_in = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------
# endpoint_json


@pytest.mark.parametrize("name, key", [
    ("Uid", "uid"), ("StateDetail", "state_detail"), ("NumConn", "num_conn"),
    ("NRestarts", "n_restarts"), ("ClaimedBy", "claimed_by"), ("AllowedPeer", "allowed_peer"),
    ("MainPID", "main_pid"), ("LastTargetFailureAt", "last_target_failure_at"),
    ("KeyGeneration", "key_generation"), ("Owner", "owner"), ("BytesIn", "bytes_in"),
])
def test_snake_case(name: str, key: str) -> None:
    assert snake_case(name) == key


def test_iso_times() -> None:
    assert iso_time_us(1742300000123456) == "2025-03-18T12:13:20.123Z"
    assert iso_time_us(0) is None
    assert iso_time_us(True) is None and iso_time_us("1") is None
    assert iso_time_us(2 ** 63) is None  # out of range: never a traceback


class FakeVariant:
    def __init__(self, signature: str, value: object) -> None:
        self.signature = signature
        self.value = value


def test_endpoint_json() -> None:
    props = {"Uid": UID, "Role": "inbound", "State": "active", "StateDetail": "",
             "Listeners": ("192.168.150.1:5100",), "CreatedAt": 1742300000123456,
             "ClaimedAt": 0, "NRestarts": FakeVariant("u", 2), "LastTargetFailureAt": 0,
             "TargetReachable": "no", "Path": "/org/scistream/Tunnel1/endpoint/x",
             "FutureThingAt": 1742300000000000, "FutureMap": {"A": FakeVariant("s", "b")}}
    assert endpoint_json(props) == {
        "uid": UID, "role": "inbound", "state": "active", "state_detail": "",
        "listeners": ["192.168.150.1:5100"], "created_at": "2025-03-18T12:13:20.123Z",
        "claimed_at": None, "n_restarts": 2, "last_target_failure_at": None,
        "target_reachable": "no", "future_thing_at": "2025-03-18T12:13:20.000Z",
        "future_map": {"A": "b"}}


# ---------------------------------------------------------------------------
# the peer's answer


def test_state_answer_with_target_health_round_trips() -> None:
    health = {"target_reachable": "no", "target_failures": 3,
              "last_target_failure": "the server application at 10.0.0.1:5 refused the "
                                     "connection", "last_target_failure_at": 17}
    doc = EndpointState(UID, "active", health).to_json()
    assert EndpointState.from_json(doc) == EndpointState(UID, "active", health)
    # An older peer: no health fields, no failure.
    assert EndpointState.from_json({"uid": UID, "state": "active"}).health == {}


@pytest.mark.parametrize("bad", [
    {"target_reachable": "maybe"},
    {"target_reachable": "no", "target_failures": -1},
    {"target_reachable": "no", "target_failures": True},
    {"target_reachable": "no", "last_target_failure": 5},
    {"target_reachable": "no", "last_target_failure_at": "soon"},
    {"target_reachable": "no", "last_target_failure_at": 2 ** 70},
])
def test_malformed_target_health_is_ignored(bad: dict) -> None:
    assert parse_target_health(bad) == {}


def test_target_health_text_is_cleaned() -> None:
    got = parse_target_health({"target_reachable": "no",
                               "last_target_failure": "bad\x1b[31m\n" + "x" * 500})
    assert "\x1b" not in got["last_target_failure"] and "\n" not in got["last_target_failure"]
    assert len(got["last_target_failure"]) <= 200
