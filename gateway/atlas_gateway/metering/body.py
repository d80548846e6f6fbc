"""What goes upstream: the client's body, with only what Atlas must set changed.

Atlas sets the completion cap it reserved for (bounds.py), asks a stream for its usage chunk
(``stream_options.include_usage``, on the routes that need asking) and owns the upstream's
``priority`` field (set from the key's class with ATLAS_FORWARD_PRIORITY, else removed).

Members Atlas only has to *add* are appended to the client's bytes (one copy, no
re-serialisation: a 200 KB prompt costs the same as a 1 KB one, streaming or not). A top-level
key absent from the parsed document is absent from the body in every spelling, so the appended
member is the only one of its name. A member that must *change* or go (a cap the client set
higher, a ``stream_options`` without ``include_usage``, a client's ``priority``), or a cap field
the client sent (which could be duplicated or escaped in its bytes: bounds.cap_patch), makes the
body re-serialised, by orjson (two orders of magnitude faster than the standard library's
encoder on big prompts, and faster than proving a 200 KB body's cap key unambiguous:
docs/benchmarks.md, "Figures behind the code" and issue 24).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import orjson

from .bounds import apply_cap, cap_patch

if TYPE_CHECKING:
    from ..routes import Route

_INCLUDE_USAGE_MEMBER = b',"stream_options":{"include_usage":true}'


def _encode(doc: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(doc)
    except TypeError:  # beyond what orjson encodes (e.g. an integer wider than 64 bits): the slow way
        return json.dumps(doc, separators=(",", ":")).encode()


class UpstreamBody:
    """``payload``: the bytes to send; ``streaming``: the client asked for SSE; ``strip_usage``:
    Atlas asked for the usage chunk, so the client must not see it."""

    __slots__ = ("payload", "streaming", "strip_usage")

    def __init__(self, route: Route, doc: dict[str, Any], raw: bytes, cap: int, priority_value: int | None) -> None:
        self.streaming = route.streams and doc.get("stream") is True
        self.strip_usage = False
        rewrite = False  # a member must change or go: re-serialise
        added = []  # members to append to the client's object
        if route.cap_fields:  # the upstream may generate no more than was reserved
            patch = cap_patch(route, doc, cap, raw)
            apply_cap(route, doc, cap)
            if patch is None:
                rewrite = True
            elif patch:
                added.append(patch)
        if self.streaming and route.asks_usage:
            options = doc.get("stream_options") or {}
            if not options.get("include_usage"):
                self.strip_usage = True
                if "stream_options" in doc:  # (even as null: the member must change)
                    rewrite = True
                else:
                    added.append(_INCLUDE_USAGE_MEMBER)
                doc["stream_options"] = {**options, "include_usage": True}
        # the upstream's scheduling priority is Atlas's to set, on every route: a client's own
        # `priority` field is replaced (ATLAS_FORWARD_PRIORITY) or removed
        if "priority" in doc:
            rewrite = True
            if priority_value is None:
                del doc["priority"]
            else:
                doc["priority"] = priority_value
        elif priority_value is not None:
            doc["priority"] = priority_value
            added.append(b',"priority":%d' % priority_value)
        if rewrite:
            self.payload = _encode(doc)
        elif added:
            # the object's closing brace is the last one: only whitespace may follow it
            end = raw.rindex(b"}")
            self.payload = b"".join((memoryview(raw)[:end], *added, b"}"))
        else:
            self.payload = raw
