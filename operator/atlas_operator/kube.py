"""The few Kubernetes API calls the reconcile functions make, behind one small interface.

The reconcile modules only see :class:`KubeApi`; the unit tests pass an in-memory fake, the
operator passes :class:`ClientKubeApi` (the official ``kubernetes`` client, whose blocking calls
run on a small thread pool so the kopf event loop never blocks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Protocol

from .settings import API_VERSION, GROUP, KIND_OF, VERSION

log = logging.getLogger(__name__)

PATCHED, CONFLICT, GONE = "patched", "conflict", "gone"


class NamespaceTerminating(Exception):
    """The namespace is being deleted: nothing can be created in it, and nothing needs to be."""


class KubeApi(Protocol):
    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def create_secret(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create; when it already exists (a race), return the existing one."""

    async def get_object(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        status: dict[str, Any],
        resource_version: str | None = None,
    ) -> str:
        """Merge-patch ``.status``; with ``resource_version`` it is a precondition.

        Returns PATCHED, CONFLICT (the object moved on: re-read and retry) or GONE.
        """

    async def post_event(self, plural: str, obj: dict[str, Any], type_: str, reason: str, message: str) -> None: ...

    async def get_json(self, path: str) -> dict[str, Any]:
        """GET a non-resource URL of the API server (its OIDC discovery) as JSON."""

    def close(self) -> None:
        """Release the client's connections (the operator's cleanup)."""


def object_ref(plural: str, obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata", {})
    return {
        "apiVersion": API_VERSION,
        "kind": KIND_OF[plural],
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "uid": meta.get("uid"),
    }


def event_body(plural: str, obj: dict[str, Any], type_: str, reason: str, message: str) -> dict[str, Any]:
    ref = object_ref(plural, obj)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{ref['name']}.{uuid.uuid4().hex[:16]}", "namespace": ref["namespace"]},
        "involvedObject": ref,
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": "atlas-operator"},
        "reportingComponent": "atlas-operator",
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


class ClientKubeApi:
    """:class:`KubeApi` on the official client; counts the writes it makes (for measurements)."""

    def __init__(self, api_client: Any = None, workers: int = 8) -> None:
        from kubernetes import client

        self._client = client
        self.api_client = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kube-api")
        self.writes = 0

    @classmethod
    def from_environment(cls, workers: int = 8) -> "ClientKubeApi":
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        configuration = client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = max(workers, 4)
        return cls(client.ApiClient(configuration), workers=workers)

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def _plain(self, model: Any) -> dict[str, Any]:
        return self.api_client.sanitize_for_serialization(model)

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._plain(await self._run(self.core.read_namespaced_secret, name, namespace))
        except self._client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def create_secret(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            self.writes += 1
            return self._plain(await self._run(self.core.create_namespaced_secret, namespace, body))
        except self._client.ApiException as exc:
            if exc.status == 403 and "NamespaceTerminating" in (exc.body or ""):
                raise NamespaceTerminating(namespace) from None
            if exc.status != 409:
                raise
        existing = await self.get_secret(namespace, body["metadata"]["name"])
        if existing is None:
            raise RuntimeError("Secret vanished right after a create conflict; will retry")
        return existing

    async def get_object(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._run(self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, plural, name)
        except self._client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        status: dict[str, Any],
        resource_version: str | None = None,
    ) -> str:
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            self.writes += 1
            await self._run(
                self.custom.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                body,
                _content_type="application/merge-patch+json",
            )
            return PATCHED
        except self._client.ApiException as exc:
            if exc.status == 409:
                return CONFLICT
            if exc.status == 404:
                return GONE
            raise

    async def post_event(self, plural: str, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        try:
            self.writes += 1
            await self._run(
                self.core.create_namespaced_event,
                obj["metadata"]["namespace"],
                event_body(plural, obj, type_, reason, message),
            )
        except self._client.ApiException as exc:  # events are best effort: never fail a reconcile
            if "NamespaceTerminating" not in (exc.body or ""):
                log.warning(
                    "could not post event %s for %s: HTTP %s %s",
                    reason,
                    obj["metadata"].get("name"),
                    exc.status,
                    exc.reason,
                )
        except Exception as exc:
            log.warning("could not post event %s for %s: %s", reason, obj["metadata"].get("name"), exc)

    async def get_json(self, path: str) -> dict[str, Any]:
        # The client's own methods for these two paths (a generic call differs between versions).
        calls = {
            "/.well-known/openid-configuration": self._client.WellKnownApi(
                self.api_client
            ).get_service_account_issuer_open_id_configuration,
            "/openid/v1/jwks": self._client.OpenidApi(self.api_client).get_service_account_issuer_open_id_keyset,
        }
        if path not in calls:
            raise ValueError(f"{path}: not a document the operator reads")
        response = await self._run(calls[path], _preload_content=False)  # raw: typed as a str, it is JSON
        doc = json.loads(response.data)
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: not a JSON object")
        return doc

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.api_client.close()
