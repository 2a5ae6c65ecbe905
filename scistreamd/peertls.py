"""TLS of the peer port: the server and client contexts, trust PEM checks, identities.

The one place that loads certificates for the peer port and turns OpenSSL's
failures into named errors. Imports only the standard library and the pure
model, so the CLI may use :func:`check_trust_pem` for ``--server_cert``.
:class:`ServerTls` runs the server side of a connection over asyncio streams.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from .errors import ConfigError, InvalidArgument

if TYPE_CHECKING:  # asyncio only where ServerTls runs (the daemon): CLI start-up
    import asyncio

    # Not on the CLI's remote path at run time (their dataclasses: ~4 ms).
    from .model import IPAddress
    from .peerident import PeerIdentity

#: Largest trust PEM accepted (CLI --server_cert, D-Bus option trust_pem).
MAX_TRUST_PEM = 1024 * 1024
PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
# "(_ssl.c:992)" in OpenSSL error texts: noise for a user.
_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)")
#: OpenSSL's X509_V_FLAG_PARTIAL_CHAIN: the trust may be the peer's own CA-issued
#: certificate (pinning), not only its root.
_PARTIAL_CHAIN = getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0x80000)
#: TLS alerts a server sends when it does not accept our client certificate (or its absence).
CLIENT_CERT_ALERTS = frozenset({
    "TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE",
    "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV1_ALERT_UNKNOWN_CA",
    "TLSV1_ALERT_ACCESS_DENIED", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
})


def _clean(text: object, limit: int = 200) -> str:
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    return s if len(s) <= limit else s[: limit - 3] + "..."


def ssl_reason(e: BaseException) -> str:
    """OpenSSL's reason for a failure, without source locations."""
    if isinstance(e, ssl.SSLError) and getattr(e, "reason", None):
        return str(e.reason)
    if isinstance(e, OSError) and e.strerror:
        return _clean(_SSL_SOURCE.sub("", e.strerror))
    return _clean(_SSL_SOURCE.sub("", str(e)))


def check_trust_pem(value: object, what: str = "option trust_pem", *, load: bool = True) -> str:
    """PEM text of one or more certificates, each loadable by OpenSSL, else InvalidArgument.

    The one check of a trust PEM: the daemon's trust_pem option (``load``:
    OpenSSL parses every certificate), and the CLI's --server_cert file, whose
    form only it checks (the daemon loads it anyway). The client context
    then only loads it.
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be PEM text")
    if len(value) > MAX_TRUST_PEM:
        raise InvalidArgument(f"{what} is larger than 1 MiB: give only the CA bundle or "
                              "peer certificate")
    if PEM_BEGIN not in value:
        raise InvalidArgument(
            f"{what} holds no PEM certificate: give a file with '{PEM_BEGIN}' blocks "
            "(convert DER with 'openssl x509 -inform der'): a CA bundle or the peer's "
            "certificate, with --server_cert")
    if not load:
        return value
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=value)
    except (ssl.SSLError, ValueError) as e:
        raise InvalidArgument(f"{what} holds an unreadable certificate ({ssl_reason(e)}): "
                              "pass the peer's PEM certificate or CA with --server_cert") from None
    return value


# -- server --------------------------------------------------------------------


def server_context(cert: Path, key: Path, client_ca: Optional[Path],
                   user_client_ca: Optional[Path] = None) -> ssl.SSLContext:
    """The peer port's context; ConfigError naming the file that cannot be loaded.

    ``user_client_ca``: CA(s) of users' client certificates (user API), trusted
    besides ``client_ca``; which of the two a certificate chains to is decided
    after the handshake (usercert.py)."""
    for path, what in ((cert, "certificate"), (key, "private key")):
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ConfigError(str(path), "", f"cannot read the peer-port TLS {what}: "
                              f"{e.strerror or e}; create it or fix its permissions (the "
                              "daemon must be able to read it)") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2 fallback: forward-secret AEAD suites only (TLS 1.3 suites are all fine).
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.options |= ssl.OP_NO_COMPRESSION
    # One request per connection: resumption buys nothing, tickets are extra writes
    # (and would make a connection scistreamctl opened ahead look closed to urllib3).
    ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError, ValueError) as e:
        raise ConfigError(str(cert), "", f"cannot load the peer-port certificate with key "
                          f"{key}: {ssl_reason(e)}; both must be PEM and the key must belong "
                          "to the certificate") from None
    for ca, whose in ((client_ca, "peer daemons'"), (user_client_ca, "users'")):
        if ca is None:
            continue
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, OSError, ValueError) as e:
            raise ConfigError(str(ca), "", f"cannot load the CA for {whose} client "
                              f"certificates: {ssl_reason(e)}; give a readable PEM file of "
                              f"the CA(s) that sign {whose} certificates") from None
    if client_ca is not None or user_client_ca is not None:
        # Optional at the TLS level: a client without a certificate still gets an
        # HTTP answer naming the fix; one that does not chain fails the handshake.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.verify_flags |= _PARTIAL_CHAIN
    return ctx


def is_client_cert_failure(e: ssl.SSLError) -> bool:
    return isinstance(e, ssl.SSLCertVerificationError) or getattr(e, "reason", "") in (
        "PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATES_RETURNED")


def cert_failure_text(e: ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLCertVerificationError) and getattr(e, "verify_message", ""):
        return _clean(e.verify_message, 120)
    return ssl_reason(e)


def format_client(addr: Any) -> str:
    """ip:port of a connection's peer; IPv4 peers of a dual-stack socket shown as IPv4."""
    try:
        ip: IPAddress = ipaddress.ip_address(addr[0])
    except (ValueError, IndexError, TypeError):
        return _clean(addr, 80)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return f"[{ip}]:{addr[1]}" if ip.version == 6 else f"{ip}:{addr[1]}"


def identity_of(who: str, cert: Dict[str, Any]) -> PeerIdentity:
    """A PeerIdentity from ssl's dict form of a verified certificate."""
    from .peerident import PeerIdentity  # the server's side only

    ips: List[IPAddress] = []
    dns: List[str] = []
    for kind, value in cert.get("subjectAltName", ()):
        if not isinstance(value, str):
            continue
        if kind == "IP Address":
            # ssl prints IPv6 SANs in full upper-case form: parse, do not compare text.
            with contextlib.suppress(ValueError):
                ips.append(ipaddress.ip_address(value.strip()))
        elif kind == "DNS":
            dns.append(_clean(value, 253))
    cn = ""
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName" and not cn:
                cn = _clean(v, 64)
    return PeerIdentity(who, True, tuple(ips[:16]), tuple(dns[:16]), cn)


class ServerTls:
    """Server-side TLS over an asyncio stream pair, through memory BIOs.

    Unlike asyncio's own TLS transport it sends a failed handshake's alert
    before the connection closes, and lets the server count a connection
    before any TLS work. Each read waits at most ``read_timeout``.
    """

    def __init__(self, ctx: ssl.SSLContext, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, read_timeout: float) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=True)
        self._reader, self._writer = reader, writer
        self._read_timeout = read_timeout

    async def flush(self) -> None:
        data = self._out.read()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _fill(self) -> None:
        import asyncio  # loaded by the daemon already; not at import (the CLI)

        try:
            data = await asyncio.wait_for(self._reader.read(65536), self._read_timeout)
        except asyncio.TimeoutError:
            raise ConnectionError(f"no data for {self._read_timeout:g} s") from None
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self.flush()
                await self._fill()
            except ssl.SSLError:
                await self.flush()  # the alert tells the client why
                raise
        await self.flush()

    async def read(self, n: int) -> bytes:
        """Up to n bytes; b"" at the end (close_notify or TCP EOF)."""
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                await self.flush()
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def write(self, data: bytes) -> None:
        self.obj.write(data)
        await self.flush()

    async def close_notify(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            self.obj.unwrap()
        await self.flush()


# -- client --------------------------------------------------------------------


class _PeerSSLContext(ssl.SSLContext):
    """Verifies the server against the IP we dialled, whatever urllib3 passes.

    urllib3 1.26 sends no server_hostname for IP literals and falls back to its
    own name matching (which also accepts a commonName); forcing the dialled
    IP here makes OpenSSL check the IP subjectAltName itself, in every version.
    """

    expected_host = ""

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        kwargs["server_hostname"] = self.expected_host
        return super().wrap_socket(sock, *args, **kwargs)


def client_context(host: IPAddress, trust_file: Optional[Path], trust_pem: Optional[str],
                   client_cert: Optional[Path],
                   client_key: Optional[Path]) -> Tuple[ssl.SSLContext, str]:
    """The client context for a peer at ``host``, and what it trusts (for messages).

    ``trust_pem`` (checked by :func:`check_trust_pem` where it entered) wins
    over ``trust_file``; neither: the system CA store. InvalidArgument names
    what cannot be loaded.
    """
    ctx = _PeerSSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + hostname check
    ctx.expected_host = str(host)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_flags |= _PARTIAL_CHAIN
    if trust_pem is not None:
        trust = "the certificate given with --server_cert"
        try:
            ctx.load_verify_locations(cadata=trust_pem)
        except (ssl.SSLError, ValueError, TypeError) as e:
            raise InvalidArgument("the peer certificate given with --server_cert cannot be "
                                  f"loaded: {ssl_reason(e)}; pass the peer's PEM certificate "
                                  "or CA") from None
    elif trust_file is not None:
        trust = str(trust_file)
        try:
            ctx.load_verify_locations(cafile=str(trust_file))
        except (ssl.SSLError, OSError, ValueError) as e:
            raise InvalidArgument(f"cannot load the peer trust file {trust_file}: "
                                  f"{ssl_reason(e)}; give a readable PEM file with the peer's "
                                  "certificate or CA") from None
    else:
        trust = "the system CA store"
        ctx.load_default_certs()
    if client_cert is not None or client_key is not None:
        if client_cert is None:
            raise InvalidArgument("a client key was given without a client certificate: "
                                  "give both")
        try:
            ctx.load_cert_chain(str(client_cert),
                                str(client_key) if client_key is not None else None)
        except (ssl.SSLError, OSError, ValueError) as e:
            with_key = f" with key {client_key}" if client_key is not None else ""
            raise InvalidArgument(f"cannot load the client certificate {client_cert}{with_key}: "
                                  f"{ssl_reason(e)}; both must be readable PEM and the key "
                                  "must match") from None
    return ctx, trust
