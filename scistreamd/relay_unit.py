"""The transient unit of one relay: its systemd properties.

Sandbox first: the relay is stunnel running as a dynamic user with no
capabilities, a read-only system, no devices, only IP and Unix sockets. Its
config and key stay in its root-only key directory (store.py); the unit
bind-mounts that one directory read-only at RELAY_KEY_DIR inside its own
mount namespace, and group scistream-relay lets the dynamic user read it. So
the key is never on a command line, never in the unit's (world-readable)
properties and never in a file anyone but root and this relay can read.

Why not LoadCredential=: systemd 252 keeps every unit's credentials as a
mount on the host (/run/credentials/<unit>), and each new sandboxed unit
then processes all of them: with 400 relays a start took 1.2 s instead of
70 ms (bench/results/evidence-unitscale-*.json). A BindReadOnlyPaths= mount
exists only inside the relay's namespace, so starts stay flat at any N.

Nothing here names the tunnel's uid (a capability: whoever knows it can try
to claim the key): unit name, Description, LogExtraFields and the key
directory carry the endpoint's opaque relay id instead, because every local
user can read them (systemctl show, /run/systemd/transient, cgroup paths).

No PartOf=/BindsTo= on scistreamd: relays outlive a daemon restart or upgrade.

Listeners (relay_socket_activation, the default): a transient .socket unit
per relay binds them and hands them to stunnel (systemd socket activation;
stunnel 5.68 takes descriptor i for its i-th [service] section, in the
order of the socket's ListenStream= lines = the endpoint's mappings). The
socket stays bound while the relay crashes, restarts or is re-armed, so no
other process can take the port meanwhile, and its start job tells at once
whether the bind worked. Its IPAddressAllow=/IPAddressDeny= lists (BPF on
the socket's cgroup) apply to the listening socket and every connection
accepted from it; the relay's own connections to its targets are made from
the service's cgroup and are not filtered.

IPAccounting=yes on both units: systemd counts the bytes of the listening
socket and of every connection accepted from it on the .socket unit, and the
relay's connections to its targets on the .service unit (traffic.py).
"""

from __future__ import annotations

import socket
from ipaddress import ip_network
from pathlib import Path
from typing import Any, List, Tuple

from dbus_next import Variant

from . import RELAY_GROUP, SLICE
from .config import RELAY_SCHEDULING, Config, relay_connection_fit
from .model import Endpoint, IPNetwork
from .relay import (
    RELAY_KEY_DIR,
    listener_allow_networks,
    relay_file_path,
    relay_nofile,
    stunnel_command,
)
from .store import CONF_FILE

USEC = 1_000_000


def relay_unit_properties(ep: Endpoint, cfg: Config, key_dir: Path) -> List[List[Any]]:
    """(name, Variant) pairs for StartTransientUnit (D-Bus structs are lists here).

    ``key_dir`` is the endpoint's own key directory on the host.
    """
    argv = stunnel_command(cfg.stunnel, relay_file_path(CONF_FILE))
    # stunnel derives its connection cap from the descriptor limit (relay.py).
    nofile = relay_nofile(cfg.relay_max_connections, len(ep.listeners),
                          relay_connection_fit(cfg.relay_memory_max, cfg.relay_tasks_max))
    props: List[Tuple[str, Variant]] = [
        ("Description", Variant("s", f"SciStream {ep.role.value} relay")),
        ("Slice", Variant("s", SLICE)),
        ("Type", Variant("s", "exec")),
        ("ExecStart", Variant("a(sasb)", [[argv[0], argv, False]])),
        ("Restart", Variant("s", "on-failure")),
        ("RestartUSec", Variant("t", 1 * USEC)),
        # A relay that cannot start (its port taken meanwhile) ends as failed
        # instead of restarting forever.
        ("StartLimitIntervalUSec", Variant("t", 30 * USEC)),
        ("StartLimitBurst", Variant("u", 5)),
        ("TimeoutStopUSec", Variant("t", 5 * USEC)),
        # (source, destination, ignore if missing, mount flags): a missing key
        # directory must fail the start, not run a relay without its key.
        ("BindReadOnlyPaths", Variant("a(ssbt)", [[str(key_dir), RELAY_KEY_DIR, False, 0]])),
        ("SupplementaryGroups", Variant("as", [RELAY_GROUP])),
        # No SCISTREAM_UID: the values are world-readable unit properties.
        # scistreamctl logs finds the relay's lines by its unit (_SYSTEMD_UNIT).
        ("LogExtraFields", Variant("aay", [f"SCISTREAM_ROLE={ep.role.value}".encode()])),
        ("SyslogIdentifier", Variant("s", "scistream-relay")),
        # Ordering only (no PartOf/BindsTo): at shutdown scistreamd stops first,
        # so it never records relays stopped by a poweroff as failed, and the
        # next boot recreates them from the persisted state.
        ("Before", Variant("as", ["scistreamd.service"])),
        ("DynamicUser", Variant("b", True)),
        ("NoNewPrivileges", Variant("b", True)),
        ("ProtectSystem", Variant("s", "strict")),
        ("ProtectHome", Variant("s", "yes")),
        ("PrivateTmp", Variant("b", True)),
        ("PrivateDevices", Variant("b", True)),
        ("ProtectKernelTunables", Variant("b", True)),
        ("ProtectKernelModules", Variant("b", True)),
        ("ProtectKernelLogs", Variant("b", True)),
        ("ProtectControlGroups", Variant("b", True)),
        ("ProtectClock", Variant("b", True)),
        ("ProtectHostname", Variant("b", True)),
        ("RestrictNamespaces", Variant("t", 0)),  # the mask of namespaces allowed: none
        ("RestrictRealtime", Variant("b", True)),
        ("RestrictSUIDSGID", Variant("b", True)),
        ("LockPersonality", Variant("b", True)),
        ("MemoryDenyWriteExecute", Variant("b", True)),
        ("CapabilityBoundingSet", Variant("t", 0)),
        ("AmbientCapabilities", Variant("t", 0)),
        ("RestrictAddressFamilies", Variant("(bas)", [True, ["AF_INET", "AF_INET6", "AF_UNIX"]])),
        ("UMask", Variant("u", 0o077)),
        ("LimitNOFILE", Variant("t", nofile)),
        ("LimitNOFILESoft", Variant("t", nofile)),
        ("TasksMax", Variant("t", cfg.relay_tasks_max)),
        ("Nice", Variant("i", cfg.relay_nice)),
        ("CPUSchedulingPolicy", Variant("i", RELAY_SCHEDULING[cfg.relay_cpu_scheduling])),
        # Bytes of the relay's connections to its targets (those accepted from
        # the listeners are counted on the .socket unit: traffic.py).
        ("IPAccounting", Variant("b", True)),
    ]
    if cfg.relay_memory_max:
        props.append(("MemoryMax", Variant("t", cfg.relay_memory_max)))
    if cfg.relay_socket_activation:
        # Starting the relay starts (binds) its socket first; stopping the
        # socket stops the relay; the relay's own stop leaves the socket bound.
        props.append(("Requires", Variant("as", [ep.socket_unit])))
        props.append(("After", Variant("as", [ep.socket_unit])))
    return [list(p) for p in props]


_ANY = (ip_network("0.0.0.0/0"), ip_network("::/0"))


def ip_address_list(nets) -> Variant:
    """IPAddressAllow=/IPAddressDeny= as systemd's a(iayu): (family, address, prefix)."""
    return Variant("a(iayu)", [
        [int(socket.AF_INET if n.version == 4 else socket.AF_INET6), n.network_address.packed,
         n.prefixlen] for n in nets])


def allow_property(ep: Endpoint, cfg: Config) -> List[Any]:
    """The socket's IPAddressAllow= for the endpoint as it is now (see listener_allow_networks)."""
    nets: List[IPNetwork] = listener_allow_networks(ep, cfg.listen_address,
                                                    cfg.outbound_client_networks)
    return ["IPAddressAllow", ip_address_list(nets)]


def relay_socket_properties(ep: Endpoint, cfg: Config) -> List[List[Any]]:
    """The .socket unit holding the listeners of ``ep``, one ListenStream= per mapping, in
    mapping order (stunnel gives descriptor i to its i-th section)."""
    props: List[Tuple[str, Variant]] = [
        ("Description", Variant("s", f"Listeners of {ep.unit}")),
        ("Slice", Variant("s", SLICE)),
        ("Listen", Variant("a(ss)", [["Stream", str(listener)]
                                     for listener, _target in ep.mappings()])),
        # One relay process for all connections (not a process per connection).
        ("Accept", Variant("b", False)),
        # Ordering as for the relay: at shutdown scistreamd stops first.
        ("Before", Variant("as", ["scistreamd.service"])),
        # Deny everyone, then allow: the allow list wins where both match.
        ("IPAddressDeny", ip_address_list(_ANY)),
        # systemd counts every connection accepted from these listeners here, not
        # on the service that handles it: the relay's bytes are both units' sums.
        ("IPAccounting", Variant("b", True)),
    ]
    out = [list(p) for p in props]
    out.append(allow_property(ep, cfg))
    return out
