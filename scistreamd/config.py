"""The daemon's configuration: ``scistreamd.toml`` plus ``conf.d/*.toml`` drop-ins.

All keys are flat and optional. Drop-ins are read in lexical order after the
main file; a later file overrides a key of an earlier one. Every value is
parsed into a typed value as it is read, so an error names the file the bad
value came from, the key, and what to write instead.

Pure: imports nothing from D-Bus or systemd.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Address, ip_network
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Tuple

import toml

from . import configvalues as cv
from .errors import ConfigError, InvalidArgument
from .model import HostPort, IPAddress, IPNetwork
from .relay import (
    DEFAULT_CIPHERSUITES,
    parse_ciphersuites,
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

#: What one relayed connection may cost a relay (stunnel: a thread, its stack,
#: two 18 KiB buffers, OpenSSL's records): 117 KiB were measured idle; the margin
#: covers connections that are moving data. And what the relay needs besides.
RELAY_CONNECTION_MEMORY = 192 * 1024
RELAY_BASE_MEMORY = 4 * 1024**2  # 2.4 MiB measured for an idle relay
#: Threads of a relay besides one per connection (main, cron, and a margin).
RELAY_BASE_TASKS = 4
#: stunnel needs 16 descriptors: (16 - 6) / 2 clients.
MIN_RELAY_CONNECTIONS = 5


@dataclass(frozen=True)
class Config:
    """Typed configuration; the defaults are those of the shipped scistreamd.toml."""

    #: The host's facility address: the peer port listens here, relays too unless
    #: relay_address says otherwise. 0.0.0.0 / "::": the peer port listens on all
    #: of the host's addresses, relays on relay_address or the address the daemon
    #: picks at start (hostaddrs.pick_relay_address). The default: a first install
    #: answers peers on the host's real addresses with no edit.
    listen_address: IPAddress = IPv4Address("0.0.0.0")
    #: Where relays listen (None: listen_address, or for a wildcard one the picked
    #: address; the daemon stores its resolved choice here at start-up).
    relay_address: IPAddress | None = None
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
    #: /usr/bin/stunnel exists on both families: on Debian a link to stunnel4
    #: (package stunnel4), on Fedora/EL9 the binary itself (package stunnel).
    stunnel: Path = Path("/usr/bin/stunnel")
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
    #: Where the Prometheus metrics endpoint listens (HTTP, GET /metrics); None: off.
    #: Anyone who can connect reads it: loopback or a monitoring network only.
    metrics_listen: HostPort | None = None
    #: Label per-endpoint series with the tunnel uid too (a uid is a capability:
    #: only when nobody untrusted can reach metrics_listen); else unit and role only.
    metrics_uid_label: bool = False
    #: Which file set each key (for messages); not part of equality.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def peer_client_ca_file(self) -> Path:
        """The CA file client certificates on the peer port are verified with."""
        return self.peer_client_ca if self.peer_client_ca is not None else self.peer_trust_file

    @property
    def relay_listen_address(self) -> IPAddress:
        """The concrete address relay listeners bind (resolved by the daemon when
        listen_address is a wildcard and relay_address unset)."""
        return self.relay_address if self.relay_address is not None else self.listen_address

    @property
    def port_range_text(self) -> str:
        return f"{self.port_range[0]}-{self.port_range[1]}"


_PARSERS: Dict[str, Callable[[object], Any]] = {
    "listen_address": cv.listen_ip,
    "relay_address": cv.relay_ip,
    "peer_port": cv.port,
    "port_range": cv.port_range,
    "peer_cert": cv.path,
    "peer_key": cv.path,
    "peer_trust_file": cv.path,
    "peer_client_ca": cv.optional_path,
    "peer_require_client_cert": cv.boolean,
    "peer_timeout": cv.seconds,
    "peer_check_interval": lambda v: 0.0 if v == 0 and not isinstance(v, bool) else cv.seconds(v),
    "peer_enabled": cv.boolean,
    "stunnel": cv.path,
    "relay_memory_max": cv.memory,
    "relay_tasks_max": lambda v: cv.integer(v, 1, 1_000_000),
    "relay_max_connections": lambda v: cv.integer(v, MIN_RELAY_CONNECTIONS, 1_000_000),
    "relay_socket_activation": cv.boolean,
    "outbound_client_networks": cv.networks,
    "relay_nice": lambda v: cv.integer(v, -20, 19),
    "relay_cpu_scheduling": cv.choice(tuple(RELAY_SCHEDULING), "scheduling policy"),
    "relay_start_timeout": cv.seconds,
    "relay_ciphersuites": parse_ciphersuites,
    "relay_log_level": parse_stunnel_log_level,
    "state_dir": cv.path,
    "key_dir": cv.path,
    "max_endpoints": lambda v: cv.integer(v, 1, 100_000),
    "allowed_targets": parse_target_rules,
    "user_client_ca": cv.optional_path,
    "user_rules": parse_user_rules,
    "log_level": cv.choice(LOG_LEVELS, "level"),
    "token_introspection_url": cv.https_url,
    "token_client_id": cv.client_id,
    "token_client_secret_file": cv.path,
    "token_required_scope": cv.scope_list,
    "token_audience": cv.audience,
    "token_cache_max_seconds": cv.seconds_upto(3600),
    "token_negative_cache_seconds": cv.seconds_upto(30),
    "token_ca_file": cv.optional_path,
    "token_timeout": cv.seconds,
    "metrics_listen": cv.optional_hostport,
    "metrics_uid_label": cv.boolean,
}
assert set(_PARSERS) == {f.name for f in fields(Config)} - {"sources"}


#: Keys `systemctl reload scistreamd` applies to the running daemon (the others
#: need a restart: they bind sockets, move state, or are part of running relays
#: and their peers' claims). Relay settings apply to relays started afterwards.
RELOADABLE_KEYS = frozenset({
    "allowed_targets", "max_endpoints", "peer_check_interval", "outbound_client_networks",
    "log_level", "peer_cert", "peer_key", "peer_trust_file", "peer_client_ca",
    "peer_require_client_cert", "stunnel", "relay_memory_max", "relay_tasks_max",
    "relay_max_connections", "relay_nice", "relay_cpu_scheduling", "relay_start_timeout",
    "relay_log_level",
})
assert set(_PARSERS) >= RELOADABLE_KEYS


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload does: the configuration to run with, and the changed keys it
    applies and those it keeps at their running value until a restart."""

    config: Config
    applied: Tuple[str, ...]
    needs_restart: Tuple[str, ...]


def plan_reload(running: Config, new: Config) -> ReloadPlan:
    """Merge a re-read configuration into the running one: reloadable keys take the
    new value, the others keep the running one."""
    changed = [k for k in _PARSERS if getattr(running, k) != getattr(new, k)]
    applied = tuple(k for k in changed if k in RELOADABLE_KEYS)
    kept = tuple(k for k in changed if k not in RELOADABLE_KEYS)
    merged = dataclasses.replace(running, **{k: getattr(new, k) for k in applied},
                                 sources={**running.sources,
                                          **{k: v for k, v in new.sources.items()
                                             if k in RELOADABLE_KEYS}})
    return ReloadPlan(merged, applied, kept)


def _parse_value(source: str, key: str, value: object) -> object:
    if key not in _PARSERS:
        close = difflib.get_close_matches(key, _PARSERS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            source, key, f"unknown key: {hint}known keys are {', '.join(sorted(_PARSERS))}"
        )
    try:
        return _PARSERS[key](value)
    except (cv.BadValue, InvalidArgument) as err:
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
    _check_metrics_port(values, sources)


def _check_metrics_port(values: Dict[str, Any], sources: Mapping[str, str]) -> None:
    metrics = values["metrics_listen"]
    if metrics is None:
        return
    low, high = values["port_range"]
    if low <= metrics.port <= high or metrics.port == values["peer_port"]:
        raise ConfigError(
            sources.get("metrics_listen", "<defaults>"), "metrics_listen",
            f"port {metrics.port} is the peer port or inside port_range {low}-{high}: "
            "choose another port for the metrics endpoint (e.g. 9731)")


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
