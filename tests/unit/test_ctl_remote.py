"""scistreamctl's remote mode, the parts that need no daemon: token sourcing and
redaction, which daemon a verb goes to, argument parsing, and the mapping of
user API answers to exit codes.

The tiny HTTPS server here only answers canned documents: it checks what the
client sends and how it maps answers, nothing about the real user API (that is
tests/integration/test_remote_cli.py, against real daemons on the test bed).
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from scistreamd import ctl, errors
from scistreamd.certs import make_ca, make_host_cert, write_pair
from scistreamd.ctl import credentials, remote

REPO = Path(__file__).resolve().parents[2]
UID = "bd9f1a7e-04d7-11f0-b44c-946dae415862"
TOKEN = "AgV0kE8mlqQ9x3yVb1W2Nn4PjK7vRzTyC5sQ0aFhLd6-._~+/="


# ---------------------------------------------------------------------------
# Tokens


def test_redaction_never_shows_the_token() -> None:
    assert credentials.redact(None) == "INVALID_TOKEN"
    assert credentials.redact("") == "INVALID_TOKEN"
    shown = credentials.redact(TOKEN)
    assert shown.startswith("REDACTED:") and len(shown) == len("REDACTED:") + 8
    assert TOKEN[:6] not in shown and shown != credentials.redact(TOKEN + "x")
    token = credentials.parse_token(f"  {TOKEN}\n", "x")
    assert TOKEN not in repr(token) and token.redacted() == shown


@pytest.mark.parametrize("text", ["", "  \n", "a b", "tok\nen", "tök", "x" * 20000, "a=b"])
def test_bad_token_text_is_refused_without_echo(text: str) -> None:
    with pytest.raises(errors.InvalidArgument) as got:
        credentials.parse_token(text, "$SCISTREAM_TOKEN")
    assert "$SCISTREAM_TOKEN" in str(got.value)
    if len(text.strip()) > 3:
        assert text.strip()[:20] not in str(got.value)


def _token_file(path: Path, mode: int = 0o600, text: str = TOKEN) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return path


def test_token_sources_in_order(tmp_path: Path) -> None:
    per_user = _token_file(tmp_path / "cfg/scistream/token", text="peruser")
    given = _token_file(tmp_path / "given", text="fromfile")
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "HOME": "/nonexistent"}
    assert credentials.user_token_path(env) == str(per_user)
    got = credentials.find_token(None, env)
    assert got is not None and (got.value, got.source) == ("peruser",
                                                           f"the token file {per_user}")
    got = credentials.find_token(None, {**env, "SCISTREAM_TOKEN": "fromenv"})
    assert got is not None and (got.value, got.source) == ("fromenv", "$SCISTREAM_TOKEN")
    got = credentials.find_token(str(given), {**env, "SCISTREAM_TOKEN": "fromenv"})
    assert got is not None and got.value == "fromfile"
    # no token anywhere: none (a certificate may be the identity)
    assert credentials.find_token(None, {"XDG_CONFIG_HOME": str(tmp_path / "none")}) is None
    # XDG rule: a relative XDG_CONFIG_HOME is ignored, HOME/.config used
    assert credentials.user_token_path({"XDG_CONFIG_HOME": "rel", "HOME": "/h"}) == \
        "/h/.config/scistream/token"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620])
def test_token_file_others_can_read_is_refused_by_name(tmp_path: Path, mode: int) -> None:
    path = _token_file(tmp_path / "cfg/scistream/token", mode)
    with pytest.raises(errors.InvalidArgument) as got:
        credentials.find_token(None, {"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert str(path) in str(got.value) and f"chmod 600 {path}" in str(got.value)
    assert TOKEN not in str(got.value)
    with pytest.raises(errors.InvalidArgument):
        credentials.find_token(str(path), {})


def test_token_file_not_mine_symlink_dir_missing(tmp_path: Path) -> None:
    path = _token_file(tmp_path / "t")
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
        with pytest.raises(errors.InvalidArgument, match="belongs to uid 65534"):
            credentials.find_token(str(path), {})
        os.chown(path, 0, 0)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(errors.InvalidArgument, match="is a symbolic link"):
        credentials.find_token(str(link), {})
    with pytest.raises(errors.InvalidArgument, match="not a regular file"):
        credentials.read_token_file(str(tmp_path), "--token-file")
    with pytest.raises(errors.InvalidArgument, match="no such file"):
        credentials.find_token(str(tmp_path / "missing"), {})


# ---------------------------------------------------------------------------
# Which daemon


def test_this_host_by_binding() -> None:
    assert remote.is_this_host(ipaddress.ip_address("127.0.0.1"))
    assert remote.is_this_host(ipaddress.ip_address("127.0.0.2"))
    # TEST-NET-1: never an address of this machine (binding sends nothing)
    assert not remote.is_this_host(ipaddress.ip_address("192.0.2.1"))


def test_daemon_of(monkeypatch: pytest.MonkeyPatch) -> None:
    args = ctl.parse_args(["list"])
    assert remote.daemon_of(args, None) is None
    assert str(remote.daemon_of(args, "192.0.2.1:5000")) == "192.0.2.1:5000"
    # this host's address: its daemon's peer port decides
    monkeypatch.setattr(remote, "own_peer_port", lambda a: 5000)
    assert remote.daemon_of(args, "127.0.0.1:5000") is None
    assert str(remote.daemon_of(args, "127.0.0.1:6000")) == "127.0.0.1:6000"
    monkeypatch.setattr(remote, "own_peer_port", lambda a: None)  # bus cannot say
    assert remote.daemon_of(args, "127.0.0.1:6000") is None
    forced = ctl.parse_args(["list", "--remote", "--s2cs", "127.0.0.1:5000"])
    assert str(remote.daemon_of(forced, forced.s2cs)) == "127.0.0.1:5000"
    with pytest.raises(ctl.CtlError) as got:
        remote.daemon_of(ctl.parse_args(["list", "--remote"]), None)
    assert got.value.exit_code == 2


def test_parse_tunnel_and_release_both() -> None:
    args = ctl.parse_args(["tunnel", "--server-s2cs", "192.0.2.1:5000", "--client_s2cs",
                           "192.0.2.2:5000", "--remote_ip", "192.0.2.1", "--receiver_ports",
                           "5300", "--num_conn", "2", "--local-ports", "6000,6001",
                           "--token-file", "/t", "--server_cert", "/ca.pem",
                           "--peer-trust", "/p.pem"])
    assert (args.server_s2cs, args.client_s2cs, args.local_ports) == (
        "192.0.2.1:5000", "192.0.2.2:5000", ["6000,6001"])
    assert (args.token_file, args.server_cert, args.peer_trust) == ("/t", "/ca.pem", "/p.pem")
    with pytest.raises(ctl.CtlError):  # both daemons are required
        ctl.parse_args(["tunnel", "--server-s2cs", "192.0.2.1:5000", "--remote_ip",
                        "192.0.2.1", "--receiver_ports", "5300"])
    args = ctl.parse_args(["release", UID, "--server-s2cs", "192.0.2.1:5000",
                           "--client-s2cs", "192.0.2.2:5000"])
    assert (args.uid, args.server_s2cs, args.client_s2cs) == (UID, "192.0.2.1:5000",
                                                              "192.0.2.2:5000")
    for verb in (["list"], ["status", UID], ["release", UID]):
        args = ctl.parse_args([*verb, "--s2cs", "192.0.2.1:5000", "--client-cert", "/c"])
        assert (args.s2cs, args.client_cert) == ("192.0.2.1:5000", "/c")


def test_release_both_needs_both_and_a_uid(capsys: pytest.CaptureFixture) -> None:
    for argv in (["release", UID, "--server-s2cs", "192.0.2.1:5000"],
                 ["release", "--all", "--server-s2cs", "192.0.2.1:5000",
                  "--client-s2cs", "192.0.2.2:5000"],
                 ["release", UID, "--s2cs", "192.0.2.3:5000", "--server-s2cs",
                  "192.0.2.1:5000", "--client-s2cs", "192.0.2.2:5000"]):
        assert ctl.main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 3


def test_endpoint_json_back_to_property_names() -> None:
    got = remote.dbus_style({"uid": UID, "state_detail": "", "n_restarts": 1, "main_pid": 7,
                             "created_at": "2026-12-03T10:00:00+00:00", "claimed_at": None,
                             "last_target_failure_at": "2026-12-03T10:00:01Z"})
    assert got == {"Uid": UID, "StateDetail": "", "NRestarts": 1, "MainPID": 7,
                   "CreatedAt": 1796292000000000, "ClaimedAt": 0,
                   "LastTargetFailureAt": 1796292001000000}


# ---------------------------------------------------------------------------
# Answers -> exit codes


@pytest.mark.parametrize("name", sorted(
    c.name for c in errors.BY_DBUS_NAME.values()))
def test_every_named_error_keeps_its_class_and_exit_code(name: str) -> None:
    from scistreamd.model import parse_hostport
    from scistreamd.userclient import error_from_answer

    cls = errors.BY_DBUS_NAME[f"org.scistream.Tunnel1.Error.{name}"]
    err = error_from_answer(parse_hostport("192.0.2.1:5000", "x"), 409,
                            {"error": name, "message": "the fix"}, "the request")
    assert type(err) is cls and err.exit_code == cls.exit_code
    assert str(err) == "scistreamd at 192.0.2.1:5000: the fix"


def test_http_layer_answers() -> None:
    from scistreamd.model import parse_hostport
    from scistreamd.userclient import error_from_answer

    hp = parse_hostport("192.0.2.1:5000", "x")
    busy = error_from_answer(hp, 503, {"error": "Busy", "message": "m"}, "r")
    assert (busy.name, busy.exit_code) == ("DaemonUnreachable", 10)
    old = error_from_answer(hp, 404, {"error": "UnknownPath"}, "r")
    assert old.exit_code == 1 and "no user API" in str(old)
    odd = error_from_answer(hp, 418, ["not", "an", "object"], "r")
    assert odd.exit_code == 1 and "HTTP 418" in str(odd)


# ---------------------------------------------------------------------------
# A canned HTTPS server (wire encoding and error mapping only)


class Canned:
    """Answers (status, doc) per "METHOD path" key; records every request."""

    def __init__(self, tmp: Path, host: str = "127.0.0.1") -> None:
        ca = make_ca("canned CA")
        pair = make_host_cert("canned", [ipaddress.ip_address(host)], issuer=ca)
        write_pair(pair, tmp / "srv.crt", tmp / "srv.key")
        self.ca = tmp / "ca.crt"
        self.ca.write_bytes(ca.cert_pem())
        self.answers: Dict[str, Tuple[int, Any]] = {}
        self.delays: Dict[str, float] = {}
        self.seen: List[Tuple[str, str, str, Any]] = []
        self.hosts: List[str] = []  # each request's Host header
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                key = f"{self.command} {self.path}"
                owner.seen.append((self.command, self.path,
                                   self.headers.get("Authorization", ""), body))
                owner.hosts.append(self.headers.get("Host", ""))
                status, doc = owner.answers.get(key, (404, {"error": "UnknownPath"}))
                time.sleep(owner.delays.get(key, 0))
                raw = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = do_DELETE = _any

            def log_message(self, *a: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def handle_error(self, request: Any, client_address: Any) -> None:
                # A client that went away before its answer (a test interrupts or
                # times it out) is not the server's error: nothing on stderr, where
                # it would land in a later test's captured output.
                if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):
                    super().handle_error(request, client_address)

        self.httpd = Server((host, 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp / "srv.crt", tmp / "srv.key")
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        port = self.httpd.server_address[1]
        self.addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def canned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    c = Canned(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nocfg"))
    monkeypatch.delenv("SCISTREAM_TOKEN", raising=False)
    monkeypatch.setenv(ctl.BUS_ADDRESS_ENV, "unix:path=/nonexistent")
    yield c
    c.close()


def _run(argv: List[str], capsys: pytest.CaptureFixture) -> Tuple[int, str, str]:
    code = ctl.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


INBOUND_OK = (201, {"uid": UID, "listeners": ["192.0.2.1:5100"], "endpoint": {"uid": UID}})


def test_remote_inbound_sends_token_shows_it_redacted(canned: Canned, capsys,
                                                      monkeypatch) -> None:
    canned.answers["POST /v1/tunnels/inbound"] = INBOUND_OK
    monkeypatch.setenv("SCISTREAM_TOKEN", TOKEN)
    code, out, err = _run(["inbound-request", "--remote", "--s2cs", canned.addr,
                           "--remote_ip", "192.0.2.1", "--receiver_ports", "5300",
                           "--server_cert", str(canned.ca)], capsys)
    assert (code, err) == (0, "")
    assert out == ("uid; s2cs; access_token; role\n"
                   f"{UID} {canned.addr} {credentials.redact(TOKEN)} PROD\n"
                   "Listeners: ['192.0.2.1:5100']\n")
    assert canned.seen == [("POST", "/v1/tunnels/inbound", f"Bearer {TOKEN}",
                            {"remote_ip": "192.0.2.1", "receiver_ports": [5300],
                             "num_conn": 1})]
    assert TOKEN not in out


@pytest.mark.parametrize("name,code", [("PortsExhausted", 5), ("AccessDenied", 9),
                                       ("InvalidArgument", 2), ("PeerRejected", 7),
                                       ("NotFound", 3), ("Busy", 10)])
def test_remote_error_names_give_the_dbus_exit_codes(canned: Canned, capsys, name: str,
                                                     code: int) -> None:
    canned.answers["POST /v1/tunnels/inbound"] = (409, {"error": name, "message": "why. fix"})
    got, out, err = _run(["--json", "inbound-request", "--remote", "--s2cs", canned.addr,
                          "--remote_ip", "192.0.2.1", "--receiver_ports", "5300",
                          "--server_cert", str(canned.ca)], capsys)
    assert got == code and err.count("\n") == 1 and "Traceback" not in err
    assert json.loads(out)["exit_code"] == code


def test_remote_transport_failures(canned: Canned, capsys, tmp_path: Path) -> None:
    base = ["list", "--remote", "--timeout", "5"]
    # untrusted: the system store does not know the canned CA
    code, _, err = _run([*base, "--s2cs", canned.addr], capsys)
    assert code == 1 and "not trusted" in err and "--server_cert" in err
    # nobody listens
    canned.close()
    code, _, err = _run([*base, "--s2cs", canned.addr, "--server_cert", str(canned.ca)], capsys)
    assert code == 10 and "not reachable" in err


def test_tunnel_rolls_back_the_inbound_half(canned: Canned, capsys) -> None:
    canned.answers["POST /v1/tunnels/inbound?early=1"] = INBOUND_OK
    canned.answers["POST /v1/tunnels/outbound"] = (409, {"error": "PeerRejected",
                                                         "message": "claimed"})
    canned.answers[f"DELETE /v1/tunnels/{UID}"] = (200, {"released": 1})
    code, out, err = _run(["tunnel", "--remote", "--server-s2cs", canned.addr,
                           "--client-s2cs", canned.addr, "--remote_ip", "192.0.2.1",
                           "--receiver_ports", "5300", "--server_cert", str(canned.ca)],
                          capsys)
    assert (code, out) == (7, "") and "claimed" in err
    assert f"inbound half at {canned.addr} was released: nothing is left" in err
    assert [(m, p) for m, p, _, _ in canned.seen] == [
        ("POST", "/v1/tunnels/inbound?early=1"), ("POST", "/v1/tunnels/outbound"),
        ("DELETE", f"/v1/tunnels/{UID}"), ("DELETE", f"/v1/tunnels/{UID}")]
    # the key may only go to the client side's daemon; the client side claims from
    # the server side's address
    assert canned.seen[1][3] == {"uid": UID, "remote_listeners": ["192.0.2.1:5100"],
                                 "num_conn": 1, "peer": canned.addr}


def test_tunnel_rollback_that_fails_says_how_to_release(canned: Canned, capsys) -> None:
    canned.answers["POST /v1/tunnels/inbound?early=1"] = INBOUND_OK
    canned.answers["POST /v1/tunnels/outbound"] = (403, {"error": "AccessDenied",
                                                         "message": "no"})
    canned.answers[f"DELETE /v1/tunnels/{UID}"] = (500, {"error": "Failed", "message": "x"})
    code, _, err = _run(["tunnel", "--remote", "--server-s2cs", canned.addr,
                         "--client-s2cs", canned.addr, "--remote_ip", "192.0.2.1",
                         "--receiver_ports", "5300", "--server_cert", str(canned.ca)], capsys)
    assert code == 9 and err.count("\n") == 1
    assert (f"'scistreamctl release {UID} --server-s2cs {canned.addr} --client-s2cs "
            f"{canned.addr}'") in err


def test_tunnel_interrupted_in_its_outbound_half_releases_the_inbound_half(
        canned: Canned, tmp_path: Path) -> None:
    import signal

    canned.answers["POST /v1/tunnels/inbound?early=1"] = INBOUND_OK
    canned.answers["POST /v1/tunnels/outbound"] = (201, {"listeners": ["192.0.2.2:5100"]})
    canned.delays["POST /v1/tunnels/outbound"] = 3.0
    canned.answers[f"DELETE /v1/tunnels/{UID}"] = (200, {"released": 1})
    env = dict(os.environ, PYTHONPATH=str(REPO), XDG_CONFIG_HOME=str(tmp_path / "none"))
    proc = subprocess.Popen(
        ["/usr/bin/python3", "-m", "scistreamd.ctl", "tunnel", "--remote", "--server-s2cs",
         canned.addr, "--client-s2cs", canned.addr, "--remote_ip", "192.0.2.1",
         "--receiver_ports", "5300", "--server_cert", str(canned.ca)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while len(canned.seen) < 2 and time.monotonic() < deadline:  # the outbound half is asked
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (130, ""), err
    assert "Traceback" not in err
    assert [(m, p) for m, p, _, _ in canned.seen][-2:] == [
        ("DELETE", f"/v1/tunnels/{UID}"), ("DELETE", f"/v1/tunnels/{UID}")]


def test_tunnel_loopback_addresses(canned: Canned, capsys) -> None:
    base = ["tunnel", "--remote", "--remote_ip", "192.0.2.1", "--receiver_ports", "5300",
            "--server_cert", str(canned.ca)]
    # the client side would claim from its own loopback: refused before anything is made
    code, _, err = _run([*base, "--server-s2cs", "127.0.0.1:5000", "--client-s2cs",
                         "192.0.2.2:5000"], capsys)
    assert code == 2 and "loopback" in err and canned.seen == []
    # a loopback name of the client side says nothing of its certificate: no allowed_peer
    canned.answers["POST /v1/tunnels/inbound?early=1"] = INBOUND_OK
    canned.answers["POST /v1/tunnels/outbound"] = (201, {"listeners": ["192.0.2.2:5100"]})
    code, _, err = _run([*base, "--server-s2cs", canned.addr, "--client-s2cs", canned.addr],
                        capsys)
    assert code == 0, err
    assert "allowed_peer" not in canned.seen[0][3]


def test_tunnel_prints_both_sides(canned: Canned, capsys) -> None:
    canned.answers["POST /v1/tunnels/inbound?early=1"] = INBOUND_OK
    canned.answers["POST /v1/tunnels/outbound"] = (201, {"listeners": ["192.0.2.2:5100"],
                                                         "endpoint": {}})
    code, out, err = _run(["tunnel", "--remote", "--server-s2cs", canned.addr,
                           "--client-s2cs", canned.addr, "--remote_ip", "192.0.2.1",
                           "--receiver_ports", "5300", "--server_cert", str(canned.ca)],
                          capsys)
    assert (code, err) == (0, "")
    assert out == ("uid; s2cs; access_token; role\n"
                   f"{UID} {canned.addr} INVALID_TOKEN PROD\n"
                   f"{UID} {canned.addr} INVALID_TOKEN CONS\n"
                   "Listeners: ['192.0.2.2:5100']\n")


STARTING = (201, {"uid": UID, "listeners": ["192.0.2.1:5100"],
                  "endpoint": {"uid": UID, "role": "inbound", "state": "starting"}})
TUNNEL_ARGS = ["--remote_ip", "192.0.2.1", "--receiver_ports", "5300"]


def test_tunnel_confirms_an_early_server_sides_start(canned: Canned, capsys) -> None:
    canned.answers["POST /v1/tunnels/inbound?early=1"] = STARTING
    canned.answers["POST /v1/tunnels/outbound"] = (201, {"listeners": ["192.0.2.2:5100"],
                                                         "endpoint": {}})
    canned.answers[f"GET /v1/tunnels/{UID}?wait=1"] = (200, {"tunnels": [
        {"uid": UID, "role": "inbound", "state": "active"}]})
    code, out, err = _run(["--json", "tunnel", "--remote", "--server-s2cs", canned.addr,
                           "--client-s2cs", canned.addr, *TUNNEL_ARGS,
                           "--server_cert", str(canned.ca)], capsys)
    assert (code, err) == (0, "")
    assert json.loads(out)["server"]["endpoint"]["state"] == "active"
    seen = [(m, p) for m, p, _, _ in canned.seen]
    # The wait is asked beside the client side's half (in either order), after the answer.
    assert seen[0] == ("POST", "/v1/tunnels/inbound?early=1")
    assert sorted(seen[1:]) == [("GET", f"/v1/tunnels/{UID}?wait=1"),
                                ("POST", "/v1/tunnels/outbound")]


def test_tunnel_whose_server_side_does_not_start_releases_the_client_side(
        canned: Canned, capsys) -> None:
    canned.answers["POST /v1/tunnels/inbound?early=1"] = STARTING
    canned.answers["POST /v1/tunnels/outbound"] = (201, {"listeners": ["192.0.2.2:5100"],
                                                         "endpoint": {}})
    canned.answers[f"GET /v1/tunnels/{UID}?wait=1"] = (502, {
        "error": "RelayFailed", "message": "listener 192.0.2.1:5100 of tunnel x is in use"})
    canned.answers[f"DELETE /v1/tunnels/{UID}"] = (200, {"released": 1})
    code, out, err = _run(["tunnel", "--remote", "--server-s2cs", canned.addr,
                           "--client-s2cs", canned.addr, *TUNNEL_ARGS,
                           "--server_cert", str(canned.ca)], capsys)
    assert (code, out) == (8, "") and "is in use" in err
    assert (f"the inbound half of tunnel {UID} at {canned.addr} did not start; its outbound "
            f"half at {canned.addr} was released: nothing is left") in err
    seen = [(m, p) for m, p, _, _ in canned.seen]
    assert sorted(seen[1:3]) == [("GET", f"/v1/tunnels/{UID}?wait=1"),
                                 ("POST", "/v1/tunnels/outbound")]
    assert seen[3:] == [("DELETE", f"/v1/tunnels/{UID}")] * 2  # client side, server side


def test_version_and_list_do_not_import_remote_mode() -> None:
    code = ("import sys, scistreamd.ctl as c; c.main(['list']); "
            "print(sorted(m for m in ('requests', 'urllib3', 'ssl', 'scistreamd.userclient',"
            " 'scistreamd.ctl.remote', 'scistreamd.ctl.credentials', 'scistreamd.model',"
            " 'hashlib', 'secrets', 'logging', 'shutil') if m in sys.modules))")
    res = subprocess.run(["/usr/bin/python3", "-c", code], env=dict(
        os.environ, PYTHONPATH=str(REPO), SCISTREAM_BUS_ADDRESS="unix:path=/nonexistent"),
        capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == "[]"
