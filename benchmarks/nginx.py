"""A static OpenAI-shaped upstream served by Debian's nginx: the reference of what a proxy
costs when the upstream costs nothing (it answers from memory in a few microseconds).

Configured in a temporary directory, in the foreground (``daemon off``), one worker, on a free
loopback port. Locations (the gateway's base URL decides which one a model reaches):

* ``/json/v1/chat/completions``: a fixed chat completion;
* ``/sse/v1/chat/completions``: a fixed SSE stream (``bodies.sse_stream``).

The request body is read and discarded (``client_max_body_size`` allows 200 KB prompts).
"""

from __future__ import annotations

import json
import os

from . import bodies
from .procs import Proc

JSON_BASE = "/json"
SSE_BASE = "/sse"


def _quoted(text: str) -> str:
    """An nginx config string: single quotes, with backslashes and quotes escaped (no
    variables are expanded in a ``return`` text without ``$``, which these bodies lack)."""
    if "$" in text:
        raise ValueError("a static body must not contain '$' (nginx would expand it)")
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _conf(port: int, workdir: str, upstream: str, locations: str) -> str:
    """One worker, keep-alive without end, temp paths under ``workdir``: the part both nginx
    processes share; ``upstream`` and ``locations`` are their own."""
    temp = {name: os.path.join(workdir, name) for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    return f"""
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    client_max_body_size 8m;
    client_body_buffer_size 512k;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    {upstream}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location = /healthz {{ default_type text/plain; return 200 'ok'; }}
        {locations}
    }}
}}
"""


def config(port: int, workdir: str) -> str:
    completion = json.dumps(bodies.COMPLETION, separators=(",", ":"))
    return _conf(
        port,
        workdir,
        "",
        f"""location = {JSON_BASE}/v1/chat/completions {{
            default_type application/json;
            return 200 {_quoted(completion)};
        }}
        location = {SSE_BASE}/v1/chat/completions {{
            default_type text/event-stream;
            add_header Cache-Control no-cache;
            return 200 {_quoted(bodies.sse_stream())};
        }}""",
    )


def static_upstream(binary: str, workdir: str) -> Proc:
    """The nginx process (a context manager); its ``url`` + ``JSON_BASE``/``SSE_BASE`` are the two
    upstream base URLs."""
    home = os.path.join(workdir, "nginx")
    os.makedirs(home, exist_ok=True)
    proc = Proc(
        "nginx",
        [binary, "-p", home, "-c", os.path.join(home, "nginx.conf"), "-e", os.path.join(home, "error.log")],
        log=os.path.join(home, "stdout.log"),
    )
    with open(os.path.join(home, "nginx.conf"), "w") as fh:
        fh.write(config(proc.port, home))
    return proc


def proxy_config(port: int, workdir: str, upstream_port: int) -> str:
    """nginx as a reverse proxy in front of the static upstream: one worker, keep-alive
    connections to the upstream (``proxy_http_version 1.1``, an empty Connection header), the
    request body buffered in memory, the answer buffered; what a proxy in C costs per request."""
    upstream = f"upstream static {{ server 127.0.0.1:{upstream_port}; keepalive 64; keepalive_requests 10000000; }}"
    return _conf(
        port,
        workdir,
        upstream,
        """location / {
            proxy_pass http://static;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
        }""",
    )


def reverse_proxy(binary: str, workdir: str, upstream_port: int) -> Proc:
    """nginx proxying every path to the static upstream at ``upstream_port`` (a context manager):
    its ``url`` + ``JSON_BASE``/``SSE_BASE`` reach the same two locations through it."""
    home = os.path.join(workdir, "nginx-proxy")
    os.makedirs(home, exist_ok=True)
    proc = Proc(
        "nginx reverse proxy",
        [binary, "-p", home, "-c", os.path.join(home, "nginx.conf"), "-e", os.path.join(home, "error.log")],
        log=os.path.join(home, "stdout.log"),
    )
    with open(os.path.join(home, "nginx.conf"), "w") as fh:
        fh.write(proxy_config(proc.port, home, upstream_port))
    return proc
