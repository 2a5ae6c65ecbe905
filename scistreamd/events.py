"""The daemon's journal events about tunnels: their MESSAGE_IDs and the one
function that logs a line carrying an endpoint's fields (scistreamd(8) lists
the ids; tests/unit/test_message_ids.py keeps them unique and documented)."""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model import Endpoint

#: The manager's logger: journalctl -u scistreamd shows these as before the split.
logger = logging.getLogger("scistreamd.manager")

#: journald MESSAGE_IDs of the daemon's tunnel events (journalctl MESSAGE_ID=...).
MSG_REQUEST = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a71")
MSG_RELEASE = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a72")
MSG_FAILURE = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a73")
MSG_CLAIM = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a74")
#: A refused claim (same id as peerwire.MSG_PEER_REFUSED, which the peer port logs).
MSG_CLAIM_REFUSED = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a75")


def log_event(level: int, msg_id: uuid.UUID, ep: Endpoint, text: str, *args: Any) -> None:
    """A journal line carrying the endpoint's fields, so journalctl SCISTREAM_UID=x finds it.

    SCISTREAM_UNIT names the relay's unit: scistreamctl logs reads it to find
    the relay's own lines, which carry no uid (relay_unit.py says why).
    """
    logger.log(level, text, *args, extra={
        "MESSAGE_ID": msg_id.hex, "SCISTREAM_UID": ep.uid, "SCISTREAM_ROLE": ep.role.value,
        "SCISTREAM_UNIT": ep.unit, "SCISTREAM_OWNER": ep.owner})
