"""What systemd is told of the daemon (sd_notify): READY=1, RELOADING=1, and the
STATUS= line that follows the real endpoint count."""

from __future__ import annotations

import logging
from typing import Any, Dict

logger = logging.getLogger("scistreamd")


async def notify(*lines: str) -> None:
    notify_now(*lines)


def notify_now(*lines: str) -> None:
    from systemd import daemon as sd

    sd.notify("\n".join(lines))


def status_text(endpoints: int, failed: int = 0) -> str:
    """STATUS= of the daemon: the real endpoint count, and how many failed."""
    text = f"serving {endpoints} endpoint{'' if endpoints == 1 else 's'}"
    return f"{text} ({failed} failed)" if failed else text


class StatusKeeper:
    """An EndpointListener that keeps systemd's StatusText equal to the real count:
    the daemon's listeners (D-Bus objects, this) all see every add/change/remove."""

    def __init__(self, inner: Any, manager_endpoints: Dict[Any, Any],
                 notify: Any = notify_now) -> None:
        self._inner = inner
        self._endpoints = manager_endpoints
        self._notify = notify
        self._last = ""
        #: No notification before READY=1 (which carries the first status).
        self.live = False

    def current(self) -> str:
        failed = sum(1 for ep in self._endpoints.values() if ep.state.value == "failed")
        return status_text(len(self._endpoints), failed)

    def update(self, force: bool = False) -> None:
        if not self.live:
            # Before READY=1 nothing is sent, and counting every endpoint at each
            # one adopted made a start with N endpoints cost N² steps.
            return
        text = self.current()
        if force or text != self._last:
            self._last = text
            try:
                self._notify(f"STATUS={text}")
            except OSError as e:  # a status line is never worth a failed request
                logger.debug("sd_notify STATUS failed: %s", e)

    def endpoint_added(self, ep: Any) -> None:
        self._inner.endpoint_added(ep)
        # A new endpoint whose relay is starting is counted when it settles (its
        # state changes) or is removed: systemd handles a notification (and the
        # PropertiesChanged of scistreamd.service it causes) ahead of the
        # StartTransientUnit call that follows at once, delaying the relay.
        if ep.state.value != "starting":
            self.update()

    def endpoint_changed(self, ep: Any, changed: Any) -> None:
        self._inner.endpoint_changed(ep, changed)
        if "state" in changed:
            self.update()

    def endpoint_removed(self, ep: Any) -> None:
        self._inner.endpoint_removed(ep)
        self.update()
