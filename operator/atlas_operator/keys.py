"""AtlasKey reconcile: one idempotent function for create, update, resume and every re-trigger
(Secret changed, quota appeared or vanished, expiry reached).

Order of work: Secret (generate when absent) -> key hash -> KeyConfig in Redis (old hash removed
on rotation) -> status (keyId, observedGeneration, conditions). Each step writes only a
difference, so calling it again on a settled key makes no write anywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from atlas_core import contract
from atlas_core.contract import KeyConfig, Limits

from . import apikeys, rotation, store, times
from . import conditions as cond
from .bindings import Bound
from .kube import KubeApi
from .price_lists import PriceListLookup, no_price_lists, resolve_price_list
from .settings import KEYS, SECRET_WATCH_LABEL
from .status import starting_fields, write_status

log = logging.getLogger(__name__)

QuotaExists = Callable[[str, str], bool]
# (namespace, name, spec) -> what binding its spec.subjects did (runtime.Runtime.bind_subjects)
SubjectBinder = Callable[[str, str, dict[str, Any]], Awaitable[Bound]]


@dataclass
class KeyOutcome:
    serving: bool  # the gateway accepts the key
    reason: str
    message: str
    key_hash: str | None = None
    redis_written: bool = False
    status_patched: bool = False
    secret_created: bool = False
    rotated_from: str | None = None
    previous: contract.PreviousKey | None = None  # still accepted during rotationGracePeriod
    retired: str | None = None  # previous key whose grace period ended now
    secret_watched: bool = True  # the Secret carries the watch label (else its changes go unseen)
    next_check: datetime | None = None  # when the outcome changes by itself (expiresAt, grace end)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    bound: Bound | None = None  # spec.subjects: held, in conflict, released
    # (reason, message) of a configuration error in spec.subjects (a subject bound by an earlier
    # AtlasKey, one no trusted token can name): the rest of the key works, but not as declared
    subject_problem: tuple[str, str] | None = None

    @property
    def ready(self) -> bool:
        """In effect as declared: serving, or refusing on purpose (suspended, expired); False
        only on a configuration error."""
        return (self.serving or self.reason in cond.DECLARED_REFUSALS) and self.subject_problem is None

    @property
    def verdict(self) -> tuple[str, str]:
        """The Ready (and Stalled) reason and message: the key's own, else its subjects' problem."""
        if self.subject_problem is not None and (self.serving or self.reason in cond.DECLARED_REFUSALS):
            return self.subject_problem
        return self.reason, self.message


def parse_time(value: str | None) -> datetime | None:
    return times.parse_rfc3339(value) if value else None


def desired_key_config(
    namespace: str,
    name: str,
    spec: dict[str, Any],
    key_hash: str,
    quota_exists: QuotaExists,
    now: datetime,
    price_list: PriceListLookup = no_price_lists,
) -> tuple[KeyConfig, bool, str, str]:
    """The KeyConfig for this spec, whether the gateway serves the key, and why (pure)."""
    quota = spec.get("quotaRef") or None
    expires = parse_time(spec.get("expiresAt"))
    suspended = bool(spec.get("suspended", False))
    refusal = message = None
    table, missing = resolve_price_list(namespace, spec, price_list)
    if quota and not quota_exists(namespace, quota):
        # Never "unlimited": the gateway refuses a key whose shared budget is missing.
        refusal = cond.QUOTA_NOT_FOUND
        message = f"AtlasQuota {quota!r} not found in namespace {namespace!r}"
    elif missing:
        refusal, message = cond.PRICE_LIST_NOT_FOUND, missing
    config = KeyConfig(
        namespace=namespace,
        name=name,
        key_id=contract.key_id_of(key_hash),
        limits=Limits.from_spec(spec.get("limits")),
        quota=quota,
        models=tuple(spec.get("models") or ()),
        priority=spec.get("priority") or contract.DEFAULT_PRIORITY,
        suspended=suspended,
        expires_at=expires.timestamp() if expires else None,
        refusal=refusal,
        refusal_message=message,
        shortfall=contract.Shortfall.from_spec(spec),
        price_list=table,
    )
    if expires is not None and expires <= now:
        return config, False, cond.EXPIRED, f"the key expired at {cond.rfc3339(expires)}"
    if suspended:
        return config, False, cond.SUSPENDED, "spec.suspended is true"
    if refusal:
        return config, False, refusal, message or refusal
    return config, True, cond.ACTIVE, "the key is accepted by the gateway"


def _desired_status(
    obj: dict[str, Any],
    key_id: str | None,
    outcome: KeyOutcome,
    now: datetime,
) -> dict[str, Any]:
    status = dict(obj.get("status") or {})
    generation = obj["metadata"].get("generation")
    previous = outcome.previous
    conditions = cond.with_verdict(status.get("conditions"), outcome.ready, *outcome.verdict, generation, now)
    conditions = cond.merge(
        conditions,
        cond.SERVING,
        outcome.serving,
        outcome.reason,
        "the gateway accepts the key" if outcome.serving else f"the gateway refuses the key: {outcome.message}",
        generation,
        now,
    )
    conditions, usage = starting_fields(status, conditions, generation, now)
    out: dict[str, Any] = {"observedGeneration": generation, "conditions": conditions}
    out["keyId"] = key_id
    out["previousKey"] = (
        None
        if previous is None
        else {
            "keyId": contract.key_id_of(previous.key_hash),
            "expiresAt": cond.rfc3339(times.from_unix(previous.until)),
        }
    )
    if usage is not None:
        out["usage"] = usage
    return out


async def reconcile_key(
    obj: dict[str, Any],
    *,
    kube: KubeApi,
    redis: Any,
    quota_exists: QuotaExists,
    now: datetime | None = None,
    price_list: PriceListLookup = no_price_lists,
    bind_subjects: SubjectBinder | None = None,
) -> KeyOutcome:
    now = now or datetime.now(timezone.utc)
    meta = obj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    spec = obj.get("spec") or {}
    secret_name = apikeys.secret_name_of(name, spec)

    secret = await kube.get_secret(namespace, secret_name)
    generated = None
    if secret is None:
        secret = await kube.create_secret(namespace, apikeys.generated_secret(namespace, secret_name, obj))
        generated = ("Normal", "SecretGenerated", f"generated a key in Secret {secret_name!r}")
        # Posted at once: a status conflict below re-runs this function, which then finds the Secret.
        await kube.post_event(KEYS, obj, *generated)
    api_key, problem = apikeys.read_api_key(secret)

    if api_key is None:
        outcome = KeyOutcome(False, cond.SECRET_INVALID, f"Secret {secret_name!r}: {problem}")
        # The old key must stop working: its Secret no longer holds it.
        outcome.redis_written = await store.delete_key_config(redis, namespace, name)
        key_id = None
    else:
        key_hash = contract.hash_api_key(api_key)
        del api_key
        owner = await store.owner_of_hash(redis, key_hash)
        ref = f"{namespace}/{name}"
        if owner not in (None, ref) and await store.served_hash(redis, owner) == key_hash:
            outcome = KeyOutcome(
                False,
                cond.SECRET_INVALID,  # the Secret holds another AtlasKey's key: not usable here
                f"Secret {secret_name!r} holds a key already used by AtlasKey {owner!r}",
            )
            outcome.redis_written = await store.delete_key_config(redis, namespace, name)
            key_id = None
        else:
            config, serving, reason, message = desired_key_config(
                namespace, name, spec, key_hash, quota_exists, now, price_list
            )
            watched = _watched(secret)
            if serving and not watched:
                # read by name, so it works; but unwatched, its rotation goes unnoticed (docs/operator.md)
                message += (
                    f"; Secret {secret_name!r} lacks the label {SECRET_WATCH_LABEL}={name}: until it has "
                    "it, a change of its key is not noticed"
                )
            outcome = KeyOutcome(serving, reason, message, key_hash=key_hash, secret_watched=watched)
            grace = rotation.parse_duration(spec.get("rotationGracePeriod"))
            write = await store.write_key_config(redis, key_hash, config, grace, now.timestamp())
            outcome.redis_written, outcome.rotated_from = write.written, write.rotated_from
            outcome.previous, outcome.retired = write.previous, write.retired
            key_id = config.key_id
            expires = parse_time(spec.get("expiresAt"))
            checks = [t for t in (expires, _time_of(write.previous)) if t is not None and t > now]
            if checks:
                outcome.next_check = min(checks)
    outcome.secret_created = generated is not None
    if bind_subjects is not None:
        outcome.bound = await bind_subjects(namespace, name, spec)
        outcome.redis_written |= outcome.bound.written
        bind_problem = outcome.bound.problem
        if bind_problem:
            # The rest works (its Secret's key, its other subjects), which the message says; the
            # conflicting subject never binds here.
            reason = cond.SUBJECT_CONFLICT if outcome.bound.conflicts else cond.SUBJECT_UNUSABLE
            outcome.subject_problem = (
                reason,
                f"{bind_problem}; the key's Secret and its other subjects work as declared",
            )

    old_ready = cond.find((obj.get("status") or {}).get("conditions"), cond.READY)
    desired = _desired_status(obj, key_id, outcome, now)
    outcome.status_patched = await write_status(kube, KEYS, obj, desired)

    events = []
    if outcome.rotated_from:
        old_id = contract.key_id_of(outcome.rotated_from)
        if outcome.previous is not None and outcome.previous.key_hash == outcome.rotated_from:
            until = cond.rfc3339(times.from_unix(outcome.previous.until))
            events.append(
                (
                    "Normal",
                    "KeyRotated",
                    f"key {old_id} replaced by {key_id}; {old_id} keeps working until {until} "
                    f"(rotationGracePeriod {spec.get('rotationGracePeriod')})",
                )
            )
        else:
            events.append(("Normal", "KeyRotated", f"key {old_id} replaced by {key_id}"))
    if outcome.retired:
        events.append(
            (
                "Normal",
                "PreviousKeyRetired",
                f"key {contract.key_id_of(outcome.retired)} is no longer accepted: its "
                f"rotationGracePeriod ended; only {key_id} works",
            )
        )
    verdict_reason, verdict_message = outcome.verdict
    if old_ready is None or (old_ready.get("status"), old_ready.get("reason")) != (
        "True" if outcome.ready else "False",
        verdict_reason,
    ):
        events.append(("Normal" if outcome.ready else "Warning", verdict_reason, verdict_message))
    for event in events:
        await kube.post_event(KEYS, obj, *event)
    outcome.events += ([generated] if generated else []) + events
    return outcome


def _time_of(previous: contract.PreviousKey | None) -> datetime | None:
    return None if previous is None else times.from_unix(previous.until)


def _watched(secret: dict[str, Any]) -> bool:
    return SECRET_WATCH_LABEL in ((secret.get("metadata") or {}).get("labels") or {})


async def delete_key(obj: dict[str, Any], *, redis: Any) -> bool:
    """Finalizer work: drop the key's config so the gateway refuses it; usage stays."""
    meta = obj["metadata"]
    return await store.delete_key_config(redis, meta["namespace"], meta["name"])
