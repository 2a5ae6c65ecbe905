"""Work done ahead in scistreamctl's remote mode: UserClient.warm (a connection
opened before its call) and remote.Ahead (the client side of ``tunnel`` made
while the server side's daemon works). Against the canned HTTPS server of
test_ctl_remote: what is checked is how many connections reach it, and when."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, List

import pytest

from scistreamd import userclient
from scistreamd.ctl import remote
from scistreamd.errors import InvalidArgument
from scistreamd.userclient import DaemonUnreachable, UserClient

from .test_ctl_remote import INBOUND_OK, UID, Canned, _run
from .test_ctl_remote import canned as canned  # noqa: F401  (the fixture)


class Counted(Canned):
    """Canned, counting the connections it accepted."""

    def __init__(self, tmp: Path, host: str = "127.0.0.1") -> None:
        super().__init__(tmp, host)
        # As the daemon's peer port (peertls): no TLS 1.3 session tickets, which would
        # make an idle connection look readable, i.e. closed, to urllib3.
        self.httpd.socket.context.num_tickets = 0
        self.accepted = 0
        serve = self.httpd.process_request

        def counting(request: Any, address: Any) -> None:
            self.accepted += 1
            serve(request, address)

        self.httpd.process_request = counting  # type: ignore[method-assign]


@pytest.fixture
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    c = Counted(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nocfg"))
    yield c
    c.close()


def _client(c: Canned) -> UserClient:
    return UserClient(c.addr, trust_file=c.ca, timeout=5)


def _wait(pred: Any) -> None:
    for _ in range(500):
        if pred():
            return
        threading.Event().wait(0.01)
    raise AssertionError("not within 5 s")


def test_warm_opens_the_connection_the_call_then_uses(counted: Counted) -> None:
    counted.answers["GET /v1/tunnels"] = (200, {"tunnels": []})
    client = _client(counted)
    client.warm()
    _wait(lambda: counted.accepted == 1)
    assert counted.seen == []  # connected and verified, nothing asked
    assert client.list() == []
    assert counted.accepted == 1 and len(counted.seen) == 1


def test_a_connection_warmed_long_ago_is_not_used(counted: Counted) -> None:
    counted.answers["GET /v1/tunnels"] = (200, {"tunnels": []})
    client = _client(counted)
    client.warm()
    _wait(lambda: counted.accepted == 1)
    for conn in client._conns._idle:
        conn.idle_since -= userclient.IDLE_MAX + 1  # the daemon may be closing it
    assert client.list() == []
    assert counted.accepted == 2


def test_warm_failures_are_left_to_the_call(counted: Counted, tmp_path: Path) -> None:
    # An untrusted daemon: warm says nothing, the call names the problem.
    other = UserClient(counted.addr, timeout=5)  # the system store: canned CA unknown
    other.warm()
    with pytest.raises(userclient.UntrustedServer):
        other.list()
    # Nobody listening.
    counted.close()
    gone = _client(counted)
    gone.warm()
    with pytest.raises(DaemonUnreachable):
        gone.list()


class FakeSide:
    def __init__(self) -> None:
        self.warmed = threading.Event()

    def warm(self) -> None:
        self.warmed.set()


def test_ahead_gives_the_side_and_then_warms_it() -> None:
    side = FakeSide()
    ahead = remote.Ahead(lambda: side)
    assert ahead.result() is side
    assert side.warmed.wait(5)


def test_ahead_raises_what_making_the_side_raised_in_the_callers_thread() -> None:
    def fail() -> Any:
        raise InvalidArgument("bad --client-cert")

    with pytest.raises(InvalidArgument, match="bad --client-cert"):
        remote.Ahead(fail).result()


def test_result_does_not_wait_for_the_connection() -> None:
    release = threading.Event()

    class Slow(FakeSide):
        def warm(self) -> None:
            release.wait(10)

    side = Slow()
    assert remote.Ahead(lambda: side).result() is side  # while warm() still blocks
    release.set()


def test_tunnel_whose_client_side_cannot_be_made_releases_the_inbound_half(
        canned: Canned, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    canned.answers["POST /v1/tunnels/inbound?early=1"] = INBOUND_OK
    canned.answers[f"DELETE /v1/tunnels/{UID}"] = (200, {"released": 1})
    made: List[str] = []
    real_side = remote.side

    def side(args: Any, option: str) -> Any:
        made.append(option)
        if option == "--client-s2cs":
            raise InvalidArgument("cannot load the client certificate x: gone")
        return real_side(args, option)

    monkeypatch.setattr(remote, "side", side)
    code, out, err = _run(["tunnel", "--remote", "--server-s2cs", canned.addr,
                           "--client-s2cs", canned.addr, "--remote_ip", "192.0.2.1",
                           "--receiver_ports", "5300", "--server_cert", str(canned.ca)],
                          capsys)
    assert (code, out) == (2, "") and "cannot load the client certificate" in err
    assert f"inbound half at {canned.addr} was released: nothing is left" in err
    assert [(m, p) for m, p, _, _ in canned.seen] == [
        ("POST", "/v1/tunnels/inbound?early=1"), ("DELETE", f"/v1/tunnels/{UID}")]
    assert made == ["--server-s2cs", "--client-s2cs"]


def test_remote_mode_imports_no_daemon_to_daemon_documents() -> None:
    """Start-up time of every remote verb: the peer port's documents (peerwire, relay),
    uuid, and the daemon's model and peer identities (with their dataclasses) stay out
    of the CLI's remote mode."""
    import os
    import subprocess

    from .test_ctl_remote import REPO

    code = ("import sys, scistreamd.ctl.cli, scistreamd.ctl.verbs, scistreamd.ctl.remote, "
            "scistreamd.userclient, scistreamd.ctl.credentials; print(sorted(m for m in "
            "('uuid', 'scistreamd.peerwire', 'scistreamd.relay', 'scistreamd.model', "
            "'scistreamd.peerident', 'dataclasses') if m in sys.modules))")
    res = subprocess.run(["/usr/bin/python3", "-c", code], env=dict(os.environ,
                         PYTHONPATH=str(REPO)), capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_a_remote_call_imports_neither_requests_nor_logging(counted: Counted) -> None:
    """The user API's exchanges are http.client's (tlshttp.Connections): requests and
    urllib3 (~55 ms of every remote command's start) stay the daemon's, and logging
    is imported only for a debug line. Checked after a whole call, token and TLS."""
    import os
    import subprocess

    from .test_ctl_remote import REPO

    counted.answers["GET /v1/tunnels"] = (200, {"tunnels": []})
    code = ("import sys, scistreamd.ctl as c; rc = c.main(['list', '--remote', '--s2cs', "
            f"'{counted.addr}', '--server_cert', '{counted.ca}']); print(rc, sorted(m for m in "
            "('requests', 'urllib3', 'logging', 'charset_normalizer', 'chardet') "
            "if m in sys.modules))")
    res = subprocess.run(["/usr/bin/python3", "-c", code], env=dict(
        os.environ, PYTHONPATH=str(REPO), SCISTREAM_TOKEN="t" * 40), capture_output=True,
        text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == "0 []", res.stderr
    assert [(m, p, a) for m, p, a, _ in counted.seen] == [
        ("GET", "/v1/tunnels", "Bearer " + "t" * 40)]


def test_proxy_settings_never_see_the_token(counted: Counted) -> None:
    """https_proxy/HTTPS_PROXY/ALL_PROXY and a .netrc are not followed: the request and
    its bearer token go to the named daemon only, never to a proxy that the
    environment of a user's session names."""
    import os
    import socket
    import subprocess

    from .test_ctl_remote import REPO

    counted.answers["GET /v1/tunnels"] = (200, {"tunnels": []})
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    trap.settimeout(0.5)
    proxy = f"http://127.0.0.1:{trap.getsockname()[1]}"
    home = counted.ca.parent
    (home / ".netrc").write_text("machine 127.0.0.1 login x password y\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), SCISTREAM_TOKEN="t" * 40, HOME=str(home),
               https_proxy=proxy, HTTPS_PROXY=proxy, ALL_PROXY=proxy, all_proxy=proxy)
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    res = subprocess.run(["/usr/bin/python3", "-m", "scistreamd.ctl", "list", "--remote",
                          "--timeout", "3", "--s2cs", counted.addr,
                          "--server_cert", str(counted.ca)],
                         env=env, capture_output=True, text=True)
    try:
        assert res.returncode == 0, res.stderr
        with pytest.raises(socket.timeout):
            trap.accept()[0].close()  # nobody came to the proxy
    finally:
        trap.close()
    assert [(m, p, a) for m, p, a, _ in counted.seen] == [
        ("GET", "/v1/tunnels", "Bearer " + "t" * 40)]
