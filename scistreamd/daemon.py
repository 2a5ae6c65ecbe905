"""scistreamd entry point (minimal: owns the bus name, answers Version)."""

from __future__ import annotations

import asyncio
import logging
import sys

from . import BUS_NAME, MANAGER_IFACE, MANAGER_PATH, __version__

logger = logging.getLogger(__name__)


async def _main() -> int:
    from dbus_next import BusType
    from dbus_next.aio import MessageBus
    from dbus_next.service import PropertyAccess, ServiceInterface, dbus_property
    from systemd import daemon as sd

    class Manager(ServiceInterface):
        def __init__(self) -> None:
            super().__init__(MANAGER_IFACE)

        @dbus_property(access=PropertyAccess.READ)
        def Version(self) -> "s":  # noqa: F821
            return __version__

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    bus.export(MANAGER_PATH, Manager())
    await bus.request_name(BUS_NAME)
    sd.notify("READY=1")
    logger.info("scistreamd %s ready", __version__)
    await bus.wait_for_disconnect()
    return 0


def main() -> int:
    from systemd.journal import JournalHandler
    logging.basicConfig(level=logging.INFO, handlers=[JournalHandler(SYSLOG_IDENTIFIER="scistreamd")])
    return asyncio.run(_main())


if __name__ == "__main__":
    sys.exit(main())
