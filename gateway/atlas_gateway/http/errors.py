"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the statuses
of the table in design.md. Handlers raise :class:`GatewayError`; the ASGI layer renders it."""

from __future__ import annotations

import json


class GatewayError(Exception):
    __slots__ = ("status", "message", "type", "code", "param", "headers", "reason")

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or []
        self.reason: str | None = None  # the metrics label, when more precise than ``code``

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type, "param": param, "code": code}},
        separators=(",", ":"),
    ).encode()


# Constructors named after the situations of the design table ------------------------------


def invalid_api_key(message: str = "Incorrect or missing API key.") -> GatewayError:
    return GatewayError(401, message, "invalid_request_error", "invalid_api_key")


def permission_denied(message: str, code: str | None = None) -> GatewayError:
    return GatewayError(403, message, "permission_error", code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", code, param)


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"Request body larger than {limit} bytes.", "invalid_request_error", "request_too_large")


def not_found(path: str) -> GatewayError:
    return GatewayError(404, f"Unknown endpoint {path}.", "invalid_request_error", "unknown_url")


def response_not_found(response_id: str) -> GatewayError:
    """A stored response that does not exist, or is another key's (the same answer)."""
    return GatewayError(
        404,
        f"Response with id '{response_id}' not found.",
        "invalid_request_error",
        param="response_id",
        code="not_found",
    )


def method_not_allowed() -> GatewayError:
    return GatewayError(405, "Method not allowed.", "invalid_request_error", "method_not_allowed")


def rate_limited(limited: str, message: str, retry_after: int) -> GatewayError:
    """429 for requests/s, tokens/min and concurrency. ``limited`` (the error's type) is
    ``requests`` or ``tokens``."""
    return GatewayError(
        429,
        message,
        limited,
        "rate_limit_exceeded",
        headers=[(b"retry-after", str(retry_after).encode())],
    )


def quota_exhausted(message: str, retry_after: int) -> GatewayError:
    return GatewayError(
        429,
        message,
        "insufficient_quota",
        "insufficient_quota",
        headers=[(b"retry-after", str(retry_after).encode()), (b"x-should-retry", b"false")],
    )


def shed(retry_after: int = 1) -> GatewayError:
    return GatewayError(
        503,
        "The upstream is saturated; this request's priority class is being shed. Retry later.",
        "server_error",
        "overloaded",
        headers=[(b"retry-after", str(retry_after).encode())],
    )


def admissions_queued(retry_after: int = 1) -> GatewayError:
    """Too many admissions already wait for a healthy Redis (ATLAS_REDIS_MAX_WAITING): load
    shedding, not an outage (docs/design-decisions.md)."""
    return GatewayError(
        503,
        "Too many requests are waiting for the quota store; retry later.",
        "server_error",
        "admission_queue_full",
        headers=[(b"retry-after", str(retry_after).encode())],
    )


def redis_unavailable() -> GatewayError:
    return GatewayError(
        503,
        "Quota store unavailable; refusing requests until it is back (fail-closed).",
        "server_error",
        "quota_store_unavailable",
        headers=[(b"retry-after", b"1")],
    )


def redis_refused(kind: str) -> GatewayError:
    return GatewayError(
        500,
        f"Quota store refused the request ({kind}); nothing was let through unchecked.",
        "server_error",
        "quota_store_error",
    )


def request_timeout(what: str = "body") -> GatewayError:
    return GatewayError(408, f"The request {what} did not arrive in time.", "invalid_request_error", "request_timeout")


def upstream_unreachable(detail: str = "") -> GatewayError:
    return GatewayError(
        502,
        "Upstream model server unreachable." + (f" {detail}" if detail else ""),
        "server_error",
        "upstream_unreachable",
    )


def upstream_timeout() -> GatewayError:
    return GatewayError(504, "Upstream model server timed out.", "server_error", "upstream_timeout")
