"""A fast OpenAI-compatible mock upstream for tests, benchmarks and ``make dev``.

Run: ``python -m atlas_devstack.mock_upstream --host 127.0.0.1 --port N``.

It is a raw ASGI app on uvicorn (no framework) so that benchmarks measure the gateway, not
the mock. Endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
``/v1/models``, and for tests ``/_mock/requests/<id>`` and ``/_mock/reset``.

Per-request controls (request headers; the gateway forwards them):

* ``x-mock-latency-ms``: wait before answering (default ``--latency-ms``)
* ``x-mock-completion-tokens`` / ``x-mock-prompt-tokens``: token counts reported in ``usage``
  (default: ``--completion-tokens``, capped by ``max_tokens``; prompt = words / 0.75 + 1)
* ``x-mock-chunk-delay-ms``: pause between streamed chunks (default ``--chunk-delay-ms``)
* ``x-mock-fail``: ``500`` (error response), ``hang`` (never answer), ``drop-mid-stream``
  (stream half the chunks, then cut the connection), ``no-usage`` (omit usage)
* ``x-mock-id``: a test-chosen id; ``GET /_mock/requests/<id>`` then tells how many times the
  request was received, the last body, whether ``stream_options.include_usage`` was present,
  and whether the client went away before the end (``disconnected``).

Load, as vLLM reports it: ``GET /metrics`` exports ``vllm:num_requests_running`` and
``vllm:num_requests_waiting`` from the mock's real state. With ``--capacity N`` at most N
completion/embedding requests are worked on at once (running); the rest wait, first come first
served, for a slot (waiting), so a test drives a queue by holding requests
(``x-mock-latency-ms``, ``x-mock-chunk-delay-ms``). ``--capacity 0`` (default): no queue.
``--no-metrics``: ``/metrics`` is a 404, an upstream that exports nothing (the Inference
Extension's endpoint picker, which reads these gauges, then sees no vLLM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass

from . import processes
from .processes import ServerProcess

MODELS = ["llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "mistral-7b-instruct", "text-embedding-3-small"]


async def serve_lifespan(receive, send) -> None:
    """The ASGI lifespan protocol for an app with nothing to start or stop."""
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@dataclass
class MockSettings:
    latency_ms: float = 0.0
    completion_tokens: int = 16
    chunk_delay_ms: float = 0.0
    models: tuple[str, ...] = tuple(MODELS)
    capacity: int = 0  # requests worked on at once; the rest wait (0: no limit)
    export_metrics: bool = True  # /metrics with vLLM's gauges; False: 404, like a server exporting nothing


class Slots:
    """Running vs waiting, as vLLM counts them: at most ``capacity`` requests run; the others
    queue in arrival order and start as slots free up."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.running = 0
        self.queue: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return len(self.queue)

    async def acquire(self) -> None:
        if self.capacity <= 0 or (self.running < self.capacity and not self.queue):
            self.running += 1
            return
        turn = asyncio.get_running_loop().create_future()
        self.queue.append(turn)
        try:
            await turn  # release() hands its slot over: running is counted there
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # the slot was handed over as the waiter went away: pass it on
            else:
                self.queue.remove(turn)
            raise

    def release(self) -> None:
        while self.queue:
            turn = self.queue.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes to the next waiter: running unchanged
                return
        self.running -= 1

    def exposition(self, model: str) -> bytes:
        labels = f'{{model_name="{model}"}}'
        return (
            f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{labels} {self.running}\n"
            f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{labels} {self.waiting}\n"
        ).encode()


class _Record:
    __slots__ = ("count", "body", "include_usage", "disconnected", "completed", "headers")

    def __init__(self) -> None:
        self.count = 0
        self.body: object = None
        self.include_usage: bool | None = None
        self.disconnected = False
        self.completed = False
        self.headers: dict[str, str] = {}

    def to_json(self) -> dict[str, object]:
        return {
            "count": self.count,
            "body": self.body,
            "include_usage": self.include_usage,
            "disconnected": self.disconnected,
            "completed": self.completed,
            "headers": self.headers,
        }


def _json_response(status: int, doc: object) -> tuple[int, bytes]:
    return status, json.dumps(doc, separators=(",", ":")).encode()


def _prompt_tokens(doc: dict) -> int:
    text = json.dumps(doc.get("messages") or doc.get("prompt") or doc.get("input") or "")
    return max(1, int(len(text.split()) / 0.75) + 1)


class MockUpstream:
    """The ASGI app."""

    def __init__(self, settings: MockSettings | None = None) -> None:
        self.settings = settings or MockSettings()
        self.records: dict[str, _Record] = {}
        self._counter = 0
        self.slots = Slots(self.settings.capacity)

    async def __call__(self, scope, receive, send):  # noqa: C901 - a dispatcher
        if scope["type"] == "lifespan":
            return await serve_lifespan(receive, send)
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        body = b""
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)

        if path == "/v1/models":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "mock"} for m in self.settings.models]
            return await self._send(send, *_json_response(200, {"object": "list", "data": data}))
        if path == "/_mock/reset":
            self.records.clear()
            return await self._send(send, *_json_response(200, {"ok": True}))
        if path.startswith("/_mock/requests/"):
            rec = self.records.get(path.rsplit("/", 1)[1])
            return await self._send(send, *_json_response(200, rec.to_json() if rec else {"count": 0}))
        if path in ("/healthz", "/health"):
            return await self._send(send, 200, b"ok", b"text/plain")
        if path == "/metrics" and self.settings.export_metrics:
            return await self._send(
                send, 200, self.slots.exposition(self.settings.models[0]), b"text/plain; version=0.0.4"
            )
        if path not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            return await self._send(
                send,
                *_json_response(
                    404,
                    {"error": {"message": "not found", "type": "invalid_request_error", "param": None, "code": None}},
                ),
            )
        await self.slots.acquire()
        try:
            await self._complete(path, body, headers, send, receive)
        finally:
            self.slots.release()

    async def _complete(self, path, body, headers, send, receive):  # noqa: C901 - one response per kind
        try:
            doc = json.loads(body)
        except ValueError:
            return await self._send(
                send,
                *_json_response(
                    400,
                    {"error": {"message": "bad json", "type": "invalid_request_error", "param": None, "code": None}},
                ),
            )

        rec = None
        mock_id = headers.get("x-mock-id")
        if mock_id:
            rec = self.records.get(mock_id)
            if rec is None:
                rec = self.records[mock_id] = _Record()
            rec.count += 1
            rec.body = doc
            rec.headers = headers
            opts = doc.get("stream_options") or {}
            rec.include_usage = bool(opts.get("include_usage")) if "include_usage" in opts else None

        fail = headers.get("x-mock-fail", "")
        latency = float(headers.get("x-mock-latency-ms", self.settings.latency_ms))
        if fail == "hang":
            await self._wait_disconnect(receive, rec)
            return
        if latency > 0 and await self._gone_within(receive, latency / 1000):
            if rec:
                rec.disconnected = True
            return  # the client left while held: its slot is free again (as vLLM aborts a request)
        if fail == "500":
            return await self._send(
                send,
                *_json_response(
                    500, {"error": {"message": "mock failure", "type": "server_error", "param": None, "code": None}}
                ),
            )

        prompt_tokens = int(headers.get("x-mock-prompt-tokens", 0)) or _prompt_tokens(doc)
        model = doc.get("model", "mock")
        if path == "/v1/embeddings":
            inputs = doc.get("input")
            n = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
            data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3, 0.4]} for i in range(n)]
            resp = {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            }
            if rec:
                rec.completed = True
            return await self._send(send, *_json_response(200, resp))

        completion_tokens = int(headers.get("x-mock-completion-tokens", self.settings.completion_tokens))
        cap = doc.get("max_completion_tokens") or doc.get("max_tokens")
        if cap is not None:
            completion_tokens = min(completion_tokens, int(cap))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        chat = path == "/v1/chat/completions"
        self._counter += 1
        rid = f"mock-{self._counter}"
        if not doc.get("stream"):
            text = "tok " * completion_tokens
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
                obj = "text_completion"
            resp = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
            if fail != "no-usage":
                resp["usage"] = usage
            if rec:
                rec.completed = True
            return await self._send(send, *_json_response(200, resp))
        await self._stream(send, receive, rec, rid, model, chat, completion_tokens, usage, doc, headers, fail)

    async def _stream(self, send, receive, rec, rid, model, chat, n, usage, doc, headers, fail):
        include_usage = bool((doc.get("stream_options") or {}).get("include_usage")) and fail != "no-usage"
        delay = float(headers.get("x-mock-chunk-delay-ms", self.settings.chunk_delay_ms)) / 1000
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )
        disconnected = asyncio.Event()

        async def watch() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    disconnected.set()
                    return

        watcher = asyncio.ensure_future(watch())
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        usage_null = ',"usage":null' if include_usage else ""
        try:
            stop_at = n // 2 if fail == "drop-mid-stream" else None
            for i in range(n):
                if stop_at is not None and i == stop_at:
                    # Cut the connection without finishing the chunked body: the client sees
                    # a truncated transfer, exactly like an upstream process dying.
                    raise _DropConnection
                if chat:
                    delta = {"role": "assistant", "content": "tok "} if i == 0 else {"content": "tok "}
                    choice = {"index": 0, "delta": delta, "finish_reason": None if i < n - 1 else "length"}
                else:
                    choice = {
                        "index": 0,
                        "text": "tok ",
                        "finish_reason": None if i < n - 1 else "length",
                        "logprobs": None,
                    }
                chunk = json.dumps(
                    {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]},
                    separators=(",", ":"),
                )
                if usage_null:
                    chunk = chunk[:-1] + usage_null + "}"
                await send(
                    {"type": "http.response.body", "body": b"data: " + chunk.encode() + b"\n\n", "more_body": True}
                )
                if disconnected.is_set():
                    break
                if delay:
                    try:
                        await asyncio.wait_for(disconnected.wait(), delay)
                    except asyncio.TimeoutError:
                        pass
                if disconnected.is_set():
                    break
            if disconnected.is_set():
                if rec:
                    rec.disconnected = True
                return
            if include_usage:
                chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n",
                        "more_body": True,
                    }
                )
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            if rec:
                rec.completed = True
        finally:
            watcher.cancel()

    @staticmethod
    async def _gone_within(receive, seconds: float) -> bool:
        """Wait ``seconds``; True if the client went away meanwhile."""

        async def disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        try:
            await asyncio.wait_for(disconnect(), seconds)
        except asyncio.TimeoutError:
            return False
        return True

    async def _wait_disconnect(self, receive, rec) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                if rec:
                    rec.disconnected = True
                return

    @staticmethod
    async def _send(send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _DropConnection(Exception):
    """Raised inside a streaming response: uvicorn then closes the connection mid-body."""


# ---------------------------------------------------------------------------- process helper


class MockUpstreamProcess(ServerProcess):
    """Run the mock as a real process on a free loopback port (tests, benchmarks, dev stack)."""

    MODULE = "atlas_devstack.mock_upstream"
    LABEL = "mock upstream"
    HOST_ARGS = ("--host", "127.0.0.1")

    def __init__(
        self,
        port: int | None = None,
        *,
        latency_ms: float = 0,
        completion_tokens: int = 16,
        chunk_delay_ms: float = 0,
        log_path: str | None = None,
        capacity: int = 0,
        metrics: bool = True,
    ) -> None:
        from atlas_devstack.redis_server import free_port

        self.port = port or free_port()
        self.args = [
            "--latency-ms",
            str(latency_ms),
            "--completion-tokens",
            str(completion_tokens),
            "--chunk-delay-ms",
            str(chunk_delay_ms),
            "--capacity",
            str(capacity),
        ]
        if not metrics:
            self.args.append("--no-metrics")
        self.log_path = log_path
        self._proc = None


def fastapi_app(settings: MockSettings):
    """The same non-streaming chat/models/health behaviour as a plain FastAPI app: only for the
    benchmark's reference run (design.md's performance table was measured against a FastAPI
    mock, which is several times slower than the raw ASGI one)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    app = FastAPI()
    counter = {"n": 0}

    @app.get("/healthz")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "mock"} for m in settings.models],
        }

    async def chat(request: Request) -> JSONResponse:
        doc = await request.json()
        counter["n"] += 1
        n = min(settings.completion_tokens, int(doc.get("max_tokens") or settings.completion_tokens))
        prompt = _prompt_tokens(doc)
        return JSONResponse(
            {
                "id": f"mock-{counter['n']}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": doc.get("model"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "tok " * n}, "finish_reason": "length"}
                ],
                "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n},
            }
        )

    # this module uses postponed annotations and Request is imported locally: give FastAPI the
    # classes themselves, or it would take `request` for a query parameter
    chat.__annotations__ = {"request": Request, "return": JSONResponse}
    app.post("/v1/chat/completions")(chat)
    return app


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM, SIGINT or SIGHUP: uvicorn shuts down gracefully, then the signal is
    re-raised and ends the process through processes.run (exit 128+N, no traceback)."""
    import uvicorn

    parser = argparse.ArgumentParser(description="OpenAI-compatible mock upstream")
    parser.add_argument("--host", default=os.environ.get("MOCK_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("MOCK_PORT", "8000")))
    parser.add_argument("--latency-ms", type=float, default=float(os.environ.get("MOCK_LATENCY_MS", "0")))
    parser.add_argument("--completion-tokens", type=int, default=int(os.environ.get("MOCK_COMPLETION_TOKENS", "16")))
    parser.add_argument("--chunk-delay-ms", type=float, default=float(os.environ.get("MOCK_CHUNK_DELAY_MS", "0")))
    parser.add_argument(
        "--capacity",
        type=int,
        default=int(os.environ.get("MOCK_CAPACITY", "0")),
        help="requests worked on at once (vllm:num_requests_running); the rest queue "
        "(vllm:num_requests_waiting); 0: no limit",
    )
    parser.add_argument("--no-metrics", action="store_true", help="no /metrics: an upstream that exports no load (404)")
    parser.add_argument(
        "--backlog",
        type=int,
        default=int(os.environ.get("MOCK_BACKLOG", "16384")),
        help="listen backlog: thousands of connections may arrive at once",
    )
    parser.add_argument(
        "--framework",
        choices=["asgi", "fastapi"],
        default="asgi",
        help="fastapi: a FastAPI reference implementation (benchmarks only)",
    )
    args = parser.parse_args(argv)
    settings = MockSettings(
        args.latency_ms,
        args.completion_tokens,
        args.chunk_delay_ms,
        capacity=args.capacity,
        export_metrics=not args.no_metrics,
    )
    app = fastapi_app(settings) if args.framework == "fastapi" else MockUpstream(settings)

    def serve(on_exit: processes.OnExit) -> int:
        # uvicorn shuts down gracefully on SIGTERM/SIGINT only, and an exception raised by a signal
        # handler inside uvloop is logged and lost: make a hang-up a SIGTERM.
        signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            loop="uvloop",
            http="httptools",
            access_log=False,
            log_level="warning",
            lifespan="on",
            backlog=args.backlog,
        )
        return 1  # returned unsignalled: it did not serve (a taken port exits 3 in uvicorn)

    return processes.run("mock-upstream", serve)


if __name__ == "__main__":
    sys.exit(main())
