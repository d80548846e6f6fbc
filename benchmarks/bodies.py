"""Request bodies of the bench and the fixed answers of the static upstream.

Streaming requests name their own model (``STREAM_MODEL``): the static nginx upstream cannot
read a body, so the gateway's (and LiteLLM's) per-model upstream map sends them to the
location that answers with an SSE stream.
"""

from __future__ import annotations

import json

MODEL = "llama-3.1-8b-instruct"
STREAM_MODEL = "bench-stream"  # routed to the static upstream's SSE location
SMALL = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
    "max_tokens": 16,
}

# One word repeated: the same text whatever the size, ~1 token per 5 bytes for a BPE tokenizer.
_FILLER = "The quick brown fox jumps over the lazy dog and keeps running. "


def chat(prompt_bytes: int, stream: bool) -> dict:
    """A chat completion whose body is ``prompt_bytes`` long (within a few bytes): the RAG- or
    agent-shaped request of the prompt-size table (a system message and one long user turn)."""
    doc = {
        "model": STREAM_MODEL if stream else MODEL,
        "messages": [{"role": "system", "content": "Answer from the context."}, {"role": "user", "content": ""}],
        "max_tokens": 16,
    }
    if stream:
        doc["stream"] = True
    overhead = len(encode(doc))
    text = (_FILLER * (prompt_bytes // len(_FILLER) + 1))[: max(0, prompt_bytes - overhead)]
    doc["messages"][1]["content"] = text
    return doc


def encode(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


# The static upstream's answers: what a vLLM server returns for a 16-token completion.
COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1764547200,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28},
}


def sse_stream(chunks: int = 8) -> str:
    """An OpenAI SSE stream: a role chunk, ``chunks`` content chunks, a finish chunk, a usage-only
    chunk (the gateway asks for it with stream_options.include_usage) and [DONE]."""

    def event(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        doc = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1764547200,
            "model": STREAM_MODEL,
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage:
            doc["usage"] = usage
        return "data: " + json.dumps(doc, separators=(",", ":")) + "\n\n"

    out = [event({"role": "assistant", "content": ""})]
    out += [event({"content": f" word{i}"}) for i in range(chunks)]
    out.append(event({}, finish="stop"))
    out.append(event({}, usage={"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}))
    out.append("data: [DONE]\n\n")
    return "".join(out)
