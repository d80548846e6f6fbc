"""Request-body checks that turn into 400s with the offending ``param``, before any Redis call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from ..http import errors

if TYPE_CHECKING:
    from ..routes import Route


MAX_NESTING = 64  # JSON arrays/objects inside each other; real requests (tool schemas) stay far below
# elements a depth check walks before it falls back to counting brackets (see parse_body)
_WALK_BUDGET = 2048


def _too_deep() -> errors.GatewayError:
    return errors.bad_request(f"The request body nests JSON deeper than {MAX_NESTING} levels.")


def _deeper_than(doc: Any, limit: int, budget: int | None = None) -> bool | None:
    """Whether a parsed document nests arrays/objects more than ``limit`` deep (an explicit
    stack: no recursion, whatever the depth); None once ``budget`` elements were looked at
    without an answer."""
    stack = [(doc, 1)]
    seen = 0
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        if budget is not None:
            seen += len(children)
            if seen > budget:
                return None
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request's JSON object. orjson: faster than the standard library on big prompts
    (docs/benchmarks.md), and
    stricter where strictness is right (no NaN/Infinity, no lone surrogates: a 400, not a 500
    later; integers beyond 64 bits read as floats, so a cap field that large is refused)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit"):  # deeper than orjson's own limit (1024)
            raise _too_deep() from None
        raise errors.bad_request(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise errors.bad_request("The request body must be a JSON object.")
    # Every walk over the document (the prompt estimate, re-encoding) recurses: bound the depth.
    # A big prompt is a few long strings (a walk of a few steps); a token-id prompt is one long
    # array with few brackets: past a budget of steps, count the brackets instead (a pass over the
    # bytes): a body with fewer than the limit cannot be deeper, and most skip the full walk.
    deeper = _deeper_than(doc, MAX_NESTING, _WALK_BUDGET)
    if deeper is None:
        deeper = raw.count(b"[") + raw.count(b"{") > MAX_NESTING and _deeper_than(doc, MAX_NESTING)
    if deeper:
        raise _too_deep()
    return doc


def _non_negative_int(doc: dict[str, Any], name: str, minimum: int = 0) -> None:
    value = doc.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise errors.bad_request(f"'{name}' must be an integer >= {minimum}.", param=name)


@dataclass(frozen=True, slots=True)
class Field:
    """A body member a route cannot do without (routes.py): a 400 naming it when it is absent
    or of another type. An empty array is refused too, unless ``may_be_empty`` (then the prompt
    reader bounds or refuses it)."""

    name: str
    types: tuple[type, ...]
    message: str
    may_be_empty: bool = False

    def check(self, doc: dict[str, Any]) -> None:
        value = doc.get(self.name)
        if not isinstance(value, self.types) or (isinstance(value, list) and not value and not self.may_be_empty):
            raise errors.bad_request(self.message, param=self.name)


def validate(route: Route, doc: dict[str, Any]) -> str:
    """Check the fields the gateway relies on; return the model name."""
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise errors.bad_request("'model' is required and must be a non-empty string.", param="model")
    for field in route.required:
        field.check(doc)
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens", "min_tokens"):
        _non_negative_int(doc, name)
    _non_negative_int(doc, "n", 1)
    _non_negative_int(doc, "best_of", 1)
    stream = doc.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise errors.bad_request("'stream' must be a boolean.", param="stream")
    options = doc.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise errors.bad_request("'stream_options' must be an object.", param="stream_options")
    previous = doc.get("previous_response_id")
    if previous is not None and (not route.stores_responses or not isinstance(previous, str) or not previous):
        raise errors.bad_request("'previous_response_id' must be a response id.", param="previous_response_id")
    return model
