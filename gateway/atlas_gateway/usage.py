"""Reading ``usage`` out of upstream responses without parsing more JSON than needed."""

from __future__ import annotations

import json
import re

_DECODER = json.JSONDecoder()
USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


def usage_from_body(body: bytes) -> dict | None:
    """The ``usage`` object of a non-streaming response body (the last one in the document)."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    match = USAGE_OBJECT.match(body, at)
    if match is None:
        return None
    try:
        obj, _ = _DECODER.raw_decode(body[match.end() - 1:].decode("utf-8"))
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def split_usage(usage: dict) -> tuple[int, int, int]:
    """(prompt, completion, total) with missing figures derived from the others."""
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    total = int(usage.get("total_tokens") or (prompt + completion))
    return prompt, completion, max(total, prompt + completion)
