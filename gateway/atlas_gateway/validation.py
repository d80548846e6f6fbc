"""Request-body checks that turn into 400s with the offending ``param``, before any Redis call."""

from __future__ import annotations

import json
import re
from typing import Any

from . import errors


MAX_NESTING = 64  # JSON arrays/objects inside each other; real requests (tool schemas) stay far below

_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def nesting_depth_exceeds(raw: bytes, limit: int = MAX_NESTING) -> bool:
    """Whether ``raw`` nests arrays/objects more than ``limit`` deep. The parser and every walk
    over the document are recursive: a deeper document would end in RecursionError (a 500).
    Cheap for the usual body: one C-level count proves most bodies shallow. Otherwise only
    C-level operations: drop escaped characters (then every remaining quote delimits a string),
    keep the brackets outside strings, and remove innermost pairs one level per pass."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(unescaped.split(b'"')[::2]).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        shorter = _INNERMOST.sub(b"", brackets)  # one level: a pair exposed by a removal waits
        if not shorter or shorter == brackets:
            return False  # fully matched within the limit (or unbalanced: the parser says so)
        brackets = shorter
    return True


def parse_body(raw: bytes) -> dict[str, Any]:
    if nesting_depth_exceeds(raw):
        raise errors.bad_request(f"The request body nests JSON deeper than {MAX_NESTING} levels.")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.bad_request(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise errors.bad_request("The request body must be a JSON object.")
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
