"""`kubectl atlas key reveal|rotate NAME`: an AtlasKey's key, read from or replaced in its Secret.

Rotation writes a fresh key into the Secret the AtlasKey names (never a new Secret: pods that
mount it see the change); the operator notices, serves the new key, and keeps the old one working
for the AtlasKey's ``rotationGracePeriod``. The plugin refuses what would defeat that: a Secret
another controller owns (sealed-secrets, external-secrets: it would put the old key back), and a
second rotation while the previous key is still in its grace period (that key would be dropped at
once) unless ``--force``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from atlas_core import contract
from atlas_core.resources import KEYS, OWNER_LABEL, SECRET_DATA_KEY, generate_api_key, read_api_key, secret_name_of

from .kube import Cluster, PluginError


def reveal(cluster: Cluster, name: str) -> str:
    key = cluster.get(KEYS, name)
    secret_name = secret_name_of(name, key.get("spec") or {})
    value, problem = read_api_key(cluster.get_secret(secret_name))
    if value is None:
        raise PluginError(f'Secret "{secret_name}" of AtlasKey "{name}": {problem}')
    return value


@dataclass
class Rotation:
    name: str
    secret: str
    old_id: str | None
    new_id: str
    grace: str  # spec.rotationGracePeriod as written ("" when absent)
    labelled: bool  # the plugin added the watch label the Secret lacked
    status: dict[str, Any] | None = None  # the AtlasKey's status once the operator took the new key

    def report(self) -> str:
        lines = []
        if self.labelled:
            lines.append(
                f'labelled Secret "{self.secret}" {OWNER_LABEL}={self.name} so that the operator '
                "notices changes of its key"
            )
        lines.append(
            f'AtlasKey "{self.name}": key {self.old_id or "<none>"} replaced by {self.new_id} in Secret "{self.secret}"'
        )
        previous = (self.status or {}).get("previousKey") or {}
        if self.status is None:
            lines.append("not waiting for the operator (--wait=false): " + self._promise())
        elif previous.get("keyId") == self.old_id and previous.get("expiresAt"):
            lines.append(
                f"the gateway accepts both until {previous['expiresAt']} "
                f"(rotationGracePeriod {self.grace}); then only {self.new_id}"
            )
        else:
            lines.append(
                f"the gateway accepts only {self.new_id} now" + ("" if self.has_grace else " (no rotationGracePeriod)")
            )
        lines.append(f"read the new key with: kubectl atlas key reveal {self.name}")
        return "\n".join(lines)

    @property
    def has_grace(self) -> bool:
        return self.grace not in ("", "0")

    def _promise(self) -> str:
        if self.has_grace:
            return f"the old key keeps working for {self.grace} after the operator takes the new one"
        return "the old key is refused as soon as the operator takes the new one"


def rotate(
    cluster: Cluster,
    name: str,
    *,
    force: bool = False,
    wait: bool = True,
    timeout: float = 30.0,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> Rotation:
    key = cluster.get(KEYS, name)
    spec, status = key.get("spec") or {}, key.get("status") or {}
    secret_name = secret_name_of(name, spec)
    secret = cluster.get_secret(secret_name)
    _refuse_foreign_owner(secret, key)
    previous = status.get("previousKey") or {}
    until = previous.get("expiresAt")
    if until and _parse(until) > now() and not force:
        raise PluginError(
            f'AtlasKey "{name}": key {previous.get("keyId")} is still in its rotationGracePeriod until {until} '
            "(from the last rotation); rotating again now would refuse it at once. Wait until then, or pass --force"
        )

    old_value, _ = read_api_key(secret)
    old_id = contract.key_id_of(contract.hash_api_key(old_value)) if old_value else status.get("keyId")
    new_value = generate_api_key()
    new_id = contract.key_id_of(contract.hash_api_key(new_value))
    labels = (secret.get("metadata") or {}).get("labels") or {}
    patch: dict[str, Any] = {
        # The resourceVersion makes the write conditional: a concurrent change is not overwritten.
        "metadata": {"resourceVersion": secret["metadata"]["resourceVersion"]},
        "data": {SECRET_DATA_KEY: base64.b64encode(new_value.encode()).decode()},
    }
    if "stringData" in secret:
        patch["stringData"] = None
    labelled = OWNER_LABEL not in labels
    if labelled:
        patch["metadata"]["labels"] = {OWNER_LABEL: name}
    cluster.patch_secret(secret_name, patch)
    del new_value
    rotation = Rotation(name, secret_name, old_id, new_id, str(spec.get("rotationGracePeriod") or ""), labelled)
    if wait:
        rotation.status = _wait_for_key(cluster, name, new_id, timeout)
    return rotation


def _refuse_foreign_owner(secret: dict[str, Any], key: dict[str, Any]) -> None:
    for ref in (secret.get("metadata") or {}).get("ownerReferences") or ():
        if ref.get("controller") and ref.get("uid") != key["metadata"].get("uid"):
            raise PluginError(
                f'Secret "{secret["metadata"]["name"]}" is managed by {ref.get("kind")}/{ref.get("name")}, '
                "which would put the old key back: rotate the key at its source; the operator picks the "
                "change up from the Secret"
            )


def _wait_for_key(cluster: Cluster, name: str, new_id: str, timeout: float) -> dict[str, Any]:
    """The AtlasKey's status once it shows the new key id (the operator serves it)."""
    found = cluster.wait_for(KEYS, name, lambda obj: (obj.get("status") or {}).get("keyId") == new_id, timeout)
    if found is None:
        shown = (cluster.get(KEYS, name).get("status") or {}).get("keyId")
        raise PluginError(
            f'the Secret holds the new key {new_id}, but after {timeout:g}s AtlasKey "{name}" still shows key '
            f"{shown}: is the operator running? (--wait=false does not wait for it)"
        )
    return found.get("status") or {}


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
