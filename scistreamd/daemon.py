"""scistreamd: process entry — config, logging, bus, peer port, sd_notify, signals.

Start-up order (READY=1 only when all of it holds):
config loaded and valid -> system bus connected -> systemd subscription ->
persisted endpoints re-adopted -> peer port listening -> bus name owned.
Stopping the daemon never stops relays: they are units of their own.
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
from typing import Any, Dict, List, Optional

from . import BUS_NAME, __version__
from .config import DEFAULT_CONFIG_PATH, Config, load_config
from .dbus_compat import AnsweredDBusErrors, patch_dbus_next_writer
from .errors import ConfigError, ScistreamError

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


def _client_ca(cfg: Config) -> Optional[Path]:
    """The CA file for peer client certificates, or None when there is none yet.

    An explicit peer_client_ca must load (else the start fails naming it). The
    default, peer_trust_file, may be absent on a fresh install: the daemon
    still starts, and with peer_require_client_cert every claim is refused by
    name until the trust file is installed and scistreamd restarted.
    """
    path = cfg.peer_client_ca_file
    if cfg.peer_client_ca is None and not path.exists():
        logger.warning(
            "peer_trust_file %s does not exist: no peer daemon can be authenticated, so %s; "
            "install the peer's CA or certificate there and restart scistreamd", path,
            "every claim of a key is refused" if cfg.peer_require_client_cert else
            "claims are accepted without client certificates only")
        return None
    return path


async def _notify(*lines: str) -> None:
    from systemd import daemon as sd

    sd.notify("\n".join(lines))


def _quiet_dbus_errors(loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
    """dbus-next re-raises a handler's DBusError after replying with it; that is no fault."""
    from dbus_next import DBusError

    if isinstance(context.get("exception"), DBusError):
        return
    loop.default_exception_handler(context)


async def run(cfg: Config, *, user_bus: bool = False) -> int:
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
    loop.add_signal_handler(signal.SIGHUP, lambda: logger.warning(
        "SIGHUP: configuration changes take effect on 'systemctl restart scistreamd' "
        "(tunnels keep running)"))

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
    api.attach(manager)
    await manager.adopt()

    peer_server = None
    if cfg.peer_enabled:
        client_ca, user_certs = _client_ca(cfg), None
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

    reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        logger.error("%s is already owned by another process: is scistreamd running twice?",
                     BUS_NAME)
        if peer_server:
            await peer_server.stop()
        return 1

    await _notify("READY=1", f"STATUS=serving {len(manager.endpoints)} endpoints")
    logger.info("scistreamd %s ready on %s (peer port %s, ports %s), %d endpoints adopted",
                __version__, cfg.listen_address, cfg.peer_port if cfg.peer_enabled else "off",
                cfg.port_range_text, len(manager.endpoints))

    watchdog = None
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec > 0:
        async def pet() -> None:
            # Proves the event loop still turns, not merely that the process lives.
            while True:
                await _notify("WATCHDOG=1")
                await asyncio.sleep(usec / 2e6)
        watchdog = asyncio.ensure_future(pet())

    checks = asyncio.ensure_future(manager.run_peer_checks())
    disconnected = asyncio.ensure_future(bus.wait_for_disconnect())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([disconnected, stopped], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if disconnected.done():
        logger.error("lost the system bus")
        code = 1
    await _notify("STOPPING=1")
    logger.info("scistreamd stopping; %d relays keep running", len(manager.endpoints))
    for task in (watchdog, stopped, checks):
        if task:
            task.cancel()
    if peer_server:
        await peer_server.stop()
    peers.close()
    if tokens is not None:
        tokens.close()
    if not disconnected.done():
        bus.disconnect()
    return code


def _addresses_for_cert(cfg: Config) -> List[Any]:
    addrs = [cfg.listen_address]
    if cfg.listen_address != ipaddress.ip_address("127.0.0.1"):
        addrs.append(ipaddress.ip_address("127.0.0.1"))
    return addrs


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="scistreamd",
                                description="SciStream tunnel manager (system daemon)")
    p.add_argument("--config", type=Path, default=None,
                   help=f"configuration file (default {DEFAULT_CONFIG_PATH}; drop-ins in "
                        "conf.d/ beside it)")
    p.add_argument("--user", action="store_true",
                   help="serve the session bus and manage units of the user's manager "
                        "(development only)")
    p.add_argument("--check-config", action="store_true",
                   help="validate the configuration and exit")
    p.add_argument("--generate-cert", action="store_true",
                   help="create a self-signed host certificate at peer_cert/peer_key unless "
                        "one exists, and exit")
    p.add_argument("--version", action="version", version=f"scistreamd {__version__}")
    args = p.parse_args(argv)

    try:
        cfg = load_config(args.config or DEFAULT_CONFIG_PATH, required=args.config is not None)
    except ConfigError as e:
        print(f"scistreamd: configuration error: {e}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config:
        if cfg.token_introspection_url:
            from .tokens import read_client_secret

            try:
                read_client_secret(cfg.token_client_secret_file)
            except ConfigError as e:
                print(f"scistreamd: configuration error: {e}", file=sys.stderr)
                return EX_CONFIG
        print("configuration OK")
        return 0
    if args.generate_cert:
        from .certs import generate_host_cert_files

        made = generate_host_cert_files(cfg.peer_cert, cfg.peer_key, socket.gethostname(),
                                        _addresses_for_cert(cfg))
        print(f"created {cfg.peer_cert}" if made else
              f"{cfg.peer_cert} exists: left unchanged")
        return 0

    _setup_logging(cfg.log_level, _journal_available() and not sys.stderr.isatty())
    try:
        return asyncio.run(run(cfg, user_bus=args.user))
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
