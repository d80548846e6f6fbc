"""Gateway configuration, read once from the environment at start-up (see docs/gateway.md)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, cast

from atlas_core import cluster, sentinel
from atlas_core.contract import PRIORITIES
from atlas_core.flags import parse_flag

from .telemetry.config import TelemetryConfig, TelemetryConfigError


class SettingsError(ValueError):
    """A configuration value is missing or malformed: the gateway refuses to start."""


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is not a number") from exc


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    return int(_float(env, name, default))


def _flag(env: Mapping[str, str], name: str) -> bool:
    try:
        return parse_flag(env.get(name), False)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


def _cluster_mode(raw: str | None) -> str:
    try:
        return cluster.parse_mode(raw)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _telemetry(env: Mapping[str, str]) -> TelemetryConfig:
    try:
        return TelemetryConfig.from_env(env)
    except TelemetryConfigError as exc:
        raise SettingsError(str(exc)) from None


DEFAULT_PRIORITY_VALUES = {"Critical": 0, "Standard": 1, "Sheddable": 2}


def _priority_values(raw: str | None) -> dict[str, int] | None:
    """ATLAS_FORWARD_PRIORITY: unset/false = off; true = default map; or a JSON object."""
    try:
        on = parse_flag(raw, False)
    except ValueError:
        pass  # not a yes/no: a JSON object
    else:
        return dict(DEFAULT_PRIORITY_VALUES) if on else None
    if raw is None:
        return None  # (not reached: unset parses as off above)
    try:
        doc = json.loads(raw)
        values = {str(k): int(v) for k, v in doc.items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise SettingsError("ATLAS_FORWARD_PRIORITY must be true/false or a JSON object class -> int") from exc
    return {**DEFAULT_PRIORITY_VALUES, **values}


_HEADER_NAME = re.compile(r"^[!#$%&'+.^_`|~0-9a-z-]+$")  # an RFC 9110 token, lower case
# an InferenceObjective's name: a Kubernetes object name (DNS subdomain)
_OBJECTIVE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def _strip_headers(raw: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """ATLAS_STRIP_HEADERS: header names, or prefixes ending in ``*``, separated by commas or
    spaces -> (names, prefixes), lower case; added to what is never forwarded (upstream/headers.py)."""
    names: list[str] = []
    prefixes: list[str] = []
    for entry in (raw or "").replace(",", " ").split():
        entry = entry.lower()
        prefix = entry.endswith("*")
        stem = entry[:-1] if prefix else entry
        if not _HEADER_NAME.match(stem):
            raise SettingsError(
                f"ATLAS_STRIP_HEADERS: {entry!r} is not a header name or a prefix ending in '*' "
                "(e.g. x-user-id, x-internal-*)"
            )
        (prefixes if prefix else names).append(stem)
    return tuple(names), tuple(prefixes)


def _objectives(raw: str | None) -> dict[str, str]:
    """ATLAS_INFERENCE_OBJECTIVES: a JSON object, priority class -> InferenceObjective name."""
    if not raw or not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
        objectives = {str(k): v for k, v in doc.items()}
    except (ValueError, AttributeError) as exc:
        raise SettingsError(
            "ATLAS_INFERENCE_OBJECTIVES must be a JSON object: priority class -> "
            'objective name, e.g. {"Critical": "critical", "Sheddable": "batch"}'
        ) from exc
    for priority, name in objectives.items():
        if priority not in PRIORITIES:
            raise SettingsError(
                f"ATLAS_INFERENCE_OBJECTIVES: {priority!r} is not a priority class ({', '.join(PRIORITIES)})"
            )
        if not isinstance(name, str) or not _OBJECTIVE_NAME.match(name):
            raise SettingsError(
                f"ATLAS_INFERENCE_OBJECTIVES: the objective of {priority} must be an object "
                f"name (lower case letters, digits, '-', '.'), not {name!r}"
            )
    return objectives


@dataclass(frozen=True)
class UpstreamShedding:
    """One upstream's shedding by its own load (ATLAS_UPSTREAM_SHEDDING, shedding/upstream_load.py)."""

    queue_thresholds: tuple[int, int, int]  # waiting requests at which Sheddable, Standard, Critical are shed
    read_metrics: bool = True  # False: never read its /metrics (the in-flight ceilings apply)


def _check_queue_order(name: str, thresholds: tuple[int, ...]) -> None:
    enabled = [value for value in thresholds if value > 0]
    if enabled != sorted(enabled):
        raise SettingsError(
            f"{name}: {thresholds} must not decrease from Sheddable to Critical: lower classes shed first"
        )


def _upstream_shedding(raw: str | None, defaults: tuple[int, int, int]) -> dict[str, UpstreamShedding]:
    """ATLAS_UPSTREAM_SHEDDING: a JSON object, upstream base URL (as in ATLAS_UPSTREAM_URL or
    ATLAS_UPSTREAM_MODELS) -> {"Sheddable": n, "Standard": n, "Critical": n, "metrics": bool};
    a class left out keeps the ATLAS_SHED_QUEUE_THRESHOLD* default. URLs are matched to the
    upstreams as upstream/targets.py normalises both (with or without a trailing /v1)."""
    if not raw or not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
        items = doc.items()
    except (ValueError, AttributeError) as exc:
        raise SettingsError(
            "ATLAS_UPSTREAM_SHEDDING must be a JSON object: base URL -> "
            '{"Sheddable": 16, "Standard": 64, "Critical": 256, "metrics": true}'
        ) from exc
    out = {}
    for url, entry in items:
        if not isinstance(entry, dict) or set(entry) - {*PRIORITIES, "metrics"}:
            raise SettingsError(
                f"ATLAS_UPSTREAM_SHEDDING[{url!r}]: an object with Sheddable, Standard, Critical "
                "(waiting requests) and metrics (true/false)"
            )
        try:
            sheddable, standard, critical = (
                max(0, int(entry.get(name, default))) for name, default in zip(PRIORITIES[::-1], defaults, strict=True)
            )
            thresholds = (sheddable, standard, critical)
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"ATLAS_UPSTREAM_SHEDDING[{url!r}]: thresholds are whole numbers") from exc
        _check_queue_order(f"ATLAS_UPSTREAM_SHEDDING[{url!r}]", thresholds)
        out[str(url)] = UpstreamShedding(thresholds, bool(entry.get("metrics", True)))
    return out


@dataclass(frozen=True)
class Settings:
    upstream_url: str
    upstream_models: tuple[tuple[str, str], ...] = ()
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: str = "auto"  # ATLAS_REDIS_CLUSTER: true | false | auto (atlas_core.cluster)
    redis_cluster_wait_ms: int = 100  # ATLAS_REDIS_CLUSTER_WAIT_MS: WAIT for a replica (store/cluster.py)
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    fail_open: bool = False
    redis_timeout: float = 0.5
    # admissions of one process waiting for Redis at once; past it 503 + Retry-After (ledger/admission.py)
    redis_max_waiting: int = 4000
    # Sentinel only: how often the gateway asks the sentinels whether the master moved (failover.py)
    sentinel_check_interval: float = 0.5
    config_ttl: float = 1.0
    # workload identity tokens (auth/identity_tokens.py): the leeway on exp/nbf/iat, in seconds
    token_leeway: float = 10.0
    max_body_bytes: int = 4 * 1024 * 1024
    default_max_tokens: int = 4096
    # the prompt bound's allowances (tokens; metering/bounds.py, docs/metering.md)
    template_tokens_per_request: int = 64
    template_tokens_per_message: int = 8
    template_tokens_per_prompt: int = 4
    media_part_tokens: int = 2048
    lease_ttl: float = 300.0
    upstream_connect_timeout: float = 5.0
    upstream_timeout: float = 300.0
    # per process; sized for 10,000 long requests in flight and more (docs/capacity.md)
    upstream_pool_size: int = 12288
    # idle upstream connections are dropped after this long: below the upstream's own keep-alive
    # (uvicorn's and so vLLM's default is 5 s), so that a request never goes out on a connection
    # the upstream is closing at that moment (a 502: a POST is never retried)
    upstream_keepalive: float = 4.0
    upstream_api_key: str | None = None
    # None: derived from upstream_pool_size (see shed_thresholds)
    shed_threshold: int | None = None
    shed_threshold_standard: int | None = None
    shed_threshold_critical: int | None = None
    # cluster: explicit thresholds count every gateway process on this Redis (shedding/shedder.py)
    shed_scope: str = "cluster"
    shed_publish_interval: float = 0.2
    # the upstream's own queue (vllm:num_requests_waiting) at which each class is shed
    # (shedding/upstream_load.py); 0: never by the queue
    queue_thresholds: tuple[int, int, int] = (16, 64, 256)
    # per upstream base URL: its own queue thresholds and whether its /metrics is read at all
    upstream_shedding: dict[str, "UpstreamShedding"] = field(default_factory=dict, hash=False)
    upstream_load_interval: float = 1.0  # 0: never read (the in-flight ceilings only)
    forward_priority: dict[str, int] | None = field(default=None, hash=False)
    # an inference gateway behind Atlas (upstream/headers.py): headers never forwarded beyond the
    # built-in ones, the objective stamped per effective priority class, the fairness id stamped
    strip_headers: tuple[str, ...] = ()
    strip_header_prefixes: tuple[str, ...] = ()
    inference_objectives: dict[str, str] = field(default_factory=dict, hash=False)
    stamp_fairness_id: bool = False
    log_level: str = "info"
    # bounds on what a client may cost before (and while) it is authenticated; see server.py
    body_timeout: float = 30.0
    header_timeout: float = 10.0
    keepalive_timeout: float = 5.0
    max_header_bytes: int = 32 * 1024
    max_connections: int = 12288
    # one of several workers (ATLAS_WORKERS > 1): where they snapshot their metrics (worker_metrics.py);
    # set by the supervisor in its workers' environment (ATLAS_METRICS_DIR), None otherwise
    metrics_dir: str | None = None
    # the collector's first threshold once start-up objects are frozen (runtime.py: 700 is
    # Python's own); 0: no freezing either
    gc_threshold: int = 700
    # traces and usage records: the standard OTEL_* variables and ATLAS_USAGE_RECORDS (telemetry/)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def shed_thresholds(self) -> tuple[int, int, int]:
        """In-flight upstream requests at which Sheddable, Standard and Critical requests are
        shed. They never exceed the upstream pool: a request beyond it would only wait for a
        pooled connection until the connect timeout and fail with 504 from a healthy upstream,
        so at the pool's size even Critical requests get an honest 503 + Retry-After. Defaults:
        5/6, 11/12 and all of the pool (10,240, 11,264 and 12,288 with its default): these
        in-flight ceilings are the fallback for an upstream whose load cannot be read
        (shedding/upstream_load.py), and an idle fleet of 10,000 long requests is not overload."""
        pool = self.upstream_pool_size
        return (
            pool * 5 // 6 if self.shed_threshold is None else self.shed_threshold,
            pool * 11 // 12 if self.shed_threshold_standard is None else self.shed_threshold_standard,
            pool if self.shed_threshold_critical is None else self.shed_threshold_critical,
        )

    def explicit_thresholds(self) -> tuple[int | None, int | None, int | None]:
        return self.shed_threshold, self.shed_threshold_standard, self.shed_threshold_critical

    def shed_limits(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(local, shared) limits for Sheddable, Standard, Critical (shedding/shedder.py). With
        ``ATLAS_SHED_SCOPE=process`` every threshold is local. With ``cluster``, a threshold set
        explicitly is shared (a total over all gateway processes), and locally such a class is
        still shed at this process's pool size; an unset one keeps its per-process default."""
        local = self.shed_thresholds()
        if self.shed_scope == "process":
            return local, (0, 0, 0)
        pool = self.upstream_pool_size
        explicit = self.explicit_thresholds()
        local_limits = tuple(
            limit if value is None else pool if value > 0 else 0 for value, limit in zip(explicit, local)
        )
        shared = tuple(value or 0 for value in explicit)
        return cast("tuple[int, int, int]", local_limits), cast("tuple[int, int, int]", shared)

    def __post_init__(self) -> None:
        names = ("ATLAS_SHED_THRESHOLD", "ATLAS_SHED_THRESHOLD_STANDARD", "ATLAS_SHED_THRESHOLD_CRITICAL")
        pool = self.upstream_pool_size
        if pool < 1:
            raise SettingsError("ATLAS_UPSTREAM_POOL_SIZE must be >= 1")
        if self.shed_scope not in ("cluster", "process"):
            raise SettingsError("ATLAS_SHED_SCOPE must be 'cluster' or 'process'")
        if self.shed_publish_interval <= 0:
            raise SettingsError("ATLAS_SHED_PUBLISH_SECONDS must be > 0")
        if self.upstream_load_interval < 0:
            raise SettingsError("ATLAS_UPSTREAM_LOAD_SECONDS must be >= 0 (0: never read the upstreams' load)")
        _check_queue_order("ATLAS_SHED_QUEUE_THRESHOLD*", self.queue_thresholds)
        cluster = self.shed_scope == "cluster"
        enabled = []
        for name, value, explicit in zip(names, self.shed_thresholds(), self.explicit_thresholds()):
            if cluster and explicit is not None:
                pass  # a total over every gateway process: it may exceed one process's pool
            elif value > pool:
                raise SettingsError(
                    f"{name}={value} exceeds ATLAS_UPSTREAM_POOL_SIZE={pool}: requests beyond the pool "
                    "wait for a connection and time out (504) instead of being shed (503)"
                )
            if value > 0 and (not cluster or explicit is not None):  # compare like with like
                enabled.append((name, value))
        for (lower, low), (higher, high) in zip(enabled, enabled[1:]):
            if low > high:
                raise SettingsError(f"{lower}={low} must not exceed {higher}={high}: lower classes shed first")
        if sentinel.is_sentinel_url(self.redis_url):
            try:
                sentinel.parse(self.redis_url)
            except ValueError as exc:
                raise SettingsError(f"ATLAS_REDIS_URL: {exc}") from exc
        for name, amount in (
            ("ATLAS_BODY_TIMEOUT_SECONDS", self.body_timeout),
            ("ATLAS_HEADER_TIMEOUT_SECONDS", self.header_timeout),
            ("ATLAS_KEEPALIVE_TIMEOUT_SECONDS", self.keepalive_timeout),
            ("ATLAS_UPSTREAM_KEEPALIVE_SECONDS", self.upstream_keepalive),
            ("ATLAS_MAX_HEADER_BYTES", self.max_header_bytes),
            ("ATLAS_MAX_CONNECTIONS", self.max_connections),
        ):
            if amount <= 0:
                raise SettingsError(f"{name} must be > 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        upstream = env.get("ATLAS_UPSTREAM_URL", "").strip()
        if not upstream:
            raise SettingsError("ATLAS_UPSTREAM_URL is required (e.g. http://127.0.0.1:8000)")
        models: tuple[tuple[str, str], ...] = ()
        raw_models = env.get("ATLAS_UPSTREAM_MODELS", "").strip()
        if raw_models:
            try:
                doc = json.loads(raw_models)
                models = tuple((str(glob), str(url)) for glob, url in doc.items())
            except (ValueError, AttributeError) as exc:
                raise SettingsError("ATLAS_UPSTREAM_MODELS must be a JSON object: model glob -> base URL") from exc
        fail_mode = env.get("ATLAS_FAIL_MODE", "closed").strip().lower()
        if fail_mode not in ("closed", "open"):
            raise SettingsError("ATLAS_FAIL_MODE must be 'closed' or 'open'")

        def optional_int(name: str) -> int | None:
            return None if env.get(name, "") == "" else _int(env, name, 0)

        strip_names, strip_prefixes = _strip_headers(env.get("ATLAS_STRIP_HEADERS"))
        queue = (
            max(0, _int(env, "ATLAS_SHED_QUEUE_THRESHOLD", 16)),
            max(0, _int(env, "ATLAS_SHED_QUEUE_THRESHOLD_STANDARD", 64)),
            max(0, _int(env, "ATLAS_SHED_QUEUE_THRESHOLD_CRITICAL", 256)),
        )

        return cls(
            upstream_url=upstream,
            upstream_models=models,
            redis_url=env.get("ATLAS_REDIS_URL", "redis://127.0.0.1:6379/0"),
            redis_cluster=_cluster_mode(env.get("ATLAS_REDIS_CLUSTER")),
            redis_cluster_wait_ms=max(0, _int(env, "ATLAS_REDIS_CLUSTER_WAIT_MS", 100)),
            host=env.get("ATLAS_HOST", "127.0.0.1"),
            port=_int(env, "ATLAS_PORT", 8080),
            workers=max(1, _int(env, "ATLAS_WORKERS", 1)),
            fail_open=fail_mode == "open",
            redis_timeout=_float(env, "ATLAS_REDIS_TIMEOUT_SECONDS", 0.5),
            redis_max_waiting=max(0, _int(env, "ATLAS_REDIS_MAX_WAITING", 4000)),
            sentinel_check_interval=_float(env, "ATLAS_REDIS_SENTINEL_CHECK_SECONDS", 0.5),
            config_ttl=_float(env, "ATLAS_CONFIG_TTL_SECONDS", 1.0),
            token_leeway=max(0.0, _float(env, "ATLAS_TOKEN_LEEWAY_SECONDS", 10.0)),
            max_body_bytes=_int(env, "ATLAS_MAX_BODY_BYTES", 4 * 1024 * 1024),
            default_max_tokens=max(1, _int(env, "ATLAS_DEFAULT_MAX_TOKENS", 4096)),
            template_tokens_per_request=_int(env, "ATLAS_TEMPLATE_TOKENS_PER_REQUEST", 64),
            template_tokens_per_message=_int(env, "ATLAS_TEMPLATE_TOKENS_PER_MESSAGE", 8),
            template_tokens_per_prompt=_int(env, "ATLAS_TEMPLATE_TOKENS_PER_PROMPT", 4),
            media_part_tokens=_int(env, "ATLAS_MEDIA_PART_TOKENS", 2048),
            lease_ttl=_float(env, "ATLAS_LEASE_TTL_SECONDS", 300.0),
            upstream_connect_timeout=_float(env, "ATLAS_UPSTREAM_CONNECT_TIMEOUT", 5.0),
            upstream_timeout=_float(env, "ATLAS_UPSTREAM_TIMEOUT", 300.0),
            upstream_pool_size=_int(env, "ATLAS_UPSTREAM_POOL_SIZE", 12288),
            upstream_keepalive=_float(env, "ATLAS_UPSTREAM_KEEPALIVE_SECONDS", 4.0),
            upstream_api_key=env.get("ATLAS_UPSTREAM_API_KEY") or None,
            shed_threshold=optional_int("ATLAS_SHED_THRESHOLD"),
            shed_threshold_standard=optional_int("ATLAS_SHED_THRESHOLD_STANDARD"),
            shed_threshold_critical=optional_int("ATLAS_SHED_THRESHOLD_CRITICAL"),
            shed_scope=env.get("ATLAS_SHED_SCOPE", "cluster").strip().lower() or "cluster",
            shed_publish_interval=_float(env, "ATLAS_SHED_PUBLISH_SECONDS", 0.2),
            queue_thresholds=queue,
            upstream_shedding=_upstream_shedding(env.get("ATLAS_UPSTREAM_SHEDDING"), queue),
            upstream_load_interval=_float(env, "ATLAS_UPSTREAM_LOAD_SECONDS", 1.0),
            forward_priority=_priority_values(env.get("ATLAS_FORWARD_PRIORITY")),
            strip_headers=strip_names,
            strip_header_prefixes=strip_prefixes,
            inference_objectives=_objectives(env.get("ATLAS_INFERENCE_OBJECTIVES")),
            stamp_fairness_id=_flag(env, "ATLAS_STAMP_FAIRNESS_ID"),
            log_level=env.get("ATLAS_LOG_LEVEL", "info").lower(),
            body_timeout=_float(env, "ATLAS_BODY_TIMEOUT_SECONDS", 30.0),
            header_timeout=_float(env, "ATLAS_HEADER_TIMEOUT_SECONDS", 10.0),
            keepalive_timeout=_float(env, "ATLAS_KEEPALIVE_TIMEOUT_SECONDS", 5.0),
            max_header_bytes=_int(env, "ATLAS_MAX_HEADER_BYTES", 32 * 1024),
            max_connections=_int(env, "ATLAS_MAX_CONNECTIONS", 12288),
            gc_threshold=max(0, _int(env, "ATLAS_GC_THRESHOLD", 700)),
            metrics_dir=env.get("ATLAS_METRICS_DIR") or None,
            telemetry=_telemetry(env),
        )
