"""Tests of scistreamctl (scistreamd/ctl/).

Pure parts (argument parsing, formatting, error mapping) are tested directly.
End to end, the CLI talks to a real dbus-daemon on a private address, where a
small dbus-next *test peer* implements org.scistream.Tunnel1 and records every
call it gets: that checks the wire encoding of each call and the mapping of
every error reply to an exit code without mocking the bus.

The test peer's signatures come from the API's one description
(scistreamd/interface.py), as the daemon's do.
"""

import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import pytest
from dbus_next import DBusError, Variant
from dbus_next.aio import MessageBus
from dbus_next.constants import PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property, method

from scistreamd import (
    BUS_NAME,
    ENDPOINT_IFACE,
    ENDPOINT_PATH_PREFIX,
    MANAGER_IFACE,
    MANAGER_PATH,
    __version__,
    ctl,
)
from scistreamd.errors import BY_DBUS_NAME, InvalidArgument
from scistreamd.interface import ENDPOINT, MANAGER, signed, typed

REPO = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"
DBUS_DAEMON = shutil.which("dbus-daemon")

UID = "bd9f1a7e-04d7-11f0-b44c-946dae415862"
UID2 = "0b0e4a7c-7d0c-4f43-9d5e-0d6f3b9a1c22"
IN_PATH = f"{ENDPOINT_PATH_PREFIX}/_62d9f1a7e_2d04d7_2d11f0_2db44c_2d946dae415862_inbound"
OUT_PATH = f"{ENDPOINT_PATH_PREFIX}/_62d9f1a7e_2d04d7_2d11f0_2db44c_2d946dae415862_outbound"
CREATED_US = 1742300000123456

PEM = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBszCCAVmgAwIBAgIUQ2VydGlmaWNhdGVGb3JUZXN0aW5nMAoGCCqGSM49BAMC\n"
    "-----END CERTIFICATE-----\n"
)

GUIDE_INBOUND = shlex.split(
    "inbound-request --remote_ip 192.168.150.1 --s2cs 192.168.150.1:5000 "
    "--receiver_ports 5300 --num_conn 1 --server_cert=/scistream/server.crt"
)
GUIDE_OUTBOUND = shlex.split(
    "outbound-request --remote_ip 192.168.150.1 --s2cs 192.168.150.2:5000 "
    f"--receiver_ports 5100 --num_conn 1 --server_cert=/scistream/server.crt {UID} "
    "192.168.150.1:5100"
)

# The guide's commands as run on the gateway itself: --s2cs names this host's own
# daemon (an address of this host and the test peer's PeerPort 5000), so they go
# over D-Bus. (192.168.150.x is another host here: remote mode, tests/unit/
# test_ctl_remote.py.)
GUIDE_INBOUND_HERE = [a.replace("192.168.150.1:5000", "127.0.0.1:5000") for a in GUIDE_INBOUND]
GUIDE_OUTBOUND_HERE = [a.replace("192.168.150.2:5000", "127.0.0.2:5000")
                       for a in GUIDE_OUTBOUND]


# ---------------------------------------------------------------------------
# A private dbus-daemon and the test peer


def _bus_config(socket_path: Path, extra_policy: str = "") -> str:
    return f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket_path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
    {extra_policy}
  </policy>
</busconfig>
"""


class Bus:
    """A dbus-daemon of our own, on a socket in a temporary directory."""

    def __init__(self, directory: Path, extra_policy: str = "") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "bus.conf"
        config.write_text(_bus_config(directory / "bus", extra_policy))
        assert DBUS_DAEMON, "dbus-daemon is needed (Debian package dbus-daemon)"
        self.proc = subprocess.Popen(
            [DBUS_DAEMON, f"--config-file={config}", "--print-address", "--nofork"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        assert self.address.startswith("unix:"), "dbus-daemon did not start"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)
        if self.proc.stdout:
            self.proc.stdout.close()


def _endpoint_props(uid: str, role: str) -> Dict[str, Any]:
    inbound = role == "inbound"
    return {
        "Uid": uid,
        "Role": role,
        "State": "active",
        "StateDetail": "",
        "Listeners": ["192.168.150.1:5100"] if inbound else ["192.168.150.2:5100"],
        "Targets": ["192.168.150.1:5300"] if inbound else ["192.168.150.1:5100"],
        "NumConn": 1,
        "Unit": f"scistream-{role}-{uid}.service",
        "CreatedAt": CREATED_US,
        "NRestarts": 0,
        "ClaimedBy": "192.168.150.2" if inbound else "",
        "ClaimedAt": CREATED_US + 1_000_000 if inbound else 0,
        "Peer": "" if inbound else "192.168.150.1:5000",
        "AllowedPeer": "",
        "Owner": "local:uid=0",
        "KeyGeneration": 1,
        "BytesIn": 1_500_000 if inbound else 1_000_000,
        "BytesOut": 1_000_000 if inbound else 1_500_000,
        "RateIn": 0,
        "RateOut": 0,
        "ConnectionsActive": 1,
        "ConnectionsTotal": 3,
        "MainPID": 4242,
        "MemoryCurrent": 3 * 1024 * 1024,
        "TargetReachable": "yes" if inbound else "unknown",
        "TargetFailures": 2 if inbound else 0,
        "LastTargetFailure": ("the server application at 192.168.150.1:5300 refused the "
                              "connection") if inbound else "",
        "LastTargetFailureAt": CREATED_US + 2_000_000 if inbound else 0,
    }


def _unwrap(value: Any) -> Any:
    """A call's argument as the test peer got it (dbus-next Variants unwrapped)."""
    if isinstance(value, Variant):
        return _unwrap(value.value)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_unwrap(v) for v in value]
    return value


class PeerState:
    """What the peer was asked, and how it should answer next."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, Tuple[Any, ...]]] = []
        self.fail: Optional[Tuple[str, str]] = None
        self.delay = 0.0
        self.endpoints: List[Tuple[str, str, str, List[str]]] = []

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    async def enter(self, member: str, *args: Any) -> None:
        self.calls.append((member, tuple(_unwrap(a) for a in args)))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise DBusError(*self.fail)


class TestManager(ServiceInterface):
    """The manager's methods and properties, with the signatures of the API's
    description (interface.signed/typed), not typed again here."""

    __test__ = False  # not a pytest class

    def __init__(self, state: PeerState) -> None:
        super().__init__(MANAGER_IFACE)
        self.state = state

    @method()
    @signed(MANAGER)
    async def InboundRequest(self, remote_ip, receiver_ports, num_conn, options):
        await self.state.enter("InboundRequest", remote_ip, receiver_ports, num_conn, options)
        return [UID, IN_PATH, [f"192.168.150.1:{5100 + i}" for i in range(num_conn)]]

    @method()
    @signed(MANAGER)
    async def OutboundRequest(self, uid, remote_listeners, local_ports, num_conn, options):
        await self.state.enter(
            "OutboundRequest", uid, remote_listeners, local_ports, num_conn, options
        )
        return [OUT_PATH, [f"192.168.150.2:{5100 + i}" for i in range(num_conn)]]

    @method()
    @signed(MANAGER)
    async def Release(self, uid):
        await self.state.enter("Release", uid)

    @method()
    @signed(MANAGER)
    async def RearmEndpoint(self, uid):
        await self.state.enter("RearmEndpoint", uid)

    @method()
    @signed(MANAGER)
    async def ReleaseAll(self):
        await self.state.enter("ReleaseAll")
        return 3

    @method()
    @signed(MANAGER)
    async def ListEndpoints(self):
        await self.state.enter("ListEndpoints")
        return [list(e) for e in self.state.endpoints]

    @dbus_property(access=PropertyAccess.READ)
    @typed(MANAGER)
    def Version(self):
        return "0.1.0"

    @dbus_property(access=PropertyAccess.READ)
    @typed(MANAGER)
    def PeerPort(self):
        return 5000

    @dbus_property(access=PropertyAccess.READ)
    @typed(MANAGER)
    def ListenAddress(self):
        return "192.168.150.1"

    @dbus_property(access=PropertyAccess.READ)
    @typed(MANAGER)
    def PortRange(self):
        return [5100, 5200]


def _endpoint_property(name: str) -> Any:
    def getter(self):
        return self.p[name]

    getter.__name__ = name
    return dbus_property(access=PropertyAccess.READ)(typed(ENDPOINT)(getter))


class TestEndpoint(ServiceInterface):
    """An endpoint object: every property of the description, values from ``props``."""

    __test__ = False

    def __init__(self, props: Dict[str, Any]) -> None:
        super().__init__(ENDPOINT_IFACE)
        self.p = props

    locals().update({name: _endpoint_property(name) for name in ENDPOINT.properties})

    @method()
    @signed(ENDPOINT)
    def Release(self):
        pass

    @method()
    @signed(ENDPOINT)
    def Rearm(self):
        pass


class Peer:
    """The test peer: serves org.scistream.Tunnel1 on a bus from its own thread."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.state = PeerState()
        #: the inbound endpoint object's properties (a test may change them)
        self.inbound_props = _endpoint_props(UID, "inbound")
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="test-peer", daemon=True)
        self.thread.start()
        assert self._ready.wait(10), "test peer did not start"
        if self._error:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        # Handlers cancelled at shutdown or cut off by a killed bus are expected here.
        self.loop.set_exception_handler(lambda loop, context: None)
        try:
            self.loop.run_until_complete(self._setup())
        except BaseException as err:  # handed to the test thread
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    async def _setup(self) -> None:
        self.bus = await MessageBus(bus_address=self.address).connect()
        self.bus.export(MANAGER_PATH, TestManager(self.state))
        self.bus.export(IN_PATH, TestEndpoint(self.inbound_props))
        self.bus.export(OUT_PATH, TestEndpoint(_endpoint_props(UID, "outbound")))
        other = f"{ENDPOINT_PATH_PREFIX}/_30b0e4a7c_2d7d0c_2d4f43_2d9d5e_2d0d6f3b9a1c22_inbound"
        self.bus.export(other, TestEndpoint(_endpoint_props(UID2, "inbound")))
        await self.bus.request_name(BUS_NAME)

    async def _shutdown(self) -> None:
        # Handlers still sleeping (delay tests) are cancelled, not left pending.
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.bus.disconnect()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory):
    b = Bus(tmp_path_factory.mktemp("bus"))
    yield b
    b.stop()


@pytest.fixture(scope="module")
def _peer(bus: Bus):
    p = Peer(bus.address)
    yield p
    p.stop()


@pytest.fixture
def peer(_peer: Peer, monkeypatch: pytest.MonkeyPatch) -> Peer:
    """The test peer with a clean record; the CLI is pointed at its bus."""
    _peer.state.reset()
    monkeypatch.setenv(ctl.BUS_ADDRESS_ENV, _peer.address)
    return _peer


def run(argv: List[str], capsys: pytest.CaptureFixture) -> Tuple[int, str, str]:
    """main() in-process: exit code, stdout, stderr."""
    code = ctl.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_sub(argv: List[str], env: Optional[Dict[str, str]] = None, **kw: Any):
    """The CLI as users run it: a fresh /usr/bin/python3 process."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    return subprocess.run(
        [PYTHON, "-m", "scistreamd.ctl", *argv],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
        **kw,
    )


# ---------------------------------------------------------------------------
# Argument parsing


def test_guide_inbound_command_parses() -> None:
    args = ctl.parse_args(GUIDE_INBOUND)
    assert args.verb == "inbound-request"
    assert args.remote_ip == "192.168.150.1"
    assert args.s2cs == "192.168.150.1:5000"
    assert args.receiver_ports == ["5300"]
    assert args.num_conn == "1"
    assert args.server_cert == "/scistream/server.crt"
    assert (args.json, args.user, args.timeout) == (False, False, 30.0)


def test_guide_outbound_command_parses() -> None:
    args = ctl.parse_args(GUIDE_OUTBOUND)
    assert args.verb == "outbound-request"
    assert args.uid == UID
    assert args.listeners == ["192.168.150.1:5100"]
    assert args.receiver_ports == ["5100"]
    assert args.s2cs == "192.168.150.2:5000"


@pytest.mark.parametrize(
    "spelling",
    [
        ["--remote_ip", "10.0.0.1", "--receiver_ports", "5300", "--num_conn", "2"],
        ["--remote-ip", "10.0.0.1", "--receiver-ports", "5300", "--num-conn", "2"],
        ["--remote-ip=10.0.0.1", "--receiver_ports=5300", "--num_conn=2"],
    ],
)
def test_inbound_spellings(spelling: List[str]) -> None:
    args = ctl.parse_args(["inbound-request", *spelling, "--server-cert", "/x"])
    assert (args.remote_ip, args.receiver_ports, args.num_conn) == ("10.0.0.1", ["5300"], "2")
    assert args.server_cert == "/x"


def test_inbound_defaults_and_repeated_ports() -> None:
    args = ctl.parse_args(
        [
            "inbound-request",
            "--remote_ip",
            "10.0.0.1",
            "--receiver_ports",
            "5300,5301",
            "--receiver-ports",
            "5302",
        ]
    )
    plan = ctl.InboundPlan(args)
    assert plan.ports == [5300, 5301, 5302]
    assert plan.num_conn == 1
    assert plan.s2cs is None


def test_global_options_before_or_after_verb() -> None:
    before = ctl.parse_args(["--json", "--timeout", "2.5", "--user", "list"])
    after = ctl.parse_args(["list", "--json", "--timeout=2.5", "--user"])
    for args in (before, after):
        assert (args.verb, args.json, args.timeout, args.user) == ("list", True, 2.5, True)
    mixed = ctl.parse_args(["--json", "status", UID, "--timeout", "1"])
    assert (mixed.json, mixed.timeout, mixed.uid) == (True, 1.0, UID)


def test_outbound_listener_forms_and_defaults() -> None:
    for listeners in (
        ["192.168.150.1:5100", "192.168.150.1:5101"],
        ["192.168.150.1:5100,192.168.150.1:5101"],
        ["['192.168.150.1:5100', '192.168.150.1:5101']"],
        ["[192.168.150.1:5100,", "192.168.150.1:5101]"],
    ):
        plan = ctl.OutboundPlan(ctl.parse_args(["outbound-request", UID.upper(), *listeners]))
        assert plan.uid == UID
        assert plan.listeners == ["192.168.150.1:5100", "192.168.150.1:5101"]
        assert plan.ports == []  # the daemon allocates
        assert plan.num_conn == 2  # default: one mapping per listener
        assert (plan.peer, plan.trust_pem, plan.s2cs) == (None, None, None)


def test_outbound_options_interleaved_with_positionals() -> None:
    args = ctl.parse_args(
        [
            "outbound-request",
            UID,
            "--num_conn",
            "3",
            "[::1]:5100",
            "--peer",
            "[::1]:5000",
            "--receiver_ports",
            "6000,6001,6002",
        ]
    )
    plan = ctl.OutboundPlan(args)
    assert plan.listeners == ["[::1]:5100"]
    assert plan.ports == [6000, 6001, 6002]
    assert plan.num_conn == 3
    assert plan.peer == "[::1]:5000"


def test_outbound_num_conn_defaults_to_local_ports() -> None:
    plan = ctl.OutboundPlan(
        ctl.parse_args(["outbound-request", "--receiver_ports", "7000 7001", UID, "1.2.3.4:5"])
    )
    assert plan.num_conn == 2


def test_release_list_status_logs_parse() -> None:
    assert ctl.parse_args(["release", UID]).uid == UID
    args = ctl.parse_args(["release", "--all"])
    assert args.all and args.uid is None
    assert ctl.parse_args(["list"]).verb == "list"
    assert ctl.parse_args(["status", UID]).uid == UID
    logs = ctl.parse_args(["logs", UID, "-f", "-n", "20"])
    assert (logs.follow, logs.lines) == (True, "20")
    logs = ctl.parse_args(["logs", "--follow", "--lines=5", UID])
    assert (logs.follow, logs.lines) == (True, "5")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["inbound-request", "--receiver_ports", "5300"], "--remote-ip"),
        (["inbound-request", "--remote_ip", "1.2.3.4"], "--receiver-ports"),
        (["list", "--bogus"], "unrecognized arguments"),
        (["list", "--timeout", "0"], "--timeout"),
        (["list", "--timeout", "nan"], "--timeout"),
        (["list", "--timeout", "soon"], "--timeout"),
        (["outbound-request", UID], "LISTENER"),
        (["list", "--jso"], "unrecognized"),  # no abbreviations
    ],
)
def test_usage_errors_are_one_line_exit_2(
    argv: List[str], fragment: str, capsys: pytest.CaptureFixture
) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("scistreamctl: ")
    assert fragment in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (
            ["inbound-request", "--remote_ip", "server1", "--receiver_ports", "5300"],
            "is not an IP address",
        ),
        (
            ["inbound-request", "--remote_ip", "0.0.0.0", "--receiver_ports", "5300"],
            "not a unicast",
        ),
        (
            ["inbound-request", "--remote_ip", "1.2.3.4", "--receiver_ports", "0"],
            "not a port number",
        ),
        (
            ["inbound-request", "--remote_ip", "1.2.3.4", "--receiver_ports", "65536"],
            "out of range",
        ),
        (
            [
                "inbound-request",
                "--remote_ip",
                "1.2.3.4",
                "--receiver_ports",
                "5300",
                "--num_conn",
                "0",
            ],
            "--num_conn",
        ),
        (
            [
                "inbound-request",
                "--remote_ip",
                "1.2.3.4",
                "--receiver_ports",
                "5300",
                "--s2cs",
                "x:y",
            ],
            "--s2cs",
        ),
        (
            ["inbound-request", "--remote_ip", "1.2.3.4\nX=1", "--receiver_ports", "5300"],
            "--remote_ip",
        ),
        (
            ["inbound-request", "--remote_ip", "1.2.3.4", "--receiver_ports", "5300",
             "--allowed-peer", "*.example.org"],
            "--allowed_peer",
        ),
        (
            ["inbound-request", "--remote_ip", "1.2.3.4", "--receiver_ports", "5300",
             "--allowed_peer", "192.168.150.2\nx"],
            "--allowed_peer",
        ),
        (["outbound-request", "not-a-uid", "1.2.3.4:5100"], "is not a tunnel uid"),
        (["outbound-request", UID, "1.2.3.4"], "has no port"),
        (["outbound-request", "--remote_ip", "nope", UID, "1.2.3.4:5"], "--remote_ip"),
        (["outbound-request", "--peer", "1.2.3.4", UID, "1.2.3.4:5"], "--peer"),
        (["release", "nope"], "not a tunnel uid"),
        (["release"], "give the UID"),
        (["release", UID, "--all"], "not both"),
        (["status", "x" * 36], "not a tunnel uid"),
        (["logs", "../etc"], "not a tunnel uid"),
        (["logs", UID, "-n", "-3"], "not a number of lines"),
    ],
)
def test_invalid_arguments_exit_2_before_any_bus_call(
    argv: List[str], fragment: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An unusable bus address proves validation happens before connecting.
    monkeypatch.setenv(ctl.BUS_ADDRESS_ENV, "unix:path=/nonexistent/bus")
    code, out, err = run(argv, capsys)
    assert code == 2, err
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("scistreamctl: ")
    assert fragment in err


def test_server_cert_is_read_checked_and_bounded(tmp_path: Path) -> None:
    good = tmp_path / "ca.pem"
    good.write_text(PEM)
    assert ctl.read_trust_pem(str(good)) == PEM
    from scistreamd.errors import InvalidArgument

    cases = {
        "missing": (tmp_path / "none.pem", "cannot read"),
        "directory": (tmp_path, "cannot read"),
        "not pem": (tmp_path / "der.crt", "holds no PEM certificate"),
        "huge": (tmp_path / "huge.pem", "larger than 1 MiB"),
    }
    (tmp_path / "der.crt").write_bytes(b"\x30\x82\x01\xb3\xff")
    (tmp_path / "huge.pem").write_text(PEM + "x" * ctl.MAX_TRUST_PEM)
    for path, fragment in cases.values():
        with pytest.raises(InvalidArgument, match=fragment):
            ctl.read_trust_pem(str(path))


# ---------------------------------------------------------------------------
# Pure formatting and error mapping


def test_format_request_is_the_guides_lines() -> None:
    assert ctl.format_request(UID, "192.168.150.1:5000", "PROD", ["192.168.150.1:5100"]) == (
        "uid; s2cs; access_token; role\n"
        f"{UID} 192.168.150.1:5000 INVALID_TOKEN PROD\n"
        "Listeners: ['192.168.150.1:5100']\n"
    )
    text = ctl.format_request(UID, "-", "CONS", ["10.0.0.2:5100", "10.0.0.2:5101"])
    assert text.splitlines()[2] == "Listeners: ['10.0.0.2:5100', '10.0.0.2:5101']"


def test_format_list_aligns_columns() -> None:
    assert ctl.format_list([]) == "No endpoints.\n"
    inbound = _endpoint_props(UID, "inbound")
    inbound["Listeners"] = ["192.168.150.1:5100", "192.168.150.1:5101"]
    outbound = dict(_endpoint_props(UID, "outbound"), State="failed", Listeners=[])
    now = CREATED_US / 1e6 + 3725
    text = ctl.format_list([inbound, outbound], now=now)
    lines = text.splitlines()
    header = ["UID", "ROLE", "STATE", "AGE", "IN/OUT", "CONNS", "PEER", "LISTENERS"]
    assert lines[0].split() == header
    assert lines[1].split() == [UID, "inbound", "active", "1h02m", "1.43MiB/977KiB", "1",
                                "192.168.150.2", "192.168.150.1:5100,192.168.150.1:5101"]
    assert lines[2].split() == [UID, "outbound", "failed", "1h02m", "977KiB/1.43MiB", "1",
                                "192.168.150.1:5000", "-"]
    # aligned: every column starts at the same offset on every line
    for word in header[1:]:
        col = lines[0].index(word)
        assert all(line[col - 2 : col] == "  " and line[col] != " " for line in lines[1:])


def test_format_bytes_rate_age() -> None:
    assert [ctl.format_bytes(n) for n in (0, 1023, 1024, 1536, 10_000_000, 5 * 2**30)] == [
        "0 B", "1023 B", "1 KiB", "1.5 KiB", "9.54 MiB", "5 GiB"]
    assert ctl.format_bytes(-1) == ctl.format_bytes("x") == "-"
    assert [ctl.format_rate(r) for r in (0, 100, 125_000, 117_500_000, 2.5e9)] == [
        "0 bit/s", "800 bit/s", "1 Mbit/s", "940 Mbit/s", "20 Gbit/s"]
    assert [ctl.format_age(s) for s in (0, 59, 60, 303, 3600, 7500, 86400 * 3 + 4 * 3600)] == [
        "0s", "59s", "1m00s", "5m03s", "1h00m", "2h05m", "3d04h"]
    assert ctl.format_age(-1) == "-"


def test_format_time_us() -> None:
    assert ctl.format_time_us(0) == "never"
    text = ctl.format_time_us(CREATED_US)
    from datetime import datetime

    assert datetime.fromisoformat(text).timestamp() == CREATED_US // 1_000_000


def test_format_status_has_every_property() -> None:
    props = _endpoint_props(UID, "outbound")
    props["Path"] = OUT_PATH
    props["FutureProperty"] = 7
    text = ctl.format_status([props], now=CREATED_US / 1e6 + 90)
    lines = dict(line.split(": ", 1) for line in text.splitlines())
    keys = [k.rstrip() for k in lines]
    assert keys[: len(ctl.STATUS_ORDER)] == list(ctl.STATUS_ORDER)
    assert keys[len(ctl.STATUS_ORDER):] == ["FutureProperty", *ctl.COUNTER_ORDER, "Path"]
    # The first lines keep their layout (scripts match "State:       active").
    plain = ctl.format_status([_endpoint_props(UID, "outbound")], now=CREATED_US / 1e6)
    assert "\nState:       active\n" in plain and "\nBytesIn:             977 KiB" in plain
    values = {k.rstrip(): v.strip() for k, v in lines.items()}
    assert values["ClaimedAt"] == "never"
    assert values["ClaimedBy"] == "-"
    assert values["AllowedPeer"] == "-"
    assert values["StateDetail"] == "-"
    assert values["CreatedAt"] == ctl.format_time_us(CREATED_US) + " (1m30s ago)"
    assert values["Listeners"] == "192.168.150.2:5100"
    assert values["Path"] == OUT_PATH
    assert values["BytesIn"] == "977 KiB (1000000 B)"
    assert values["BytesOut"] == "1.43 MiB (1500000 B)"
    assert values["MemoryCurrent"] == "3 MiB (3145728 B)"
    assert values["RateIn"] == "0 bit/s (last 5 s)"
    assert values["LastTargetFailureAt"] == "never"
    assert values["TargetReachable"] == "unknown"


@pytest.mark.parametrize("name, cls", sorted(BY_DBUS_NAME.items()))
def test_error_mapping_of_named_errors(name: str, cls: Any) -> None:
    err = ctl.error_from_dbus(name, "port 5100 is busy: free it")
    assert (err.exit_code, err.name, err.message) == (
        cls.exit_code,
        cls.name,
        "port 5100 is busy: free it",
    )


def test_error_codes_are_distinct_and_documented() -> None:
    codes = {cls.exit_code for cls in BY_DBUS_NAME.values()}
    assert codes == set(range(2, 10)) | {11, 12}
    for code in range(0, 13):
        assert f"  {code} " in ctl.EXIT_CODES_HELP
        assert f"\n{code} " in ctl.__doc__


def test_error_mapping_of_bus_errors() -> None:
    denied = ctl.error_from_dbus("org.freedesktop.DBus.Error.AccessDenied", "Rejected send")
    assert denied.exit_code == 9 and "group 'scistream'" in denied.message
    for name in ("ServiceUnknown", "NameHasNoOwner", "NoReply"):
        err = ctl.error_from_dbus(f"org.freedesktop.DBus.Error.{name}", "x")
        assert err.exit_code == 10
        assert "systemctl start scistreamd" in err.message
    assert (
        "scistreamd --user"
        in ctl.error_from_dbus(
            "org.freedesktop.DBus.Error.ServiceUnknown", "x", user_bus=True
        ).message
    )
    other = ctl.error_from_dbus(
        "com.dubstepdish.dbus.next.ServiceError",
        "Traceback (most recent call last):\n  File x\nValueError: boom\n",
    )
    assert other.exit_code == 1
    assert other.message == "com.dubstepdish.dbus.next.ServiceError: ValueError: boom"


def test_bus_address_selection() -> None:
    assert ctl.bus_address(False, {}) == ctl.SYSTEM_BUS_DEFAULT
    assert ctl.bus_address(False, {"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/s"}) == "unix:path=/s"
    assert ctl.bus_address(True, {"DBUS_SESSION_BUS_ADDRESS": "unix:path=/u"}) == "unix:path=/u"
    assert ctl.bus_address(True, {"XDG_RUNTIME_DIR": "/run/user/7"}) == "unix:path=/run/user/7/bus"
    env = {ctl.BUS_ADDRESS_ENV: "unix:path=/o", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/u"}
    assert ctl.bus_address(True, env) == "unix:path=/o"


def test_journalctl_argv() -> None:
    assert ctl.journalctl_argv(UID, False, None, False) == [
        "journalctl",
        f"SCISTREAM_UID={UID}",
        "-o",
        "short-iso",
        "--no-pager",
    ]
    assert ctl.journalctl_argv(UID, True, 50, True)[-5:] == ["json", "--no-pager", "-f", "-n", "50"]
    unit = "scistream-inbound-0123456789abcdef.service"
    assert ctl.journalctl_argv(UID, False, None, False, [unit])[:6] == [
        "journalctl", f"SCISTREAM_UID={UID}", "+", f"_SYSTEMD_UNIT={unit}", "+", f"UNIT={unit}"]


def test_relay_units_are_read_from_the_daemons_journal_lines() -> None:
    """logs finds relay units (whose lines carry no uid) in the daemon's lines;
    journal text that is not a relay unit name never reaches journalctl."""
    import json as _json

    good = ["scistream-inbound-0123456789abcdef.service", f"scistream-outbound-{UID}.service"]
    lines = [_json.dumps({"SCISTREAM_UNIT": u, "__CURSOR": "c"}) for u in good + good]
    lines += ["not json", _json.dumps({"MESSAGE": "x"}), _json.dumps([1]),
              _json.dumps({"SCISTREAM_UNIT": "scistream-inbound-0123.service"}),
              _json.dumps({"SCISTREAM_UNIT": "sshd.service"}),
              _json.dumps({"SCISTREAM_UNIT": "scistream-inbound-0123456789abcdef.service -f"}),
              _json.dumps({"SCISTREAM_UNIT": ["scistream-inbound-0123456789abcdef.service"]})]
    assert ctl.relay_units_in(lines) == sorted(good)


# ---------------------------------------------------------------------------
# End to end against the test peer on a real bus


def test_inbound_request_guide_command(peer: Peer, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(GUIDE_INBOUND_HERE, capsys)
    assert (code, err) == (0, "")
    assert out == (
        "uid; s2cs; access_token; role\n"
        f"{UID} 127.0.0.1:5000 INVALID_TOKEN PROD\n"
        "Listeners: ['192.168.150.1:5100']\n"
    )
    assert peer.state.calls == [("InboundRequest", ("192.168.150.1", [5300], 1, {}))]


def test_inbound_request_allowed_peer_is_sent_canonical(
    peer: Peer, capsys: pytest.CaptureFixture
) -> None:
    base = ["inbound-request", "--remote_ip", "192.168.150.1", "--receiver_ports", "5300"]
    assert run([*base, "--allowed-peer", "2001:DB8::0:1"], capsys)[0] == 0
    assert run([*base, "--allowed_peer", "GW2.Example.ORG."], capsys)[0] == 0
    assert [c[1][3] for c in peer.state.calls] == [
        {"allowed_peer": "2001:db8::1"},
        {"allowed_peer": "gw2.example.org"},
    ]


def test_inbound_request_default_s2cs_and_json(peer: Peer, capsys: pytest.CaptureFixture) -> None:
    argv = [
        "inbound-request",
        "--remote-ip",
        "192.168.150.1",
        "--receiver-ports",
        "5300,5301",
        "--num-conn",
        "3",
    ]
    code, out, _ = run(argv, capsys)
    assert code == 0
    # s2cs from the daemon's ListenAddress:PeerPort, read in the same round trip
    assert out.splitlines()[1] == f"{UID} 192.168.150.1:5000 INVALID_TOKEN PROD"
    assert peer.state.calls == [("InboundRequest", ("192.168.150.1", [5300, 5301], 3, {}))]
    code, out, _ = run(["--json", *argv], capsys)
    assert code == 0
    assert json.loads(out) == {
        "uid": UID,
        "role": "PROD",
        "s2cs": "192.168.150.1:5000",
        "listeners": ["192.168.150.1:5100", "192.168.150.1:5101", "192.168.150.1:5102"],
        "endpoint": IN_PATH,
        "target_reachable": "yes",
    }


def test_inbound_request_warns_when_the_target_does_not_accept(
    peer: Peer, capsys: pytest.CaptureFixture
) -> None:
    saved = dict(peer.inbound_props)
    peer.inbound_props["TargetReachable"] = "no"
    peer.inbound_props["LastTargetFailure"] = "nothing accepted connections at 192.168.150.1:5300"
    try:
        _check_inbound_warning(capsys)
    finally:
        peer.inbound_props.clear()
        peer.inbound_props.update(saved)


def _check_inbound_warning(capsys: pytest.CaptureFixture) -> None:
    argv = ["inbound-request", "--remote-ip", "192.168.150.1", "--receiver-ports", "5300"]
    code, out, err = run(argv, capsys)
    assert code == 0
    # The guide's three lines stay on stdout, unchanged; the warning goes to stderr.
    assert out.splitlines()[0] == "uid; s2cs; access_token; role"
    assert len(out.splitlines()) == 3
    assert err == ("scistreamctl: warning: nothing accepted connections at "
                   "192.168.150.1:5300\n")
    code, out, err = run(["--json", *argv], capsys)
    data = json.loads(out)
    assert data["target_reachable"] == "no"
    assert data["warnings"] == ["nothing accepted connections at 192.168.150.1:5300"]


def test_outbound_request_guide_command(
    peer: Peer, capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert = tmp_path / "server.crt"
    cert.write_text(PEM)
    argv = [a.replace("/scistream/server.crt", str(cert)) for a in GUIDE_OUTBOUND_HERE]
    code, out, err = run(argv, capsys)
    assert (code, err) == (0, "")
    assert out == (
        "uid; s2cs; access_token; role\n"
        f"{UID} 127.0.0.2:5000 INVALID_TOKEN CONS\n"
        "Listeners: ['192.168.150.2:5100']\n"
    )
    assert peer.state.calls == [
        ("OutboundRequest", (UID, ["192.168.150.1:5100"], [5100], 1, {"trust_pem": PEM}))
    ]


def test_outbound_request_peer_option_and_json(peer: Peer, capsys: pytest.CaptureFixture) -> None:
    argv = [
        "outbound-request",
        "--json",
        "--peer",
        "192.168.150.1:6000",
        UID,
        "['192.168.150.1:5100', '192.168.150.1:5101']",
    ]
    code, out, _ = run(argv, capsys)
    assert code == 0
    assert peer.state.calls == [
        (
            "OutboundRequest",
            (
                UID,
                ["192.168.150.1:5100", "192.168.150.1:5101"],
                [],
                2,
                {"peer": "192.168.150.1:6000"},
            ),
        )
    ]
    assert json.loads(out) == {
        "uid": UID,
        "role": "CONS",
        "s2cs": "192.168.150.1:5000",
        "listeners": ["192.168.150.2:5100", "192.168.150.2:5101"],
        "endpoint": OUT_PATH,
    }


def test_release(peer: Peer, capsys: pytest.CaptureFixture) -> None:
    assert run(["release", UID.upper()], capsys) == (0, f"Released {UID}.\n", "")
    code, out, _ = run(["release", "--json", UID], capsys)
    assert (code, json.loads(out)) == (0, {"released": [UID]})
    assert run(["release", "--all"], capsys) == (0, "Released 3 endpoints.\n", "")
    code, out, _ = run(["--json", "release", "--all"], capsys)
    assert json.loads(out) == {"released_count": 3}
    assert [c[0] for c in peer.state.calls] == ["Release", "Release", "ReleaseAll", "ReleaseAll"]
    assert peer.state.calls[0][1] == (UID,)


def test_list(peer: Peer, capsys: pytest.CaptureFixture) -> None:
    assert run(["list"], capsys) == (0, "No endpoints.\n", "")
    assert json.loads(run(["list", "--json"], capsys)[1]) == []
    peer.state.endpoints = [
        (UID, "outbound", "active", ["192.168.150.2:5100"]),
        (UID, "inbound", "starting", ["192.168.150.1:5100", "192.168.150.1:5101"]),
    ]
    code, out, _ = run(["list"], capsys)
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["UID", "ROLE", "STATE", "AGE", "IN/OUT", "CONNS", "PEER", "LISTENERS"]
    # the list's own columns; counters and peer from the endpoints' properties
    assert [r[:3] + r[5:] for r in rows[1:]] == [
        [UID, "inbound", "starting", "1", "192.168.150.2",
         "192.168.150.1:5100,192.168.150.1:5101"],
        [UID, "outbound", "active", "1", "192.168.150.1:5000", "192.168.150.2:5100"],
    ]
    assert [r[4] for r in rows[1:]] == ["1.43MiB/977KiB", "977KiB/1.43MiB"]
    data = json.loads(run(["--json", "list"], capsys)[1])
    assert data[1]["uid"] == UID
    assert data[1]["role"] == "outbound"
    assert data[1]["state"] == "active"
    assert data[1]["listeners"] == ["192.168.150.2:5100"]
    assert data[1]["bytes_in"] == 1_000_000 and data[1]["connections_active"] == 1
    assert "path" not in data[1] and "Path" not in data[1]


def test_status(peer: Peer, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(["status", UID], capsys)
    assert (code, err) == (0, "")
    blocks = out.split("\n\n")
    assert len(blocks) == 2  # inbound and outbound of that uid; not UID2's endpoint
    inbound = dict(line.split(None, 1) for line in blocks[0].splitlines())
    assert inbound["Role:"] == "inbound"
    assert inbound["Uid:"] == UID
    assert inbound["ClaimedAt:"] == ctl.format_time_us(CREATED_US + 1_000_000)
    assert inbound["Path:"] == IN_PATH
    outbound = dict(line.split(None, 1) for line in blocks[1].splitlines())
    assert (outbound["Role:"], outbound["Peer:"], outbound["ClaimedAt:"]) == (
        "outbound",
        "192.168.150.1:5000",
        "never",
    )

    code, out, _ = run(["status", "--json", UID], capsys)
    data = json.loads(out)
    assert [d["role"] for d in data] == ["inbound", "outbound"]
    from scistreamd.endpoint_json import endpoint_json

    assert data[0] == endpoint_json(_endpoint_props(UID, "inbound"))
    assert data[0]["claimed_at"] == "2025-03-18T12:13:21.123Z"
    assert data[0]["last_target_failure_at"].endswith("Z")
    assert data[1]["claimed_at"] is None
    assert data[0]["n_restarts"] == 0 and data[0]["main_pid"] == 4242


def test_status_unknown_uid_is_not_found(peer: Peer, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(["status", "11111111-2222-4333-8444-555555555555"], capsys)
    assert (code, out) == (3, "")
    assert err.startswith("scistreamctl: no endpoint of tunnel 11111111-")
    assert "scistreamctl list" in err and err.count("\n") == 1


@pytest.mark.parametrize("name, cls", sorted(BY_DBUS_NAME.items()))
def test_daemon_errors_map_to_exit_codes(
    name: str, cls: Any, peer: Peer, capsys: pytest.CaptureFixture
) -> None:
    message = f"{cls.name} happened: do the thing that fixes it"
    peer.state.fail = (name, message)
    code, out, err = run(["release", UID], capsys)
    assert code == cls.exit_code
    assert out == ""
    assert err == f"scistreamctl: {message}\n"
    code, out, err = run(["release", "--json", UID], capsys)
    assert code == cls.exit_code
    assert err == f"scistreamctl: {message}\n"
    assert json.loads(out) == {"error": cls.name, "message": message, "exit_code": cls.exit_code}


@pytest.mark.parametrize(
    "name, code",
    [
        ("org.freedesktop.DBus.Error.AccessDenied", 9),
        ("org.freedesktop.DBus.Error.NoReply", 10),
        ("org.freedesktop.DBus.Error.UnknownMethod", 1),
    ],
)
def test_bus_errors_map_to_exit_codes(
    name: str, code: int, peer: Peer, capsys: pytest.CaptureFixture
) -> None:
    peer.state.fail = (name, "some text")
    got, out, err = run(["list"], capsys)
    assert (got, out) == (code, "")
    assert err.count("\n") == 1
    if code == 1:
        assert err == f"scistreamctl: {name}: some text\n"


def test_failed_request_with_s2cs_lookup_reports_the_request_error(
    peer: Peer, capsys: pytest.CaptureFixture
) -> None:
    peer.state.fail = ("org.scistream.Tunnel1.Error.PortsExhausted", "no free port: widen")
    code, _, err = run(
        ["inbound-request", "--remote_ip", "10.1.1.1", "--receiver_ports", "1"], capsys
    )
    assert (code, err) == (5, "scistreamctl: no free port: widen\n")


def test_timeout_is_exit_10(peer: Peer, capsys: pytest.CaptureFixture) -> None:
    peer.state.delay = 2.0
    start = time.monotonic()
    code, out, err = run(["list", "--timeout", "0.2"], capsys)
    assert time.monotonic() - start < 1.5
    assert (code, out) == (10, "")
    assert "did not answer within 0.2 s" in err and err.count("\n") == 1


def test_policy_denial_is_exit_9(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A genuine refusal by dbus-daemon's policy, as the system bus gives non-members.
    deny = f'<deny send_destination="{BUS_NAME}" send_interface="{MANAGER_IFACE}"/>'
    denying = Bus(tmp_path, deny)
    peer = Peer(denying.address)
    try:
        monkeypatch.setenv(ctl.BUS_ADDRESS_ENV, denying.address)
        code, out, err = run(["release", "--all"], capsys)
        assert (code, out) == (9, "")
        assert err == (
            "scistreamctl: permission denied: managing tunnels needs root or membership "
            "of group 'scistream'\n"
        )
        assert peer.state.calls == []
    finally:
        peer.stop()
        denying.stop()


def test_no_daemon_on_the_bus_is_exit_10(tmp_path: Path) -> None:
    empty = Bus(tmp_path)
    try:
        res = run_sub(["list"], {ctl.BUS_ADDRESS_ENV: empty.address})
    finally:
        empty.stop()
    assert res.returncode == 10
    assert res.stdout == ""
    assert res.stderr == (
        "scistreamctl: scistreamd is not running (or the system bus is unreachable): "
        "start it with 'systemctl start scistreamd'\n"
    )


def test_bus_lost_mid_call_is_exit_10(tmp_path: Path) -> None:
    dying = Bus(tmp_path)
    peer = Peer(dying.address)
    peer.state.delay = 20.0
    proc = subprocess.Popen(
        [PYTHON, "-m", "scistreamd.ctl", "list"],
        env=dict(os.environ, PYTHONPATH=str(REPO), **{ctl.BUS_ADDRESS_ENV: dying.address}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not peer.state.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert peer.state.calls, "the CLI never called the peer"
        dying.stop()
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        peer.stop()
    assert (proc.returncode, out) == (10, "")
    assert err.startswith("scistreamctl: scistreamd is not running")
    assert "connection lost" in err and err.count("\n") == 1


def test_bus_closing_during_authentication_is_exit_10_not_a_hang(tmp_path: Path) -> None:
    # dbus-next 0.2.3 would spin forever here (and ignore --timeout).
    path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()

    def accept_and_hang_up() -> None:
        conn, _ = server.accept()
        got = b""
        while b"\r\n" not in got:  # the whole AUTH line: closing earlier would reset
            chunk = conn.recv(64)
            if not chunk:
                break
            got += chunk
        conn.close()

    thread = threading.Thread(target=accept_and_hang_up, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        res = run_sub(["list", "--timeout", "5"], {ctl.BUS_ADDRESS_ENV: f"unix:path={path}"})
        assert time.monotonic() - start < 4
    finally:
        thread.join(5)
        server.close()
    assert res.returncode == 10
    assert "closed the connection during authentication" in res.stderr
    assert res.stderr.count("\n") == 1


# ---------------------------------------------------------------------------
# As a process: what users and scripts see


def test_nonexistent_bus_is_exit_10_one_line_no_traceback() -> None:
    res = run_sub(
        ["inbound-request", *GUIDE_INBOUND_HERE[1:]],
        {ctl.BUS_ADDRESS_ENV: "unix:path=/nonexistent"},
    )
    assert res.returncode == 10
    assert res.stdout == ""
    assert res.stderr == (
        "scistreamctl: scistreamd is not running (or the system bus is unreachable): "
        "start it with 'systemctl start scistreamd'\n"
    )
    res = run_sub(["--json", "list"], {ctl.BUS_ADDRESS_ENV: "unix:path=/nonexistent"})
    assert res.returncode == 10 and res.stderr.count("\n") == 1
    assert json.loads(res.stdout)["error"] == "DaemonUnreachable"


def test_user_bus_unreachable_says_how_to_start_the_user_daemon(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ctl.BUS_ADDRESS_ENV, raising=False)
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/session")
    code, out, err = run(["list", "--user"], capsys)
    assert (code, out) == (10, "")
    assert err == (
        "scistreamctl: scistreamd is not running on the session bus (or the session bus is "
        "unreachable): start it with 'scistreamd --user'\n"
    )


def test_invalid_bus_address_is_exit_10() -> None:
    res = run_sub(["list"], {ctl.BUS_ADDRESS_ENV: "nonsense"})
    assert res.returncode == 10
    assert res.stderr.count("\n") == 1 and "SCISTREAM_BUS_ADDRESS" in res.stderr
    assert "Traceback" not in res.stderr


def test_guide_inbound_as_process(peer: Peer) -> None:
    res = run_sub(GUIDE_INBOUND_HERE)
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout.splitlines() == [
        "uid; s2cs; access_token; role",
        f"{UID} 127.0.0.1:5000 INVALID_TOKEN PROD",
        "Listeners: ['192.168.150.1:5100']",
    ]


def test_version_and_help() -> None:
    res = run_sub(["--version"])
    assert (res.returncode, res.stdout) == (0, f"scistreamctl {__version__}\n")
    res = run_sub(["--help"])
    assert res.returncode == 0 and "exit codes:" in res.stdout
    for verb in ctl.VERBS:
        assert verb in res.stdout


def test_ctrl_c_is_exit_130_quietly(peer: Peer) -> None:
    peer.state.delay = 20.0
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [PYTHON, "-m", "scistreamd.ctl", "list"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a test run started in the background (e.g. `cmd &` in a
        # script) inherits SIGINT ignored, and Python then keeps ignoring it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 10
        while not peer.state.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert peer.state.calls, "the CLI never called the peer"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, out, err) == (130, "", "")


def test_logs_execs_journalctl() -> None:
    # The real journalctl: whatever it finds, it is what runs (exec), not us.
    res = run_sub(["logs", UID, "-n", "1"])
    assert "Traceback" not in res.stderr
    assert not res.stderr.startswith("scistreamctl:")
    res = run_sub(["logs", UID], {"PATH": "/nonexistent"})
    assert res.returncode == 1
    assert res.stderr.startswith("scistreamctl: cannot run journalctl")


def test_import_is_lazy() -> None:
    code = (
        "import sys, scistreamd.ctl as c; c.parse_args(['list']); "
        "print(sorted(m for m in ('dbus_next', 'asyncio', 'scistreamd.model') if m in sys.modules))"
    )
    res = subprocess.run(
        [PYTHON, "-c", code],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        check=True,
    )
    assert res.stdout.strip() == "[]"


# What scistreamctl's start-up must not import (each measured with -X importtime,
# warm byte code, on the path named; a verb that needs one imports it where used).
#: Never before the verb runs, nor by --version/--help: typing (~3 ms; jeepney
#: brings it on bus calls), shutil (~2 ms: argparse's terminal width), textwrap
#: (~1 ms: only for text that needs wrapping), the bus client, the verbs.
_NOT_FOR_VERSION = frozenset({
    "typing", "shutil", "textwrap", "socket", "jeepney", "json", "logging", "dataclasses",
    "ipaddress", "scistreamd.model", "scistreamd.interface", "scistreamd.ctl.bus",
    "scistreamd.ctl.verbs", "scistreamd.ctl.plans", "scistreamd.ctl.output",
})
#: Never by a bus verb: remote mode (requests, TLS), completion, dbus-next/asyncio
#: (the daemon's), logging (~6 ms), secrets/hashlib and uuid/platform (~8 ms: the
#: daemon's new uids), watch's live view.
_NOT_FOR_BUS_VERBS = frozenset({
    "shutil", "textwrap", "logging", "secrets", "hashlib", "uuid", "platform", "json",
    "argcomplete", "asyncio", "dbus_next", "requests", "urllib3", "ssl",
    "scistreamd.userclient", "scistreamd.ctl.remote", "scistreamd.ctl.credentials",
    "scistreamd.ctl.watch", "rich",
})
#: Validation uses scistreamd.values, not the model (dataclasses, inspect: ~12 ms).
_NOT_FOR_VALIDATION = _NOT_FOR_BUS_VERBS | {"scistreamd.model", "dataclasses", "inspect"}
#: list validates nothing.
_NOT_FOR_LIST = _NOT_FOR_VALIDATION | {"scistreamd.values", "ipaddress"}


def _modules_added(argv: List[str]) -> Tuple[int, Set[str]]:
    """main(argv) in a fresh interpreter: its exit code and the modules it imported
    beyond those of a bare interpreter start (site, .pth files)."""
    listing = "print(); print(rc, *sorted(sys.modules))"
    bare = subprocess.run([PYTHON, "-c", f"import sys; rc = 0; {listing}"],
                          capture_output=True, text=True, check=True).stdout.split()
    code = f"import sys; from scistreamd.ctl.cli import main; rc = main(sys.argv[1:]); {listing}"
    res = subprocess.run([PYTHON, "-c", code, *argv], env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, check=True)
    rc, *modules = res.stdout.splitlines()[-1].split()
    return int(rc), set(modules) - set(bare)


def test_start_up_imports_only_what_the_verb_needs(peer: Peer) -> None:
    """Guards the CLI's start-up cost by what it imports (no timing): a module added
    to these paths has to be justified here."""
    rc, added = _modules_added(["--version"])
    assert rc == 0 and "scistreamd.ctl.args" in added  # the test sees what it checks
    assert added & _NOT_FOR_VERSION == set()
    rc, added = _modules_added(["--help"])
    assert rc == 0 and added & _NOT_FOR_VERSION == {"textwrap"}  # help text is wrapped
    rc, added = _modules_added(["list"])
    assert rc == 0 and {"jeepney", "scistreamd.ctl.verbs"} <= added
    assert added & _NOT_FOR_LIST == set()
    peer.state.reset()
    rc, added = _modules_added(["inbound-request", "--remote_ip", "192.0.2.1",
                                "--receiver_ports", "5300"])
    assert rc == 0 and "scistreamd.values" in added
    assert [member for member, _ in peer.state.calls] == ["InboundRequest"]
    assert added & _NOT_FOR_VALIDATION == set()
    rc, added = _modules_added(["release", UID])
    assert rc == 0 and "scistreamd.values" in added
    assert added & _NOT_FOR_VALIDATION == set()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_rearm_validates_uid_before_any_bus_call(capsys) -> None:
    from scistreamd import ctl

    assert ctl.main(["rearm", "not-a-uid"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scistreamctl: ") and "Traceback" not in err


def test_uid_from_stdin_keeps_it_off_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """UID "-" reads the uid from stdin: command lines are world-readable."""
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(UID.upper() + "\n"))
    assert ctl.read_uid_arg("-") == UID
    monkeypatch.setattr(sys, "stdin", io.StringIO("not-a-uid\n"))
    with pytest.raises(InvalidArgument, match="not a tunnel uid"):
        ctl.read_uid_arg("-")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(InvalidArgument, match="not a tunnel uid"):
        ctl.read_uid_arg("-")
    assert ctl.read_uid_arg(UID) == UID
    for verb in (["status", "-"], ["logs", "-"], ["rearm", "-"], ["release", "-"],
                 ["outbound-request", "-", "192.168.150.1:5100"]):
        assert ctl.parse_args(verb).uid == "-"
