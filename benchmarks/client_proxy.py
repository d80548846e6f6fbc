"""A minimal raw-ASGI reverse proxy used only to compare upstream HTTP clients (aiohttp vs
httpx) under the same server, so the gateway's choice of client rests on a measurement.

python -m benchmarks.client_proxy --client aiohttp|httpx --upstream URL --port N
"""

from __future__ import annotations

import argparse


def make_app(client: str, upstream: str):
    state: dict = {}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    if client == "aiohttp":
                        import aiohttp

                        state["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
                    else:
                        import httpx

                        state["s"] = httpx.AsyncClient(limits=httpx.Limits(max_connections=512,
                                                                           max_keepalive_connections=512))
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await (state["s"].close() if client == "aiohttp" else state["s"].aclose())
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/healthz":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        url = upstream + scope["path"]
        hdrs = {"content-type": "application/json"}
        if client == "aiohttp":
            async with state["s"].post(url, data=body, headers=hdrs) as resp:
                data = await resp.read()
                status = resp.status
        else:
            resp = await state["s"].post(url, content=body, headers=hdrs)
            data, status = resp.content, resp.status_code
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--client", choices=["aiohttp", "httpx"], required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    uvicorn.run(make_app(a.client, a.upstream.rstrip("/")), host="127.0.0.1", port=a.port, loop="uvloop",
                http="httptools", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
