"""What goes upstream: the client's body, with only what Atlas must set changed.

Atlas sets the completion cap it reserved for (tokens.py), asks a stream for its usage chunk
(``stream_options.include_usage``, on the routes that need asking) and owns the upstream's
``priority`` field (set from the key's class with ATLAS_FORWARD_PRIORITY, else removed).
"""

from __future__ import annotations

import json
from typing import Any

from .tokens import GENERATING, apply_cap, cap_patch

STREAMING = frozenset({"chat", "completions", "responses", "messages"})
INCLUDE_USAGE = frozenset({"chat", "completions"})  # routes whose usage chunk must be asked for


class UpstreamBody:
    """``payload``: the bytes to send; ``streaming``: the client asked for SSE; ``strip_usage``:
    Atlas asked for the usage chunk, so the client must not see it."""

    __slots__ = ("payload", "streaming", "strip_usage")

    def __init__(self, kind: str, doc: dict[str, Any], raw: bytes, cap: int, priority_value: int | None) -> None:
        self.streaming = kind in STREAMING and doc.get("stream") is True
        self.strip_usage = False
        modified = False
        patch = None
        if kind in GENERATING:  # the upstream may generate no more than was reserved
            patch = cap_patch(kind, doc, cap, raw)
            apply_cap(kind, doc, cap)
            modified = patch is None
        if self.streaming and kind in INCLUDE_USAGE:
            options = doc.get("stream_options") or {}
            if not options.get("include_usage"):
                doc["stream_options"] = {**options, "include_usage": True}
                self.strip_usage = modified = True
        # the upstream's scheduling priority is Atlas's to set, on every route: a client's own
        # `priority` field is replaced (ATLAS_FORWARD_PRIORITY) or removed
        if priority_value is not None:
            doc["priority"] = priority_value
            modified = True
        elif "priority" in doc:
            del doc["priority"]
            modified = True
        if modified:
            self.payload = json.dumps(doc, separators=(",", ":")).encode()
        elif patch:  # only cap fields to add: append them to the client's object
            self.payload = raw.rstrip()[:-1] + patch + b"}"
        else:
            self.payload = raw
