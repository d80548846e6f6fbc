"""The operator's process-wide state and the glue between kopf triggers and the plain
reconcile functions: per-key locks, re-triggers by name, and the background loops
(usage write-back, self-healing, expiry, price list status). Each object is run on its own: its
failure is reported (failures.py) and is no other object's problem."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any, Awaitable, Callable, Iterable, Mapping

from atlas_core.contract import TokenSubject

from . import bindings, failures, heal, keys, price_list_status, quotas, usage
from .carry_over import CarryOver
from .expiry import ExpiryScheduler
from .failures import Failures, ObjectFailed
from .history import History
from .issuers import IssuerRefresher
from .kube import KubeApi, NamespaceTerminating
from .metrics import OperatorCollector, Snapshot
from .pacing import StalenessQueue, TokenBucket
from .settings import KEYS, KIND_OF, PRICE_LISTS, QUOTAS, OperatorSettings
from .status import StatusConflict
from .views import ObjectView, SecretView

log = logging.getLogger("atlas_operator")


def values(index: Any) -> Iterable[Any]:
    """All values of a kopf index (a mapping of key -> Store of values)."""
    for store in list(index.values()):
        yield from list(store)


def first(index: Any, key: Any) -> Any:
    for value in index.get(key, ()):
        return value
    return None


class SecretMapping(Mapping):
    """Read-only (namespace, name) -> SecretView view over the kopf secrets index."""

    def __init__(self, index: Any) -> None:
        self._index = index

    def __getitem__(self, key: Any) -> SecretView:
        found = first(self._index, key)
        if found is None:
            raise KeyError(key)
        return found

    def __iter__(self):
        return iter(list(self._index.keys()))

    def __len__(self) -> int:
        return len(self._index)


class Runtime:
    def __init__(
        self,
        settings: OperatorSettings,
        kube: KubeApi,
        redis: Any,
        indexes: dict[str, Any],
        status_kube: KubeApi | None = None,
    ):
        self.settings = settings
        self.kube = kube
        self.status_kube = status_kube or kube  # the usage write-back's API client (its own threads)
        self.redis = redis
        self.indexes = indexes  # kopf indexes by name (live views)
        self.locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.applied_hash: dict[tuple[str, str], str | None] = {}
        self.deleting_quotas: set[tuple[str, str]] = set()
        self.deleting_price_lists: set[tuple[str, str]] = set()
        self.price_list_generations: dict[tuple[str, str], int] = {}  # the spec last re-priced from
        self.scheduler = ExpiryScheduler(self.reconcile_key_by_name)
        self.last_cycle: usage.CycleStats | None = None
        self.history = History() if settings.forecast else None
        self.carry_over = CarryOver()  # usage counted under the v1 contract (an upgrade)
        # the write-back's rate bound and staleness order, both kept across cycles (pacing.py)
        self.status_bucket = TokenBucket(settings.status_writes_per_second, settings.status_write_burst)
        self.status_queue = StalenessQueue()
        self.failures = Failures()
        self.metrics = OperatorCollector(self.failures)
        self.tasks: list[asyncio.Task] = []
        self.issuer_retries = 0  # refresh rounds in a row with an issuer never fetched
        self.issuers = IssuerRefresher(
            settings.jwt_issuers, settings.token_audience if settings.service_account_tokens else None, kube.get_json
        )

    # ------------------------------------------------------------------ lookups

    def quota_exists(self, namespace: str, name: str) -> bool:
        if (namespace, name) in self.deleting_quotas:
            return False
        view = first(self.indexes["atlasquota_views"], (namespace, name))
        return view is not None and not view.deleting

    def price_list(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The spec of a live AtlasPriceList (kopf index), or None."""
        if (namespace, name) in self.deleting_price_lists:
            return None
        view = first(self.indexes.get("atlaspricelist_views") or {}, (namespace, name))
        return None if view is None or view.deleting else view.spec

    def keys_of_quota(self, namespace: str, name: str) -> list[str]:
        return sorted(set(self.indexes["keys_by_quota"].get((namespace, name), ())))

    def keys_of_secret(self, namespace: str, name: str) -> list[str]:
        return sorted(set(self.indexes["keys_by_secret"].get((namespace, name), ())))

    def key_count(self, namespace: str, name: str) -> int:
        count = 0
        for key_name in self.keys_of_quota(namespace, name):
            view = first(self.indexes["atlaskey_views"], (namespace, key_name))
            if view is not None and not view.deleting:
                count += 1
        return count

    # ------------------------------------------------------------------ token subjects

    def claimants_of(self, subject: TokenSubject) -> list[bindings.Claimant]:
        return list((self.indexes.get("keys_by_subject") or {}).get(subject, ()))

    def account_uid(self, subject: TokenSubject) -> str | None:
        return first(self.indexes.get("service_account_uids") or {}, (subject.namespace, subject.name))

    def unusable(self, subject: TokenSubject) -> str | None:
        settings = self.settings
        return bindings.unusable(subject, settings.service_account_tokens, settings.watches, len(settings.jwt_issuers))

    async def bind_subjects(self, namespace: str, name: str, spec: dict[str, Any]) -> bindings.Bound:
        """keys.SubjectBinder: bind this AtlasKey's usable subjects; say why the others are not."""
        subjects = bindings.subjects_of(namespace, spec)
        problems = [(s, why) for s in subjects if (why := self.unusable(s)) is not None]
        usable = [s for s in subjects if all(s != p for p, _ in problems)]
        bound = await bindings.bind(self.redis, f"{namespace}/{name}", usable, self.claimants_of, self.account_uid)
        bound.unusable = problems
        return bound

    async def rebind_claimants(self, released: list[TokenSubject], ref: str) -> None:
        """Subjects ``ref`` let go of: the other AtlasKeys naming them may take them over."""
        others = {c.ref for s in released for c in self.claimants_of(s) if c.ref != ref and not c.deleting}
        await asyncio.gather(*(self.reconcile_key_by_name(*other.split("/", 1)) for other in sorted(others)))

    def binds_account(self, namespace: str, name: str) -> bool:
        return bool(self.claimants_of(TokenSubject("ServiceAccount", name, namespace)))

    async def service_account_changed(self, namespace: str, name: str, uid: str | None) -> None:
        """A ServiceAccount was created, deleted or recreated: when an AtlasKey binds it, its
        UID in Redis follows at once (a token of the account it was is then refused)."""
        subject = TokenSubject("ServiceAccount", name, namespace)
        if self.binds_account(namespace, name):
            if await bindings.account_changed(self.redis, subject, uid):
                log.info(
                    "ServiceAccount %s/%s %s: its tokens %s",
                    namespace,
                    name,
                    "deleted" if uid is None else "(re)created",
                    "are refused" if uid is None else "must carry its new UID",
                )

    def desired_identity(self) -> tuple[dict[str, str], dict[str, str]]:
        """Every binding and bound ServiceAccount UID the indexes imply (self-healing)."""
        index = self.indexes.get("keys_by_subject") or {}
        claims = {s: list(index.get(s, ())) for s in list(index.keys()) if self.unusable(s) is None}
        return bindings.desired_bindings(claims, {}, self.account_uid)

    async def refresh_issuers(self) -> None:
        await self.issuers.refresh(self.redis)

    def _lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self.locks.setdefault((namespace, name), asyncio.Lock())

    # ------------------------------------------------------------------ keys

    async def _guarded(self, plural: str, body: dict[str, Any], work: Callable[[], Awaitable[Any]]) -> Any:
        """Run one object's reconcile; a failure (other than the conflicts its callers handle)
        is reported once with an Event and raised as ObjectFailed."""
        meta = body["metadata"]
        obj = (KIND_OF[plural], meta["namespace"], meta["name"])
        try:
            result = await work()
        except (StatusConflict, NamespaceTerminating, asyncio.CancelledError):
            raise
        except Exception as exc:
            self.failures.failed(failures.RECONCILE, obj, exc)
            if self.failures.take_report(failures.RECONCILE, obj):
                await self.kube.post_event(
                    plural, body, "Warning", "ReconcileFailed", f"reconcile failed: {failures.describe(exc)}"
                )
            raise ObjectFailed(failures.describe(exc), self.failures.retry_in(failures.RECONCILE, obj)) from exc
        self.failures.succeeded(failures.RECONCILE, obj)
        self.failures.succeeded(failures.HEAL, obj)  # its config is written again
        return result

    async def reconcile_key(self, body: dict[str, Any]) -> keys.KeyOutcome:
        meta = body["metadata"]
        ident = (meta["namespace"], meta["name"])

        async def work() -> keys.KeyOutcome:
            async with self._lock(*ident):
                return await keys.reconcile_key(
                    body,
                    kube=self.kube,
                    redis=self.redis,
                    quota_exists=self.quota_exists,
                    price_list=self.price_list,
                    bind_subjects=self.bind_subjects,
                )

        outcome = await self._guarded(KEYS, body, work)
        if outcome.bound is not None and outcome.bound.released:
            await self.rebind_claimants(outcome.bound.released, f"{ident[0]}/{ident[1]}")
        # unwatched Secret: its first event (it was just labelled) must reconcile, hash or not
        self.applied_hash[ident] = outcome.key_hash if outcome.secret_watched else None
        if outcome.next_check is not None:
            self.scheduler.schedule(*ident, outcome.next_check)
        if outcome.redis_written or outcome.status_patched:
            log.info(
                "AtlasKey %s/%s reconciled: %s (keyId %s)", *ident, outcome.reason, (outcome.key_hash or "")[:8] or "-"
            )
        return outcome

    async def reconcile_key_by_name(self, namespace: str, name: str) -> None:
        """Re-trigger from outside the key's own handler (Secret, quota, price list, expiry,
        a retry). Never raises: a failure is reported, and retried by the timer with backoff."""
        retry_in = await self._reconcile_by_name(KEYS, self.reconcile_key, namespace, name)
        if retry_in is not None:
            self.scheduler.schedule(namespace, name, datetime.now(timezone.utc) + timedelta(seconds=retry_in))

    async def _reconcile_by_name(self, plural: str, reconcile, namespace: str, name: str) -> float | None:
        """Re-read and reconcile; None when done, else the seconds after which to retry."""
        obj = (KIND_OF[plural], namespace, name)
        try:
            await self._reconcile_fresh(plural, reconcile, namespace, name)
        except ObjectFailed as failure:
            return failure.retry_in
        except StatusConflict:
            return 1.0  # it kept changing: try again shortly
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reading the object failed
            self.failures.failed(failures.RECONCILE, obj, exc)
            return self.failures.retry_in(failures.RECONCILE, obj)
        return None

    async def _reconcile_fresh(self, plural: str, reconcile, namespace: str, name: str, attempts: int = 5) -> None:
        """Re-read the object and reconcile it, again while its status patch conflicts."""
        for _ in range(attempts):
            body = await self.kube.get_object(plural, namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            try:
                await reconcile(body)
                return
            except StatusConflict:
                continue
        raise StatusConflict(f"{plural} {namespace}/{name} kept changing during reconcile")

    async def delete_key(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        ident = (meta["namespace"], meta["name"])

        async def work() -> list[TokenSubject]:
            async with self._lock(*ident):
                await keys.delete_key(body, redis=self.redis)
                return await bindings.release_all(self.redis, f"{ident[0]}/{ident[1]}")

        released = await self._guarded(KEYS, body, work)
        if released:
            await self.rebind_claimants(released, f"{ident[0]}/{ident[1]}")
        self.applied_hash.pop(ident, None)
        self.locks.pop(ident, None)

    async def secret_changed(self, namespace: str, name: str, body: Any, deleted: bool) -> None:
        new_hash = None if deleted else SecretView.of(body).key_hash
        for key_name in self.keys_of_secret(namespace, name):
            known = self.applied_hash.get((namespace, key_name), "unknown")
            if new_hash is not None and known == new_hash:
                continue  # our own create echoing back, or an edit that kept the value
            await self.reconcile_key_by_name(namespace, key_name)

    # ------------------------------------------------------------------ quotas

    async def reconcile_quota(self, body: dict[str, Any]) -> quotas.QuotaOutcome:
        meta = body["metadata"]
        return await self._guarded(
            QUOTAS,
            body,
            lambda: quotas.reconcile_quota(
                body,
                kube=self.kube,
                redis=self.redis,
                key_count=self.key_count(meta["namespace"], meta["name"]),
                price_list=self.price_list,
            ),
        )

    async def reconcile_quota_by_name(self, namespace: str, name: str) -> None:
        """Like reconcile_key_by_name, without the timer's retry (the quota's next change or
        resume runs it again)."""
        await self._reconcile_by_name(QUOTAS, self.reconcile_quota, namespace, name)

    async def reconcile_dependents(self, namespace: str, name: str) -> None:
        await asyncio.gather(*(self.reconcile_key_by_name(namespace, k) for k in self.keys_of_quota(namespace, name)))

    async def delete_quota(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        ident = (meta["namespace"], meta["name"])
        self.deleting_quotas.add(ident)
        try:
            await self._guarded(QUOTAS, body, lambda: quotas.delete_quota(body, redis=self.redis))
            await self.reconcile_dependents(*ident)
        finally:
            self.deleting_quotas.discard(ident)

    # ------------------------------------------------------------------ price lists

    def price_list_users(self, namespace: str, name: str) -> tuple[list[str], list[str]]:
        """(keys, quotas) of the namespace naming this price list."""

        def naming(views: list[ObjectView]) -> list[str]:
            return [
                v.name
                for v in views
                if v.namespace == namespace and v.spec.get("priceListRef") == name and not v.deleting
            ]

        return naming(self.key_views()), naming(self.quota_views())

    async def price_list_event(self, body: dict[str, Any], event_type: str | None) -> None:
        """A price list's own event: re-price its users when its spec changed (not on the initial
        listing: every key and quota resumes on its own), then its status."""
        view = ObjectView.of(body)
        ident = (view.namespace, view.name)
        if event_type == "DELETED":
            self.price_list_generations.pop(ident, None)
            await self.price_list_changed(*ident, deleted=True)
            return
        if event_type is not None and self.price_list_generations.get(ident) != view.generation:
            await self.price_list_changed(*ident)
        self.price_list_generations[ident] = view.generation
        if not view.deleting:
            await self.reconcile_price_list(view)

    async def price_list_changed(self, namespace: str, name: str, deleted: bool = False) -> None:
        """Re-write the config of every key and quota naming this price list: a changed or
        deleted price list re-prices (or refuses) future requests only."""
        ident = (namespace, name)
        if deleted:
            self.deleting_price_lists.add(ident)
        try:
            key_names, quota_names = self.price_list_users(namespace, name)
            await asyncio.gather(*(self.reconcile_quota_by_name(namespace, q) for q in quota_names))
            await asyncio.gather(*(self.reconcile_key_by_name(namespace, k) for k in key_names))
        finally:
            self.deleting_price_lists.discard(ident)

    async def reconcile_price_list(self, view: ObjectView) -> bool:
        """Its status; True when written. Never fails its caller: a failure is reported (the
        next cycle retries); on a conflict (the view is older than the object) once more from a GET."""
        for attempt in range(2):
            key_names, quota_names = self.price_list_users(view.namespace, view.name)
            try:
                return await self._guarded(
                    PRICE_LISTS,
                    view.event_target(),
                    partial(
                        price_list_status.reconcile_price_list, view, kube=self.kube, keys=key_names, quotas=quota_names
                    ),
                )
            except ObjectFailed:
                return False
            except StatusConflict:
                body = await self.kube.get_object(PRICE_LISTS, view.namespace, view.name)
                if body is None or attempt:
                    return False
                view = ObjectView.of(body)
        return False

    async def price_lists_once(self) -> int:
        """Every price list's status (who uses it changes with the keys and quotas): patches only
        what differs, so an idle cycle writes nothing."""
        written = 0
        for view in self.price_list_views():
            if not view.deleting:
                written += await self.reconcile_price_list(view)
        return written

    # ------------------------------------------------------------------ loops

    def key_views(self) -> list[ObjectView]:
        return list(values(self.indexes["atlaskey_views"]))

    def quota_views(self) -> list[ObjectView]:
        return list(values(self.indexes["atlasquota_views"]))

    def price_list_views(self) -> list[ObjectView]:
        return list(values(self.indexes.get("atlaspricelist_views") or {}))

    async def usage_once(self) -> usage.CycleStats:
        key_views, quota_views = self.key_views(), self.quota_views()
        observed: usage.Observed = []
        # Patches go out until the next cycle is due (the loop runs at a fixed rate), so the
        # bucket's rate is used nearly all the time while a backlog lasts.
        deadline = self.status_bucket.clock() + self.settings.usage_interval
        stats = await usage.usage_cycle(
            self.redis,
            self.status_kube,
            key_views,
            quota_views,
            datetime.now(timezone.utc),
            bucket=self.status_bucket,
            queue=self.status_queue,
            deadline=deadline,
            history=self.history,
            observed=observed,
            carry_over=self.carry_over,
            tracker=self.failures,
        )
        if self.failures.counts:  # objects deleted since they failed: their series go
            self.failures.forget(
                {(KIND_OF[KEYS], k.namespace, k.name) for k in key_views}
                | {(KIND_OF[QUOTAS], q.namespace, q.name) for q in quota_views}
                | {(KIND_OF[PRICE_LISTS], p.namespace, p.name) for p in self.price_list_views()}
            )
        self.last_cycle = stats
        self.metrics.snapshot = Snapshot(
            forecasts=observed,
            keys=[(k.namespace, k.name, k.quota or "") for k in key_views if not k.deleting],
            cycle_seconds=stats.seconds,
            subjects=stats.subjects,
            patches=stats.patches,
            deferred=stats.deferred,
            lag_seconds=self.status_queue.staleness(),
        )
        if stats.patches or stats.conflicts or stats.deferred:
            log.info(
                "usage write-back: %d subjects, %d patches, %d conflicts, %d deferred, %d failing, "
                "oldest lag %.0fs, %.3fs",
                stats.subjects,
                stats.patches,
                stats.conflicts,
                stats.deferred,
                stats.failed,
                self.status_queue.staleness(),
                stats.seconds,
            )
        return stats

    async def heal_once(self) -> int | None:
        result = await heal.heal_if_needed(
            self.redis,
            self.key_views(),
            self.quota_views(),
            SecretMapping(self.indexes["secret_views"]),
            datetime.now(timezone.utc),
            self.price_list,
            identity=self.desired_identity,
        )
        if result is None:
            return None
        await self.issuers.republish(self.redis)
        for plural, view, exc in result.failed:  # their config stays absent: the gateway refuses them
            obj = (KIND_OF[plural], view.namespace, view.name)
            self.failures.failed(failures.HEAL, obj, exc)
            if self.failures.take_report(failures.HEAL, obj):
                await self.kube.post_event(
                    plural,
                    view.event_target(),
                    "Warning",
                    "ConfigRestoreFailed",
                    f"self-healing could not rewrite its config: {failures.describe(exc)}",
                )
        log.warning(
            "Redis had no config epoch: rewrote %d configs from the indexes (%d could not be)",
            result.rewritten,
            len(result.failed),
        )
        return result.rewritten

    async def _every(
        self,
        seconds: float | Callable[[], float],
        fn: Callable[[], Any],
        name: str,
        at_once: bool = False,
        fixed_rate: bool = False,
    ) -> None:
        """Run ``fn`` every ``seconds``: after a pause that long, or with ``fixed_rate`` that long
        after the previous run started (at once when it took longer)."""
        started = None
        loop = asyncio.get_running_loop()
        while True:
            if not at_once:
                pause = seconds() if callable(seconds) else seconds
                if fixed_rate and started is not None:
                    pause = max(0.0, started + pause - loop.time())
                await asyncio.sleep(pause)
            at_once = False
            started = loop.time()
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis or the API server unreachable: the next round retries
                self.failures.loop_failed(name, exc)
            else:
                self.failures.loop_succeeded(name)

    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(
                self._every(self.settings.usage_interval, self.usage_once, failures.USAGE, fixed_rate=True)
            ),
            asyncio.create_task(self._every(self.settings.heal_interval, self.heal_once, failures.HEAL)),
            asyncio.create_task(
                self._every(self.settings.usage_interval, self.price_lists_once, failures.PRICE_LIST_STATUS)
            ),
            asyncio.create_task(self.scheduler.run()),
        ]
        if self.issuers.enabled:
            self.tasks.append(
                asyncio.create_task(
                    self._every(self.issuers_delay, self.refresh_issuers, failures.ISSUERS, at_once=True)
                )
            )

    def issuers_delay(self) -> float:
        """ATLAS_JWKS_REFRESH_SECONDS, or sooner while an issuer has never been fetched (the API
        server or the issuer still starting: its tokens are refused until then): 2, 4, 8 ... s."""
        refresh = self.settings.jwks_refresh
        if not self.issuers.unfetched():
            self.issuer_retries = 0
            return refresh
        self.issuer_retries += 1
        return min(refresh, 2.0 ** min(self.issuer_retries, 16))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
