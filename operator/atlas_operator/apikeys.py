"""The Secret the operator generates for an AtlasKey that has none. The key format and the Secret's
layout (shared with the kubectl plugin) are in atlas_core.resources. Key material is never logged."""

from __future__ import annotations

import base64
from typing import Any

from atlas_core.resources import default_secret_name, generate_api_key, read_api_key, secret_name_of  # noqa: F401

from .settings import API_VERSION, MANAGED_BY, MANAGED_BY_LABEL, OWNER_LABEL, SECRET_DATA_KEY


def generated_secret(namespace: str, secret_name: str, owner: dict[str, Any]) -> dict[str, Any]:
    """A Secret holding a fresh key, owned by the AtlasKey (deleted with it by the GC)."""
    meta = owner["metadata"]
    encoded = base64.b64encode(generate_api_key().encode()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, OWNER_LABEL: meta["name"]},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "AtlasKey",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                }
            ],
        },
        "data": {SECRET_DATA_KEY: encoded},
    }
