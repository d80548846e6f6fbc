"""Request-body checks that turn into 400s with the offending ``param``, before any Redis call."""

from __future__ import annotations

import json
from typing import Any

from . import errors


MAX_NESTING = 64  # JSON arrays/objects inside each other; real requests (tool schemas) stay far below


def _too_deep() -> errors.GatewayError:
    return errors.bad_request(f"The request body nests JSON deeper than {MAX_NESTING} levels.")


def _deeper_than(doc: Any, limit: int) -> bool:
    """Whether a parsed document nests arrays/objects more than ``limit`` deep (an explicit
    stack: no recursion, whatever the depth)."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        for child in (value.values() if isinstance(value, dict) else value):
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except RecursionError:  # deeper than the interpreter's recursion limit (~1000)
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.bad_request(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise errors.bad_request("The request body must be a JSON object.")
    # Every walk over the document (the prompt estimate, re-encoding) recurses: bound the depth.
    # A body with fewer brackets than the limit cannot be deeper, so most skip the walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_NESTING and _deeper_than(doc, MAX_NESTING):
        raise _too_deep()
    return doc


def _non_negative_int(doc: dict[str, Any], name: str, minimum: int = 0) -> None:
    value = doc.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise errors.bad_request(f"'{name}' must be an integer >= {minimum}.", param=name)


def validate(kind: str, doc: dict[str, Any]) -> str:
    """Check the fields the gateway relies on; return the model name."""
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise errors.bad_request("'model' is required and must be a non-empty string.", param="model")
    if kind == "chat":
        messages = doc.get("messages")
        if not isinstance(messages, list) or not messages:
            raise errors.bad_request("'messages' must be a non-empty array.", param="messages")
    elif kind == "completions":
        if not isinstance(doc.get("prompt"), (str, list)):
            raise errors.bad_request("'prompt' is required (string or array).", param="prompt")
    else:
        if not isinstance(doc.get("input"), (str, list)):
            raise errors.bad_request("'input' is required (string or array).", param="input")
    _non_negative_int(doc, "max_tokens")
    _non_negative_int(doc, "max_completion_tokens")
    _non_negative_int(doc, "n", 1)
    _non_negative_int(doc, "best_of", 1)
    stream = doc.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise errors.bad_request("'stream' must be a boolean.", param="stream")
    options = doc.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise errors.bad_request("'stream_options' must be an object.", param="stream_options")
    return model
