"""An in-memory stand-in for the operator's KubeApi: objects, Secrets, status patches with
resourceVersion preconditions, and a record of every write."""

from __future__ import annotations

import base64
import copy
import itertools
import json
from typing import Any

from atlas_devstack.merge_patch import merge_patch
from atlas_operator.kube import CONFLICT, GONE, PATCHED
from atlas_operator.settings import API_VERSION, KIND_OF

_rv = itertools.count(100)
_uid = itertools.count(1)


class ApiError(Exception):
    """Shaped like the kubernetes client's ApiException (status, reason, a JSON Status body)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"({status})\nReason: {reason}")
        self.status, self.reason = status, reason
        self.body = json.dumps({"kind": "Status", "message": message})


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.patches: list[tuple[str, str, str, dict[str, Any]]] = []
        self.events: list[tuple[str, str, str, str]] = []
        self.created_secrets: list[str] = []
        # name -> exception: calls about that object raise it (an API server refusing them)
        self.refuse: dict[str, Exception] = {}
        # name -> status fields whose patch the API server refuses as invalid (a 422)
        self.invalid_fields: dict[str, set[str]] = {}
        # non-resource URL -> JSON document (the API server's OIDC discovery)
        self.documents: dict[str, dict[str, Any]] = {}

    def _refused(self, name: str, status: dict[str, Any] | None = None) -> None:
        if name in self.refuse:
            raise self.refuse[name]
        bad = self.invalid_fields.get(name, set()) & set(status or {})
        if bad:
            raise ApiError(422, "Unprocessable Entity", f"status.{sorted(bad)[0]}: Invalid value")

    # -- helpers for tests
    def add(self, plural: str, name: str, spec: dict[str, Any], namespace: str = "team") -> dict[str, Any]:
        obj = {
            "apiVersion": API_VERSION,
            "kind": KIND_OF[plural],
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": f"uid-{next(_uid)}",
                "generation": 1,
                "resourceVersion": str(next(_rv)),
            },
            "spec": copy.deepcopy(spec),
        }
        self.objects[(plural, namespace, name)] = obj
        return copy.deepcopy(obj)

    def update_spec(self, plural: str, name: str, spec: dict[str, Any], namespace: str = "team") -> dict[str, Any]:
        obj = self.objects[(plural, namespace, name)]
        obj["spec"] = copy.deepcopy(spec)
        obj["metadata"]["generation"] += 1
        obj["metadata"]["resourceVersion"] = str(next(_rv))
        return copy.deepcopy(obj)

    def get(self, plural: str, name: str, namespace: str = "team") -> dict[str, Any]:
        return copy.deepcopy(self.objects[(plural, namespace, name)])

    def put_secret(self, name: str, value: str | None, namespace: str = "team", raw: dict | None = None) -> None:
        data = (
            raw
            if raw is not None
            else ({"api-key": base64.b64encode(value.encode()).decode()} if value is not None else {})
        )
        self.secrets[(namespace, name)] = {
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": str(next(_rv))},
            "data": data,
        }

    def secret_value(self, name: str, namespace: str = "team") -> str:
        return base64.b64decode(self.secrets[(namespace, name)]["data"]["api-key"]).decode()

    # -- KubeApi
    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._refused(name)
        found = self.secrets.get((namespace, name))
        return copy.deepcopy(found) if found else None

    async def create_secret(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        if (namespace, name) not in self.secrets:
            stored = copy.deepcopy(body)
            stored["metadata"]["resourceVersion"] = str(next(_rv))
            self.secrets[(namespace, name)] = stored
            self.created_secrets.append(name)
        return copy.deepcopy(self.secrets[(namespace, name)])

    async def get_object(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.objects.get((plural, namespace, name))
        return copy.deepcopy(found) if found else None

    async def patch_status(self, plural, namespace, name, status, resource_version=None) -> str:
        self._refused(name, status)
        obj = self.objects.get((plural, namespace, name))
        if obj is None:
            return GONE
        if resource_version and resource_version != obj["metadata"]["resourceVersion"]:
            return CONFLICT
        obj["status"] = merge_patch(obj.get("status") or {}, status)
        obj["metadata"]["resourceVersion"] = str(next(_rv))
        self.patches.append((plural, namespace, name, copy.deepcopy(status)))
        return PATCHED

    async def post_event(self, plural, obj, type_, reason, message) -> None:
        self.events.append((obj["metadata"]["name"], type_, reason, message))

    async def get_json(self, path: str) -> dict[str, Any]:
        if path not in self.documents:
            raise ApiError(404, "Not Found", f"{path} not found")
        return copy.deepcopy(self.documents[path])


class FakeClock:
    """A monotonic clock that only moves when told to, or when something sleeps on it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
