"""How many tokens to reserve before forwarding, without a tokenizer.

Heuristic (deliberately on the high side, since the reservation is refunded at settlement
but an under-estimate could let concurrent requests overshoot a budget):

* text: ``ceil(utf8_bytes / 3)``. BPE tokenizers of current LLMs average about 4 bytes per
  token on English text and code; 3 covers most other Latin-script languages too, and for
  CJK (3 UTF-8 bytes per character, ~1 token per character) it still lands near one token per
  character.
* chat: + 4 tokens per message (role markers, separators) + 3 for the assistant primer;
  every string in a message is counted (content parts, names, tool calls and their
  arguments), images count a flat 1024 tokens each.
* ``tools`` / ``functions`` / ``response_format`` schemas are counted as their JSON text.
* token-id prompts (``[1, 2, 3]`` or lists of them) count exactly one token per id.

Reservation = prompt estimate + completion allowance, where the allowance is
``max_completion_tokens`` / ``max_tokens`` (or ``ATLAS_DEFAULT_MAX_TOKENS`` when absent)
times ``n`` (or ``best_of``) choices. Embeddings reserve the prompt estimate only.
"""

from __future__ import annotations

import json
from typing import Any

IMAGE_TOKENS = 1024
PER_MESSAGE = 4
PRIMER = 3


def text_tokens(text: str) -> int:
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    return -(-size // 3)


def _walk(value: Any) -> int:
    if isinstance(value, str):
        return text_tokens(value)
    if isinstance(value, list):
        return sum(_walk(v) for v in value)
    if isinstance(value, dict):
        kind = value.get("type")
        if kind in ("image_url", "input_image", "image"):
            return IMAGE_TOKENS
        if kind == "input_audio":
            return IMAGE_TOKENS
        return sum(_walk(v) for k, v in value.items() if k != "type")
    return 0


def chat_prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages") or []
    total = PRIMER
    for message in messages:
        total += PER_MESSAGE
        if isinstance(message, dict):
            for field, value in message.items():
                if field != "role":
                    total += _walk(value)
        else:
            total += _walk(message)
    for extra in ("tools", "functions", "response_format"):
        if body.get(extra):
            total += text_tokens(json.dumps(body[extra], separators=(",", ":")))
    return total


def prompt_input_tokens(value: Any) -> int:
    """``prompt`` (completions) or ``input`` (embeddings): str, [str], [int] or [[int]]."""
    if isinstance(value, str):
        return text_tokens(value)
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, int):
                total += 1
            elif isinstance(item, list):
                total += len(item)
            elif isinstance(item, str):
                total += text_tokens(item)
        return total
    return 0


def completion_allowance(body: dict[str, Any], default_max_tokens: int) -> int:
    cap = body.get("max_completion_tokens")
    if cap is None:
        cap = body.get("max_tokens")
    if cap is None:
        cap = default_max_tokens
    choices = body.get("best_of") or body.get("n") or 1
    return int(cap) * max(1, int(choices))


def estimate(kind: str, body: dict[str, Any], default_max_tokens: int) -> tuple[int, int]:
    """(prompt estimate, tokens to reserve) for a request of ``kind`` chat|completions|embeddings."""
    if kind == "chat":
        prompt = chat_prompt_tokens(body)
    elif kind == "completions":
        prompt = prompt_input_tokens(body.get("prompt"))
    else:
        return (prompt := prompt_input_tokens(body.get("input"))), prompt
    return prompt, prompt + completion_allowance(body, default_max_tokens)
