"""The configuration at run time: the concrete relay address, the peer port's
client CA, and `systemctl reload` (re-read, validate, apply the reloadable keys)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Optional, Tuple

from .config import Config, load_config, plan_reload
from .errors import ConfigError, InvalidArgument, ScistreamError
from .sdstatus import StatusKeeper, notify

logger = logging.getLogger("scistreamd")


def peer_client_ca(cfg: Config) -> Optional[Path]:
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
            "install the peer's CA or certificate there and run 'systemctl reload "
            "scistreamd'", path,
            "every claim of a key is refused" if cfg.peer_require_client_cert else
            "claims are accepted without client certificates only")
        return None
    return path


def resolve_config(cfg: Config) -> Config:
    """``cfg`` with the concrete relay address (hostaddrs.resolve_relay_address)."""
    import dataclasses

    from .hostaddrs import resolve_relay_address

    relay = resolve_relay_address(cfg.listen_address, cfg.relay_address)
    return dataclasses.replace(cfg, relay_address=relay)


class Reloader:
    """Re-reads the configuration and applies what may change without a restart."""

    def __init__(self, config_path: Path, required: bool, cfg: Config, manager: Any,
                 peers: Any, peer_server: Any, status: StatusKeeper) -> None:
        self._path, self._required = config_path, required
        self.cfg = cfg
        self._manager, self._peers, self._server = manager, peers, peer_server
        self._status = status
        self._lock = asyncio.Lock()

    async def reload(self) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
        """(applied keys, keys needing a restart); InvalidArgument, nothing changed,
        when the new configuration is invalid."""
        async with self._lock:
            await notify("RELOADING=1", "STATUS=reloading the configuration")
            try:
                return await self._reload()
            except ScistreamError as e:
                logger.error("configuration NOT reloaded, the running one stays: %s", e)
                raise InvalidArgument(f"configuration not reloaded (the running one stays): "
                                      f"{e}") from None
            finally:
                await notify("READY=1", f"STATUS={self._status.current()}")

    async def _reload(self) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
        new = await asyncio.to_thread(load_config, self._path, required=self._required)
        new = await asyncio.to_thread(resolve_config, new)
        plan = plan_reload(self.cfg, new)
        cfg = plan.config
        if "stunnel" in plan.applied:
            from .configcheck import check_stunnel

            problems = await asyncio.to_thread(check_stunnel, cfg)
            if problems:
                raise ConfigError(problems[0])
        # The peer port's TLS: loaded (and checked) before anything changes. The
        # files are read afresh even when their names did not change.
        if self._server is not None:
            self._server.reload_tls(cfg.peer_cert, cfg.peer_key, peer_client_ca(cfg),
                                    cfg.peer_require_client_cert)
        self._peers.trust_file = cfg.peer_trust_file
        self._peers.client_cert, self._peers.client_key = cfg.peer_cert, cfg.peer_key
        await self._manager.apply_config(cfg)
        logging.getLogger().setLevel(cfg.log_level.upper())
        self.cfg = cfg
        logger.info("configuration reloaded from %s: %s", self._path,
                    f"applied {', '.join(plan.applied)}" if plan.applied else "no change applied")
        if plan.needs_restart:
            logger.warning("configuration keys changed that take effect only on 'systemctl "
                           "restart scistreamd' (tunnels keep running), kept at their running "
                           "value until then: %s", ", ".join(plan.needs_restart))
        return plan.applied, plan.needs_restart
