"""``python -m atlas_gateway`` / ``atlas-gateway``: uvicorn with uvloop + httptools (writes
coalesced per loop iteration, see server.py), env config."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile


def main() -> None:
    from .settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"atlas-gateway: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

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
