"""A strict test upstream: counts tokens the way vLLM does, at least as finely as a BPE would.

Run: ``python -m atlas_devstack.strict_upstream --port N [--context 32768] [--media-tokens 1024]``.

Where the mock upstream (mock_upstream.py) is fast and obliging, this one is the metering
oracle: whatever a careless client sends, it generates as much as it is allowed to and counts
all of it, so a gateway that does not cap, multiply or bound correctly shows up as an overshoot.

* The prompt is rendered through a Llama-3-like chat template (one token per special marker)
  and counted one token per UTF-8 byte, which no byte-level BPE undercuts. Tools and tool
  calls are rendered with ``json.dumps(indent=4)``, media parts count ``--media-tokens`` each,
  token-id prompts one per id, every prompt of a batch and every input of a list.
* Generation runs to the cap (``max_completion_tokens or max_tokens``, ``max_output_tokens``
  on /v1/responses: 0 reads as absent, exactly like vLLM) or, without one, to the end of the
  context (``--context`` minus the prompt); for every sequence: ``max(n, best_of)`` per prompt.
* Routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses (stored, with
  GET/DELETE /v1/responses/{id} and previous_response_id re-feeding the stored conversation),
  /v1/messages (Anthropic events with running ``message_delta`` counts), /v1/rerank, /v1/score,
  /tokenize, /detokenize, /v1/models. Streams carry per-frame cumulative usage when asked for
  (``stream_options.continuous_usage_stats``) and the final usage when ``include_usage``.
* Ledger: a request with ``x-strict-ledger: NAME`` adds what it counted to ledger NAME;
  ``GET /_strict/ledger/NAME`` -> ``{"tokens", "requests", "prompt", "completion"}``,
  ``GET /_strict/routes`` -> requests per path (to prove a route was never reached),
  ``GET /_strict/headers`` -> the headers of the last request per path (what a client could
  steer through the gateway), ``POST /_strict/reset`` clears all three.
* ``GET /metrics``: 404, not counted (the gateway reads it in the background for the upstream's
  load; this upstream exports none, so the gateway's in-flight ceilings apply).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter

from .mock_upstream import serve_lifespan
from .processes import ServerProcess

SPECIAL = 1  # one token per template marker (<|start_header_id|>, <|eot_id|>, ...)
TEXT_PARTS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "summary_text": "text",
    "reasoning_text": "text",
    "thinking": "thinking",
}
MEDIA_PARTS = {"image_url", "input_image", "image", "input_audio", "audio_url", "video_url", "video"}


class BadRequest(Exception):
    pass


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def rendered(value) -> int:
    return nbytes(json.dumps(value, indent=4, ensure_ascii=False))


class Counting:
    def __init__(self, context: int, media_tokens: int) -> None:
        self.context = context
        self.media_tokens = media_tokens

    def content(self, value) -> int:
        if value is None:
            return 0
        if isinstance(value, str):
            return nbytes(value)
        if not isinstance(value, list):
            raise BadRequest("content must be a string or a list of parts")
        total = 0
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in TEXT_PARTS:
                total += nbytes(part[TEXT_PARTS[kind]]) + 1  # parts joined by a newline
            elif kind in MEDIA_PARTS:
                total += self.media_tokens
            elif kind in ("tool_use", "redacted_thinking", "function_call"):
                total += rendered(part)
            elif kind == "tool_result":
                total += self.content(part.get("content")) + rendered({k: v for k, v in part.items() if k != "content"})
            else:
                raise BadRequest(f"unsupported content part {kind!r}")
        return total

    def message(self, message: dict) -> int:
        # <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>
        total = 3 * SPECIAL + 2
        for name, value in message.items():
            if name == "content":
                total += self.content(value)
            elif isinstance(value, str):
                total += nbytes(value)
            elif value is not None:
                total += rendered(value)
        return total

    def chat(self, doc: dict, extra_structured=("tools", "functions", "documents")) -> int:
        # <|begin_of_text|> ... <|start_header_id|>assistant<|end_header_id|>\n\n
        total = SPECIAL + 3 * SPECIAL + nbytes("assistant") + 2
        for name in extra_structured:
            if doc.get(name) is not None:
                total += rendered(doc[name])
        return total + sum(self.message(m) for m in doc["messages"])

    def prompts(self, value, special: int) -> list[int]:
        if isinstance(value, str):
            return [nbytes(value) + special]
        if value and isinstance(value[0], int):
            return [len(value)]
        return [nbytes(p) + special if isinstance(p, str) else len(p) for p in value]

    def generated(self, cap, prompt: int) -> int:
        room = max(0, self.context - prompt)
        return min(int(cap), room) if cap else room  # 0 or absent: to the end of the context


class StrictUpstream:
    def __init__(self, counting: Counting) -> None:
        self.counting = counting
        self.ledgers: dict[str, dict[str, int]] = {}
        self.routes: Counter[str] = Counter()
        self.headers: dict[str, dict[str, str]] = {}  # path -> the headers of its last request
        self.stored: dict[str, dict] = {}
        self._ids = 0

    def _charge(self, ledger: str | None, prompt: int, completion: int) -> None:
        if ledger:
            entry = self.ledgers.setdefault(ledger, {"tokens": 0, "requests": 0, "prompt": 0, "completion": 0})
            entry["tokens"] += prompt + completion
            entry["prompt"] += prompt
            entry["completion"] += completion
            entry["requests"] += 1

    async def __call__(self, scope, receive, send):  # noqa: C901 - a dispatcher
        if scope["type"] == "lifespan":
            return await serve_lifespan(receive, send)
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method = scope["method"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        body = b""
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        if path == "/healthz":
            return await _send(send, 200, b"ok", b"text/plain")
        if path == "/_strict/reset":
            self.ledgers.clear()
            self.routes.clear()
            self.headers.clear()
            return await _json(send, 200, {"ok": True})
        if path.startswith("/_strict/ledger/"):
            name = path.rsplit("/", 1)[1]
            return await _json(
                send, 200, self.ledgers.get(name, {"tokens": 0, "requests": 0, "prompt": 0, "completion": 0})
            )
        if path == "/_strict/routes":
            return await _json(send, 200, dict(self.routes))
        if path == "/_strict/headers":
            return await _json(send, 200, self.headers)
        if path == "/metrics":  # the gateway's load readings (not a route a client reaches): no gauges here
            return await _json(send, 404, {"error": {"message": "no metrics", "type": "invalid_request_error"}})
        self.routes[path] += 1
        self.headers[path] = headers
        if path == "/v1/models":
            return await _json(send, 200, {"object": "list", "data": [{"id": "strict-model", "object": "model"}]})
        if path.startswith("/v1/responses/"):
            return await self._stored(send, method, path)
        try:
            doc = json.loads(body)
            handler = _ROUTES.get(path)
            if handler is None:
                return await _json(send, 404, {"error": {"message": "no such route", "type": "invalid_request_error"}})
            await handler(self, send, doc, headers.get("x-strict-ledger"))
        except (BadRequest, ValueError, KeyError, TypeError, AttributeError) as exc:
            await _json(send, 400, {"error": {"message": f"strict upstream: {exc}", "type": "invalid_request_error"}})

    # ------------------------------------------------------------------ generating routes

    async def chat(self, send, doc, ledger):
        c = self.counting
        prompt = c.chat(doc)
        if prompt > c.context:
            raise BadRequest("prompt longer than the context")
        each = c.generated(doc.get("max_completion_tokens") or doc.get("max_tokens"), prompt)
        sequences = max(doc.get("n") or 1, doc.get("best_of") or 1)
        await self._openai(send, doc, ledger, "chat.completion", prompt, [each] * sequences, chat=True)

    async def completions(self, send, doc, ledger):
        c = self.counting
        prompts = c.prompts(doc["prompt"], SPECIAL)
        if isinstance(doc.get("suffix"), str):
            prompts = [p + nbytes(doc["suffix"]) for p in prompts]
        if max(prompts) > c.context:
            raise BadRequest("prompt longer than the context")
        sequences = max(doc.get("n") or 1, doc.get("best_of") or 1)
        completions = [c.generated(doc.get("max_tokens"), p) for p in prompts for _ in range(sequences)]
        await self._openai(send, doc, ledger, "text_completion", sum(prompts), completions, chat=False)

    async def _openai(self, send, doc, ledger, obj, prompt, completions, chat):
        completion = sum(completions)
        self._charge(ledger, prompt, completion)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        self._ids += 1
        rid = f"strict-{self._ids}"
        if not doc.get("stream"):
            if chat:
                choices = [
                    {"index": i, "message": {"role": "assistant", "content": "x"}, "finish_reason": "length"}
                    for i in range(len(completions))
                ]
            else:
                choices = [{"index": i, "text": "x", "finish_reason": "length"} for i in range(len(completions))]
            return await _json(
                send, 200, {"id": rid, "object": obj, "model": doc.get("model"), "choices": choices, "usage": usage}
            )
        options = doc.get("stream_options") or {}
        continuous = bool(options.get("continuous_usage_stats"))
        await _start_sse(send)
        steps = 4
        for step in range(1, steps + 1):
            done = [n * step // steps for n in completions]
            choices = [
                {"index": i, "delta": {"content": "x"}} if chat else {"index": i, "text": "x"}
                for i in range(len(completions))
            ]
            chunk = {"id": rid, "object": obj + ".chunk" if chat else obj, "choices": choices}
            if continuous:
                chunk["usage"] = {
                    "prompt_tokens": prompt,
                    "completion_tokens": sum(done),
                    "total_tokens": prompt + sum(done),
                }
            await _event(send, chunk)
        if options.get("include_usage"):
            await _event(send, {"id": rid, "object": obj, "choices": [], "usage": usage})
        await _done(send, b"data: [DONE]\n\n")

    async def embeddings(self, send, doc, ledger):
        prompts = self.counting.prompts(doc["input"], 2 * SPECIAL)
        self._charge(ledger, sum(prompts), 0)
        data = [{"object": "embedding", "index": i, "embedding": [0.0]} for i in range(len(prompts))]
        await _json(
            send,
            200,
            {"object": "list", "data": data, "usage": {"prompt_tokens": sum(prompts), "total_tokens": sum(prompts)}},
        )

    def _response_prompt(self, doc) -> int:
        c = self.counting
        total = SPECIAL + 3 * SPECIAL + nbytes("assistant") + 2
        if doc.get("tools") is not None:
            total += rendered(doc["tools"])
        if isinstance(doc.get("instructions"), str):
            total += 3 * SPECIAL + 2 + nbytes("system") + nbytes(doc["instructions"])
        items = doc["input"]
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        for item in items:
            kind = item.get("type", "message")
            if kind == "message":
                total += 3 * SPECIAL + 2 + nbytes(item.get("role", "")) + c.content(item.get("content"))
            elif kind in ("function_call", "function_call_output", "reasoning"):
                total += 3 * SPECIAL + 2 + rendered(item)
            else:
                raise BadRequest(f"unsupported input item {kind!r}")
        previous = doc.get("previous_response_id")
        if previous:
            stored = self.stored.get(previous)
            if stored is None:
                raise BadRequest("previous response not found")
            total += stored["usage"]["total_tokens"]  # the whole conversation is fed again
        return total

    async def responses(self, send, doc, ledger):
        c = self.counting
        prompt = self._response_prompt(doc)
        if prompt > c.context:
            raise BadRequest("prompt longer than the context")
        output = c.generated(doc.get("max_output_tokens"), prompt)
        self._charge(ledger, prompt, output)
        self._ids += 1
        rid = f"resp_strict{self._ids}"
        usage = {"input_tokens": prompt, "output_tokens": output, "total_tokens": prompt + output}
        response = {
            "id": rid,
            "object": "response",
            "status": "completed",
            "model": doc.get("model"),
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "x"}]}],
            "usage": usage,
        }
        if doc.get("store", True):
            self.stored[rid] = response
        if not doc.get("stream"):
            return await _json(send, 200, response)
        await _start_sse(send)
        created = {**response, "status": "in_progress", "usage": None, "output": []}
        await _event(send, {"type": "response.created", "response": created}, b"response.created")
        for _ in range(3):
            await _event(send, {"type": "response.output_text.delta", "delta": "x"}, b"response.output_text.delta")
        await _done(send, _event_bytes({"type": "response.completed", "response": response}, b"response.completed"))

    async def messages(self, send, doc, ledger):
        c = self.counting
        prompt = c.chat(doc, ("tools",))
        if doc.get("system") is not None:
            prompt += 3 * SPECIAL + 2 + nbytes("system") + c.content(doc["system"])
        if prompt > c.context:
            raise BadRequest("prompt longer than the context")
        output = c.generated(doc.get("max_tokens"), prompt)
        self._charge(ledger, prompt, output)
        self._ids += 1
        mid = f"msg_strict{self._ids}"
        message = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": doc.get("model"),
            "content": [{"type": "text", "text": "x"}],
            "stop_reason": "max_tokens",
            "usage": {"input_tokens": prompt, "output_tokens": output},
        }
        if not doc.get("stream"):
            return await _json(send, 200, message)
        await _start_sse(send)
        start = {**message, "content": [], "usage": {"input_tokens": prompt, "output_tokens": 1}}
        await _event(send, {"type": "message_start", "message": start}, b"message_start")
        await _event(
            send,
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            b"content_block_start",
        )
        for step in (1, 2):
            await _event(
                send,
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}},
                b"content_block_delta",
            )
            await _event(
                send,
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": None},
                    "usage": {"output_tokens": output * step // 2},
                },
                b"message_delta",
            )
        await _done(send, _event_bytes({"type": "message_stop"}, b"message_stop"))

    # ------------------------------------------------------------------ pooling and helpers

    async def rerank(self, send, doc, ledger):
        query = nbytes(doc["query"])
        docs = [d["text"] if isinstance(d, dict) else d for d in doc["documents"]]
        total = sum(query + nbytes(d) + 2 * SPECIAL for d in docs)
        self._charge(ledger, total, 0)
        await _json(
            send,
            200,
            {
                "id": "rerank",
                "results": [{"index": i, "relevance_score": 0.5} for i in range(len(docs))],
                "usage": {"total_tokens": total},
            },
        )

    async def score(self, send, doc, ledger):
        first = doc["text_1"] if isinstance(doc["text_1"], list) else [doc["text_1"]]
        second = doc["text_2"] if isinstance(doc["text_2"], list) else [doc["text_2"]]
        if len(first) == 1:
            first = first * len(second)
        total = sum(nbytes(a) + nbytes(b) + 2 * SPECIAL for a, b in zip(first, second))
        self._charge(ledger, total, 0)
        await _json(
            send,
            200,
            {
                "object": "list",
                "data": [{"index": i, "score": 0.5} for i in range(len(second))],
                "usage": {"prompt_tokens": total, "total_tokens": total},
            },
        )

    async def tokenize(self, send, doc, ledger):
        count = self.counting.chat(doc) if "messages" in doc else sum(self.counting.prompts(doc["prompt"], SPECIAL))
        self._charge(ledger, 0, 0)
        await _json(send, 200, {"count": count, "max_model_len": self.counting.context, "tokens": [0] * min(count, 16)})

    async def detokenize(self, send, doc, ledger):
        self._charge(ledger, 0, 0)
        await _json(send, 200, {"prompt": "x" * len(doc["tokens"])})

    async def _stored(self, send, method, path):
        rid = path[len("/v1/responses/") :].split("/", 1)[0]
        stored = self.stored.get(rid)
        if stored is None:
            return await _json(send, 404, {"error": {"message": "not found", "type": "invalid_request_error"}})
        if method == "DELETE":
            del self.stored[rid]
            return await _json(send, 200, {"id": rid, "object": "response", "deleted": True})
        await _json(send, 200, stored)


_ROUTES = {
    "/v1/chat/completions": StrictUpstream.chat,
    "/v1/completions": StrictUpstream.completions,
    "/v1/embeddings": StrictUpstream.embeddings,
    "/v1/responses": StrictUpstream.responses,
    "/v1/messages": StrictUpstream.messages,
    "/v1/rerank": StrictUpstream.rerank,
    "/v1/score": StrictUpstream.score,
    "/tokenize": StrictUpstream.tokenize,
    "/detokenize": StrictUpstream.detokenize,
}


def _event_bytes(doc, event: bytes | None = None) -> bytes:
    data = b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"
    return (b"event: " + event + b"\n" + data) if event else data


async def _event(send, doc, event: bytes | None = None) -> None:
    await send({"type": "http.response.body", "body": _event_bytes(doc, event), "more_body": True})


async def _start_sse(send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})


async def _done(send, last: bytes) -> None:
    await send({"type": "http.response.body", "body": last, "more_body": False})


async def _send(send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _json(send, status: int, doc) -> None:
    await _send(send, status, json.dumps(doc, separators=(",", ":")).encode())


class StrictUpstreamProcess(ServerProcess):
    """The strict upstream as a real process on a free loopback port (tests)."""

    MODULE = "atlas_devstack.strict_upstream"
    LABEL = "strict upstream"

    def __init__(self, *, context: int = 32768, media_tokens: int = 1024, log_path: str | None = None) -> None:
        from .redis_server import free_port

        self.port = free_port()
        self.args = ["--context", str(context), "--media-tokens", str(media_tokens)]
        self.log_path = log_path
        self._proc = None


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Strict OpenAI-compatible test upstream (vLLM-like counting)")
    parser.add_argument("--host", default=os.environ.get("STRICT_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("STRICT_PORT", "8001")))
    parser.add_argument("--context", type=int, default=32768, help="the model's context length (tokens)")
    parser.add_argument("--media-tokens", type=int, default=1024, help="tokens one image/audio/video part becomes")
    args = parser.parse_args(argv)
    app = StrictUpstream(Counting(args.context, args.media_tokens))
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="on",
    )


if __name__ == "__main__":
    main()
