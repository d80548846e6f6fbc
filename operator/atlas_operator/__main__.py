"""`python -m atlas_operator` / `atlas-operator`: run the operator standalone (no peering)."""

from __future__ import annotations

import os
import socket

import kopf

from .settings import OperatorSettings


def own_identity() -> str:
    """This process's kopf identity, named without the passwd database.

    kopf's default (`user@host/...`) calls `getpass.getuser()`, which raises KeyError in the
    image: it runs as a bare numeric UID (10001) with no passwd entry. In a pod the hostname is
    the pod's name, which is what an identity should tell; the pid keeps two local runs apart.
    """
    return f"atlas-operator@{socket.gethostname()}/{os.getpid()}"


def main() -> None:
    config = OperatorSettings.from_env()
    kopf.configure(verbose=bool(os.environ.get("ATLAS_DEBUG")), log_format=kopf.LogFormat.PLAIN, log_prefix=True)
    from . import main as _handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        standalone=True,
        identity=own_identity(),  # type: ignore[arg-type]  # (kopf's Identity: a NewType of str it does not export)
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
        liveness_endpoint=config.liveness_endpoint,
        memo=kopf.Memo(config=config),
    )


if __name__ == "__main__":
    main()
