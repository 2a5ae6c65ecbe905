"""The relays' journal lines, followed on the event loop (python3-systemd's reader).

One reader for all relays, matching SYSLOG_IDENTIFIER=scistream-relay (every
relay unit sets it; relay_unit.py): journald wakes it through its inotify
descriptor, so idle relays cost nothing. Each entry goes to ``callback(unit,
invocation id, MESSAGE, realtime µs)``; which lines count is traffic.py's
business.

At start-up the lines since ``since_us`` (the oldest endpoint's creation,
this boot only, at most BACKLOG_LIMIT entries) are replayed oldest first, so a
restarted daemon counts the connections its relays opened meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Callable, List, Tuple

logger = logging.getLogger(__name__)

IDENTIFIER = "scistream-relay"
BACKLOG_LIMIT = 200_000
#: Entries handled per wakeup before the loop gets a turn.
BATCH = 2000

Callback = Callable[[str, str, str, int], None]


def _fields(entry: Any) -> Tuple[str, str, str, int]:
    unit = entry.get("_SYSTEMD_UNIT", "")
    invocation = entry.get("_SYSTEMD_INVOCATION_ID", "")
    when = entry.get("__REALTIME_TIMESTAMP")
    at_us = int(when.timestamp() * 1e6) if when is not None else 0
    message = entry.get("MESSAGE", "")
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return (str(unit), getattr(invocation, "hex", str(invocation)), str(message), at_us)


class RelayJournal:
    def __init__(self, callback: Callback) -> None:
        self._callback = callback
        self._reader: Any = None
        self._fd = -1

    async def start(self, since_us: int) -> None:
        from systemd import journal

        r = self._reader = journal.Reader()
        r.this_boot()
        r.add_match(SYSLOG_IDENTIFIER=IDENTIFIER)
        await asyncio.to_thread(self._replay, since_us)
        self._fd = r.fileno()
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)
        if not r.reliable_fd():
            # Without a reliable descriptor journald's changes may not wake us.
            asyncio.ensure_future(self._tick(r.get_timeout_ms() or 1000))
        self._drain()

    def _replay(self, since_us: int) -> None:
        r = self._reader
        r.seek_tail()
        backlog: List[Tuple[str, str, str, int]] = []
        newest = None
        while len(backlog) < BACKLOG_LIMIT:
            entry = r.get_previous()
            if not entry:
                break
            if newest is None:
                newest = entry.get("__CURSOR")
            fields = _fields(entry)
            if fields[3] and fields[3] < since_us:
                break
            backlog.append(fields)
        # Follow from just after the newest entry replayed (not seek_tail again:
        # a line written meanwhile would be skipped).
        if newest:
            r.seek_cursor(newest)
            r.get_next()
        else:
            # No relay line yet this boot: every line to come is new. (A seek to
            # the tail of an empty selection lost the first lines written later.)
            r.seek_head()
        self._pending = backlog[::-1]
        logger.debug("replayed %d relay journal lines", len(backlog))

    def _emit(self, fields: Tuple[str, str, str, int]) -> None:
        try:
            self._callback(*fields)
        except Exception:
            logger.exception("handling a relay's journal line failed")

    def _drain(self) -> None:
        for fields in getattr(self, "_pending", []):
            self._emit(fields)
        self._pending = []
        self._on_readable()

    def _on_readable(self) -> None:
        r = self._reader
        if r is None:
            return
        try:
            r.process()  # acknowledges the wakeup
            for _ in range(BATCH):
                entry = r.get_next()
                if not entry:
                    return
                self._emit(_fields(entry))
            # More waiting: continue on the next turn of the loop.
            asyncio.get_running_loop().call_soon(self._on_readable)
        except Exception:
            logger.exception("reading the relays' journal failed")

    async def _tick(self, ms: int) -> None:
        while self._reader is not None:
            await asyncio.sleep(max(ms, 250) / 1000)
            self._on_readable()

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = -1
        if self._reader is not None:
            self._reader.close()
            self._reader = None
