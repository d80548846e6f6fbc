"""The plugin's connection to the API server, chosen the way kubectl chooses it, and the few
calls it makes. Every failure becomes a :class:`PluginError` whose message says what to do.

Kubeconfig: ``--kubeconfig``, else ``$KUBECONFIG`` (a list of files, merged as kubectl merges
them), else ``~/.kube/config``; inside a pod without one, the pod's ServiceAccount. Context:
``--context`` or the current one. Namespace: ``-n``, else the context's, else ``default``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from atlas_core.resources import GROUP, KIND_OF, VERSION

# (connect, read) seconds: an unreachable server is reported, not waited on for minutes.
TIMEOUT = (10, 60)
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class PluginError(Exception):
    """A failure to report on stderr as ``error: <message>`` with exit code 1."""


class NotFound(PluginError):
    pass


@dataclass
class Cluster:
    """An API client bound to the namespace scope of one invocation."""

    api_client: Any
    namespace: str
    all_namespaces: bool
    server: str

    @property
    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api_client)

    @property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    def list(self, plural: str, selector: str | None = None) -> list[dict[str, Any]]:
        """Every object of an Atlas kind in scope (-n or -A), as plain dicts."""
        kwargs: dict[str, Any] = {"_request_timeout": TIMEOUT}
        if selector:
            kwargs["label_selector"] = selector
        with self.errors(f"list {plural}"):
            if self.all_namespaces:
                found = self.custom.list_cluster_custom_object(GROUP, VERSION, plural, **kwargs)
            else:
                found = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, **kwargs)
        return list(found.get("items") or ())

    def get(self, plural: str, name: str) -> dict[str, Any]:
        with self.errors(
            f"get {plural}", missing=f'{KIND_OF[plural]} "{name}" not found in namespace "{self.namespace}"'
        ):
            return self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, plural, name, _request_timeout=TIMEOUT
            )

    def get_secret(self, name: str) -> dict[str, Any]:
        with self.errors("get secrets", missing=f'Secret "{name}" not found in namespace "{self.namespace}"'):
            secret = self.core.read_namespaced_secret(name, self.namespace, _request_timeout=TIMEOUT)
        return self.api_client.sanitize_for_serialization(secret)

    def patch_secret(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        with self.errors(
            "patch secrets",
            missing=f'Secret "{name}" not found in namespace "{self.namespace}"',
            conflict=f'Secret "{name}" changed while it was being rotated: run the command again',
        ):
            secret = self.core.patch_namespaced_secret(
                name, self.namespace, patch, _request_timeout=TIMEOUT, _content_type="application/merge-patch+json"
            )
        return self.api_client.sanitize_for_serialization(secret)

    def wait_for(
        self, plural: str, name: str, done: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any] | None:
        """Watch one object until ``done(object)`` (as `kubectl wait` does); None at the deadline."""
        from kubernetes import watch

        deadline = time.monotonic() + timeout
        stream = watch.Watch()
        with self.errors(f"watch {plural}"):
            while (left := deadline - time.monotonic()) > 0:
                for event in stream.stream(
                    self.custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    plural,
                    field_selector=f"metadata.name={name}",
                    timeout_seconds=max(1, int(left)),
                    _request_timeout=(TIMEOUT[0], left + 5),
                ):
                    if event["type"] in ("ADDED", "MODIFIED") and done(event["object"]):
                        stream.stop()
                        return event["object"]
                    if time.monotonic() >= deadline:
                        stream.stop()
                        break
        return None

    def errors(self, action: str, missing: str | None = None, conflict: str | None = None) -> "_Errors":
        return _Errors(self, action, missing, conflict)


class _Errors:
    """Turns the client's exceptions into PluginErrors that say what failed and why."""

    def __init__(self, cluster: Cluster, action: str, missing: str | None, conflict: str | None):
        self.cluster, self.action, self.missing, self.conflict = cluster, action, missing, conflict

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Literal[False]:
        if exc is None or isinstance(exc, PluginError):
            return False
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        if isinstance(exc, ApiException):
            raise self._api_error(exc) from None
        if isinstance(exc, HTTPError):
            raise PluginError(f"cannot reach the API server at {self.cluster.server}: {_reason(exc)}") from None
        return False

    def _api_error(self, exc: Any) -> PluginError:
        message = _server_message(exc)
        if exc.status == 404 and self.missing and "the server could not find the requested resource" not in message:
            return NotFound(self.missing)
        if exc.status == 404:
            return PluginError(
                f"the API server at {self.cluster.server} does not serve "
                f"{GROUP}/{VERSION}: are Atlas's CRDs installed? (kubectl apply -f crds/, "
                "or the chart)"
            )
        if exc.status == 409 and self.conflict:
            return PluginError(self.conflict)
        if exc.status == 401:
            return PluginError(
                f"the API server at {self.cluster.server} refused the credentials of this "
                "context (401 Unauthorized): log in again or pick another --context"
            )
        if exc.status == 403:
            return PluginError(
                f"{message} (cannot {self.action}: ask for the RBAC that allows it, e.g. the "
                "chart's atlas-view or atlas-edit ClusterRoles)"
            )
        return PluginError(f"{self.action}: HTTP {exc.status}: {message}")


def _server_message(exc: Any) -> str:
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return (exc.body or exc.reason or "").strip() if isinstance(exc.body or "", str) else str(exc.reason)


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)  # urllib3's MaxRetryError wraps the real cause
    return str(reason or exc)


def connect(kubeconfig: str | None, context: str | None, namespace: str | None, all_namespaces: bool) -> Cluster:
    from kubernetes import client, config

    kube_env = os.environ.get("KUBECONFIG")
    explicit = kubeconfig or kube_env
    default_file = Path.home() / ".kube" / "config"
    try:
        if not explicit and not default_file.exists() and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
            configuration = client.Configuration.get_default_copy()
            context_namespace = IN_CLUSTER_NAMESPACE.read_text().strip() if IN_CLUSTER_NAMESPACE.exists() else None
        else:
            if not explicit and not default_file.exists():
                raise PluginError("no kubeconfig: set KUBECONFIG, pass --kubeconfig, or create ~/.kube/config")
            configuration = client.Configuration()
            context = context or _current_context(kubeconfig or kube_env or str(default_file))
            config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=configuration, persist_config=False
            )
            context_namespace = _context_namespace(kubeconfig, context)
    except config.ConfigException as exc:
        raise PluginError(f"kubeconfig: {exc}") from None
    except OSError as exc:
        raise PluginError(f"kubeconfig: {exc}") from None
    return Cluster(
        client.ApiClient(configuration), namespace or context_namespace or "default", all_namespaces, configuration.host
    )


def _current_context(paths: str) -> str | None:
    """kubectl's rule for a list of kubeconfig files: the first that names a current context wins
    (the kubernetes client alone takes the last)."""
    import yaml

    for path in paths.split(os.pathsep):
        try:
            doc = yaml.safe_load(Path(path).expanduser().read_text()) if path else None
        except (OSError, yaml.YAMLError):
            continue  # as kubectl: an unreadable file in the list is skipped here, reported on load
        if isinstance(doc, dict) and doc.get("current-context"):
            return doc["current-context"]
    return None


def _context_namespace(kubeconfig: str | None, context: str | None) -> str | None:
    from kubernetes import config

    contexts, current = config.list_kube_config_contexts(config_file=kubeconfig)
    chosen = next((c for c in contexts if c["name"] == context), None) if context else current
    return ((chosen or {}).get("context") or {}).get("namespace")
