"""The daemon's configuration: ``scistreamd.toml`` plus ``conf.d/*.toml`` drop-ins.

All keys are flat and optional. Drop-ins are read in lexical order after the
main file; a later file overrides a key of an earlier one. Every value is
parsed into a typed value as it is read, so an error names the file the bad
value came from, the key, and what to write instead.

Pure: imports nothing from D-Bus or systemd.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Address, ip_network
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Tuple

import toml

from .errors import ConfigError, InvalidArgument, ScistreamError
from .model import IPAddress, IPNetwork, parse_ip, parse_network, parse_port
from .ports import FIRST_UNPRIVILEGED_PORT
from .relay import (
    DEFAULT_CIPHERSUITES,
    parse_ciphersuites,
    parse_safe_path,
    parse_stunnel_log_level,
)
from .targets import DEFAULT_TARGET_RULES, TargetRule, parse_target_rules
from .userrules import UserRule, parse_user_rules

logger = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("/etc/scistream/scistreamd.toml")

#: Python logging level names accepted for ``log_level``.
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: relay_cpu_scheduling values, the non-realtime policies (RestrictRealtime= holds),
#: and their Linux policy numbers (sched.h) for CPUSchedulingPolicy=.
RELAY_SCHEDULING = {"other": 0, "batch": 3}

_MEMORY = re.compile(r"([0-9]{1,15})([KMGT]?)")
_MEMORY_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
# A relay (stunnel + OpenSSL) needs a few MiB; a smaller cap is a unit mistake ("256" for 256M).
_MIN_MEMORY = 8 * 1024**2
_PORT_RANGE = re.compile(r"([0-9]{1,5})-([0-9]{1,5})")
_MAX_SECONDS = 300.0
#: What one relayed connection may cost a relay (stunnel: a thread, its stack,
#: two 18 KiB buffers, OpenSSL's records): 117 KiB were measured idle; the margin
#: covers connections that are moving data. And what the relay needs besides.
RELAY_CONNECTION_MEMORY = 192 * 1024
RELAY_BASE_MEMORY = 4 * 1024**2  # 2.4 MiB measured for an idle relay
#: Threads of a relay besides one per connection (main, cron, and a margin).
RELAY_BASE_TASKS = 4
MAX_CLIENT_NETWORKS = 256
#: stunnel needs 16 descriptors: (16 - 6) / 2 clients.
MIN_RELAY_CONNECTIONS = 5


@dataclass(frozen=True)
class Config:
    """Typed configuration; the defaults are those of the shipped scistreamd.toml."""

    #: The host's facility address: relays listen here, the peer port too.
    listen_address: IPAddress = IPv4Address("127.0.0.1")
    peer_port: int = 5000
    #: Relay ports to allocate from, low..high inclusive.
    port_range: Tuple[int, int] = (5100, 5200)
    peer_cert: Path = Path("/etc/scistream/server.crt")
    peer_key: Path = Path("/etc/scistream/server.key")
    #: CA bundle (or the peer's own certificate) that peer daemons' certificates must match.
    peer_trust_file: Path = Path("/etc/scistream/peer-ca.crt")
    #: CA(s) that peer daemons' client certificates must chain to; None: peer_trust_file.
    peer_client_ca: Path | None = None
    #: Claims (and endpoint state, full health) need a verified client certificate.
    #: false is a lab opt-out: then whoever knows a uid can claim its key once.
    peer_require_client_cert: bool = True
    peer_timeout: float = 10.0
    #: Seconds between checks that the peer still holds each outbound endpoint's
    #: inbound half; 0 = never check.
    peer_check_interval: float = 30.0
    peer_enabled: bool = True
    stunnel: Path = Path("/usr/bin/stunnel4")
    #: Bytes; 0 = no limit.
    relay_memory_max: int = 256 * 1024**2
    #: stunnel runs a thread per connection: TasksMax= of each relay, a backstop
    #: that relay_max_connections must stay below.
    relay_tasks_max: int = 4096
    #: Concurrent connections one relay serves; beyond it stunnel closes new ones
    #: at once ("Connection rejected: too many clients") instead of growing into
    #: relay_memory_max and being killed. Checked against both caps at load.
    relay_max_connections: int = 1024
    #: Listeners are held by a systemd .socket unit per relay (bound before the
    #: reply, kept across relay restarts, IP access lists); false: stunnel binds
    #: them itself (no IP access lists; for a stunnel built without systemd support).
    relay_socket_activation: bool = True
    #: Networks whose hosts may connect to outbound relays' local listeners (the
    #: application side, plaintext). This host's own listen_address is always allowed.
    outbound_client_networks: Tuple[IPNetwork, ...] = (ip_network("127.0.0.0/8"),
                                                       ip_network("::1/128"))
    #: Nice= of each relay. A gateway's job is relaying: when its cores are shared
    #: with other work, relays come first (bench/results/evidence-explore-scheduling.json).
    relay_nice: int = -5
    #: CPUSchedulingPolicy= of each relay: "batch" (no wakeup preemption: more
    #: throughput, less CPU per GB, and on the test bed also about half the p50 of
    #: 64-byte round trips) or "other" (the default Linux policy)
    #: (bench/results/evidence-latency-scheduling-*.json).
    relay_cpu_scheduling: str = "batch"
    relay_start_timeout: float = 10.0
    relay_ciphersuites: str = DEFAULT_CIPHERSUITES
    relay_log_level: str = "notice"
    state_dir: Path = Path("/var/lib/scistream")
    key_dir: Path = Path("/var/lib/scistream/keys")
    max_endpoints: int = 1024
    #: Networks/ports inbound endpoints may forward to (targets.py); loopback and
    #: link-local only when a rule names them.
    allowed_targets: Tuple[TargetRule, ...] = DEFAULT_TARGET_RULES
    #: CA(s) whose client certificates are remote users' identities ("cert:<name>")
    #: on the user API; None: user certificates are not accepted.
    user_client_ca: Path | None = None
    #: Who among remote users (user API) may do what (userrules.py); none: nothing.
    user_rules: Tuple[UserRule, ...] = ()
    log_level: str = "info"
    #: RFC 7662 introspection endpoint that checks remote users' bearer tokens
    #: (https); "" = none: the daemon accepts no user tokens.
    token_introspection_url: str = ""
    #: This daemon's own client at the authorization server (HTTP Basic).
    token_client_id: str = ""
    #: Root-only file (0600) holding that client's secret.
    token_client_secret_file: Path = Path("/etc/scistream/token-client-secret")
    #: Scopes every token must carry (all of them).
    token_required_scope: Tuple[str, ...] = ()
    #: The audience every token must name in its "aud"; "" = not checked.
    token_audience: str = ""
    #: Longest time a positive introspection answer is reused (never past exp);
    #: also how long a revoked token may still work. 0 = never reused.
    token_cache_max_seconds: float = 60.0
    #: How long a negative answer is reused (a few seconds).
    token_negative_cache_seconds: float = 5.0
    #: CA bundle to verify the introspection server with; None: the system's CAs.
    token_ca_file: Path | None = None
    #: Seconds to wait for the introspection server.
    token_timeout: float = 5.0
    #: Which file set each key (for messages); not part of equality.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def peer_client_ca_file(self) -> Path:
        """The CA file client certificates on the peer port are verified with."""
        return self.peer_client_ca if self.peer_client_ca is not None else self.peer_trust_file

    @property
    def port_range_text(self) -> str:
        return f"{self.port_range[0]}-{self.port_range[1]}"


class _Bad(ScistreamError):
    """A value problem, turned into ConfigError by the caller who knows file and key."""


def _type_name(value: object) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a float"}
    names.update({list: "an array", dict: "a table"})
    return names.get(type(value), type(value).__name__)


def _int(value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"expected an integer in {low}..{high}, got {_type_name(value)}")
    if not low <= value <= high:
        raise _Bad(f"{value} is out of range: use {low}..{high}")
    return value


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"expected a port number (integer 1..65535), got {_type_name(value)}")
    return parse_port(value, "port")


def _port_range(value: object) -> Tuple[int, int]:
    if isinstance(value, str):
        m = _PORT_RANGE.fullmatch(value)
        if not m:
            raise _Bad(f'{value!r:.60} is not a range: write "LOW-HIGH", e.g. "5100-5200"')
        low, high = int(m.group(1)), int(m.group(2))
    elif isinstance(value, list) and len(value) == 2:
        low, high = (_port(v) for v in value)
    else:
        raise _Bad(f'expected "LOW-HIGH" or [LOW, HIGH], got {_type_name(value)}')
    low, high = parse_port(low, "low port"), parse_port(high, "high port")
    if low > high:
        raise _Bad(f"{low}-{high} is empty: write the lower port first")
    if low < FIRST_UNPRIVILEGED_PORT:
        raise _Bad(
            f"{low}-{high} includes privileged ports and relays run without privileges: "
            f"start the range at {FIRST_UNPRIVILEGED_PORT} or above"
        )
    return (low, high)


def _ip(value: object) -> IPAddress:
    if not isinstance(value, str):
        raise _Bad(f"expected an IP address string, got {_type_name(value)}")
    return parse_ip(value, "address")


def _path(value: object) -> Path:
    if not isinstance(value, str):
        raise _Bad(f"expected an absolute path string, got {_type_name(value)}")
    # Paths end up in unit properties and relay command lines: keep them plain.
    return Path(parse_safe_path(value, "path"))


def _optional_path(value: object) -> Path | None:
    if value == "":
        return None
    return _path(value)


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f"expected seconds (a number), got {_type_name(value)}")
    # A range comparison rejects NaN and inf too, and does not overflow on huge ints.
    if not 0 < value <= _MAX_SECONDS:
        raise _Bad(f"{value} is out of range: use more than 0 and at most {_MAX_SECONDS:g} seconds")
    return float(value)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {_type_name(value)}")
    return value


def _memory(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Bad(f'expected bytes or a size like "256M", got {_type_name(value)}')
    if isinstance(value, int):
        size = value
    else:
        m = _MEMORY.fullmatch(value)
        if not m:
            raise _Bad(f"{value!r:.60} is not a size: write bytes or a number with K, M, G or T")
        size = int(m.group(1)) * _MEMORY_UNITS[m.group(2)]
    if size < 0:
        raise _Bad(f'{size} is negative: use 0 for no limit, or a size like "256M"')
    if 0 < size < _MIN_MEMORY:
        raise _Bad(f'{size} bytes is too little for a relay: use at least "8M", or 0 for no limit')
    return size


def _networks(value: object) -> Tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise _Bad(f'expected an array of CIDR strings, e.g. ["127.0.0.0/8", "10.1.0.0/16"], '
                   f"got {_type_name(value)}")
    if len(value) > MAX_CLIENT_NETWORKS:
        raise _Bad(f"{len(value)} networks: use at most {MAX_CLIENT_NETWORKS} (summarise them)")
    nets = []
    for item in value:
        if not isinstance(item, str):
            raise _Bad(f"expected CIDR strings, got {_type_name(item)} in the array")
        nets.append(parse_network(item, "network"))
    return tuple(dict.fromkeys(nets))  # duplicates dropped, order kept


_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,256}")
# Printable ASCII without ':' (HTTP Basic separates id and secret with it).
_CLIENT_ID = re.compile(r"[\x21-\x39\x3b-\x7e]{1,256}")


def _https_url(value: object) -> str:
    """"" or an https URL without credentials or fragment (it gets the client secret)."""
    from urllib.parse import urlsplit

    if not isinstance(value, str):
        raise _Bad(f"expected an https URL string, got {_type_name(value)}")
    if value == "":
        return ""
    if len(value) > 2048 or not value.isprintable() or any(c.isspace() for c in value):
        raise _Bad("not a URL (spaces, control characters, or longer than 2048): "
                   'write e.g. "https://auth.example.org/oauth2/token/introspect"')
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as err:
        raise _Bad(f"{value!r:.80} is not a URL ({err})") from None
    if url.scheme != "https" or not url.hostname:
        raise _Bad(f"{value!r:.80} is not an https URL: the daemon sends its client secret "
                   "there, so only https is accepted")
    if url.username is not None or url.password is not None or url.fragment:
        raise _Bad(f"{value!r:.80} carries credentials or a fragment: give the bare URL "
                   "(the secret goes in token_client_secret_file)")
    return value


def _client_id(value: object) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected a string, got {_type_name(value)}")
    if value and not _CLIENT_ID.fullmatch(value):
        raise _Bad("expected printable ASCII without spaces or ':', at most 256 characters")
    return value


def _scope_list(value: object) -> Tuple[str, ...]:
    if isinstance(value, str):
        items: List[object] = list(value.split())
    elif isinstance(value, list):
        items = list(value)
    else:
        raise _Bad(f'expected a scope string or an array of scopes, got {_type_name(value)}')
    if len(items) > 32:
        raise _Bad(f"{len(items)} scopes: require at most 32")
    for item in items:
        if not isinstance(item, str) or not _SCOPE_TOKEN.fullmatch(item):
            raise _Bad(f"{item!r:.60} is not an OAuth scope (RFC 6749: printable ASCII "
                       "without spaces, quotes or backslashes)")
    return tuple(dict.fromkeys(items))  # type: ignore[arg-type]


def _audience(value: object) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected a string, got {_type_name(value)}")
    if len(value) > 512 or not value.isprintable():
        raise _Bad("expected printable text of at most 512 characters")
    return value


def _seconds_upto(high: float) -> Callable[[object], float]:
    def parse(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(f"expected seconds (a number), got {_type_name(value)}")
        if not 0 <= value <= high:
            raise _Bad(f"{value} is out of range: use 0..{high:g} seconds")
        return float(value)

    return parse


def _choice(names: Tuple[str, ...], what: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if isinstance(value, str) and value in names:
            return value
        raise _Bad(f"{value!r:.60} is not a {what}: use one of {', '.join(names)}")

    return parse


_PARSERS: Dict[str, Callable[[object], Any]] = {
    "listen_address": _ip,
    "peer_port": _port,
    "port_range": _port_range,
    "peer_cert": _path,
    "peer_key": _path,
    "peer_trust_file": _path,
    "peer_client_ca": _optional_path,
    "peer_require_client_cert": _bool,
    "peer_timeout": _seconds,
    "peer_check_interval": lambda v: 0.0 if v == 0 and not isinstance(v, bool) else _seconds(v),
    "peer_enabled": _bool,
    "stunnel": _path,
    "relay_memory_max": _memory,
    "relay_tasks_max": lambda v: _int(v, 1, 1_000_000),
    "relay_max_connections": lambda v: _int(v, MIN_RELAY_CONNECTIONS, 1_000_000),
    "relay_socket_activation": _bool,
    "outbound_client_networks": _networks,
    "relay_nice": lambda v: _int(v, -20, 19),
    "relay_cpu_scheduling": _choice(tuple(RELAY_SCHEDULING), "scheduling policy"),
    "relay_start_timeout": _seconds,
    "relay_ciphersuites": parse_ciphersuites,
    "relay_log_level": parse_stunnel_log_level,
    "state_dir": _path,
    "key_dir": _path,
    "max_endpoints": lambda v: _int(v, 1, 100_000),
    "allowed_targets": parse_target_rules,
    "user_client_ca": _optional_path,
    "user_rules": parse_user_rules,
    "log_level": _choice(LOG_LEVELS, "level"),
    "token_introspection_url": _https_url,
    "token_client_id": _client_id,
    "token_client_secret_file": _path,
    "token_required_scope": _scope_list,
    "token_audience": _audience,
    "token_cache_max_seconds": _seconds_upto(3600),
    "token_negative_cache_seconds": _seconds_upto(30),
    "token_ca_file": _optional_path,
    "token_timeout": _seconds,
}
assert set(_PARSERS) == {f.name for f in fields(Config)} - {"sources"}


def _parse_value(source: str, key: str, value: object) -> object:
    if key not in _PARSERS:
        close = difflib.get_close_matches(key, _PARSERS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            source, key, f"unknown key: {hint}known keys are {', '.join(sorted(_PARSERS))}"
        )
    try:
        return _PARSERS[key](value)
    except (_Bad, InvalidArgument) as err:
        raise ConfigError(source, key, str(err)) from None


def _check_consistency(
    values: Dict[str, Any], sources: Mapping[str, str], rank: Mapping[str, int]
) -> None:
    low, high = values["port_range"]
    peer_port = values["peer_port"]
    if low <= peer_port <= high:
        # Blame whichever of the two was set later: that file introduced the clash.
        later = max(
            ("port_range", "peer_port"),
            key=lambda k: rank[sources[k]] if k in sources else -1,
        )
        raise ConfigError(
            sources.get(later, "<defaults>"),
            later,
            f"port_range {low}-{high} includes peer_port {peer_port}: "
            "choose a port_range that excludes the peer port",
        )
    _check_relay_caps(values, sources, rank)
    if values["token_introspection_url"] and not values["token_client_id"]:
        raise ConfigError(
            sources.get("token_introspection_url", "<defaults>"), "token_client_id",
            "token_introspection_url is set but token_client_id is not: give this daemon's "
            "client id at the authorization server (its secret goes in "
            "token_client_secret_file)")


def relay_connection_fit(memory_max: int, tasks_max: int) -> int:
    """How many connections a relay can hold within both caps (memory 0 = no limit)."""
    fit = tasks_max - RELAY_BASE_TASKS
    if memory_max:
        fit = min(fit, (memory_max - RELAY_BASE_MEMORY) // RELAY_CONNECTION_MEMORY)
    return fit


def _check_relay_caps(
    values: Dict[str, Any], sources: Mapping[str, str], rank: Mapping[str, int]
) -> None:
    """relay_max_connections must be reached before TasksMax and MemoryMax: then a
    flood is refused connection by connection instead of getting the relay killed.

    Not set: the default, lowered to what the other two caps allow (an existing
    configuration with a small relay_memory_max keeps working). Set: checked.
    """
    memory, tasks = values["relay_memory_max"], values["relay_tasks_max"]
    fit = relay_connection_fit(memory, tasks)
    if "relay_max_connections" not in sources:
        values["relay_max_connections"] = min(values["relay_max_connections"], fit)
    conns = values["relay_max_connections"]
    if conns > fit or conns < MIN_RELAY_CONNECTIONS:
        tight = ("relay_tasks_max" if fit == tasks - RELAY_BASE_TASKS else "relay_memory_max")
        keys = [k for k in ("relay_max_connections", tight) if k in sources] or [tight]
        later = max(keys, key=lambda k: rank[sources[k]])
        raise ConfigError(
            sources.get(later, "<defaults>"), later,
            f"relay_max_connections {conns} does not fit relay_memory_max "
            f"{memory // 1024**2}M and relay_tasks_max {tasks}: each connection needs "
            f"{RELAY_CONNECTION_MEMORY // 1024}K and a thread, besides "
            f"{RELAY_BASE_MEMORY // 1024**2}M and {RELAY_BASE_TASKS} threads per relay, so "
            f"these allow {max(fit, 0)}; lower relay_max_connections (at least "
            f"{MIN_RELAY_CONNECTIONS}) or raise relay_memory_max / relay_tasks_max")


def config_from_mapping(data: Mapping[str, object], source: str = "<config>") -> Config:
    """A Config from raw (TOML-typed) values, validated like a file; for tools and tests."""
    return _build([(source, data)])


def _build(layers: List[Tuple[str, Mapping[str, object]]]) -> Config:
    defaults = Config()
    values: Dict[str, Any] = {name: getattr(defaults, name) for name in _PARSERS}
    sources: Dict[str, str] = {}
    for source, data in layers:
        for key, raw in data.items():
            values[key] = _parse_value(source, str(key), raw)
            sources[key] = source
    rank = {source: i for i, (source, _) in enumerate(layers)}
    _check_consistency(values, sources, rank)
    return Config(**values, sources=sources)


def _read(path: Path) -> Mapping[str, object]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(str(path), "", "not UTF-8 text: save the file as UTF-8") from None
    except OSError as err:
        raise ConfigError(str(path), "", f"cannot read it: {err.strerror or err}") from None
    try:
        data = toml.loads(text)
    # The toml package raises assorted exception types on malformed input.
    except Exception as err:
        raise ConfigError(str(path), "", f"not valid TOML: {err}") from None
    return data


def dropin_files(dropin_dir: Path) -> List[Path]:
    """The ``*.toml`` files of a drop-in directory, in the order they apply."""
    if not dropin_dir.is_dir():
        return []
    return sorted(
        (p for p in dropin_dir.glob("*.toml") if not p.name.startswith(".") and p.is_file()),
        key=lambda p: p.name,
    )


def load_config(path: Path, dropin_dir: Path | None = None, *, required: bool = True) -> Config:
    """Read ``path`` and then its drop-ins (default ``<dir of path>/conf.d``).

    A missing main file is an error if ``required``, else the defaults apply
    (drop-ins are still read).
    """
    layers: List[Tuple[str, Mapping[str, object]]] = []
    if path.exists():
        layers.append((str(path), _read(path)))
    elif required:
        raise ConfigError(
            str(path),
            "",
            "file not found: create it (an empty file means all defaults) "
            "or give the right path with --config",
        )
    if dropin_dir is None:
        dropin_dir = path.parent / "conf.d"
    for dropin in dropin_files(dropin_dir):
        layers.append((str(dropin), _read(dropin)))
    config = _build(layers)
    logger.debug("configuration from %s", [source for source, _ in layers] or "defaults")
    return config
