"""Unit tests of scistreamd.relay: stunnel config rendering and secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scistreamd.errors import InvalidArgument
from scistreamd.model import Endpoint, HostPort, Role, State, parse_hostport
from scistreamd.relay import (
    DEFAULT_CIPHERSUITES,
    RELAY_KEY_DIR,
    TLS13_CIPHERSUITES,
    new_psk,
    parse_ciphersuites,
    parse_psk,
    parse_safe_path,
    parse_stunnel_log_level,
    relay_file_path,
    render_psk_file,
    render_stunnel_config,
    stunnel_address,
    stunnel_command,
)

UID = "bd9f1a7e-04d7-11f0-b44c-946dae415862"
PSK_IN = "/run/scistream-relay/psk"
PSK_OUT = "/run/scistream-relay/psk"


def hp(text: str) -> HostPort:
    return parse_hostport(text, "test")


def inbound_3_2() -> Endpoint:
    return Endpoint(
        uid=UID,
        role=Role.INBOUND,
        listeners=(hp("192.168.150.1:5100"), hp("192.168.150.1:5101"), hp("192.168.150.1:5102")),
        targets=(hp("192.168.150.1:5300"), hp("192.168.150.1:5301")),
        num_conn=3,
        created_at=1742400000.0,
    )


def outbound_1() -> Endpoint:
    return Endpoint(
        uid=UID,
        role=Role.OUTBOUND,
        listeners=(hp("192.168.150.2:5100"),),
        targets=(hp("192.168.150.1:5100"),),
        num_conn=1,
        created_at=1742400000.0,
        state=State.ACTIVE,
        peer=hp("192.168.150.1:5000"),
    )


# --- secrets -----------------------------------------------------------------


def test_new_psk_is_random_256_bit_hex() -> None:
    keys = {new_psk() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert re.fullmatch(r"[0-9a-f]{64}", key)
        assert parse_psk(key) == key
    # Never derived from the uid.
    assert UID.replace("-", "") not in "".join(keys)


@pytest.mark.parametrize("bad", ["", "ab" * 31, "ab" * 33, "AB" * 32, "g" * 64, None, 1])
def test_parse_psk_rejects(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        parse_psk(bad)


def test_render_psk_file() -> None:
    psk = "0123456789abcdef" * 4
    assert render_psk_file(UID, psk) == f"{UID}:{psk}\n"
    assert render_psk_file(UID.upper(), psk) == f"{UID}:{psk}\n"
    with pytest.raises(InvalidArgument):
        render_psk_file(UID + "\nx", psk)
    with pytest.raises(InvalidArgument):
        render_psk_file(UID, psk + "\n")
    with pytest.raises(InvalidArgument):
        render_psk_file(UID, "short")


def test_relay_file_path() -> None:
    assert RELAY_KEY_DIR == "/run/scistream-relay"
    assert relay_file_path("psk") == PSK_IN
    assert relay_file_path("stunnel.conf") == "/run/scistream-relay/stunnel.conf"
    for name in ["../x", "a/b", "", ".", "..", "psk\n", "p sk", None, 3]:
        with pytest.raises(InvalidArgument):
            relay_file_path(name)  # type: ignore[arg-type]


# --- ciphersuites, levels, paths ---------------------------------------------


def test_parse_ciphersuites() -> None:
    assert parse_ciphersuites(DEFAULT_CIPHERSUITES) == DEFAULT_CIPHERSUITES
    assert parse_ciphersuites("TLS_CHACHA20_POLY1305_SHA256") == "TLS_CHACHA20_POLY1305_SHA256"
    assert parse_ciphersuites(":".join(TLS13_CIPHERSUITES))
    for bad in (
        "",
        "eNULL",
        "ALL",
        "AES128-SHA",
        "TLS_AES_128_GCM_SHA256:",
        "TLS_AES_128_GCM_SHA256:TLS_AES_128_GCM_SHA256",
        "TLS_AES_128_GCM_SHA256\nexec = /bin/sh",
        "tls_aes_128_gcm_sha256",
        "TLS_AES_256_GCM_SHA384",  # PSK handshakes need a SHA-256 suite
        None,
        ["TLS_AES_128_GCM_SHA256"],
    ):
        with pytest.raises(InvalidArgument):
            parse_ciphersuites(bad)


def test_parse_stunnel_log_level() -> None:
    for level in ("emerg", "notice", "info", "debug"):
        assert parse_stunnel_log_level(level) == level
    for bad in ("", "7", "DEBUG", "verbose", "debug\n", 7, None):
        with pytest.raises(InvalidArgument):
            parse_stunnel_log_level(bad)


@pytest.mark.parametrize(
    "bad",
    ["", "relative/path", "/a/../b", "/a b", "/a\nb", "/a\x00b", "/a=b", "/ä", "/a;b", None],
)
def test_parse_safe_path_rejects(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        parse_safe_path(bad, "path")


def test_stunnel_command() -> None:
    conf = "/run/scistream-relay/stunnel.conf"
    assert stunnel_command(Path("/usr/bin/stunnel4"), conf) == ["/usr/bin/stunnel4", conf]
    with pytest.raises(InvalidArgument):
        stunnel_command(Path("stunnel4"), conf)
    with pytest.raises(InvalidArgument):
        stunnel_command("/usr/bin/stunnel4", conf)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        stunnel_command(Path("/usr/bin/stunnel4"), "relative.conf")


# --- addresses ---------------------------------------------------------------


def test_stunnel_address_forms() -> None:
    assert stunnel_address(hp("192.168.150.1:5100")) == "192.168.150.1:5100"
    # stunnel splits at the last colon and rejects brackets ("Error resolving \"[::1]\"").
    assert stunnel_address(hp("[::1]:5100")) == "::1:5100"
    assert stunnel_address(hp("[2001:db8::1]:443")) == "2001:db8::1:443"
    with pytest.raises(InvalidArgument):
        stunnel_address("127.0.0.1:5100")  # type: ignore[arg-type]


# --- rendering ---------------------------------------------------------------

EXPECTED_INBOUND = f"""\
; stunnel relay of scistream tunnel {UID} (inbound), written by scistreamd
foreground = yes
pid =
syslog = no
debug = notice

[inbound-0]
accept = 192.168.150.1:5100
connect = 192.168.150.1:5300
sslVersionMin = TLSv1.3
sslVersionMax = TLSv1.3
ciphersuites = TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
PSKsecrets = {PSK_IN}
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1

[inbound-1]
accept = 192.168.150.1:5101
connect = 192.168.150.1:5301
sslVersionMin = TLSv1.3
sslVersionMax = TLSv1.3
ciphersuites = TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
PSKsecrets = {PSK_IN}
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1

[inbound-2]
accept = 192.168.150.1:5102
connect = 192.168.150.1:5300
sslVersionMin = TLSv1.3
sslVersionMax = TLSv1.3
ciphersuites = TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
PSKsecrets = {PSK_IN}
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
"""

EXPECTED_OUTBOUND = f"""\
; stunnel relay of scistream tunnel {UID} (outbound), written by scistreamd
foreground = yes
pid =
syslog = no
debug = info

[outbound-0]
client = yes
accept = 192.168.150.2:5100
connect = 192.168.150.1:5100
sslVersionMin = TLSv1.3
sslVersionMax = TLSv1.3
ciphersuites = TLS_CHACHA20_POLY1305_SHA256
PSKsecrets = {PSK_OUT}
PSKidentity = {UID}
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
"""


def test_render_inbound_round_robin_exact() -> None:
    text = render_stunnel_config(inbound_3_2(), psk_path=PSK_IN, ciphersuites=DEFAULT_CIPHERSUITES)
    assert text == EXPECTED_INBOUND


def test_render_outbound_exact() -> None:
    text = render_stunnel_config(
        outbound_1(),
        psk_path=PSK_OUT,
        ciphersuites="TLS_CHACHA20_POLY1305_SHA256",
        log_level="info",
    )
    assert text == EXPECTED_OUTBOUND


def test_render_ipv6_uses_stunnel_form() -> None:
    ep = Endpoint(
        uid=UID,
        role=Role.INBOUND,
        listeners=(hp("[::1]:5100"),),
        targets=(hp("[::1]:5300"),),
        num_conn=1,
        created_at=0.0,
    )
    text = render_stunnel_config(ep, psk_path=PSK_IN, ciphersuites=DEFAULT_CIPHERSUITES)
    assert "accept = ::1:5100\n" in text
    assert "connect = ::1:5300\n" in text
    assert "[::1]" not in text


def test_render_never_weakens_tls() -> None:
    for ep in (inbound_3_2(), outbound_1()):
        text = render_stunnel_config(ep, psk_path=PSK_IN, ciphersuites=DEFAULT_CIPHERSUITES)
        lowered = text.lower()
        for forbidden in ("enull", "securitylevel", "ciphers =", "verify", "exec", "tlsv1.2"):
            assert forbidden not in lowered
        sections = text.count("\n[")
        assert text.count("sslVersionMin = TLSv1.3") == sections
        assert text.count("sslVersionMax = TLSv1.3") == sections
        assert text.count("PSKsecrets = ") == sections


@pytest.mark.parametrize(
    "kwargs",
    [
        {"psk_path": "/run/x\nexec = /bin/sh"},
        {"psk_path": "relative"},
        {"psk_path": "/a b"},
        {"ciphersuites": "eNULL"},
        {"ciphersuites": DEFAULT_CIPHERSUITES + "\nexec = /bin/sh"},
        {"log_level": "debug\nexec = /bin/sh"},
        {"log_level": "7"},
    ],
)
def test_render_rejects_unsafe_arguments(kwargs: dict) -> None:
    args = {"psk_path": PSK_IN, "ciphersuites": DEFAULT_CIPHERSUITES, **kwargs}
    with pytest.raises(InvalidArgument):
        render_stunnel_config(inbound_3_2(), **args)


def test_render_revalidates_a_mutated_endpoint() -> None:
    ep = inbound_3_2()
    ep.uid = UID + "\nexec = /bin/sh"
    with pytest.raises(InvalidArgument):
        render_stunnel_config(ep, psk_path=PSK_IN, ciphersuites=DEFAULT_CIPHERSUITES)
    with pytest.raises(InvalidArgument):
        render_stunnel_config("x", psk_path=PSK_IN, ciphersuites=DEFAULT_CIPHERSUITES)  # type: ignore[arg-type]


def _is_directive(line: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z]+ = [\x21-\x7e]+( [\x21-\x7e]+)*|pid =", line))


@given(
    st.lists(st.ip_addresses(), min_size=1, max_size=5, unique=True),
    st.lists(st.integers(min_value=1, max_value=65535), min_size=1, max_size=5, unique=True),
    st.sampled_from(list(Role)),
)
def test_render_output_is_only_well_formed_lines(addrs: list, ports: list, role: Role) -> None:
    addrs = [a for a in addrs if not a.is_unspecified and not a.is_multicast]
    if not addrs:
        return
    listeners = tuple(HostPort(addrs[0], p) for p in ports)
    targets = tuple(HostPort(a, ports[0]) for a in addrs)
    ep = Endpoint(UID, role, listeners, targets, len(listeners), 0.0)
    text = render_stunnel_config(ep, psk_path=PSK_IN, ciphersuites=DEFAULT_CIPHERSUITES)
    assert text.endswith("\n") and "\r" not in text and "\x00" not in text
    for line in text.splitlines():
        assert (
            line == ""
            or line.startswith("; ")
            or re.fullmatch(rf"\[{role.value}-[0-9]+\]", line)
            or _is_directive(line)
        ), line
