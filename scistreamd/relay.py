"""Rendering the stunnel configuration of one endpoint.

Upstream SciStream pasted request strings into stunnel configs (command
execution), derived the PSK from the uid and disabled encryption. Here the
renderer accepts only typed, validated values (an :class:`Endpoint`, a
checked suite list, a checked path), refuses any value that could break a
line, and always renders TLS 1.3 with a random per-endpoint PSK.

Pure: imports nothing from D-Bus or systemd.
"""

from __future__ import annotations

import logging
import re
import secrets
from ipaddress import ip_network
from pathlib import Path
from typing import List, Sequence, Tuple

from .errors import InvalidArgument
from .model import Endpoint, HostPort, IPAddress, IPNetwork, Role, parse_uid

logger = logging.getLogger(__name__)

#: The TLS 1.3 cipher suites OpenSSL knows (RFC 8446 names).
TLS13_CIPHERSUITES: Tuple[str, ...] = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_CCM_SHA256",
    "TLS_AES_128_CCM_8_SHA256",
)
DEFAULT_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

#: stunnel's ``debug`` levels (syslog names), least to most verbose.
STUNNEL_LOG_LEVELS: Tuple[str, ...] = (
    "emerg",
    "alert",
    "crit",
    "err",
    "warning",
    "notice",
    "info",
    "debug",
)

#: Where a relay sees its own key directory: scistreamd bind-mounts it there,
#: read-only, inside the relay unit's mount namespace (BindReadOnlyPaths=).
#: Fixed, so a relay's config never names the host's key directory.
RELAY_KEY_DIR = "/run/scistream-relay"

_PSK = re.compile(r"[0-9a-f]{64}")
# File names inside a relay's key directory.
_FILE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}")
# Paths written into a config: absolute, no spaces, no control characters, no "..".
_SAFE_PATH = re.compile(r"/[A-Za-z0-9/_.:@+-]*")
# What may appear in a rendered value: printable ASCII, no line breaks.
_SAFE_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


def new_psk() -> str:
    """A fresh 256-bit pre-shared key as 64 hex characters; random, never derived."""
    return secrets.token_hex(32)


def parse_psk(value: object) -> str:
    if isinstance(value, str) and _PSK.fullmatch(value):
        return value
    raise InvalidArgument("the tunnel key is malformed: expected 64 lower-case hex characters")


def parse_ciphersuites(value: object) -> str:
    """Check a colon-separated list of TLS 1.3 suites; returns it unchanged."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument(
            f"ciphersuites must be a non-empty string of TLS 1.3 suites, not {value!r:.60}"
        )
    items = value.split(":")
    for item in items:
        if item not in TLS13_CIPHERSUITES:
            raise InvalidArgument(
                f"{item!r:.60} is not a TLS 1.3 cipher suite: use a colon-separated list of "
                + ", ".join(TLS13_CIPHERSUITES)
            )
    if len(set(items)) != len(items):
        raise InvalidArgument(f"ciphersuites {value!r} lists a suite twice: list each once")
    # stunnel's PSK callbacks make OpenSSL bind the key to SHA-256: with only
    # SHA-384 suites every handshake fails ("no suitable signature algorithm").
    if not any(item.endswith("_SHA256") for item in items):
        raise InvalidArgument(
            f"ciphersuites {value!r} has no SHA-256 suite, which relays keyed with a "
            "pre-shared key need: include TLS_AES_128_GCM_SHA256 or TLS_CHACHA20_POLY1305_SHA256"
        )
    return value


def parse_stunnel_log_level(value: object) -> str:
    if isinstance(value, str) and value in STUNNEL_LOG_LEVELS:
        return value
    raise InvalidArgument(
        f"stunnel log level {value!r:.60} is unknown: use one of " + ", ".join(STUNNEL_LOG_LEVELS)
    )


def parse_safe_path(value: object, what: str) -> str:
    if (
        not isinstance(value, str)
        or not _SAFE_PATH.fullmatch(value)
        or ".." in value.split("/")
        or len(value) > 4096
    ):
        raise InvalidArgument(
            f"{what} {value!r:.60} is not a plain absolute path (letters, digits and /_.:@+- only)"
        )
    return value


def relay_file_path(name: str) -> str:
    """Where the relay sees file ``name`` of its key directory (stunnel expands no env vars)."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(f"{name!r:.60} is not a key directory file name")
    return f"{RELAY_KEY_DIR}/{name}"


def render_psk_file(uid: str, psk: str) -> str:
    """The PSKsecrets file: one ``identity:key`` line; the identity is the uid."""
    return f"{parse_uid(uid)}:{parse_psk(psk)}\n"


def stunnel_address(hp: HostPort) -> str:
    """stunnel's form of an address: it splits at the last ':' and takes no brackets."""
    if not isinstance(hp, HostPort):
        raise InvalidArgument(f"{hp!r:.60} is not a HostPort")
    # str(IPv6Address) is the compressed numeric form, e.g. "::1" -> "::1:5100".
    return f"{hp.host}:{hp.port}"


def _line(key: str, value: object) -> str:
    # Last line of defence: every value was typed or checked already, but a
    # value containing a line break would be a new directive, so refuse it.
    text = str(value)
    if not _SAFE_VALUE.fullmatch(text):
        raise InvalidArgument(f"refusing to render {key} = {text!r:.60}: not a plain value")
    return f"{key} = {text}"


def render_stunnel_config(
    ep: Endpoint, *, psk_path: str, ciphersuites: str, log_level: str = "notice"
) -> str:
    """The complete stunnel configuration of endpoint ``ep``.

    One service section per mapping; inbound sections are PSK servers that
    forward plain TCP to the application, outbound sections are PSK clients
    that the local application connects to.
    """
    if not isinstance(ep, Endpoint):
        raise InvalidArgument(f"{ep!r:.60} is not an Endpoint")
    ep.validate()
    psk_path = parse_safe_path(psk_path, "PSK file path")
    ciphersuites = parse_ciphersuites(ciphersuites)
    log_level = parse_stunnel_log_level(log_level)

    lines: List[str] = [
        f"; stunnel relay of scistream tunnel {ep.uid} ({ep.role.value}), written by scistreamd",
        _line("foreground", "yes"),
        # No pid file: systemd tracks the main process.
        "pid =",
        # Log to stderr, which the unit sends to journald.
        _line("syslog", "no"),
        _line("debug", log_level),
    ]
    for i, (listener, target) in enumerate(ep.mappings()):
        lines.append("")
        lines.append(f"[{ep.role.value}-{i}]")
        if ep.role is Role.OUTBOUND:
            lines.append(_line("client", "yes"))
        lines.append(_line("accept", stunnel_address(listener)))
        lines.append(_line("connect", stunnel_address(target)))
        lines.append(_line("sslVersionMin", "TLSv1.3"))
        lines.append(_line("sslVersionMax", "TLSv1.3"))
        lines.append(_line("ciphersuites", ciphersuites))
        lines.append(_line("PSKsecrets", psk_path))
        if ep.role is Role.OUTBOUND:
            lines.append(_line("PSKidentity", ep.uid))
        # Interactive and streaming traffic alike: do not wait to coalesce segments.
        lines.append(_line("socket", "l:TCP_NODELAY=1"))
        lines.append(_line("socket", "r:TCP_NODELAY=1"))
    return "\n".join(lines) + "\n"


def stunnel_command(stunnel: Path, conf_path: str) -> List[str]:
    """The relay's ExecStart argv: stunnel and its config file, nothing else."""
    if not isinstance(stunnel, Path) or not stunnel.is_absolute():
        raise InvalidArgument(f"stunnel {stunnel!r:.60} must be an absolute Path")
    return [
        parse_safe_path(str(stunnel), "stunnel path"),
        parse_safe_path(conf_path, "config path"),
    ]


def nofile_for_connections(max_connections: int) -> int:
    """The RLIMIT_NOFILE that makes stunnel 5.68 allow exactly ``max_connections`` clients.

    stunnel (src/fd.c, get_limits) derives its cap from the descriptor limit:
    max_clients = nofile*125/256 when nofile >= 256, else (nofile-6)/2; past it
    each new connection is accepted and closed at once ("Connection rejected:
    too many clients"). This inverts that formula (smallest nofile giving the cap).
    """
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) \
            or max_connections < 5:
        raise InvalidArgument(f"max_connections {max_connections!r:.60} is not an integer >= 5")
    small = 2 * max_connections + 6
    if small < 256:
        return small
    return -(-max_connections * 256 // 125)  # ceiling


#: Descriptors a relay holds besides two per connection and one per listener: stdin,
#: stdout, stderr, stunnel's signal and terminate pipes (7), and a margin.
STUNNEL_BASE_FDS = 16


def relay_nofile(max_connections: int, listeners: int, fit: int) -> int:
    """LimitNOFILE= of a relay with ``listeners`` listeners: stunnel's cap is
    ``max_connections``, raised where needed (never past ``fit``, what the relay's
    memory and task caps allow) so that descriptors last until the cap.

    stunnel's formula leaves nofile*6/256 descriptors beyond two per client. When that
    is less than the relay needs besides (STUNNEL_BASE_FDS + listeners), accept()
    fails with EMFILE before the cap: stunnel then pauses accepting and new
    connections wait in the backlog instead of being closed at once. Found on the test
    bed with a cap of 32 (70 descriptors): the cap needs headroom, so small caps and
    relays with many listeners get a higher one, up to ``fit``.
    """
    want = nofile_for_connections(max_connections)
    need = STUNNEL_BASE_FDS + listeners
    enough = max(256, -(-need * 256 // 6))
    if stunnel_max_clients(want) * 2 + need <= want or fit <= max_connections:
        return want
    return max(want, min(enough, nofile_for_connections(max(fit, 5))))


def stunnel_max_clients(nofile: int) -> int:
    """stunnel 5.68's client cap for a descriptor limit (nofile_for_connections inverts it)."""
    nofile = max(nofile, 16)
    return nofile * 125 // 256 if nofile >= 256 else (nofile - 6) // 2


_LOCAL_NETWORKS = (ip_network("127.0.0.0/8"), ip_network("::1/128"))


def listener_allow_networks(
    ep: Endpoint, listen_address: IPAddress, client_networks: Sequence[IPNetwork]
) -> List[IPNetwork]:
    """Who may open TCP connections to the listeners of ``ep`` (everyone else: denied).

    - inbound, unclaimed: nobody (nobody has the key yet, so no connection can
      carry data; a flood before the claim reaches no relay thread);
    - inbound, claimed: the claimant's address only. A claim from this very host
      (both halves on one gateway) also allows the host's own addresses, which its
      outbound relay connects from;
    - outbound: the configured client networks plus this host's listen_address (an
      application on the gateway itself connects from that address).
    """
    own = ip_network(listen_address)
    if ep.role is Role.OUTBOUND:
        return list(dict.fromkeys([*client_networks, own]))
    if ep.claimant_ip is None:
        return []
    nets = [ip_network(ep.claimant_ip)]
    if ep.claimant_ip.is_loopback or ep.claimant_ip == listen_address:
        nets += [*_LOCAL_NETWORKS, own]
    return list(dict.fromkeys(nets))
