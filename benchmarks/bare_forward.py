"""A bare forward: a server that reads the request body and POSTs it upstream, answering with
the upstream's status, content type and body, and nothing else (no Redis, no logic). It is the
floor of what a gateway written on a given Python server and upstream client can cost, so
Atlas's CPU per request is judged against it (``make bench``) and candidate stacks are compared
on it (benchmarks.floor).

python -m benchmarks.bare_forward --server atlas|uvicorn|granian-asgi|granian-rsgi
                                  --client aiohttp|httpx|raw --upstream URL --port N

Servers: ``atlas`` is Atlas's own (uvicorn + uvloop + httptools with the gateway's protocol,
gateway/atlas_gateway/server.py, configured as the gateway configures it); ``uvicorn`` is the
stock httptools protocol; ``granian-*`` is granian (Rust, one worker, uvloop) with its ASGI or
its own RSGI interface; ``socketify*`` is socketify (uWebSockets in C through cffi, its own loop)
natively or through its ASGI adapter. Clients: aiohttp (Atlas's), httpx, and ``raw``, a keep-alive HTTP/1.1
client on asyncio protocols with httptools' response parser (benchmarks.raw_client).
"""

from __future__ import annotations

import argparse
import os
import sys

HEALTH = b"ok"


class Forwarder:
    """The upstream client, behind one ``post(path, body) -> (status, content_type, body)``."""

    def __init__(self, client: str, upstream: str) -> None:
        self.client, self.upstream = client, upstream.rstrip("/")
        self.session = None

    async def start(self) -> None:
        if self.client == "aiohttp":
            import aiohttp

            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
        elif self.client == "httpx":
            import httpx

            self.session = httpx.AsyncClient(limits=httpx.Limits(max_connections=512, max_keepalive_connections=512))
        else:
            from .raw_client import RawClient

            self.session = RawClient(self.upstream)

    async def close(self) -> None:
        if self.session is not None:
            await (self.session.aclose() if self.client == "httpx" else self.session.close())

    async def post(self, path: str, body: bytes) -> tuple[int, bytes, bytes]:
        headers = {"content-type": "application/json"}
        if self.client == "aiohttp":
            async with self.session.post(self.upstream + path, data=body, headers=headers) as resp:
                data = await resp.read()
                return resp.status, resp.headers.get("content-type", "application/json").encode(), data
        if self.client == "httpx":
            resp = await self.session.post(self.upstream + path, content=body, headers=headers)
            return resp.status_code, resp.headers.get("content-type", "application/json").encode(), resp.content
        return await self.session.post(path, body, headers)


def asgi_app(fwd: Forwarder):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await fwd.start()
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await fwd.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if fwd.session is None:  # a server without lifespan (granian's ASGI may skip it)
            await fwd.start()
        if scope["path"] == "/healthz":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": HEALTH})
            return
        msg = await receive()
        body = msg.get("body", b"")
        if msg.get("more_body"):
            parts = [body]
            while msg.get("more_body"):
                msg = await receive()
                parts.append(msg.get("body", b""))
            body = b"".join(parts)
        status, ctype, data = await fwd.post(scope["path"], body)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(data)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": data})

    return app


def rsgi_app(fwd: Forwarder):
    class App:
        def __rsgi_init__(self, loop):
            loop.run_until_complete(fwd.start())

        def __rsgi_del__(self, loop):
            loop.run_until_complete(fwd.close())

        async def __rsgi__(self, scope, proto):
            if scope.path == "/healthz":
                proto.response_bytes(200, [], HEALTH)
                return
            body = await proto()
            status, ctype, data = await fwd.post(scope.path, body)
            proto.response_bytes(status, [("content-type", ctype.decode())], data)

    return App()


def run_socketify(fwd: Forwarder, port: int, asgi: bool) -> None:
    """socketify (uWebSockets through cffi, its own loop): its ASGI adapter, or its native API."""
    import asyncio

    from socketify import ASGI, App

    if asgi:
        ASGI(asgi_app(fwd)).listen(port, lambda config: None).run()
        return

    app = App()

    async def forward(res, req):
        path = req.get_url()
        body = (await res.get_data()).getvalue()
        status, ctype, data = await fwd.post(path, body)
        res.cork(lambda r: r.write_status(status).write_header("content-type", ctype.decode()).end(data))

    app.get("/healthz", lambda res, req: res.end(HEALTH))
    app.post("/*", forward)
    app.listen(port, lambda config: None)
    asyncio.set_event_loop(app.loop.loop)
    app.loop.loop.run_until_complete(fwd.start())
    app.run()


def _from_env() -> Forwarder:
    return Forwarder(os.environ["BARE_CLIENT"], os.environ["BARE_UPSTREAM"])


def granian_asgi():  # granian's --factory target
    return asgi_app(_from_env())


def granian_rsgi():
    return rsgi_app(_from_env())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--server",
        choices=["atlas", "uvicorn", "granian-asgi", "granian-rsgi", "socketify", "socketify-asgi"],
        default="atlas",
    )
    p.add_argument("--client", choices=["aiohttp", "httpx", "raw"], default="aiohttp")
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    if a.server.startswith("granian"):
        interface = a.server.split("-")[1]
        os.environ.update(BARE_CLIENT=a.client, BARE_UPSTREAM=a.upstream)
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "granian",
                "--interface",
                interface,
                "--workers",
                "1",
                "--loop",
                "uvloop",
                "--host",
                "127.0.0.1",
                "--port",
                str(a.port),
                "--no-ws",
                "--log-level",
                "warning",
                "--factory",
                f"benchmarks.bare_forward:granian_{interface}",
            ],
        )
    if a.server.startswith("socketify"):
        run_socketify(Forwarder(a.client, a.upstream), a.port, asgi=a.server == "socketify-asgi")
        return
    import uvicorn

    app = asgi_app(Forwarder(a.client, a.upstream))
    http = "httptools"
    if a.server == "atlas":
        from atlas_gateway.server import CoalescingHttpToolsProtocol

        http = CoalescingHttpToolsProtocol
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=a.port,
        loop="uvloop",
        http=http,
        access_log=False,
        log_level="warning",
        lifespan="on",
        proxy_headers=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
