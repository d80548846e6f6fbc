"""kopf wiring only: settings, indexes and handlers that delegate to the plain modules."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from atlas_core import cluster
from atlas_core.sentinel import describe_url

from .bindings import Claimant, subjects_of
from .failures import ObjectFailed
from .kube import ClientKubeApi, NamespaceTerminating
from .metrics import serve as serve_metrics
from .runtime import Runtime
from .settings import FINALIZER, GROUP, KEYS, PRICE_LISTS, QUOTAS, SECRET_WATCH_LABEL, VERSION, OperatorSettings
from .status import StatusConflict
from .views import ObjectView, SecretView

RETRY = dict(backoff=2, errors=kopf.ErrorsMode.TEMPORARY)
# Read at import: which watches exist is decided when the handlers are registered (without
# ServiceAccount tokens the operator neither watches ServiceAccounts nor needs RBAC for them).
SERVICE_ACCOUNT_TOKENS = OperatorSettings.from_env().service_account_tokens


def for_kopf(failure: ObjectFailed) -> kopf.TemporaryError:
    """A reported failure (failures.py) as kopf's retry: with a delay growing to 5 minutes, so
    that an object whose cause went away (Redis data repaired, another object fixed) recovers
    by itself, and one that keeps failing costs a retry every 5 minutes, logged by kopf only."""
    return kopf.TemporaryError(str(failure), delay=failure.retry_in)


def plain(body: Any) -> dict[str, Any]:
    return {k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in body}


# --------------------------------------------------------------------------- settings


@kopf.on.startup()
async def startup(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    logger: logging.Logger,
    atlaskey_views: kopf.Index,
    atlasquota_views: kopf.Index,
    keys_by_secret: kopf.Index,
    keys_by_quota: kopf.Index,
    secret_views: kopf.Index,
    atlaspricelist_views: kopf.Index,
    keys_by_subject: kopf.Index,
    **kwargs: Any,
) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.peering.standalone = True
    # The CRDs ship with the chart and namespaces are named, not globbed: no cluster-wide
    # CRD/namespace watches, so the operator needs no cluster-scoped RBAC beyond its own kinds.
    settings.scanning.disabled = True
    # Only labelled Secrets are listed and watched (the selector is sent to the API server).
    settings.watching.label_selectors["", "v1", "secrets"] = SECRET_WATCH_LABEL
    # Our own Events say what changed, and what failed once per failure (failures.py); kopf's
    # would repeat a handler's failure on every retry.
    settings.posting.level = logging.CRITICAL
    settings.watching.server_timeout = 300
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30

    config: OperatorSettings = memo.get("config") or OperatorSettings.from_env()
    kube = ClientKubeApi.from_environment(workers=config.api_workers)
    # The usage write-back's patches get threads and connections of their own: behind the
    # reconciles' calls (a new fleet: Secrets, Events) in one pool they would wait seconds each,
    # and the write rate would be whatever that queue leaves (docs/operator.md, "Pacing").
    status_kube = ClientKubeApi.from_environment(workers=config.api_workers)
    on_cluster = await cluster.resolve(config.redis_cluster, config.redis_url, 5)
    redis = cluster.redis_py_client(
        config.redis_url, on_cluster, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
    )
    memo.runtime = Runtime(
        config,
        kube,
        redis,
        {
            "atlaskey_views": atlaskey_views,
            "atlasquota_views": atlasquota_views,
            "keys_by_secret": keys_by_secret,
            "keys_by_quota": keys_by_quota,
            "secret_views": secret_views,
            "atlaspricelist_views": atlaspricelist_views,
            "keys_by_subject": keys_by_subject,
            "service_account_uids": kwargs.get("service_account_uids", {}),
        },
        status_kube=status_kube,
    )
    memo.runtime.start()
    if config.metrics_port > 0:
        try:
            memo.metrics_server = serve_metrics(memo.runtime.metrics, config.metrics_host, config.metrics_port)
        except OSError as exc:  # metrics are for alerting; never the reason the operator is down
            logger.warning("no metrics endpoint on %s:%s: %s", config.metrics_host, config.metrics_port, exc)
    logger.info(
        "atlas operator: redis %s, namespaces %s, usage every %ss",
        describe_url(config.redis_url),
        ",".join(config.namespaces) or "all",
        config.usage_interval,
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime | None = memo.get("runtime")
    server = memo.get("metrics_server")
    if server is not None:
        server[0].shutdown()
    if runtime is not None:
        await runtime.stop()
        await runtime.redis.aclose()
        runtime.kube.close()
        if runtime.status_kube is not runtime.kube:
            runtime.status_kube.close()


@kopf.on.probe(id="redis")
async def redis_alive(memo: kopf.Memo, **_: Any) -> bool:
    return bool(await memo.runtime.redis.ping())


# --------------------------------------------------------------------------- indexes


@kopf.index(GROUP, VERSION, KEYS)
def atlaskey_views(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): ObjectView.of(body)}


@kopf.index(GROUP, VERSION, KEYS)
def keys_by_secret(namespace: str, name: str, spec: kopf.Spec, **_: Any) -> dict:
    return {(namespace, spec.get("secretName") or f"{name}-api-key"): name}


@kopf.index(GROUP, VERSION, KEYS)
def keys_by_quota(namespace: str, name: str, spec: kopf.Spec, **_: Any) -> dict | None:
    quota = spec.get("quotaRef")
    return {(namespace, quota): name} if quota else None


@kopf.index(GROUP, VERSION, KEYS)
def keys_by_subject(namespace: str, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any) -> dict | None:
    claimant = Claimant(meta.get("creationTimestamp") or "", f"{namespace}/{name}", bool(meta.get("deletionTimestamp")))
    return {subject: claimant for subject in subjects_of(namespace, spec)} or None


@kopf.index(GROUP, VERSION, QUOTAS)
def atlasquota_views(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): ObjectView.of(body)}


@kopf.index(GROUP, VERSION, PRICE_LISTS)
def atlaspricelist_views(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): ObjectView.of(body)}


@kopf.index("", "v1", "secrets", labels={SECRET_WATCH_LABEL: kopf.PRESENT})
def secret_views(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    # Only the SHA-256 of `api-key` is kept: enough to rewrite config without an API call.
    return {(namespace, name): SecretView.of(body)}


# --------------------------------------------------------------------------- AtlasKey


@kopf.on.resume(GROUP, VERSION, KEYS, **RETRY)
@kopf.on.create(GROUP, VERSION, KEYS, **RETRY)
@kopf.on.update(GROUP, VERSION, KEYS, **RETRY)
async def atlaskey_changed(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    try:
        await memo.runtime.reconcile_key(plain(body))
    except NamespaceTerminating:
        logger.info("namespace is terminating: no Secret generated, nothing to serve")
    except StatusConflict:
        # Our view is older than the object (e.g. the usage loop just patched it): re-read
        # and run again here rather than through a kopf retry (which logs an error Event).
        await memo.runtime.reconcile_key_by_name(body["metadata"]["namespace"], body["metadata"]["name"])
    except ObjectFailed as failure:
        raise for_kopf(failure) from None


@kopf.on.delete(GROUP, VERSION, KEYS, **RETRY)
async def atlaskey_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    try:
        await memo.runtime.delete_key(plain(body))
    except ObjectFailed as failure:
        raise for_kopf(failure) from None


@kopf.on.event("", "v1", "secrets", labels={SECRET_WATCH_LABEL: kopf.PRESENT})
async def secret_event(event: dict, namespace: str, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if event.get("type") is None:
        return  # the initial listing: every AtlasKey is resumed on its own
    await memo.runtime.secret_changed(namespace, name, body, deleted=event["type"] == "DELETED")


# --------------------------------------------------------------------------- ServiceAccount
# Only its UID is kept: a token names the account's UID, which must still be the current one.

if SERVICE_ACCOUNT_TOKENS:

    @kopf.index("", "v1", "serviceaccounts")
    def service_account_uids(namespace: str, name: str, uid: str, **_: Any) -> dict:
        return {(namespace, name): uid}

    def _bound(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> bool:
        runtime = memo.get("runtime")
        return runtime is not None and runtime.binds_account(namespace, name)

    @kopf.on.event("", "v1", "serviceaccounts", when=_bound)  # unbound accounts: nothing to do, nor log
    async def service_account_event(
        event: dict, namespace: str, name: str, uid: str, memo: kopf.Memo, **_: Any
    ) -> None:
        if event.get("type") is None:
            return  # the initial listing: every AtlasKey is resumed on its own
        await memo.runtime.service_account_changed(namespace, name, None if event["type"] == "DELETED" else uid)


# --------------------------------------------------------------------------- AtlasQuota


@kopf.on.resume(GROUP, VERSION, QUOTAS, **RETRY)
@kopf.on.create(GROUP, VERSION, QUOTAS, **RETRY)
@kopf.on.update(GROUP, VERSION, QUOTAS, **RETRY)
async def atlasquota_changed(body: kopf.Body, reason: str, memo: kopf.Memo, **_: Any) -> None:
    try:
        await memo.runtime.reconcile_quota(plain(body))
    except StatusConflict:
        await memo.runtime.reconcile_quota_by_name(body["metadata"]["namespace"], body["metadata"]["name"])
    except ObjectFailed as failure:
        raise for_kopf(failure) from None
    if reason == kopf.Reason.CREATE:
        # Keys that named this quota before it existed were refused (QuotaNotFound): lift that.
        await memo.runtime.reconcile_dependents(body["metadata"]["namespace"], body["metadata"]["name"])


@kopf.on.delete(GROUP, VERSION, QUOTAS, **RETRY)
async def atlasquota_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    try:
        await memo.runtime.delete_quota(plain(body))
    except ObjectFailed as failure:
        raise for_kopf(failure) from None


# --------------------------------------------------------------------------- AtlasPriceList
# No finalizer: the keys and quotas naming one carry its prices in their config, so a change (or
# deletion) re-writes theirs; its status (Ready, models, users) is written from its events and
# each write-back cycle (price_list_status.py).


@kopf.on.event(GROUP, VERSION, PRICE_LISTS)
async def atlaspricelist_event(event: dict, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.runtime.price_list_event(plain(body), event.get("type"))
