"""``python -m atlas_gateway`` / ``atlas-gateway``: uvicorn with uvloop + httptools (writes
coalesced per loop iteration, see server.py), env config."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile


def _allow_connections(max_connections: int) -> None:
    """Raise the open-file soft limit towards the hard one so that ATLAS_MAX_CONNECTIONS sockets
    (plus upstream and Redis connections) fit: with the common soft limit of 1024, accept()
    would fail with EMFILE long before the gateway's own cap answers 503."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = max_connections + 2048
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def main() -> None:
    from .settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"atlas-gateway: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    _allow_connections(settings.max_connections)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    multiproc_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Must be set before prometheus_client is imported by any worker.
        multiproc_dir = tempfile.mkdtemp(prefix="atlas-prom-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir

    import uvicorn

    from .server import CoalescingHttpToolsProtocol

    common = dict(host=settings.host, port=settings.port, loop="uvloop", http=CoalescingHttpToolsProtocol,
                  access_log=False, log_level=settings.log_level, lifespan="on",
                  timeout_graceful_shutdown=10, proxy_headers=False, server_header=False,
                  # uvicorn's own bounds; the rest (header size/time, body time, connection cap) are
                  # enforced by CoalescingHttpToolsProtocol
                  timeout_keep_alive=settings.keepalive_timeout,
                  limit_concurrency=settings.max_connections + 1)
    try:
        if settings.workers > 1:
            uvicorn.run("atlas_gateway.app:create_app", factory=True, workers=settings.workers, **common)
        else:
            from .app import create_app

            uvicorn.run(create_app(settings), **common)
    finally:
        if multiproc_dir:
            shutil.rmtree(multiproc_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
