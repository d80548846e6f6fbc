"""The headers of every request Atlas sends upstream, decided in one place: the inference call,
``/v1/models`` and the stored responses all pass theirs through :meth:`UpstreamHeaders.stamp`.

What a client may pass on was first narrowed when its headers were read (http/headers.py:
hop-by-hop headers, its Atlas key and Atlas's own controls never are). Here the headers no
client may set are removed (:data:`REFUSED_PREFIXES`, :data:`REFUSED_NAMES`, and the names or
prefixes of ``ATLAS_STRIP_HEADERS``), then Atlas adds its own: its request id, the upstream's
credentials, its trace context and, when configured, an inference gateway's steering headers
(the objective of the request's effective priority, the fairness id of its AtlasQuota or
AtlasKey). docs/inference-gateway.md says why each refused header is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from ..settings import Settings

# Prefixes no client may send upstream.
REFUSED_PREFIXES = (
    # an endpoint picker's steering (Gateway API Inference Extension; llm-d, whose current names
    # are x-llm-d-*, the x-gateway-* ones its deprecated aliases): objective, fairness id, model
    # name rewrite, SLOs, destination endpoint and subset, body-based routing's model name
    "x-gateway-",
    "x-llm-d-",
    # Envoy honours x-envoy-* (retries, timeouts, original destination host) from a peer it
    # considers internal, which a gateway in the cluster is: a retry would generate twice for
    # one reservation
    "x-envoy-",
    # hop and identity headers that proxies set and services behind them believe: the client's
    # address, host, scheme, path, and the user an auth proxy vouched for
    "x-forwarded-",
    "x-remote-",
    "x-auth-request-",
)
REFUSED_NAMES = frozenset(
    {
        "forwarded",
        "x-real-ip",
        "x-original-path",
        # llm-d's older SLO names (x-llm-d-slo-* now)
        "x-slo-ttft-ms",
        "x-slo-tpot-ms",
        # llm-d's routing sidecar: where prefill, encoding, KV-cache transfer and data-parallel
        # requests go (host:port, set by the endpoint picker); vLLM: which data-parallel rank serves
        "x-prefiller-host-port",
        "x-encoder-hosts-ports",
        "x-data-parallel-host-port",
        "x-kv-cache-source-host-port",
        "x-data-parallel-rank",
    }
)

# The steering headers Atlas stamps, under both names an endpoint picker may read: llm-d's
# (read first) and the Gateway API Inference Extension's (llm-d's deprecated alias).
OBJECTIVE_HEADERS = ("x-llm-d-inference-objective", "x-gateway-inference-objective")
FAIRNESS_HEADERS = ("x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id")


class UpstreamHeaders:
    """One process's rules for upstream request headers (settings, read once)."""

    __slots__ = ("credentials", "names", "prefixes", "objectives", "fairness")

    def __init__(
        self,
        credentials: str | None = None,
        *,
        strip_names: tuple[str, ...] = (),
        strip_prefixes: tuple[str, ...] = (),
        objectives: Mapping[str, str] | None = None,
        fairness: bool = False,
    ) -> None:
        self.credentials = credentials  # Authorization for the upstream (never the client's key)
        self.names = REFUSED_NAMES | frozenset(strip_names)
        self.prefixes = REFUSED_PREFIXES + tuple(strip_prefixes)
        self.objectives = dict(objectives or {})  # priority class -> objective name
        self.fairness = fairness

    @classmethod
    def from_settings(cls, settings: Settings) -> "UpstreamHeaders":
        return cls(
            f"Bearer {settings.upstream_api_key}" if settings.upstream_api_key else None,
            strip_names=settings.strip_headers,
            strip_prefixes=settings.strip_header_prefixes,
            objectives=settings.inference_objectives,
            fairness=settings.stamp_fairness_id,
        )

    def stamp(
        self,
        headers: dict[str, str],
        request_id: str | None = None,
        priority: str | None = None,
        fairness_id: str | None = None,
        traceparent: str | None = None,
    ) -> dict[str, str]:
        """``headers`` (the client's, lower-case names; changed in place) without the refused ones,
        with Atlas's request id, the upstream's credentials, when the gateway traces its own
        ``traceparent`` (telemetry/: the upstream's spans become the gateway's children; with
        tracing off the client's own passes through) and, when configured, the objective of
        ``priority`` (the request's effective class) and ``fairness_id``."""
        refused = [name for name in headers if name in self.names or name.startswith(self.prefixes)]
        for name in refused:
            del headers[name]
        if request_id is not None:
            headers["x-request-id"] = request_id
        if traceparent is not None:
            headers["traceparent"] = traceparent
        if self.credentials:
            headers["authorization"] = self.credentials
        objective = self.objectives.get(priority) if priority else None
        if objective:
            for name in OBJECTIVE_HEADERS:
                headers[name] = objective
        if fairness_id and self.fairness:
            for name in FAIRNESS_HEADERS:
                headers[name] = fairness_id
        return headers
