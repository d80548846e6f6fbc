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
        obj, _ = _DECODER.raw_decode(body[match.end() - 1 :].decode("utf-8"))
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def split_usage(usage: dict) -> tuple[int, int, int]:
    """(prompt, completion, total) with missing figures derived from the others.

    Understands OpenAI's chat/completions fields (``prompt_tokens``/``completion_tokens``), the
    Responses API's and Anthropic's (``input_tokens``/``output_tokens``, plus Anthropic's cache
    fields, which it counts apart from ``input_tokens``) and the pooling routes' (rerank, score:
    ``total_tokens`` only, all of it prompt)."""
    get = usage.get
    prompt = int(get("prompt_tokens") or get("input_tokens") or 0)
    prompt += int(get("cache_creation_input_tokens") or 0) + int(get("cache_read_input_tokens") or 0)
    completion = int(get("completion_tokens") or get("output_tokens") or 0)
    total = int(get("total_tokens") or 0)
    if not prompt and not completion:
        prompt = total
    return prompt, completion, max(total, prompt + completion)


def cached_tokens(usage: dict) -> int:
    """Prompt tokens the upstream read from its prompt cache (priced at ``cachedInput``):
    OpenAI's ``prompt_tokens_details.cached_tokens`` (chat, completions), the Responses API's
    ``input_tokens_details.cached_tokens``, Anthropic's ``cache_read_input_tokens``."""
    for holder in ("prompt_tokens_details", "input_tokens_details"):
        details = usage.get(holder)
        if isinstance(details, dict):
            try:
                return max(0, int(details.get("cached_tokens") or 0))
            except (TypeError, ValueError):
                return 0
    try:
        return max(0, int(usage.get("cache_read_input_tokens") or 0))
    except (TypeError, ValueError):
        return 0


_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,256})"')


def response_id_from_body(body: bytes) -> str | None:
    """The id of a /v1/responses response: its first ``"id"`` (the top-level one comes first)."""
    match = _RESPONSE_ID.search(body, 0, 4096)
    return match.group(1).decode("utf-8", "replace") if match else None


_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')


def model_from_body(body: bytes) -> str | None:
    """The model a response names: its first ``"model"`` within the first 4 KiB (OpenAI's,
    Anthropic's and the Responses API's bodies all name it before the content)."""
    match = _MODEL.search(body, 0, 4096)
    return match.group(1).decode("utf-8", "replace") if match else None


def event_model(doc: dict) -> str | None:
    """The model an SSE event names, where :func:`event_usage` finds usage."""
    model = doc.get("model")
    if isinstance(model, str):
        return model
    for holder in ("response", "message"):
        inner = doc.get(holder)
        if isinstance(inner, dict) and isinstance(inner.get("model"), str):
            return inner["model"]
    return None


def event_usage(doc: dict) -> dict | None:
    """The usage an SSE event carries: top-level (chat, completions, Anthropic message_delta),
    in ``response`` (Responses API terminal events) or in ``message`` (Anthropic message_start)."""
    usage = doc.get("usage")
    if isinstance(usage, dict):
        return usage
    for holder in ("response", "message"):
        inner = doc.get(holder)
        if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
            return inner["usage"]
    return None
