"""The one parser of request headers (raw ASGI ``(name, value)`` byte pairs, names lower-case),
used by the hot path and by every other endpoint that needs the caller's key.

One pass over the headers yields the API key (``Authorization: Bearer <key>`` wins over
``x-api-key: <key>``; the first usable one of each counts), the ``x-atlas-priority`` request,
the declared ``content-length`` and, when asked, the headers to forward upstream.
"""

from __future__ import annotations

# Request headers never forwarded upstream: hop-by-hop, the client's Atlas credentials, our own
# controls, and accept-encoding (the gateway reads usage out of the body, so it wants identity).
NOT_FORWARDED = frozenset(
    {
        b"host",
        b"content-length",
        b"authorization",
        b"x-api-key",
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-connection",
        b"x-atlas-priority",
        b"accept-encoding",
        b"expect",
        b"x-request-id",
    }
)
_BEARER = b"bearer "


class RequestHeaders:
    """What the gateway reads from a request's headers. ``forward`` (only when asked for) holds
    every header not in :data:`NOT_FORWARDED`, as str -> str for the upstream client."""

    __slots__ = ("api_key", "priority", "content_length", "forward")

    def __init__(self, raw: list[tuple[bytes, bytes]], forward: bool = False) -> None:
        bearer = api_key = priority = None
        content_length = 0
        kept: dict[str, str] = {}
        for name, value in raw:
            if name in NOT_FORWARDED:
                if name == b"authorization":
                    if bearer is None and value[:7].lower() == _BEARER:
                        bearer = value[7:].strip() or None
                elif name == b"x-api-key":
                    if api_key is None:
                        api_key = value.strip() or None
                elif name == b"x-atlas-priority":
                    priority = value.decode("latin-1")
                elif name == b"content-length":
                    content_length = int(value) if value.isdigit() else 0
            elif forward:
                kept[name.decode("latin-1")] = value.decode("latin-1")
        key = bearer if bearer is not None else api_key
        self.api_key = key.decode("latin-1") if key is not None else None
        self.priority = priority
        self.content_length = content_length
        self.forward = kept


def api_key_from_headers(raw: list[tuple[bytes, bytes]]) -> str | None:
    """The caller's key (see :class:`RequestHeaders`), for endpoints that need nothing else."""
    return RequestHeaders(raw).api_key
