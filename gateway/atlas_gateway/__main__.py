"""``python -m atlas_gateway`` / ``atlas-gateway``: uvicorn with uvloop + httptools (writes
coalesced per loop iteration, see server.py), env config; with ATLAS_WORKERS > 1 a supervisor of
that many such processes on one port (SO_REUSEPORT), whose metrics add up (worker_metrics.py)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

FDS_BESIDES_CONNECTIONS = 256  # Redis, the listening socket, logs, the load readings' pool, Python's own files


def _allow_connections(max_connections: int, pool_size: int) -> int:
    """Raise the open-file soft limit towards the hard one so that ATLAS_MAX_CONNECTIONS client
    sockets and as many upstream ones (each long request holds one of each) fit: with the common
    soft limit of 1024, accept() would fail with EMFILE long before the gateway's own cap
    answers 503. Returns the connection cap that fits: lowered (with a warning) when the hard
    limit is too small, so that a client beyond it gets the cap's 503, not a refused accept()."""
    needed = max_connections + min(max_connections, pool_size) + FDS_BESIDES_CONNECTIONS
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    except (ImportError, ValueError, OSError):
        return max_connections
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return max_connections
    fits = max(1, (soft - FDS_BESIDES_CONNECTIONS) // 2)
    print(
        f"atlas-gateway: the open-file limit ({soft}) is below the {needed} that ATLAS_MAX_CONNECTIONS="
        f"{max_connections} needs (a client and an upstream socket per request): capping connections at "
        f"{fits}; raise the container's nofile limit (docs/capacity.md)",
        file=sys.stderr,
    )
    return fits


def _listener(host: str, port: int, reuse_port: bool) -> socket.socket:
    """The listening socket; with ``reuse_port`` one of several (one per worker) on the same port."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _supervise(workers: int) -> int:
    """ATLAS_WORKERS > 1: run that many single-process gateways, each with its own listening
    socket on the port (SO_REUSEPORT: the kernel spreads new connections over them; with one
    shared socket, as uvicorn's own workers have, a burst of connections went to whichever worker
    woke first: docs/benchmarks.md, "Workers"). A worker that dies is started again; SIGTERM or
    SIGINT is passed on to every worker, and the supervisor exits when they all have."""
    log = logging.getLogger("atlas_gateway")
    metrics_dir = tempfile.mkdtemp(prefix="atlas-metrics-")  # the chart's /tmp: an emptyDir
    env = {**os.environ, "ATLAS_WORKERS": "1", WORKER_ENV: str(os.getpid()), "ATLAS_METRICS_DIR": metrics_dir}
    procs: dict[int, subprocess.Popen] = {}
    started: dict[int, float] = {}
    stopping = False

    def start(slot: int) -> None:
        if time.monotonic() - started.get(slot, -10.0) < 1.0:
            time.sleep(1.0)  # a worker that dies at once is not restarted in a tight loop
        started[slot] = time.monotonic()
        procs[slot] = subprocess.Popen([sys.executable, "-m", "atlas_gateway"], env=env)

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for slot in range(workers):
            start(slot)
        while procs:
            pid, status = os.wait()
            exited = next((s for s, p in procs.items() if p.pid == pid), None)
            if exited is None:
                continue
            procs[exited].returncode = os.waitstatus_to_exitcode(status)
            if stopping:
                del procs[exited]
            else:
                log.error("gateway worker %d exited (%s): starting it again", pid, procs[exited].returncode)
                start(exited)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


# set by the supervisor in its workers' environment (its pid): this process is one of them
WORKER_ENV = "ATLAS_WORKER_OF"


def main() -> None:
    from .settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"atlas-gateway: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    settings = dataclasses.replace(
        settings, max_connections=_allow_connections(settings.max_connections, settings.upstream_pool_size)
    )
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # prometheus_client's multiprocess mode (memory-mapped values) costs a fifth of a request's
    # CPU (docs/benchmarks.md): several workers snapshot in-memory metrics instead (worker_metrics.py)
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    worker = bool(os.environ.get(WORKER_ENV))
    if settings.workers > 1 and not worker:
        raise SystemExit(_supervise(settings.workers))
    if not worker:  # a metrics directory is the supervisor's, for its workers only
        settings = dataclasses.replace(settings, metrics_dir=None)

    import uvicorn

    from .app import create_app
    from .server import CoalescingHttpToolsProtocol

    config = uvicorn.Config(
        create_app(settings),
        loop="uvloop",
        http=CoalescingHttpToolsProtocol,
        access_log=False,
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=10,
        proxy_headers=False,
        server_header=False,
        # uvicorn's own bounds; the rest (header size/time, body time, connection cap) are
        # enforced by CoalescingHttpToolsProtocol
        # (uvicorn declares an int; the value reaches loop.call_later, which takes seconds as a float)
        timeout_keep_alive=settings.keepalive_timeout,  # type: ignore[arg-type]
        limit_concurrency=settings.max_connections + 1,
        # thousands of clients may connect at once (the kernel caps it at net.core.somaxconn)
        backlog=settings.max_connections,
    )
    sock = _listener(settings.host, settings.port, reuse_port=worker)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
