"""Early creation of an inbound endpoint: answered while its relay starts.

``Manager.inbound_request`` with option ``early`` returns once the endpoint exists (uid,
listeners, key; its units created and the relay's start queued), in state
``starting``; the start goes on in a task, and its key may be claimed
meanwhile. Whoever needs both halves of a tunnel (``scistreamctl tunnel``)
makes the other half in that time and then asks :meth:`settled` how the start
ended: the two relays start side by side instead of one after the other.
A failure after the answer is remembered for settled() and for a late claim.
"""

from __future__ import annotations

import asyncio
from typing import Dict, Optional, Tuple

from .config import Config
from .errors import RelayFailed, ScistreamError
from .model import Endpoint, parse_uid
from .recent import Recent


class EarlyStartMixin:
    """Uses the Manager's _create_probed, cfg."""

    cfg: Config
    #: uid -> (the start's task, the endpoint's owner)
    _early: Dict[str, Tuple[asyncio.Task[None], str]]
    _start_failures: Recent[str, Tuple[str, ScistreamError]]

    async def _create_early(self, ep: Endpoint, psk: str) -> Endpoint:
        """inbound_request with option early, once ``ep`` is made; the caller holds its
        uid's lock (a new uid: nobody else knows it until this returns)."""
        queued: asyncio.Future = asyncio.get_running_loop().create_future()

        async def start() -> None:
            try:
                await self._create_probed(ep, psk, queued)
            except BaseException as e:
                if queued.done():  # else the caller raises it
                    self._remember_start_failure(ep, e)
                raise

        task = asyncio.ensure_future(start())
        try:
            await asyncio.wait([task, queued], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if not queued.done():  # nobody learnt the uid: roll back
                task.cancel()
                raise
            self._keep_early(ep, task)
            raise
        if task.done():  # failed before its start was queued (or over already)
            task.result()
            return ep
        self._keep_early(ep, task)
        return ep

    def _keep_early(self, ep: Endpoint, task: asyncio.Task) -> None:
        self._early[ep.uid] = (task, ep.owner)
        # The outcome is retrieved here (start() remembers a failure for settled()).
        task.add_done_callback(lambda t: (self._early.pop(ep.uid, None),
                                          t.cancelled() or t.exception()))

    async def wait_early(self, uid: str) -> None:
        """Until the early start of ``uid``, if one goes on, is over (bounded)."""
        early = self._early.get(uid)
        if early is not None:
            await asyncio.wait([early[0]], timeout=self.cfg.relay_start_timeout + 5)

    async def settled(self, uid: object, owner: Optional[str] = None) -> None:
        """Wait until an early start of inbound ``uid`` (inbound_request, option early) is
        over (at most relay_start_timeout and a little more); raise its failure if it
        failed, when the endpoint is gone. ``owner``: only that owner's endpoint counts
        (another owner's start is neither waited for nor reported)."""
        uid = parse_uid(uid)
        early = self._early.get(uid)
        if early is not None and owner in (None, early[1]):
            await self.wait_early(uid)
        failed = self._start_failures.get(uid)
        if failed is not None and owner in (None, failed[0]):
            raise failed[1]

    def _remember_start_failure(self, ep: Endpoint, err: BaseException) -> None:
        if isinstance(err, asyncio.CancelledError):
            err = RelayFailed(f"the start of the relay of {ep.uid} was interrupted (scistreamd "
                              "is stopping?): the endpoint was rolled back")
        elif not isinstance(err, ScistreamError):
            err = RelayFailed(f"starting the relay of {ep.uid} failed: see 'journalctl -u "
                              "scistreamd'")
        self._start_failures.put(ep.uid, (ep.owner, err))

