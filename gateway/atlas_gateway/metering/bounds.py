"""What a request may cost: an upper bound of the tokens the upstream will count for it.

The metering invariant (design.md) needs a bound, not an estimate: the reservation must never
be smaller than what the upstream counts, or concurrent requests could overshoot a budget.

* Text: its UTF-8 length. A byte-level BPE token covers at least one byte, so no tokenizer
  counts more tokens than the text has bytes (measured factors: docs/metering.md).
* Chat templates add tokens around every message: ``template_per_message`` each, plus
  ``template_per_request`` for the fixed text a template adds once (BOS, a default system
  prompt, the assistant primer). Roles are counted as text.
* Structured values the template renders (tools, tool calls and their arguments, tool results
  given as objects, documents) are counted as the length of their JSON rendering with an
  indent of 4, the most verbose rendering templates use (``tojson(indent=4)``), which also
  bounds the compact and the default-separator renderings.
* Media parts (images, audio, video) count ``media_part`` tokens each: set it to the largest
  number of tokens the served model turns one part into.
* Token-id prompts (``[1, 2, 3]``, ``[[1, 2], [3]]``) count one token per id; a text prompt
  adds ``template_per_prompt`` for the special tokens a tokenizer adds (BOS/EOS, CLS/SEP).

What cannot be bounded is refused with a 400 naming the field, never forwarded unmetered: an
unknown content part or input item type, a prompt of an unknown shape, a request-supplied chat
template, a background response, a stored input item reference.

The completion side: the cap is the smallest positive of the route's cap fields (an upstream
reads ``max_completion_tokens or max_tokens``, so 0 means "absent"), else the configured
default; it is multiplied by the number of sequences generated: ``max(n, best_of)`` per
prompt, times the number of prompts of a batch. The gateway forwards the cap it reserved for
in every cap field of the route (:func:`apply_cap`).
"""

from __future__ import annotations

from functools import lru_cache
from json.encoder import encode_basestring
from typing import TYPE_CHECKING, Any

from ..http import errors

if TYPE_CHECKING:
    from ..routes import Route
    from ..settings import Settings

TEXT_FIELDS = {  # content part type -> the field holding its text
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "summary_text": "text",
    "reasoning_text": "text",
    "thinking": "thinking",
}
MEDIA_PARTS = frozenset({"image_url", "input_image", "image", "input_audio", "audio_url", "video_url", "video"})
RESPONSE_ITEMS = frozenset({"message", "function_call", "function_call_output", "reasoning"})

MAX_RESERVE = 10**15  # the CRDs' largest token budget: a request reserving more fits no budget
_CHAT_STRUCTURED = ("tools", "functions", "documents", "chat_template_kwargs", "response_format")


class Bound:
    """``reserve = prompt + cap * sequences``; ``sequences`` is 0 for routes that generate nothing."""

    __slots__ = ("prompt", "cap", "sequences")

    def __init__(self, prompt: int, cap: int = 0, sequences: int = 0) -> None:
        self.prompt = prompt
        self.cap = cap
        self.sequences = sequences

    @property
    def reserve(self) -> int:
        return self.prompt + self.cap * self.sequences


def _bad(message: str, param: str | None) -> errors.GatewayError:
    return errors.bad_request(message, param=param)


def utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def text_tokens(text: str) -> int:
    """Upper bound of the tokens of ``text`` (its UTF-8 length)."""
    return utf8_len(text)


def rendered_len(value: Any, depth: int = 0) -> int:
    """Length in UTF-8 bytes of ``json.dumps(value, indent=4, ensure_ascii=False)``, computed
    without building the string (the pure-Python indenting encoder is slow)."""
    if isinstance(value, str):
        return utf8_len(encode_basestring(value))
    if value is None or value is True:
        return 4
    if value is False:
        return 5
    if isinstance(value, (int, float)):
        return len(repr(value))
    inner = 4 * (depth + 1)
    if isinstance(value, list):
        if not value:
            return 2
        # "[\n" + per item: indent + item + ",\n" (the last without the comma) + indent + "]"
        return 2 + 4 * depth + sum(inner + 2 + rendered_len(v, depth + 1) for v in value)
    if isinstance(value, dict):
        if not value:
            return 2
        return (
            2 + 4 * depth + sum(inner + 4 + rendered_len(str(k)) + rendered_len(v, depth + 1) for k, v in value.items())
        )
    return len(str(value))


class Meter:
    """Bounds per route, with the allowances from the settings."""

    def __init__(
        self, default_cap: int, per_request: int = 64, per_message: int = 8, per_prompt: int = 4, media_part: int = 2048
    ) -> None:
        self.default_cap = default_cap
        self.per_request = per_request
        self.per_message = per_message
        self.per_prompt = per_prompt
        self.media_part = media_part

    @classmethod
    def from_settings(cls, settings: Settings) -> "Meter":
        return cls(
            settings.default_max_tokens,
            settings.template_tokens_per_request,
            settings.template_tokens_per_message,
            settings.template_tokens_per_prompt,
            settings.media_part_tokens,
        )

    # ------------------------------------------------------------------ pieces

    def content(self, value: Any, path: str) -> int:
        """A message's content: a string, null, or a list of typed parts."""
        if value is None:
            return 0
        if isinstance(value, str):
            return utf8_len(value)
        if not isinstance(value, list):
            raise _bad(f"'{path}' must be a string or an array of content parts.", path)
        total = 0
        for i, part in enumerate(value):
            if not isinstance(part, dict):
                raise _bad(f"'{path}[{i}]' must be an object with a 'type'.", f"{path}[{i}]")
            kind = part.get("type")
            if kind in TEXT_FIELDS:
                text = part.get(TEXT_FIELDS[kind])
                if not isinstance(text, str):
                    raise _bad(
                        f"'{path}[{i}].{TEXT_FIELDS[kind]}' must be a string.", f"{path}[{i}].{TEXT_FIELDS[kind]}"
                    )
                total += utf8_len(text) + 1
            elif kind in MEDIA_PARTS:
                total += self.media_part
            elif kind in ("tool_use", "redacted_thinking", "function_call"):
                total += rendered_len(part)
            elif kind == "tool_result":
                total += self.content(part.get("content"), f"{path}[{i}].content") + rendered_len(
                    {k: v for k, v in part.items() if k != "content"}
                )
            else:
                raise _bad(
                    f"Unsupported content part type {kind!r} at '{path}[{i}].type': the gateway "
                    "cannot bound its token count.",
                    f"{path}[{i}].type",
                )
        return total

    def messages(self, messages: Any, path: str = "messages") -> int:
        if not isinstance(messages, list):
            raise _bad(f"'{path}' must be an array.", path)
        total = 0
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise _bad(f"'{path}[{i}]' must be an object.", f"{path}[{i}]")
            total += self.per_message
            for name, value in message.items():
                if name == "content":
                    total += self.content(value, f"{path}[{i}].content")
                elif isinstance(value, str):
                    total += utf8_len(value)  # role, name, tool_call_id, reasoning_content
                elif value is not None:
                    total += rendered_len(value)  # tool_calls, function_call, ...
        return total

    def prompts(self, value: Any, path: str) -> tuple[int, int]:
        """``prompt`` / ``input``: str, [str], [int] or [[int]] -> (token bound, number of prompts)."""
        if isinstance(value, str):
            return utf8_len(value) + self.per_prompt, 1
        if not isinstance(value, list) or not value:
            raise _bad(
                f"'{path}' must be a string, an array of strings, or an array of token ids "
                "(or of arrays of them), and not empty.",
                path,
            )
        first = value[0]
        if isinstance(first, int) and not isinstance(first, bool):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
                raise _bad(f"'{path}' mixes token ids with other values.", path)
            return len(value), 1
        total = 0
        for i, item in enumerate(value):
            if isinstance(item, str):
                total += utf8_len(item) + self.per_prompt
            elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                total += len(item)
            else:
                raise _bad(f"'{path}[{i}]' must be a string or a non-empty array of token ids.", f"{path}[{i}]")
        return total, len(value)

    def cap(self, doc: dict[str, Any], fields: tuple[str, ...]) -> int:
        cap = 0
        for name in fields:
            value = doc.get(name)
            if value and (cap == 0 or value < cap):
                cap = value
        return cap or self.default_cap

    @staticmethod
    def sequences(doc: dict[str, Any]) -> int:
        return max(doc.get("n") or 1, doc.get("best_of") or 1)

    @staticmethod
    def _structured(doc: dict[str, Any], names: tuple[str, ...]) -> int:
        total = 0
        for name in names:
            value = doc.get(name)
            if value is not None:
                total += rendered_len(value)
        return total

    # ------------------------------------------------------------------ routes

    def bound(self, route: Route, doc: dict[str, Any], previous_tokens: int = 0) -> Bound:
        """The bound of a validated request of ``route``; 400 for what cannot be bounded, and for a
        reservation larger than any budget (admit.lua counts exactly only below 2^53).
        ``previous_tokens``: what a continued stored response re-feeds the model."""
        bound = self._bound(route, doc, previous_tokens)
        if bound.reserve > MAX_RESERVE:
            param = next((name for name in (*route.cap_fields, "n", "best_of") if doc.get(name)), None)
            message = f"This request may use {bound.reserve} tokens, more than any budget holds ({MAX_RESERVE})"
            raise _bad(message + (f"; lower '{param}'." if param else "."), param)
        return bound

    def _bound(self, route: Route, doc: dict[str, Any], previous_tokens: int) -> Bound:
        if route.prompt is None:
            return Bound(0)  # requests-only routes (tokenize, detokenize)
        prompt, prompts = route.prompt(self, doc)
        prompt += previous_tokens
        if not route.cap_fields:
            return Bound(prompt)
        per_prompt = self.sequences(doc) if route.choices else 1
        return Bound(prompt, self.cap(doc, route.cap_fields), prompts * per_prompt)

    # Each route's prompt reader (routes.py): (prompt bound, number of prompts generated for).

    def chat_prompt(self, doc: dict[str, Any]) -> tuple[int, int]:
        if doc.get("chat_template") is not None:
            raise _bad("A request-supplied 'chat_template' cannot be metered.", "chat_template")
        _check_tools(doc.get("tools"), "tools", ("function",))
        return self.per_request + self.messages(doc["messages"]) + self._structured(doc, _CHAT_STRUCTURED), 1

    def completions_prompt(self, doc: dict[str, Any]) -> tuple[int, int]:
        if doc.get("prompt_embeds") is not None:
            raise _bad("'prompt_embeds' cannot be metered: send text or token ids.", "prompt_embeds")
        prompt, count = self.prompts(doc["prompt"], "prompt")
        suffix = doc.get("suffix")
        if isinstance(suffix, str):
            prompt += count * utf8_len(suffix)
        return prompt, count

    def embeddings_prompt(self, doc: dict[str, Any]) -> tuple[int, int]:
        return self.prompts(doc["input"], "input")

    def messages_prompt(self, doc: dict[str, Any]) -> tuple[int, int]:
        _check_tools(doc.get("tools"), "tools", ("custom", None))
        system = doc.get("system")
        prompt = self.per_request + self.messages(doc["messages"]) + self._structured(doc, ("tools",))
        if system is not None:
            prompt += self.per_message + self.content(system, "system")
        return prompt, 1

    def rerank_prompt(self, doc: dict[str, Any]) -> tuple[int, int]:
        query = doc["query"]
        total = 0
        for i, item in enumerate(doc["documents"]):
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                item = item["text"]
            if not isinstance(item, str):
                raise _bad(f"'documents[{i}]' must be a string or an object with 'text'.", f"documents[{i}]")
            total += utf8_len(query) + utf8_len(item) + self.per_prompt
        return total, 1

    def responses_prompt(self, doc: dict[str, Any]) -> tuple[int, int]:
        return self._response_input(doc), 1

    def score_prompt(self, doc: dict[str, Any]) -> tuple[int, int]:
        return self._score_pairs(doc), 1

    def _response_input(self, doc: dict[str, Any]) -> int:
        for name, why in (
            ("background", "a background response is generated after the request ends"),
            ("conversation", "a stored conversation's length is unknown to the gateway"),
            ("prompt", "a stored prompt template's length is unknown to the gateway"),
        ):
            if doc.get(name):
                raise _bad(f"'{name}' cannot be metered: {why}.", name)
        _check_tools(doc.get("tools"), "tools", ("function",))
        total = self.per_request + self._structured(doc, ("tools", "text"))
        instructions = doc.get("instructions")
        if isinstance(instructions, str):
            total += self.per_message + utf8_len(instructions)
        items = doc["input"]  # required: routes.py
        if isinstance(items, str):
            return total + self.per_message + utf8_len(items)
        for i, item in enumerate(items):
            path = f"input[{i}]"
            if not isinstance(item, dict):
                raise _bad(f"'{path}' must be an object.", path)
            kind = item.get("type", "message")
            if kind not in RESPONSE_ITEMS:
                raise _bad(
                    f"Unsupported input item type {kind!r} at '{path}.type': the gateway cannot bound its token count.",
                    f"{path}.type",
                )
            total += self.per_message
            if kind == "message":
                total += utf8_len(str(item.get("role", ""))) + self.content(item.get("content"), f"{path}.content")
            elif kind == "function_call_output" and isinstance(item.get("output"), list):
                total += self.content(item["output"], f"{path}.output") + rendered_len(
                    {k: v for k, v in item.items() if k != "output"}
                )
            else:
                total += rendered_len(item)
        return total

    def _score_pairs(self, doc: dict[str, Any]) -> int:
        sides = []
        for name in ("text_1", "text_2"):
            value = doc[name]
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
                raise _bad(f"'{name}' must be a string or a non-empty array of strings.", name)
            sides.append([utf8_len(t) for t in items])
        first, second = sides
        if len(first) == 1:
            return len(second) * (first[0] + self.per_prompt) + sum(second)
        if len(first) != len(second):
            raise _bad("'text_2' must have as many items as 'text_1' (or 'text_1' a single one).", "text_2")
        return sum(first) + sum(second) + len(first) * self.per_prompt


def _check_tools(tools: Any, path: str, allowed: tuple) -> None:
    """Tools the upstream runs itself (web search, code interpreter, MCP) feed it text the
    gateway never sees: only tools the client executes can be bounded."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _bad(f"'{path}' must be an array.", path)
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") not in allowed:
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _bad(
                f"Unsupported tool type {kind!r} at '{path}[{i}].type': only client-executed tools can be metered.",
                f"{path}[{i}].type",
            )


@lru_cache(maxsize=None)
def _needles(fields: tuple[str, ...]) -> tuple[tuple[str, bytes, bytes], ...]:
    """Per cap field: its name, its quoted name as it appears in a body, the member appending it."""
    return tuple((name, b'"%s"' % name.encode(), b',"%s":' % name.encode()) for name in fields)


def cap_patch(route: Route, doc: dict[str, Any], cap: int, raw: bytes) -> bytes | None:
    """When forwarding the cap only needs cap fields *added*, the JSON members to append to the
    client's body ``raw``; None when the body must be re-serialised: a field must change, or the
    client sent one.

    A field absent from ``doc`` is absent from the body's top level in every spelling (the parser
    keeps every key it reads), so appending it is unambiguous without looking at the bytes. A
    present one could occur twice or escaped (``max_tok\\u0065ns``), read last-wins by the gateway
    and first-wins by an upstream: proving it does not took two passes over the bytes (a regex
    for escaped key letters and a count), 10-20 times what orjson takes to re-serialise the
    parsed body, which leaves no such ambiguity (docs/benchmarks.md, issue 24)."""
    patch = b""
    for name, _, member in _needles(route.cap_fields):
        if name in doc:
            return None
        patch += member + str(cap).encode()
    for name in route.also_capped:
        if doc.get(name, cap) != cap:
            return None
    min_tokens = doc.get("min_tokens")
    if isinstance(min_tokens, int) and min_tokens > cap:
        return None
    return patch


def apply_cap(route: Route, doc: dict[str, Any], cap: int) -> None:
    """Write the cap the reservation was made for into every cap field of the route, so that the
    upstream can generate no more, however it reads them."""
    for name in route.cap_fields:
        doc[name] = cap
    for name in route.also_capped:
        if name in doc:
            doc[name] = cap
    min_tokens = doc.get("min_tokens")
    if isinstance(min_tokens, int) and min_tokens > cap:
        doc["min_tokens"] = cap
