"""Small immutable views of AtlasKeys, AtlasQuotas and Secrets, as kept in the kopf indexes.

Only what the bulk loops (usage write-back, self-healing) need: never a whole body, and for a
Secret only the SHA-256 of its key, never the key itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from atlas_core import contract

from . import apikeys


@dataclass(frozen=True)
class ObjectView:
    namespace: str
    name: str
    resource_version: str
    generation: int
    spec: dict[str, Any]
    status: dict[str, Any]
    deleting: bool
    uid: str = ""  # for Events about the object (kubectl describe matches them by uid)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def of(cls, body: Any) -> "ObjectView":
        meta = body.get("metadata") or {}
        return cls(
            namespace=meta.get("namespace") or "",
            name=meta.get("name") or "",
            resource_version=meta.get("resourceVersion") or "",
            generation=meta.get("generation") or 0,
            spec=copy.deepcopy(dict(body.get("spec") or {})),
            status=copy.deepcopy(dict(body.get("status") or {})),
            deleting=bool(meta.get("deletionTimestamp")),
            uid=meta.get("uid") or "",
        )

    def event_target(self) -> dict[str, Any]:
        """The minimal object an Event about this one needs (KubeApi.post_event)."""
        return {"metadata": {"namespace": self.namespace, "name": self.name, "uid": self.uid}}

    @property
    def secret_name(self) -> str:
        return apikeys.secret_name_of(self.name, self.spec)

    @property
    def quota(self) -> str | None:
        return self.spec.get("quotaRef") or None


@dataclass(frozen=True)
class SecretView:
    resource_version: str
    key_hash: str | None  # None: the Secret holds no usable key

    @classmethod
    def of(cls, body: Any) -> "SecretView":
        api_key, _ = apikeys.read_api_key(dict(body))
        return cls(
            resource_version=(body.get("metadata") or {}).get("resourceVersion") or "",
            key_hash=contract.hash_api_key(api_key) if api_key else None,
        )
