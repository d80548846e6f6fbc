"""`python -m atlas_operator` / `atlas-operator`: run the operator standalone (no peering)."""

from __future__ import annotations

import os

import kopf

from .settings import OperatorSettings


def main() -> None:
    config = OperatorSettings.from_env()
    kopf.configure(verbose=bool(os.environ.get("ATLAS_DEBUG")), log_format=kopf.LogFormat.PLAIN, log_prefix=True)
    from . import main as _handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        standalone=True,
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
        liveness_endpoint=config.liveness_endpoint,
        memo=kopf.Memo(config=config),
    )


if __name__ == "__main__":
    main()
