"""What both faces of the peer port read and write before any document type: JSON
bodies (strict, never a traceback) and untrusted text made fit for one message line.

Kept apart from peerwire.py (the daemon-to-daemon documents, which re-exports
these) so the CLI's remote mode (userclient.py) does not import those with it.
"""

from __future__ import annotations

import json
from typing import Any, Dict

from .errors import InvalidArgument


def clean(text: object, limit: int = 200) -> str:
    """Untrusted text made safe for one log or message line: printable and short."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    return s if len(s) <= limit else s[: limit - 3] + "..."


def dumps(doc: Dict[str, Any]) -> bytes:
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode("utf-8")


def loads(raw: bytes) -> Any:
    """Parsed JSON; InvalidArgument for anything else (also absurd nesting)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidArgument("not JSON") from None
