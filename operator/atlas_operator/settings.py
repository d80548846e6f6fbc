"""Operator settings, read once from the environment (see docs/operator.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from atlas_core import cluster
from atlas_core.flags import parse_flag
from atlas_core.resources import (  # noqa: F401
    API_VERSION,
    GROUP,
    KEYS,
    KIND_OF,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    OWNER_LABEL,
    PRICE_LISTS,
    QUOTAS,
    SECRET_DATA_KEY,
    VERSION,
)

from .issuers import parse_oidc_issuers

FINALIZER = f"{GROUP}/finalizer"
# The operator lists and watches only Secrets carrying this label (a server-side label selector):
# the ones it generates have it, user-supplied ones are labelled with the AtlasKey's name (see
# docs/operator.md). Any other Secret never reaches the operator, nor its memory.
SECRET_WATCH_LABEL = OWNER_LABEL


@dataclass(frozen=True)
class OperatorSettings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: str = "auto"  # ATLAS_REDIS_CLUSTER: true | false | auto (atlas_core.cluster)
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    usage_interval: float = 10.0
    heal_interval: float = 3.0
    # Status patches of the usage write-back: a token bucket (pacing.py) shared by all cycles.
    # 250/s writes 10,000 changed keys in 40 s: within a minute of their change with the 10 s
    # interval (docs/operator.md, "Usage write-back"; measured in docs/benchmarks.md).
    status_writes_per_second: float = 250.0
    status_write_burst: int = 500
    liveness_host: str = "127.0.0.1"
    liveness_port: int = 8081
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8082  # 0: no metrics endpoint
    forecast: bool = True  # burn-rate history, status.forecast and BudgetAtRisk
    api_workers: int = 8  # threads running blocking Kubernetes API calls
    # Workload identity (issuers.py, bindings.py): trust the cluster's ServiceAccount tokens
    # (watches ServiceAccounts, reads the API server's OIDC discovery), the audience they must
    # carry, the OIDC issuers (ATLAS_JWT_ISSUERS, parsed), how often their keys are fetched.
    service_account_tokens: bool = True
    token_audience: str = "atlas"
    jwt_issuers: tuple = ()  # issuers.OidcIssuer
    jwks_refresh: float = 60.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "OperatorSettings":
        env = dict(os.environ if env is None else env)
        namespaces = tuple(n.strip() for n in env.get("ATLAS_NAMESPACES", "").split(",") if n.strip())
        audience = env.get("ATLAS_TOKEN_AUDIENCE", "").strip() or cls.token_audience
        return cls(
            redis_url=env.get("ATLAS_REDIS_URL", cls.redis_url),
            redis_cluster=cluster.parse_mode(env.get("ATLAS_REDIS_CLUSTER")),
            namespaces=namespaces,
            usage_interval=float(env.get("ATLAS_USAGE_INTERVAL_SECONDS", cls.usage_interval)),
            heal_interval=float(env.get("ATLAS_HEAL_INTERVAL_SECONDS", cls.heal_interval)),
            status_writes_per_second=status_rate(env, cls.status_writes_per_second),
            status_write_burst=int(env.get("ATLAS_STATUS_WRITE_BURST", cls.status_write_burst)),
            liveness_host=env.get("ATLAS_LIVENESS_HOST", cls.liveness_host),
            liveness_port=int(env.get("ATLAS_LIVENESS_PORT", cls.liveness_port)),
            metrics_host=env.get("ATLAS_METRICS_HOST", cls.metrics_host),
            metrics_port=int(env.get("ATLAS_METRICS_PORT", cls.metrics_port)),
            forecast=parse_flag(env.get("ATLAS_FORECAST"), True),
            api_workers=int(env.get("ATLAS_API_WORKERS", cls.api_workers)),
            service_account_tokens=parse_flag(env.get("ATLAS_SERVICE_ACCOUNT_TOKENS"), True),
            token_audience=audience,
            jwt_issuers=parse_oidc_issuers(env.get("ATLAS_JWT_ISSUERS"), audience),
            jwks_refresh=float(env.get("ATLAS_JWKS_REFRESH_SECONDS", cls.jwks_refresh)),
        )

    def __post_init__(self) -> None:
        if self.status_writes_per_second <= 0 or self.status_write_burst < 1:
            raise ValueError("ATLAS_STATUS_WRITES_PER_SECOND must be > 0 and ATLAS_STATUS_WRITE_BURST >= 1")

    def watches(self, namespace: str) -> bool:
        return not self.namespaces or namespace in self.namespaces

    @property
    def liveness_endpoint(self) -> str | None:
        if self.liveness_port <= 0:
            return None
        return f"http://{self.liveness_host}:{self.liveness_port}/healthz"


def status_rate(env: dict[str, str], default: float) -> float:
    """ATLAS_STATUS_WRITES_PER_SECOND; an install still setting the former per-cycle cap
    (ATLAS_USAGE_MAX_WRITES, > 0) gets the same average rate."""
    if env.get("ATLAS_STATUS_WRITES_PER_SECOND"):
        return float(env["ATLAS_STATUS_WRITES_PER_SECOND"])
    legacy = int(env.get("ATLAS_USAGE_MAX_WRITES") or 0)
    if legacy > 0:
        return legacy / float(env.get("ATLAS_USAGE_INTERVAL_SECONDS") or 10.0)
    return default
