"""Reading server-sent events for billing, without I/O: which events a client receives, what
usage they report, how many content events were delivered.

The usage chunk (``"choices": []`` with a ``usage`` object) is read for billing and, when the
gateway injected ``stream_options.include_usage`` itself, removed from what the client
receives. Only events that mention ``"usage"`` are parsed. Usage figures are cumulative: each
event's figures replace the earlier ones field by field (per-frame usage in chat chunks,
Anthropic's ``message_start`` then running ``message_delta`` counts, the Responses API's
terminal ``response.completed``/``incomplete``/``failed``).
"""

from __future__ import annotations

import json

from ..http.errors import error_body
from .usage import USAGE_OBJECT, event_model, event_usage


class StreamState:
    __slots__ = ("usage", "delivered", "error", "want_id", "response_id", "model")

    def __init__(self, want_id: bool = False) -> None:
        self.usage: dict | None = None
        self.model: str | None = None  # the upstream's "model", from the event that carried usage
        self.delivered = 0  # data events forwarded (vLLM sends about one token per event)
        self.error: str | None = None
        self.want_id = want_id  # /v1/responses: note the id of the response being created
        self.response_id: str | None = None


def _note_response_id(block: bytes, state: StreamState) -> None:
    at = block.find(b"data:")
    end = block.find(b"\n\n", at)
    try:
        doc = json.loads(block[at + 5 : end if end > 0 else None])
    except ValueError:
        return
    response = doc.get("response") if isinstance(doc, dict) else None
    if isinstance(response, dict) and isinstance(response.get("id"), str):
        state.response_id = response["id"]
        state.want_id = False


def error_event(message: str, code: str) -> bytes:
    return b"data: " + error_body(message, "server_error", code) + b"\n\n"


def filter_events(block: bytes, state: StreamState, strip_usage: bool) -> bytes:
    """Forwardable bytes of ``block`` (one or more complete events), noting usage and counts."""
    if state.want_id and b'"response"' in block:
        _note_response_id(block, state)
    if b'"usage"' not in block or USAGE_OBJECT.search(block) is None:
        state.delivered += block.count(b"data:") - block.count(b"[DONE]")
        return block
    kept = []
    for event in block.split(b"\n\n"):
        if not event:
            continue
        if USAGE_OBJECT.search(event) is not None:
            data = event[event.find(b"data:") + 5 :].strip()
            try:
                doc = json.loads(data)
            except ValueError:
                doc = None
            usage = event_usage(doc) if isinstance(doc, dict) else None
            if usage is not None:
                state.usage = usage if state.usage is None else {**state.usage, **usage}
                state.model = event_model(doc) or state.model
                if doc.get("choices"):
                    state.delivered += 1  # a content chunk carrying per-frame usage
                elif strip_usage:
                    continue
        elif b"data:" in event and b"[DONE]" not in event:
            state.delivered += 1
        kept.append(event)
    return b"".join(e + b"\n\n" for e in kept)
