"""scistreamd: process entry — config, logging, bus, peer port, sd_notify, signals.

Start-up order (READY=1 only when all of it holds):
config loaded and valid -> relay address resolved -> system bus connected ->
systemd subscription -> persisted endpoints re-adopted -> peer port listening ->
bus name owned.
Stopping the daemon never stops relays: they are units of their own.

STATUS= (systemctl status) follows every endpoint added or removed. Reload
(SIGHUP, or the bus method Reload that ``scistreamd --reload`` = ExecReload
calls and waits for): RELOADING=1, the files re-read and validated, the keys
that may change at run time applied (config.RELOADABLE_KEYS), the others named
in the journal and kept, READY=1. An invalid configuration changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import BUS_NAME, __version__
from .config import DEFAULT_CONFIG_PATH, Config, load_config
from .dbus_compat import AnsweredDBusErrors, patch_dbus_next_writer
from .errors import ConfigError, InvalidArgument, ScistreamError
from .reloader import Reloader, peer_client_ca, resolve_config
from .sdstatus import StatusKeeper, notify

logger = logging.getLogger("scistreamd")

EX_CONFIG = 78  # sysexits: configuration error — systemd shows it as such


def _setup_logging(level: str, to_journal: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler
    if to_journal:
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER="scistreamd")
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("scistreamd: %(levelname)s: %(message)s"))
    handler.addFilter(AnsweredDBusErrors())
    root.addHandler(handler)
    root.setLevel(level.upper())


def _journal_available() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM")) or os.path.exists("/run/systemd/journal/socket")


class _PeerHandler:
    """What the peer port may ask of the manager."""

    def __init__(self, manager: Any) -> None:
        self._m = manager

    async def claim(self, uid: str, claimant: Any, listeners: Any = ()) -> Dict[str, Any]:
        return await self._m.claim(uid, claimant, listeners)

    async def health(self) -> Dict[str, Any]:
        return {"version": __version__, "endpoints": len(self._m.endpoints)}

    async def endpoint_state(self, uid: str) -> Dict[str, Any]:
        return await self._m.endpoint_state(uid)


def token_verifier(cfg: Config) -> Any:
    """The user API's TokenVerifier (tokens.py), built once from the configuration
    (reading and checking the client secret file: ConfigError stops the start);
    None without token_introspection_url: bearer tokens are refused by name."""
    if not cfg.token_introspection_url:
        return None
    from .tokens import TokenVerifier

    return TokenVerifier.from_config(cfg)


def _quiet_dbus_errors(loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
    """dbus-next re-raises a handler's DBusError after replying with it; that is no fault."""
    from dbus_next import DBusError

    if isinstance(context.get("exception"), DBusError):
        return
    loop.default_exception_handler(context)


async def _start_metrics(cfg: Config, manager: Any) -> Any:
    """The Prometheus endpoint when metrics_listen is set (prometheus_client only then)."""
    if cfg.metrics_listen is None:
        return None
    from .metrics import MetricsServer

    server = MetricsServer(cfg.metrics_listen.host, cfg.metrics_listen.port, manager,
                           uid_label=cfg.metrics_uid_label)
    await server.start()
    return server


async def run(cfg: Config, *, user_bus: bool = False,
              config_path: Path = DEFAULT_CONFIG_PATH, config_required: bool = False) -> int:
    from dbus_next import BusType
    from dbus_next.aio import MessageBus
    from dbus_next.constants import NameFlag, RequestNameReply

    from .dbus_api import TunnelApi
    from .manager import Manager
    from .peerclient import PeerClient
    from .peerserver import PeerServer
    from .systemd import Systemd
    from .userapi import UserApi

    # Built once, before anything else: a bad client secret file stops the start.
    tokens = token_verifier(cfg)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_dbus_errors)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP = reload; one that arrives during start-up is done once ready (its
    # default action would end the daemon).
    reloader: Optional[Reloader] = None
    hup_pending: List[bool] = []

    def on_sighup() -> None:
        if reloader is None:
            hup_pending.append(True)
            return

        async def go(r: Reloader) -> None:
            try:
                await r.reload()
            except InvalidArgument:
                pass  # logged by reload()
            except Exception:
                logger.exception("reload after SIGHUP failed")
        asyncio.ensure_future(go(reloader))
    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    cfg = resolve_config(cfg)
    if cfg.relay_address != cfg.listen_address:
        logger.info("relays listen on %s (%s)", cfg.relay_address,
                    "relay_address" if "relay_address" in cfg.sources else
                    f"chosen for listen_address {cfg.listen_address}: the default route's "
                    "source address, else the first address that is not loopback or "
                    "link-local; set relay_address to choose another")
        if cfg.relay_listen_address.is_loopback and cfg.listen_address.is_unspecified:
            logger.warning("this host has no address but loopback: relays listen on %s, "
                           "which other gateways cannot reach; configure the network and "
                           "restart scistreamd, or set relay_address", cfg.relay_address)

    patch_dbus_next_writer()
    bus = await MessageBus(bus_type=BusType.SESSION if user_bus else BusType.SYSTEM).connect()
    api = TunnelApi(bus)
    systemd = Systemd(bus)
    await systemd.setup()
    # Whom this daemon trusts, what it presents to peers, how long it waits: once.
    peers = PeerClient(trust_file=cfg.peer_trust_file, client_cert=cfg.peer_cert,
                       client_key=cfg.peer_key, timeout=cfg.peer_timeout,
                       max_parallel=cfg.max_endpoints)
    manager = Manager(cfg, systemd, peers, listener=api)
    status = StatusKeeper(api, manager.endpoints)
    manager.listener = status
    api.attach(manager)
    await manager.adopt()

    peer_server = None
    if cfg.peer_enabled:
        client_ca, user_certs = peer_client_ca(cfg), None
        if cfg.user_client_ca is not None:
            from .usercert import UserCertMatcher

            user_certs = UserCertMatcher(cfg.user_client_ca, client_ca)
        user_api = UserApi(manager, cfg.user_rules, tokens,
                           certs=user_certs is not None)
        peer_server = PeerServer(cfg.listen_address, cfg.peer_port, cfg.peer_cert, cfg.peer_key,
                                 client_ca, _PeerHandler(manager),
                                 require_client_cert=cfg.peer_require_client_cert,
                                 timeout=cfg.peer_timeout, user_api=user_api,
                                 user_certs=user_certs)
        await peer_server.start()
    metrics = await _start_metrics(cfg, manager)

    api.announcing = True  # from now on clients can follow our signals
    reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        logger.error("%s is already owned by another process: is scistreamd running twice?",
                     BUS_NAME)
        if peer_server:
            await peer_server.stop()
        if metrics:
            await metrics.stop()
        return 1

    reloader = Reloader(config_path, config_required, cfg, manager, peers, peer_server, status)
    api.reload = reloader.reload

    status.live = True
    await notify("READY=1", f"STATUS={status.current()}")
    logger.info("scistreamd %s ready on %s (peer port %s, relays on %s ports %s), %d endpoints "
                "adopted", __version__, cfg.listen_address,
                cfg.peer_port if cfg.peer_enabled else "off", cfg.relay_listen_address,
                cfg.port_range_text, len(manager.endpoints))
    if hup_pending:
        on_sighup()

    watchdog = None
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec > 0:
        async def pet() -> None:
            # Proves the event loop still turns, not merely that the process lives.
            while True:
                await notify("WATCHDOG=1")
                await asyncio.sleep(usec / 2e6)
        watchdog = asyncio.ensure_future(pet())

    checks = asyncio.ensure_future(manager.run_peer_checks())
    counters = asyncio.ensure_future(manager.run_counters())
    disconnected = asyncio.ensure_future(bus.wait_for_disconnect())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([disconnected, stopped], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if disconnected.done():
        logger.error("lost the system bus")
        code = 1
    await notify("STOPPING=1")
    logger.info("scistreamd stopping; %d relays keep running", len(manager.endpoints))
    for task in (watchdog, stopped, checks, counters):
        if task:
            task.cancel()
    if peer_server:
        await peer_server.stop()
    if metrics:
        await metrics.stop()
    peers.close()
    if tokens is not None:
        tokens.close()
    if not disconnected.done():
        bus.disconnect()
    return code


def _cert_identity(cfg: Config) -> Tuple[str, List[Any], List[str]]:
    """(common name, IP SANs, DNS SANs) of a generated host certificate: every
    address of this host (but link-local ones), listen_address and relay_address
    even if not configured yet, the host name and its fully qualified name."""
    from .certs import host_dns_names
    from .hostaddrs import certificate_addresses, host_addresses

    addrs = [a for a in (cfg.listen_address, cfg.relay_address)
             if a is not None and not a.is_unspecified]
    try:
        addrs += host_addresses()
    except OSError as e:
        logger.warning("cannot list this host's addresses (%s): the certificate names "
                       "only %s", e, ", ".join(map(str, addrs)) or "127.0.0.1")
    addrs.append(ipaddress.ip_address("127.0.0.1"))
    hostname = socket.gethostname()
    return hostname, certificate_addresses(addrs), host_dns_names(hostname, socket.getfqdn())


def _print_cert(cfg: Config, names: Tuple[str, List[Any], List[str]]) -> None:
    _cn, addrs, dns = names
    print(f"  names: {', '.join([*map(str, addrs), *dns])}")
    print(f"next step: exchange trust files with each peer gateway: copy {cfg.peer_cert} "
          f"to the peer's peer_trust_file and the peer's certificate to "
          f"{cfg.peer_trust_file} here, then run 'systemctl reload scistreamd' on both")


def _check(cfg: Config) -> int:
    from .configcheck import check_host
    from .hostaddrs import host_addresses

    problems = check_host(cfg, host_addresses())
    for problem in problems:
        print(f"scistreamd: {problem}", file=sys.stderr)
    if problems:
        print(f"scistreamd: {len(problems)} problem{'s' if len(problems) > 1 else ''} found",
              file=sys.stderr)
        return EX_CONFIG
    try:
        relay = resolve_config(cfg).relay_listen_address
    except ConfigError as e:
        print(f"scistreamd: {e}", file=sys.stderr)
        return EX_CONFIG
    print(f"configuration OK (peer port {cfg.listen_address}:{cfg.peer_port}, relays on "
          f"{relay})")
    return 0


async def _call_reload(user_bus: bool) -> Tuple[List[str], List[str]]:
    from dbus_next import BusType, Message, MessageType
    from dbus_next.aio import MessageBus

    from . import MANAGER_IFACE, MANAGER_PATH

    bus = await MessageBus(bus_type=BusType.SESSION if user_bus else BusType.SYSTEM).connect()
    try:
        reply = await bus.call(Message(destination=BUS_NAME, path=MANAGER_PATH,
                                       interface=MANAGER_IFACE, member="Reload"))
    finally:
        bus.disconnect()
    if reply.message_type == MessageType.ERROR:
        text = reply.body[0] if reply.body else reply.error_name
        raise ScistreamError(f"{text} ({reply.error_name})")
    return reply.body[0], reply.body[1]


def _reload(user_bus: bool) -> int:
    """ExecReload: ask the running daemon to reload and wait for its verdict, so
    'systemctl reload' fails, saying why, when the configuration is invalid."""
    try:
        applied, restart = asyncio.run(_call_reload(user_bus))
    except ScistreamError as e:
        print(f"scistreamd: {e}", file=sys.stderr)
        return EX_CONFIG
    except OSError as e:
        print(f"scistreamd: cannot reach scistreamd on the bus: {e}", file=sys.stderr)
        return 1
    print("configuration reloaded: " + (f"applied {', '.join(applied)}" if applied else
                                        "no change applied"))
    if restart:
        print(f"needs 'systemctl restart scistreamd' (kept until then): {', '.join(restart)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="scistreamd",
                                description="SciStream tunnel manager (system daemon)")
    p.add_argument("--config", type=Path, default=None,
                   help=f"configuration file (default {DEFAULT_CONFIG_PATH}; drop-ins in "
                        "conf.d/ beside it)")
    p.add_argument("--user", action="store_true",
                   help="serve the session bus and manage units of the user's manager "
                        "(development only)")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--check-config", action="store_true",
                     help="check the configuration and what it refers to (TLS files, stunnel, "
                          "the certificate's addresses); exit 78 naming each problem")
    act.add_argument("--generate-cert", action="store_true",
                     help="create a self-signed host certificate at peer_cert/peer_key naming "
                          "every address of this host and its name, unless one exists, and exit")
    act.add_argument("--regenerate-cert", action="store_true",
                     help="replace the host certificate and key with new self-signed ones "
                          "(the old ones are kept as *.old), and exit")
    act.add_argument("--reload", action="store_true",
                     help="make the running daemon re-read its configuration and wait for the "
                          "result (ExecReload of scistreamd.service)")
    p.add_argument("--version", action="version", version=f"scistreamd {__version__}")
    args = p.parse_args(argv)

    if args.reload:
        return _reload(args.user)
    config_path = args.config or DEFAULT_CONFIG_PATH
    try:
        cfg = load_config(config_path, required=args.config is not None)
    except ConfigError as e:
        print(f"scistreamd: configuration error: {e}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config:
        return _check(cfg)
    if args.generate_cert or args.regenerate_cert:
        from .certs import generate_host_cert_files, regenerate_host_cert_files

        names = _cert_identity(cfg)
        try:
            if args.regenerate_cert:
                kept = regenerate_host_cert_files(cfg.peer_cert, cfg.peer_key, *names)
                print(f"created {cfg.peer_cert} and {cfg.peer_key}" + (
                    f" (the old ones are {' and '.join(map(str, kept))})" if kept else ""))
            elif generate_host_cert_files(cfg.peer_cert, cfg.peer_key, *names):
                print(f"created {cfg.peer_cert} and {cfg.peer_key}")
            else:
                print(f"{cfg.peer_cert} exists: left unchanged (replace it with "
                      "'scistreamd --regenerate-cert')")
                return 0
        except OSError as e:
            print(f"scistreamd: cannot write the host certificate: {e}", file=sys.stderr)
            return 1
        _print_cert(cfg, names)
        return 0

    _setup_logging(cfg.log_level, _journal_available() and not sys.stderr.isatty())
    try:
        return asyncio.run(run(cfg, user_bus=args.user, config_path=config_path,
                               config_required=args.config is not None))
    except ConfigError as e:
        logger.error("configuration error: %s", e)
        return EX_CONFIG
    except ScistreamError as e:
        logger.error("%s", e)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        logger.error("start-up failed: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
