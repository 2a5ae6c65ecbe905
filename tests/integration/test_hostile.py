"""Hostile input on the real test bed (issue 5, item 5).

Property-based tests (hypothesis, derandomized: every run draws the same
examples) drive the real daemons: the D-Bus methods and properties through a
long-lived client inside server1/server2, and the TLS peer port of server1
from inside server2. After every example: the daemon is the same process
(no crash, no automatic restart), nothing a failing call touched was left
behind, and every answer was a success or a named error.

Then the peer port's limits: oversized and malformed bodies, slow clients
(slowloris, silent TCP, silent TLS), TLS garbage and a connection flood,
each while legitimate requests keep working. No timed assertions: waits are
bounded guards that fail with a message when they run out.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from scistreamd import ENDPOINT_IFACE, ENDPOINT_PATH_PREFIX, MANAGER_IFACE, MANAGER_PATH
from scistreamd.config import Config
from scistreamd.interface import ENDPOINT, MANAGER
from tests.integration.conftest import (
    DaemonWatch,
    DBusBatch,
    LineTool,
    SignalWatch,
    daemon_status,
    journal_cursor,
    journal_since,
    residue,
)

S1_IP = "192.168.150.1"
S2_IP = "192.168.150.2"
DEFAULTS = Config()
PEER_PORT = DEFAULTS.peer_port
LOW, HIGH = DEFAULTS.port_range
RANGE_SIZE = HIGH - LOW + 1
MAX_LIST = 1024
MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 64
PEER_TIMEOUT = DEFAULTS.peer_timeout
#: The host's own peer certificate: the peer port serves claims only to trusted peers.
PEER_CERT = ("--cert", "/etc/scistream/server.crt", "--key", "/etc/scistream/server.key")

INBOUND_SIG = MANAGER.methods["InboundRequest"].in_sig
OUTBOUND_SIG = MANAGER.methods["OutboundRequest"].in_sig
PROPS_IFACE = "org.freedesktop.DBus.Properties"
ERR = "org.scistream.Tunnel1.Error."
NAMED_ERRORS = {ERR + n for n in ("InvalidArgument", "NotFound", "AlreadyExists",
                                  "PortsExhausted", "PeerUnreachable", "PeerRejected",
                                  "RelayFailed", "AccessDenied", "WrongListener")}
BUS_ERR = "org.freedesktop.DBus.Error."
UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                       r"[0-9a-fA-F]{12}")
IP_CHARS = re.compile(r"[0-9A-Fa-f.:]+")
HEX64 = re.compile(r"[0-9a-f]{64}")

#: The Python type each D-Bus signature of the API comes back as (through hosttool's JSON).
_PY_TYPE = {"s": str, "u": int, "t": int, "q": int, "as": list, "(qq)": list}
#: Every property of the API, as interface.py describes it (the one description).
ENDPOINT_PROPS = {p.name: _PY_TYPE[p.sig] for p in ENDPOINT.properties.values()}
MANAGER_PROPS = {p.name: _PY_TYPE[p.sig] for p in MANAGER.properties.values()}

#: Sizes. Examples x batch = calls per test; a batch shares one residue check.
#: SCISTREAM_FUZZ_EXAMPLES overrides the count (fewer while developing, more for a soak).
EXAMPLES = int(os.environ.get("SCISTREAM_FUZZ_EXAMPLES", "25"))
BATCH = 8
FLOOD = 200

# No shrinking: examples run against live daemons whose state moves on, so a
# shrunk replay would test something else; the first failing batch is reported.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                phases=(Phase.explicit, Phase.generate), report_multiple_bugs=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much])
#: For examples that each start and stop relays on both hosts.
FUZZ_HEAVY = settings(FUZZ, max_examples=max(1, EXAMPLES // 2))


# --------------------------------------------------------------------------
# strategies

#: Anything a D-Bus string may hold (no NUL, no lone surrogates).
dtext = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                       blacklist_characters="\x00"), max_size=60)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)

EDGE_IPS = ["", "0.0.0.0", "::", "224.0.0.1", "ff02::1", "127.0.0.1", "::1", S1_IP, S2_IP,
            "255.255.255.255", "fe80::1%eth0", " 1.2.3.4", "1.2.3.4 ", "1.2.3.04", "1.2.3",
            "::ffff:192.168.150.1", "[::1]", "1.2.3.4:5", "localhost", "1" * 46,
            "١٢.٣.٤.٥", "a" * 5000, "1.2.3.4\n", "::ffff:1.2.3.4.5"]
ips = st.one_of(st.ip_addresses().map(str), st.sampled_from(EDGE_IPS),
                st.text(alphabet="0123456789abcdefABCDEF.:%[]/ ", max_size=48), dtext)

port_lists = st.one_of(
    st.lists(u16, max_size=4),
    st.lists(st.sampled_from([0, 1, 1023, 1024, LOW, 5300, 65535]), min_size=1, max_size=4),
    st.builds(lambda n, p: [p] * n, st.sampled_from([MAX_LIST, MAX_LIST + 1]),
              st.integers(1, 65535)),
)
num_conns = st.one_of(st.integers(0, 3), u32,
                      st.sampled_from([RANGE_SIZE - 1, RANGE_SIZE, RANGE_SIZE + 1, MAX_LIST,
                                       MAX_LIST + 1, 2**32 - 1]))


simple_variants = st.one_of(
    st.tuples(st.just("s"), dtext),
    st.tuples(st.just("i"), st.integers(-2**31, 2**31 - 1)),
    st.tuples(st.just("u"), u32),
    st.tuples(st.just("q"), u16),
    st.tuples(st.just("x"), st.integers(-2**63, 2**63 - 1)),
    st.tuples(st.just("t"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("b"), st.booleans()),
    st.tuples(st.just("d"), st.floats(allow_nan=False)),
    st.tuples(st.just("as"), st.lists(dtext, max_size=3)),
    st.tuples(st.just("aq"), st.lists(u16, max_size=3)),
    st.tuples(st.just("ay"), st.lists(st.integers(0, 255), max_size=8)),
).map(list)
variants = st.one_of(
    simple_variants,
    st.tuples(st.just("v"), simple_variants).map(list),
    st.tuples(st.just("a{sv}"), st.dictionaries(dtext, simple_variants, max_size=2)).map(list),
)


def options_strategy(extra: Dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    keys = st.one_of(st.sampled_from(["", "x", "peer", "trust_pem", "Peer", "peer "]), dtext)
    entries = [st.dictionaries(keys, variants, max_size=3)]
    for key, values in extra.items():
        entries.append(st.fixed_dictionaries({key: values}))
    return st.one_of(st.just({}), *entries)


# --------------------------------------------------------------------------
# checks

def named(out: dict, what: str, allow_bus: bool = False) -> None:
    """``out`` is a success, or a documented named error with a sane message."""
    assert "client_error" not in out, f"{what}: the test sent something D-Bus cannot carry: {out}"
    if "reply" in out:
        return
    name, msg = out["error"], out["message"]
    assert "dubstepdish" not in name and "Traceback" not in msg and "File \"" not in msg, (
        f"{what}: an unhandled exception reached the caller: {name}: {msg}")
    if allow_bus and name.startswith(BUS_ERR):
        return
    assert name in NAMED_ERRORS, f"{what}: not a named scistreamd error: {name}: {msg}"
    assert msg.strip(), f"{what}: {name} without a message"
    assert "\n" not in msg and len(msg) < 2000, f"{what}: message is not one readable line: {msg!r}"


def err(out: dict) -> str:
    return out.get("error", "") if "reply" not in out else ""


def valid_ip(value: str) -> bool:
    if not value or len(value) > 45 or not IP_CHARS.fullmatch(value):
        return False
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return False
    return not (addr.is_unspecified or addr.is_multicast)


def guarded_target(value: str) -> bool:
    """A valid target the default allowed_targets refuses: loopback or link-local
    (an IPv4-mapped IPv6 address counts as its IPv4 address)."""
    addr = ipaddress.ip_address(value)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback or addr.is_link_local


def valid_ports(ports: List[int]) -> bool:
    return 1 <= len(ports) <= MAX_LIST and all(1 <= p <= 65535 for p in ports)


def is_uid(value: str) -> bool:
    return len(value) == 36 and bool(UUID_TEXT.fullmatch(value))


@dataclass
class Target:
    """The inbound endpoint on server1 the fuzzers aim at."""

    uid: str
    path: str
    listeners: List[str]
    residue1: List[str]


@pytest.fixture(scope="module")
def target(hosts, bus1):
    s1, s2 = hosts
    out = bus1.call("InboundRequest", INBOUND_SIG, [S1_IP, [5300], 1, {}])
    assert "reply" in out, out
    uid, path, listeners = out["reply"]
    assert residue(s2) == [], "server2 is not empty"
    yield Target(uid, path, listeners, residue(s1))
    bus1.call("Release", "s", [uid])


@pytest.fixture
def watch(hosts):
    """Both daemons, watched from the start of a test to its end."""
    w = [DaemonWatch(h) for h in hosts]
    yield w
    for x in w:
        x.check()


def settled(hosts, bus1, bus2, target: Target, watch) -> None:
    """After an example: same daemons, only the target endpoint exists anywhere."""
    s1, s2 = hosts
    for w in watch:
        w.check(journal=False)
    eps1 = bus1.call("ListEndpoints")
    eps2 = bus2.call("ListEndpoints")
    assert [e[0] for e in eps1["reply"][0]] == [target.uid], f"server1 endpoints: {eps1}"
    assert eps2 == {"reply": [[]]}, f"server2 endpoints: {eps2}"
    assert residue(s1) == target.residue1, "a call left something behind on server1"
    assert residue(s2) == [], "a call left something behind on server2"


# --------------------------------------------------------------------------
# D-Bus: InboundRequest

inbound_calls = st.tuples(ips, port_lists, num_conns, options_strategy({}))


@FUZZ
@given(batch=st.lists(inbound_calls, min_size=1, max_size=BATCH))
def test_inbound_request_with_arbitrary_arguments(hosts, bus1, bus2, target, watch, batch):
    free = RANGE_SIZE - len(target.listeners)
    for ip, ports, n, opts in batch:
        out = bus1.call("InboundRequest", INBOUND_SIG, [ip, ports, n, opts])
        what = f"InboundRequest({ip!r:.80}, {len(ports)} ports, {n}, {opts!r:.200})"
        named(out, what)
        valid = valid_ip(ip) and valid_ports(ports) and 1 <= n <= RANGE_SIZE and opts == {}
        if not valid:
            assert err(out) == ERR + "InvalidArgument", f"{what}: {out}"
            continue
        if guarded_target(ip):
            assert err(out) == ERR + "AccessDenied", f"{what}: {out}"
            continue
        if n > free:
            assert err(out) == ERR + "PortsExhausted", f"{what}: {out}"
            continue
        assert "reply" in out, f"{what}: a valid request failed: {out}"
        uid, path, listeners = out["reply"]
        assert is_uid(uid) and path.startswith(ENDPOINT_PATH_PREFIX + "/"), out
        held = [int(x.rsplit(":", 1)[1]) for x in listeners]
        assert len(set(held)) == n and all(LOW <= p <= HIGH for p in held), listeners
        assert not set(listeners) & set(target.listeners), "ports given out twice"
        assert all(x.startswith(S1_IP + ":") for x in listeners), listeners
        assert bus1.call("Release", "s", [uid]) == {"reply": []}
    settled(hosts, bus1, bus2, target, watch)


# --------------------------------------------------------------------------
# D-Bus: OutboundRequest (server2 claims from server1's peer port)

SAFE_HOSTS = [S1_IP, S2_IP, "127.0.0.1", "10.0.0.1", "0.0.0.0", "224.0.0.1", "256.1.1.1",
              "localhost", ""]


def hostports(target_listeners: List[str]) -> st.SearchStrategy:
    # Hosts the daemon may dial: the two test bed hosts, loopback, or ones that fail
    # at once (no route inside the namespaces). Never another 192.168.150.x (ARP waits).
    return st.one_of(
        st.sampled_from(target_listeners),
        st.builds(lambda h, p: f"{h}:{p}", st.sampled_from(SAFE_HOSTS),
                  st.one_of(st.integers(0, 70000), st.sampled_from([PEER_PORT, LOW, 22]))),
        st.builds(lambda h, p: f"[{h}]:{p}", st.sampled_from(["::1", "::", "2001:db8::1",
                                                              "1.2.3.4", "zz"]),
                  st.integers(0, 65535)),
        dtext,
    )


@st.composite
def outbound_calls(draw, target: Target):
    u = target.uid
    uid = draw(st.one_of(st.just(u), st.just(u.upper()), st.uuids().map(str), dtext,
                         st.sampled_from(["", u + " ", u[:-1] + "g", u.replace("-", ""),
                                          "{" + u + "}"])))
    remote = draw(st.one_of(st.lists(hostports(target.listeners), max_size=3),
                            st.just(list(target.listeners))))
    local = draw(st.one_of(st.just([]), st.lists(st.sampled_from([0, 1, 1023, 22, PEER_PORT,
                                                                  LOW, 6000, 65535]),
                                                 max_size=3),
                           st.lists(u16, max_size=3)))
    n = draw(st.one_of(st.integers(0, 3), st.sampled_from([1024, 1025, 2**32 - 1]), u32))
    ca = "-----BEGIN CERTIFICATE-----\n" + "A" * 64 + "\n-----END CERTIFICATE-----\n"
    opts = draw(options_strategy({
        "peer": st.tuples(st.just("s"), hostports([f"{S1_IP}:{PEER_PORT}"])).map(list),
        "trust_pem": st.tuples(st.just("s"), st.one_of(dtext, st.just(ca), st.just(""),
                                                       st.just("x" * (1024 * 1024 + 1)))
                               ).map(list),
    }))
    return uid, remote, local, n, opts


@FUZZ_HEAVY
@given(data=st.data())
def test_outbound_request_with_arbitrary_arguments(hosts, bus1, bus2, target, watch, data):
    # A fresh key each example, so a correct claim among the hostile ones can succeed.
    assert bus1.call("RearmEndpoint", "s", [target.uid]) == {"reply": []}
    batch = data.draw(st.lists(outbound_calls(target), min_size=1, max_size=BATCH))
    for uid, remote, local, n, opts in batch:
        out = bus2.call("OutboundRequest", OUTBOUND_SIG, [uid, remote, local, n, opts])
        shown = {k: (v[0], str(v[1])[:40]) for k, v in opts.items()}
        what = f"OutboundRequest({uid!r:.60}, {remote!r:.120}, {local}, {n}, {shown})"
        named(out, what)
        if not is_uid(uid):
            assert err(out) == ERR + "InvalidArgument", f"{what}: {out}"
        if "reply" in out:
            assert uid.lower() == target.uid and remote and set(remote) <= set(target.listeners), (
                f"{what} succeeded: {out}")
            path, listeners = out["reply"]
            assert len(listeners) == n and all(x.startswith(S2_IP + ":") for x in listeners)
            assert bus2.call("Release", "s", [uid]) == {"reply": []}
    # Whatever came before, the daemons still serve the real thing.
    assert bus1.call("RearmEndpoint", "s", [target.uid]) == {"reply": []}
    out = bus2.call("OutboundRequest", OUTBOUND_SIG, [target.uid, target.listeners[:1], [], 1, {}])
    assert "reply" in out, f"a correct outbound request failed after the hostile ones: {out}"
    assert bus2.call("Release", "s", [target.uid]) == {"reply": []}
    settled(hosts, bus1, bus2, target, watch)


# --------------------------------------------------------------------------
# D-Bus: Release, RearmEndpoint, endpoint methods

object_paths = st.one_of(
    st.from_regex(r"/[A-Za-z0-9_]{1,12}(/[A-Za-z0-9_]{1,12}){0,3}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9_]{1,40}", fullmatch=True).map(
        lambda s: f"{ENDPOINT_PATH_PREFIX}/{s}"),
    st.just(MANAGER_PATH), st.just(ENDPOINT_PATH_PREFIX),
)


@st.composite
def uid_calls(draw, target: Target):
    u = target.uid
    method = draw(st.sampled_from(["Release", "RearmEndpoint", "EpRelease", "EpRearm"]))
    if method.startswith("Ep"):
        path = draw(st.one_of(object_paths, st.just(target.path)))
        if method == "EpRelease" and path == target.path:
            path = target.path + "x"
        return method, path
    value = draw(st.one_of(st.uuids().map(str), st.uuids().map(lambda x: str(x).upper()),
                           dtext, st.just(u), st.just(u.upper()),
                           st.sampled_from(["", u[:35], u + "0", u.replace("-", "_"),
                                            "../" + u, u[:8] + "-" * 28])))
    if method == "Release" and value.lower() == u:
        value = str(uuid.uuid4())  # the target stays; releasing it is tested elsewhere
    return method, value


@FUZZ
@given(data=st.data())
def test_release_and_rearm_with_arbitrary_uids_and_paths(hosts, bus1, bus2, target, watch,
                                                         data):
    batch = data.draw(st.lists(uid_calls(target), min_size=1, max_size=BATCH))
    for method, value in batch:
        if method.startswith("Ep"):
            out = bus1.call(method[2:], path=value, iface=ENDPOINT_IFACE)
            what = f"Endpoint.{method[2:]} on {value}"
            named(out, what, allow_bus=True)
            if value == target.path:
                assert out == {"reply": []}, f"{what}: {out}"
            else:
                assert err(out) in (BUS_ERR + "UnknownMethod", BUS_ERR + "UnknownObject"), (
                    f"{what}: {out}")
            continue
        out = bus1.call(method, "s", [value])
        what = f"{method}({value!r:.80})"
        named(out, what)
        if not is_uid(value):
            assert err(out) == ERR + "InvalidArgument", f"{what}: {out}"
        elif value.lower() == target.uid:
            assert out == {"reply": []}, f"{what}: {out}"
        else:
            assert err(out) == ERR + "NotFound", f"{what}: {out}"
    settled(hosts, bus1, bus2, target, watch)


def test_quick_rearms_keep_the_relay_and_never_report_a_failure(hosts, bus1, bus2, target,
                                                                watch):
    """Re-arm hammered: every call succeeds, the relay stays, no false "failed" on D-Bus.

    Found by the fuzzer above: the 5th restart within 10 s hit systemd's start
    limit and killed the tunnel, and the unit monitor reported each deliberate
    restart as a relay failure (State=failed, an error in the journal).
    """
    s1 = hosts[0]
    out = bus1.call("InboundRequest", INBOUND_SIG, [S1_IP, [5301], 1, {}])
    uid, path, listeners = out["reply"]
    # The relay unit is named by an opaque id: the endpoint's Unit property.
    unit = bus1.call("Get", "ss", [ENDPOINT_IFACE, "Unit"], path=path,
                     iface="org.freedesktop.DBus.Properties")["reply"][0][1]  # (sig, value)
    signals = SignalWatch(s1, path, until="member:InterfacesRemoved", timeout=120)
    try:
        answers = [bus1.call("RearmEndpoint", "s", [uid]) for _ in range(8)]
        answers += bus1.calls([DBusBatch.request("RearmEndpoint", "s", [uid])] * 8)
        answers += [bus1.call("Rearm", path=path, iface=ENDPOINT_IFACE) for _ in range(4)]
        assert answers == [{"reply": []}] * 20, [a for a in answers if "reply" not in a]
        listed = {e[0]: e[2] for e in bus1.call("ListEndpoints")["reply"][0]}
        assert listed[uid] == "active", listed
        shown = s1.run(["systemctl", "show", unit, "-p", "ActiveState,NRestarts"]).stdout.split()
        assert sorted(shown) == ["ActiveState=active", "NRestarts=0"], shown
        assert bus1.call("Release", "s", [uid]) == {"reply": []}
        events = signals.events()
    finally:
        signals.close()
    states = [e["body"][1]["State"] for e in events
              if e["member"] == "PropertiesChanged" and "State" in e["body"][1]]
    assert states == ["releasing"], (
        f"State went {states} through 20 re-arms and a release: a deliberate restart was "
        "reported as a failure, or a stale refresh overwrote 'releasing'")
    failures = journal_since(s1, watch[0].cursor, "SYSLOG_IDENTIFIER=scistreamd",
                             f"SCISTREAM_UID={uid}", "-p", "err")
    assert failures.strip() == "", f"errors logged for re-arms:\n{failures}"
    settled(hosts, bus1, bus2, target, watch)


# --------------------------------------------------------------------------
# D-Bus: properties and calls with the wrong signature

WRONG_SIGNATURES = {
    "": st.just([]),
    "s": st.tuples(dtext),
    "u": st.tuples(u32),
    "as": st.tuples(st.lists(dtext, max_size=3)),
    "saq": st.tuples(dtext, st.lists(u16, max_size=2)),
    "saqu": st.tuples(dtext, st.lists(u16, max_size=2), u32),
    "saqua{ss}": st.tuples(dtext, st.lists(u16, max_size=2), u32,
                           st.dictionaries(dtext, dtext, max_size=2)),
    "sasaqu": st.tuples(dtext, st.lists(dtext, max_size=2), st.lists(u16, max_size=2), u32),
    "sasaqua{sv}x": st.tuples(dtext, st.lists(dtext, max_size=2), st.lists(u16, max_size=2),
                              u32, st.just({}), st.integers(-5, 5)),
    "v": st.tuples(variants),
    "a{sv}": st.tuples(st.dictionaries(dtext, variants, max_size=2)),
    "ss": st.tuples(dtext, dtext),
}
RIGHT_SIGNATURE = {("Manager", "InboundRequest"): INBOUND_SIG,
                   ("Manager", "OutboundRequest"): OUTBOUND_SIG,
                   ("Manager", "Release"): "s", ("Manager", "RearmEndpoint"): "s",
                   ("Manager", "ReleaseAll"): "", ("Manager", "ListEndpoints"): "",
                   ("Endpoint", "Release"): "", ("Endpoint", "Rearm"): ""}


@st.composite
def property_calls(draw, target: Target):
    kind = draw(st.sampled_from(["Get", "GetAll", "Set", "wrong-signature", "unknown-member"]))
    path = draw(st.one_of(st.just(target.path), st.just(MANAGER_PATH), object_paths))
    iface = draw(st.one_of(st.sampled_from([ENDPOINT_IFACE, MANAGER_IFACE, PROPS_IFACE,
                                            "org.freedesktop.DBus.Peer", ""]), dtext))
    prop = draw(st.one_of(st.sampled_from(sorted(ENDPOINT_PROPS) + sorted(MANAGER_PROPS)),
                          dtext))
    if kind == "Get":
        return dict(method="Get", sig="ss", body=[iface, prop], path=path, iface=PROPS_IFACE)
    if kind == "GetAll":
        return dict(method="GetAll", sig="s", body=[iface], path=path, iface=PROPS_IFACE)
    if kind == "Set":
        return dict(method="Set", sig="ssv", body=[iface, prop, draw(variants)], path=path,
                    iface=PROPS_IFACE)
    if kind == "unknown-member":
        member = draw(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,30}", fullmatch=True))
        sig = draw(st.sampled_from(sorted(WRONG_SIGNATURES)))
        which = draw(st.sampled_from([MANAGER_IFACE, ENDPOINT_IFACE]))
        if which.rsplit(".", 1)[1] in ("Manager", "Endpoint") and member in {
                m for (_, m) in RIGHT_SIGNATURE}:
            member += "X"
        return dict(method=member, sig=sig, body=list(draw(WRONG_SIGNATURES[sig])),
                    path=path, iface=which)
    (obj, member) = draw(st.sampled_from(sorted(RIGHT_SIGNATURE)))
    sig = draw(st.sampled_from(sorted(s for s in WRONG_SIGNATURES
                                      if s != RIGHT_SIGNATURE[(obj, member)])))
    return dict(method=member, sig=sig, body=list(draw(WRONG_SIGNATURES[sig])),
                path=MANAGER_PATH if obj == "Manager" else target.path,
                iface=MANAGER_IFACE if obj == "Manager" else ENDPOINT_IFACE)


def _expect_property(call: dict, out: dict, target: Target) -> None:
    what = f"{call['iface']}.{call['method']}{tuple(call['body'])!r:.160} on {call['path']}"
    named(out, what, allow_bus=True)
    iface_arg = call["body"][0] if call["body"] else None
    own = {target.path: (ENDPOINT_IFACE, ENDPOINT_PROPS), MANAGER_PATH: (MANAGER_IFACE,
                                                                         MANAGER_PROPS)}
    if call["iface"] != PROPS_IFACE:
        assert err(out) == BUS_ERR + "UnknownMethod", f"{what}: {out}"
        return
    known = own.get(call["path"])
    ok_iface = known is not None and iface_arg == known[0]
    if call["method"] == "GetAll":
        if ok_iface:
            assert "reply" in out and set(out["reply"][0]) == set(known[1]), f"{what}: {out}"
        elif known and iface_arg in (PROPS_IFACE, "org.freedesktop.DBus.Peer"):
            assert out == {"reply": [{}]}, f"{what}: {out}"
        else:
            assert err(out).startswith(BUS_ERR), f"{what}: {out}"
        return
    prop = call["body"][1]
    if call["method"] == "Get" and ok_iface and prop in known[1]:
        assert "reply" in out, f"{what}: {out}"
        sig, value = out["reply"][0]
        assert isinstance(value, known[1][prop]), f"{what}: {out}"
        if prop == "Uid":
            assert value == target.uid
        if prop == "Listeners":
            assert value == target.listeners
        return
    # Everything is read-only; unknown names are unknown.
    assert err(out).startswith(BUS_ERR), f"{what}: {out}"


@FUZZ
@given(data=st.data())
def test_properties_unknown_members_and_wrong_signatures(hosts, bus1, bus2, target, watch,
                                                         data):
    batch = data.draw(st.lists(property_calls(target), min_size=1, max_size=BATCH))
    for call in batch:
        out = bus1.ask(call)
        _expect_property(call, out, target)
    settled(hosts, bus1, bus2, target, watch)


def test_many_hostile_calls_at_once(hosts, bus1, bus2, target, watch):
    """Hostile calls in flight together on one connection, then everything is as before.

    120 at once: the system bus allows a connection 128 pending calls.
    """
    calls = []
    for i in range(40):
        calls.append(DBusBatch.request("InboundRequest", INBOUND_SIG,
                                       ["x" * i, [i], i, {}] if i % 3 else
                                       [S1_IP, [], 1, {"k": ["s", "v" * i]}]))
        calls.append(DBusBatch.request("Release", "s", [str(uuid.UUID(int=i))]))
        calls.append(DBusBatch.request("OutboundRequest", OUTBOUND_SIG,
                                       [str(uuid.UUID(int=i)), [f"127.0.0.1:{1 + i}"], [], 1,
                                        {}]))
    outs = bus1.calls(calls)
    for c, out in zip(calls, outs):
        named(out, f"{c['method']}{c['body']!r:.100}")
        assert "reply" not in out, f"{c['method']}{c['body']!r:.100} succeeded: {out}"
    settled(hosts, bus1, bus2, target, watch)


# --------------------------------------------------------------------------
# the peer port: arbitrary requests

ALLOWED_STATUS = {200, 400, 404, 405, 408, 409, 411, 413, 414, 431, 505}
# Printable text without control characters: the request's framing stays intact.
htext = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | dtext,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(dtext, inner, max_size=4),
    max_leaves=12)
MALFORMED_BODIES = ["{", "}", "[]", "null", "\"x\"", "1", "{\"listeners\": 5}",
                    "{\"listeners\": [\"1.2.3.4\"]}", "{\"listeners\": [], \"extra\": 1}",
                    "{'a': 1}", "{\"a\":1,}", "[" * 5000 + "]" * 5000, "{\"a\":" * 3000,
                    "\ufeff{}", "NaN", "{\"listeners\": [\"" + "9" * 100 + "\"]}"]


# Framing headers are set by the cases that test them, not at random: a random
# Content-Length larger than the body would only make the server wait for it.
header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True).filter(
    lambda h: h.lower() not in ("content-length", "transfer-encoding", "expect"))


@st.composite
def peer_requests(draw, target: Target):
    u = target.uid
    kind = draw(st.sampled_from(["http"] * 6 + ["raw"]))
    if kind == "raw":
        # Ends like a request head, so the server never waits for more.
        raw = draw(st.binary(min_size=1, max_size=300)) + b"\r\n\r\n"
        return {"raw_b64": base64.b64encode(raw).decode(), "kind": "raw"}
    method = draw(st.one_of(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS",
                                             "PATCH", "TRACE", "CONNECT", "BREW", "get",
                                             "post"]), htext))
    path = draw(st.one_of(
        st.sampled_from(["/v1/health", f"/v1/endpoints/{u}/claim", f"/v1/endpoints/{u}",
                         f"/v1/endpoints/{u.upper()}/claim", "/v1/health?x=1", "/v1/health/",
                         "/v1//health", "/v1/endpoints//claim", "/v1/endpoints/../health",
                         "*", "", "http://x/v1/health", "/" + "a" * 70000,
                         f"/v1/endpoints/{u}/claim/x", "/v2/health", "/V1/HEALTH"]),
        htext.map(lambda s: "/" + s),
        st.builds(lambda x: f"/v1/endpoints/{x}/claim", st.one_of(st.uuids().map(str), htext)),
        st.builds(lambda x: f"/v1/endpoints/{x}", st.one_of(st.uuids().map(str), htext)),
    ))
    headers = draw(st.one_of(
        st.just([]),
        st.lists(st.tuples(header_names, htext), max_size=4),
        st.sampled_from([[["Transfer-Encoding", "chunked"]], [["Expect", "100-continue"]],
                         [["Content-Type", "text/plain"]], [["Connection", "keep-alive"]],
                         [["X-" + str(i), "v"] for i in range(120)]]),
    ))
    req: Dict[str, Any] = {"method": method, "path": path, "headers": headers, "kind": "http"}
    body = draw(st.one_of(st.just(""), st.just("{}"), json_values.map(json.dumps),
                          st.sampled_from(MALFORMED_BODIES), htext,
                          st.just({"listeners": target.listeners}).map(json.dumps),
                          st.binary(max_size=64).map(lambda b: b"\xff" + b)))
    if isinstance(body, bytes):
        req["body_b64"] = base64.b64encode(body).decode()
    else:
        req["body"] = body
    req["length"] = draw(st.one_of(st.just("auto"), st.just(None),
                                   st.sampled_from(["abc", "-1", "0", "99999999999", "1e3",
                                                    "0x10", "65537"])))
    return req


def _claim_doc_ok(doc: dict, target: Target) -> None:
    assert set(doc) == {"uid", "listeners", "psk", "cipher_suites"}, doc
    assert doc["uid"] == target.uid and doc["listeners"] == target.listeners, doc
    assert HEX64.fullmatch(doc["psk"]), "the key is not 64 hex characters"


def request_words(req: dict) -> int:
    """Words of the request line as http.server splits it (latin-1 text, any whitespace)."""
    line = f"{req['method']} {req['path']} HTTP/1.1".encode("utf-8", "surrogateescape")
    return len(line.decode("iso-8859-1").split())


def check_peer_answer(req: dict, out: dict, target: Target) -> None:
    what = f"{req.get('method', 'raw')!r:.40} {req.get('path', '')!r:.80}"
    if "closed" in out:
        # Bytes that are not an HTTP request at all may just get the connection closed;
        # a two-word request line is HTTP/0.9, answered without a status line.
        assert req["kind"] == "raw" or request_words(req) == 2, (
            f"{what}: connection closed without an answer: {out}")
        assert out["closed"] in ("EOF", "RESET", "BadStatusLine", "TLS"), f"{what}: {out}"
        return
    status = out["status"]
    assert status in ALLOWED_STATUS, f"{what}: HTTP {status}: {out['body'][:300]}"
    assert "Traceback" not in out["body"] and "File \"" not in out["body"], out["body"]
    if req.get("method") == "HEAD":
        return
    try:
        doc = json.loads(out["body"])
    except ValueError:
        raise AssertionError(f"{what}: HTTP {status} body is not JSON: {out['body'][:200]!r}"
                             ) from None
    assert isinstance(doc, dict), doc
    if status != 200:
        assert isinstance(doc.get("error"), str) and isinstance(doc.get("message"), str), doc
        assert doc["error"] not in ("Failed", "Busy"), f"{what}: HTTP {status}: {doc}"
        return
    path = req["path"]
    if path.startswith("//"):  # http.server collapses leading slashes
        path = "/" + path.lstrip("/")
    parts = path.split("?", 1)[0].split("/")
    if parts == ["", "v1", "health"]:
        assert req["method"] == "GET" and "version" in doc, doc
    else:
        assert parts[:3] == ["", "v1", "endpoints"] and parts[3].lower() == target.uid, (
            f"{what}: HTTP 200 for a path that names no endpoint of ours: {doc}")
        if len(parts) == 5:
            assert req["method"] == "POST", doc
            _claim_doc_ok(doc, target)
        else:
            assert req["method"] == "GET" and doc == {"uid": target.uid, "state": "active"}, doc


@pytest.fixture(scope="module")
def peer_client(hosts):
    c = LineTool(hosts[1], "peerhttp", S1_IP, str(PEER_PORT), *PEER_CERT)
    yield c
    c.close()


def peer_ask(client: LineTool, req: dict) -> dict:
    return client.ask({k: v for k, v in req.items() if k != "kind"})


@FUZZ
@given(data=st.data())
def test_peer_port_with_arbitrary_requests(hosts, bus1, bus2, target, watch, peer_client, data):
    batch = data.draw(st.lists(peer_requests(target), min_size=1, max_size=BATCH))
    for req in batch:
        check_peer_answer(req, peer_ask(peer_client, req), target)
    health = peer_ask(peer_client, {"method": "GET", "path": "/v1/health", "length": None})
    assert health["status"] == 200, health
    settled(hosts, bus1, bus2, target, watch)


# --------------------------------------------------------------------------
# the peer port: size limits and malformed bodies

def _claim_req(uid: str, body: str, **kw) -> dict:
    return {"method": "POST", "path": f"/v1/endpoints/{uid}/claim", "body": body, **kw}


def test_peer_port_body_limits_and_malformed_json(hosts, target, watch, peer_client):
    other = str(uuid.uuid4())
    pad_to = lambda n: "{}" + " " * (n - 2)  # noqa: E731 (valid JSON of exactly n bytes)
    cases = [
        # (request, status, error name)
        (_claim_req(other, pad_to(MAX_BODY)), 404, "NotFound"),          # at the limit: read
        (_claim_req(other, pad_to(MAX_BODY + 1)), 413, "PayloadTooLarge"),  # one over: refused
        (_claim_req(other, "x" * (4 * MAX_BODY)), 413, "PayloadTooLarge"),  # sent in full
        (_claim_req(other, "", length=str(10**9)), 413, "PayloadTooLarge"),  # only announced
        (_claim_req(other, "{}", length="1e3"), 400, "InvalidArgument"),
        (_claim_req(other, "{}", length=None), 411, "LengthRequired"),
        (_claim_req(other, "{}", headers=[["Transfer-Encoding", "chunked"]]), 411,
         "LengthRequired"),
        (_claim_req(other, "{}", headers=[["Content-Length", "2"]]), 400, "InvalidArgument"),
        (_claim_req(other, "{}", headers=[["Expect", "100-continue"]],
                    length=str(MAX_BODY + 1)), 413, "PayloadTooLarge"),
    ]
    cases += [(_claim_req(other, b), 400, "InvalidArgument") for b in MALFORMED_BODIES]
    cases += [({"method": "POST", "path": f"/v1/endpoints/{other}/claim",
                "body_b64": base64.b64encode(b"{\"a\": \"\xff\xfe\"}").decode()}, 400,
               "InvalidArgument")]
    for req, status, name in cases:
        out = peer_client.ask(req)
        shown = {k: (v[:60] + "...") if isinstance(v, str) and len(v) > 60 else v
                 for k, v in req.items()}
        assert out.get("status") == status, f"{shown}: {out}"
        doc = json.loads(out["body"])
        assert doc["error"] == name and doc["message"], f"{shown}: {doc}"
    ok = peer_client.ask({"method": "GET", "path": "/v1/health", "length": None})
    assert ok["status"] == 200


# --------------------------------------------------------------------------
# the peer port: slow clients, garbage, floods

def established_peer_connections(host) -> int:
    out = host.run(["ss", "-Htn", "state", "established", f"( sport = :{PEER_PORT} )"]).stdout
    return len([x for x in out.splitlines() if x.strip()])


def test_slow_clients_do_not_block_others_and_are_cut_off(hosts, bus1, bus2, target, watch):
    s1, s2 = hosts
    modes = {"tls-trickle": 6, "tcp-trickle": 4, "tcp-silent": 6, "tls-silent": 6, "garbage": 4}
    args = []
    for mode, n in modes.items():
        args += [f"--{mode}", str(n)]
    # The guard is far beyond the server's limit (3 x peer_timeout per connection).
    guard = 3 * PEER_TIMEOUT + 120
    slow = LineTool(s2, "peerslow", S1_IP, str(PEER_PORT), *args, "--guard", str(guard),
                    timeout=guard + 60)
    try:
        # Meanwhile, from other connections: the legit peer-to-peer path works.
        legit = LineTool(s2, "peerhttp", S1_IP, str(PEER_PORT), *PEER_CERT)
        try:
            health = legit.ask({"method": "GET", "path": "/v1/health", "length": None})
        finally:
            legit.close()
        assert health["status"] == 200, health
        inbound = bus1.call("InboundRequest", INBOUND_SIG, [S1_IP, [5301], 1, {}])
        uid, _, listeners = inbound["reply"]
        out = bus2.call("OutboundRequest", OUTBOUND_SIG, [uid, listeners, [], 1, {}])
        assert "reply" in out, f"a legit claim failed while slow clients were connected: {out}"
        assert bus1.call("ListEndpoints")["reply"][0], "D-Bus API unresponsive"
        # The slow clients were still there while all that happened.
        held = established_peer_connections(s1)
        assert held >= modes["tls-trickle"], (
            f"only {held} connections to the peer port remain: the slow clients ended before "
            "the legit requests were done, so this run proves nothing about blocking")
        for bus in (bus2, bus1):
            assert bus.call("Release", "s", [uid]) == {"reply": []}

        ends = [slow.read() for _ in range(sum(modes.values()) + 1)]
    finally:
        slow.close()
    assert ends[-1] == {"done": sum(modes.values())}, ends[-1]
    by_mode: Dict[str, List[str]] = {}
    for e in ends[:-1]:
        by_mode.setdefault(e["mode"], []).append(e["ended"])
    assert {m: sorted(set(v)) for m, v in by_mode.items() if set(v) - {"closed", "reset"}} == {}, (
        f"some slow clients were never cut off by the server: {by_mode}")
    assert sum(len(v) for v in by_mode.values()) == sum(modes.values())
    # The trickling ones kept sending until the server cut them: its time limit, not a
    # read timeout, ended them (each got more than one byte in).
    trickled = [e["sent"] for e in ends[:-1] if e["mode"] == "tls_trickle"]
    assert all(n > 1 for n in trickled), trickled
    cut = journal_since(s1, watch[0].cursor, "-u", "scistreamd.service")
    assert "no complete exchange within" in cut, "the server did not log cutting slow clients"
    settled(hosts, bus1, bus2, target, watch)


def test_connection_flood_is_bounded_and_dbus_stays_responsive(hosts, bus1, bus2, target,
                                                               watch):
    s1, s2 = hosts
    pid = daemon_status(s1)["MainPID"]

    def threads() -> int:
        status = s1.run(["cat", f"/proc/{pid}/status"]).stdout
        return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))

    base_threads = threads()
    cursor = journal_cursor(s1)
    flood = LineTool(s2, "flood", S1_IP, str(PEER_PORT), str(FLOOD), "--guard", "60",
                     ready=False)
    try:
        opened = flood.read()
        assert opened["connected"] == FLOOD, f"could not open the flood: {opened}"
        # During the flood: the bus API answers, the daemon stays itself.
        listed = bus1.call("ListEndpoints")
        assert [e[0] for e in listed["reply"][0]] == [target.uid], listed
        for w in watch:
            w.check(journal=False)
        # Once the accept queue is drained, at most max_connections are being served.
        for _ in range(600):
            listen = s1.run(["ss", "-Hltn", f"( sport = :{PEER_PORT} )"]).stdout.split()
            if listen and listen[1] == "0":
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the peer port's accept queue never drained: {listen}")
        held = established_peer_connections(s1)
        during = threads()
        refused = ""
        for _ in range(100):
            refused = journal_since(s1, cursor, "-u", "scistreamd.service")
            if "max_connections" in refused:
                break
            time.sleep(0.1)
        flood.send("release")
        closed = flood.read()
    finally:
        flood.close()
    assert held <= MAX_CONNECTIONS, f"{held} peer connections served at once"
    assert during <= base_threads + MAX_CONNECTIONS + 2, (
        f"the daemon ran {during} threads during the flood ({base_threads} before)")
    assert "max_connections" in refused, "the daemon never refused a connection of the flood"
    assert closed["closed_by_server"] + closed["open"] == FLOOD, closed

    # Afterwards: served again, and the threads are gone.
    client = LineTool(s2, "peerhttp", S1_IP, str(PEER_PORT), *PEER_CERT)
    try:
        answer: Optional[dict] = None
        for _ in range(100):
            answer = client.ask({"method": "GET", "path": "/v1/health", "length": None})
            if answer.get("status") == 200:
                break
            time.sleep(0.2)
    finally:
        client.close()
    assert answer and answer.get("status") == 200, f"health after the flood: {answer}"
    for _ in range(200):
        if threads() <= base_threads:
            break
        time.sleep(0.1)
    assert threads() <= base_threads, "the daemon kept threads of the flood"
    settled(hosts, bus1, bus2, target, watch)
