"""scistreamctl: uid prefixes, a verb's --help, and shell completion in a real
bash (the shipped completion file sourced, COMP_LINE/COMP_POINT as bash sets
them), against the test peer of test_ctl.py on a private dbus-daemon."""

import asyncio
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from dbus_next.aio import MessageBus
from dbus_next.service import ServiceInterface, method

from scistreamd import BUS_NAME, MANAGER_IFACE, MANAGER_PATH, ctl
from scistreamd.errors import InvalidArgument
from tests.completion import COMPLETE_SH
from tests.unit import test_ctl as base
from tests.unit.test_ctl import UID, UID2, Peer, run, run_sub

# test_ctl's private dbus-daemon and test peer, as fixtures of this module too.
bus = base.bus
_peer = base._peer
peer = base.peer

REPO = Path(__file__).resolve().parents[2]
COMPLETION = REPO / "etc" / "bash-completion" / "scistreamctl"
BASH = shutil.which("bash")
UID3 = "bd9f0000-0000-4000-8000-000000000000"  # shares "bd9f" with UID


def complete(line: str, tmp_path: Path, env: Optional[Dict[str, str]] = None) -> List[str]:
    """What bash offers for ``line`` with the shipped completion file."""
    assert BASH, "bash is needed"
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "scistreamctl"
    wrapper.write_text(
        f'#!/bin/sh\nPYTHONPATH={REPO} exec /usr/bin/python3 -m scistreamd.ctl "$@"\n')
    wrapper.chmod(0o755)
    full_env = dict(os.environ, PATH=f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    full_env.update(env or {})
    res = subprocess.run([BASH, "--norc", "--noprofile", "-c", COMPLETE_SH, "bash",
                          str(COMPLETION), line],
                         env=full_env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [w.strip() for w in res.stdout.splitlines() if w.strip()]


def _endpoints(p: Peer, *uids: str) -> None:
    p.state.endpoints = [(u, "inbound", "active", ["192.168.150.1:5100"]) for u in uids]


# ---------------------------------------------------------------------------
# Prefixes


def test_uid_prefix_shapes() -> None:
    assert ctl.is_uid_prefix("b") and ctl.is_uid_prefix("bd9f1a7e-04")
    assert ctl.is_uid_prefix(UID[:35]) and not ctl.is_uid_prefix(UID)
    for bad in ("", "x", "bd9f1a7e04", "bd9f1a7e--", "-", "../etc", "bd9f\n"):
        assert not ctl.is_uid_prefix(bad), bad
    assert ctl.read_uid_ref("BD9F") == "bd9f"
    assert ctl.read_uid_ref(UID.upper()) == UID
    with pytest.raises(InvalidArgument, match="not a tunnel uid or the start of one"):
        ctl.read_uid_ref("nope")


def test_match_uid() -> None:
    assert ctl.match_uid("bd9f1", [UID, UID2, UID3]) == UID
    assert ctl.match_uid(UID2, []) == UID2  # a whole uid needs no list
    with pytest.raises(ctl.CtlError) as err:
        ctl.match_uid("bd9f", [UID, UID2, UID3])
    assert (err.value.name, err.value.exit_code) == ("AmbiguousUid", 2)
    assert UID in err.value.message and UID3 in err.value.message
    assert "give more of the uid" in err.value.message


def test_status_and_release_by_unique_prefix(peer: Peer, capsys: pytest.CaptureFixture) -> None:
    _endpoints(peer, UID, UID2)
    code, out, err = run(["status", "bd9"], capsys)
    assert (code, err) == (0, "")
    assert "Uid:" in out and UID in out and UID2 not in out
    code, out, err = run(["release", UID2[:6]], capsys)
    assert (code, out, err) == (0, f"Released {UID2}.\n", "")
    assert peer.state.calls[-2:] == [("ListEndpoints", ()), ("Release", (UID2,))]


def test_ambiguous_prefix_is_exit_2_and_changes_nothing(
    peer: Peer, capsys: pytest.CaptureFixture
) -> None:
    _endpoints(peer, UID, UID3)
    code, out, err = run(["release", "--json", "bd9f"], capsys)
    assert code == 2
    assert err.startswith("scistreamctl: uid prefix 'bd9f' is ambiguous: 2 tunnels")
    assert '"error": "AmbiguousUid"' in out
    assert [c for c, _ in peer.state.calls] == ["ListEndpoints"]


def test_unknown_prefix_is_not_found(peer: Peer, capsys: pytest.CaptureFixture) -> None:
    _endpoints(peer, UID)
    code, out, err = run(["rearm", "ffff"], capsys)
    assert (code, out) == (3, "")
    assert "no tunnel on this host has a uid starting with 'ffff'" in err
    assert [c for c, _ in peer.state.calls] == ["ListEndpoints"]


def test_whole_uid_needs_no_lookup(peer: Peer, capsys: pytest.CaptureFixture) -> None:
    code, _, _ = run(["rearm", UID], capsys)
    assert code == 0
    assert peer.state.calls == [("RearmEndpoint", (UID,))]


# ---------------------------------------------------------------------------
# --help


def test_verb_help_shows_the_verb_not_the_exit_table() -> None:
    res = run_sub(["release", "--help"])
    assert res.returncode == 0
    assert "--all" in res.stdout and "unique prefix" in res.stdout
    assert "exit codes: see 'scistreamctl --help'" in res.stdout
    assert "PeerUnreachable" not in res.stdout
    res = run_sub(["--help"])
    assert "PeerUnreachable" in res.stdout


# ---------------------------------------------------------------------------
# Completion in bash


def test_completion_of_verbs_and_options(tmp_path: Path) -> None:
    env = {ctl.BUS_ADDRESS_ENV: "unix:path=/nonexistent"}
    assert set(complete("scistreamctl ", tmp_path, env)) >= set(ctl.VERBS) | {"--json"}
    assert complete("scistreamctl re", tmp_path, env) == ["release", "rearm"]
    got = complete("scistreamctl inbound-request --rem", tmp_path, env)
    assert set(got) == {"--remote-ip", "--remote_ip", "--remote"}
    got = complete("scistreamctl tunnel --client", tmp_path, env)
    assert {"--client-s2cs", "--client-cert", "--client-key"} <= set(got)
    assert complete("scistreamctl logs --fol", tmp_path, env) == ["--follow"]


def test_completion_of_uids_from_the_daemon(peer: Peer, tmp_path: Path) -> None:
    _endpoints(peer, UID, UID2, UID3)
    env = {ctl.BUS_ADDRESS_ENV: peer.address}
    assert complete("scistreamctl status bd9f1", tmp_path, env) == [UID]
    got = complete("scistreamctl release ", tmp_path, env)
    assert {UID, UID2, UID3} <= set(got)
    assert set(complete("scistreamctl rearm bd9f", tmp_path, env)) == {UID, UID3}
    # a uid on another daemon (--s2cs): not this host's, not asked for remotely
    assert complete("scistreamctl status --s2cs 192.0.2.1:5000 bd9f1", tmp_path, env) == []
    # outbound-request's UID is the other gateway's: not completed from here
    assert UID not in complete("scistreamctl outbound-request ", tmp_path, env)


def test_uid_completion_is_quietly_empty_without_a_daemon(tmp_path: Path) -> None:
    env = {ctl.BUS_ADDRESS_ENV: "unix:path=/nonexistent"}
    got = complete("scistreamctl status ", tmp_path, env)
    assert all(w.startswith("-") for w in got)


def test_normal_start_does_not_import_argcomplete_or_jeepney() -> None:
    code = ("import sys, scistreamd.ctl as c; c.parse_args(['status', 'bd9f']); "
            "print(sorted(m for m in ('argcomplete', 'jeepney') if m in sys.modules))")
    res = subprocess.run(["/usr/bin/python3", "-c", code], env=dict(os.environ,
                         PYTHONPATH=str(REPO)), capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


# ---------------------------------------------------------------------------
# A daemon of another API version


class _OtherVersion(ServiceInterface):
    """ListEndpoints answering with another signature than the description's."""

    def __init__(self) -> None:
        super().__init__(MANAGER_IFACE)

    def ListEndpoints(self):
        return [UID]

    ListEndpoints.__annotations__ = {"return": "as"}  # dbus-next reads it as the signature
    ListEndpoints = method()(ListEndpoints)


def test_reply_of_another_signature_is_named_not_misread(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    other_bus = base.Bus(tmp_path)
    loop = asyncio.new_event_loop()

    async def serve() -> MessageBus:
        b = await MessageBus(bus_address=other_bus.address).connect()
        b.export(MANAGER_PATH, _OtherVersion())
        await b.request_name(BUS_NAME)
        return b

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    try:
        service = loop.run_until_complete(serve())
        thread.start()
        monkeypatch.setenv(ctl.BUS_ADDRESS_ENV, other_bus.address)
        code, out, err = run(["--json", "list"], capsys)
        assert code == 1
        assert "answered ListEndpoints with signature 'as', not 'a(sssas)'" in err
        assert '"error": "UnexpectedReply"' in out
    finally:
        if thread.is_alive():
            loop.call_soon_threadsafe(service.disconnect)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
        loop.close()
        other_bus.stop()
