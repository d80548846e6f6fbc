"""Prometheus metrics. Keys appear only as their AtlasKey ``namespace/name``, never as key
material. One of several workers (``ATLAS_WORKERS > 1``) keeps its metrics in memory like a
single process and snapshots them for the others; /metrics then sums every worker's
(worker_metrics.py)."""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)


class LoopValue:
    """prometheus_client's in-memory value (``values.MutexValue``) without its lock. Every metric
    of the gateway is written and read on the process's event-loop thread (the one other thread,
    OpenTelemetry's exporter, never touches them), so the lock protects nothing, and taking it is
    most of what an increment costs (docs/benchmarks.md, issue 24)."""

    __slots__ = ("_value", "_exemplar")
    _multiprocess = False

    def __init__(self, typ, metric_name, name, labelnames, labelvalues, help_text, **kwargs) -> None:
        self._value = 0.0
        self._exemplar = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp=None) -> None:
        self._value = value

    def set_exemplar(self, exemplar) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value

    def get_exemplar(self):
        return self._exemplar


# before any metric below exists: each of their values (and their children's) is a LoopValue.
# The gateway never runs prometheus_client's multiprocess mode (__main__ drops its directory).
if not getattr(values.ValueClass, "_multiprocess", False):
    values.ValueClass = LoopValue

_FAST = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(
    "atlas_gateway_requests_total",
    "Requests answered, by AtlasKey, model, status and priority",
    ["key", "model", "status", "priority"],
)
PROMPT_TOKENS = Counter("atlas_gateway_prompt_tokens_total", "Prompt tokens settled", ["key", "model"])
COMPLETION_TOKENS = Counter("atlas_gateway_completion_tokens_total", "Completion tokens settled", ["key", "model"])
REJECTIONS = Counter("atlas_gateway_rejections_total", "Requests refused by the gateway, by reason", ["key", "reason"])
OVERHEAD = Histogram(
    "atlas_gateway_overhead_seconds",
    "Time spent in the gateway itself (request time minus upstream time)",
    buckets=_FAST,
)
UPSTREAM_LATENCY = Histogram(
    "atlas_gateway_upstream_latency_seconds",
    "Upstream time: until the full body (or, streaming, until the headers)",
    ["model"],
    buckets=_SLOW,
)
INFLIGHT = Gauge("atlas_gateway_inflight_requests", "Requests in flight to the upstream")
SHED_VIEW_OTHERS = Gauge(
    "atlas_gateway_shed_view_other_inflight_requests",
    "In-flight requests of the other gateway processes, as last read from Redis "
    "(what shared shed thresholds add to this process's own count)",
)
SHED_VIEW_PEERS = Gauge("atlas_gateway_shed_view_peers", "Other live gateway processes in the shared shed view")
# each upstream's own load as last read from its /metrics (shedding/upstream_load.py); the label
# is its base URL without credentials
UPSTREAM_LOAD = Gauge(
    "atlas_gateway_upstream_load_requests",
    "The upstream's own requests as it last reported them: state running "
    "(vllm:num_requests_running) or waiting (vllm:num_requests_waiting)",
    ["upstream", "state"],
)
UPSTREAM_LOAD_FRESH = Gauge(
    "atlas_gateway_upstream_load_fresh",
    "1 while the upstream's load reading is recent enough to shed by; 0: it cannot be "
    "read and the in-flight ceilings apply",
    ["upstream"],
)
UPSTREAM_LOAD_ERRORS = Counter(
    "atlas_gateway_upstream_load_read_errors_total",
    "Reads of an upstream's /metrics that failed or found no vLLM gauges",
    ["upstream"],
)
# gauges a pod's workers report as their largest value, not their sum (worker_metrics.py): each
# worker's view of the other processes already includes its sibling workers, and every worker
# reads the same upstreams
MAX_OVER_WORKERS = frozenset(
    {
        "atlas_gateway_shed_view_other_inflight_requests",
        "atlas_gateway_shed_view_peers",
        "atlas_gateway_upstream_load_requests",
        "atlas_gateway_upstream_load_fresh",
    }
)
# The capacity view (docs/capacity.md): demand per model, all from figures the hot path already has.
ADMITTED_TOKENS = Counter(
    "atlas_gateway_admitted_tokens_total",
    "Tokens reserved by admitted requests (prompt estimate + completion cap), by model",
    ["model"],
)
REFUSED_TOKENS = Counter(
    "atlas_gateway_refused_tokens_total",
    "Tokens asked for by requests the admission refused (rate limits, budgets), by model",
    ["model", "reason"],
)
UPSTREAM_INFLIGHT = Gauge(
    "atlas_gateway_upstream_inflight_requests", "Requests in flight to the upstream, by model", ["model"]
)
REDIS_ERRORS = Counter("atlas_gateway_redis_errors_total", "Redis calls that failed", ["op"])
OVERRUNS = Counter(
    "atlas_gateway_usage_overrun_total",
    "Requests whose upstream-reported usage exceeded their reservation (charged in full)",
    ["key"],
)
OVERRUN_TOKENS = Counter(
    "atlas_gateway_usage_overrun_tokens_total", "Tokens reported by the upstream beyond the reservation", ["key"]
)

REDIS_REPLY_ERRORS = Counter(
    "atlas_gateway_redis_reply_errors_total",
    "Redis calls Redis refused with an error reply (script error, OOM, NOAUTH): answered 500, never let through",
    ["op", "kind"],
)
REDIS_UNDO_PENDING = Gauge(
    "atlas_gateway_redis_undo_pending", "Admissions/settlements with an unknown outcome, waiting to be undone in Redis"
)
REDIS_UNDONE = Counter(
    "atlas_gateway_redis_undone_total",
    "Unknown-outcome admissions/settlements resolved in Redis, by whether a lease was found",
    ["lease"],
)
COST = Counter(
    "atlas_cost_total",
    "Cost settled, in the currency of the AtlasKey's price list",
    ["currency", "namespace", "name", "model"],
)
LOOP_LAG = Histogram(
    "atlas_gateway_event_loop_lag_seconds",
    "How late a 100 ms timer fires on the gateway's event loop: time nothing else could run "
    "(a long callback, a collector pause, or the process waiting for a CPU)",
    buckets=_FAST,
)
DEMOTED = Counter(
    "atlas_gateway_demoted_total",
    "Requests admitted as Sheddable because they passed a soft budget, by AtlasKey, soft budget "
    "and the kind it belongs to",
    ["key", "budget", "kind"],
)
FAIL_OPEN = Counter("atlas_gateway_fail_open_total", "Requests let through unchecked because Redis was unreachable")

_MAX_MODELS = 200
_models: set[str] = set()
_children: dict[tuple, object] = {}


def model_label(model: str) -> str:
    """Bound the label's cardinality: a client can send any model name."""
    if model in _models:
        return model
    if len(_models) < _MAX_MODELS:
        _models.add(model)
        return model
    return "other"


def _child(metric, *labels):
    key = (id(metric), *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


# The hot path's counters and histograms, one cached callable per label set: a child's
# ``inc``/``observe`` re-checks on every call what cannot change (the metric is observable,
# the amount is not negative), and a histogram walks its buckets; these do the one addition.
_adders: dict[tuple, object] = {}
_observers: dict[tuple, object] = {}


def _adder(metric, *labels):
    """``add(amount)`` of a counter's or gauge's child: what the hot path's amounts (never
    negative for a counter) are added with."""
    key = (id(metric), *labels)
    add = _adders.get(key)
    if add is None:
        add = _adders[key] = (_child(metric, *labels) if labels else metric)._value.inc
    return add


def _histogram_observer(histogram):
    """``observe(seconds)`` of a histogram (or a child of one): into the sum and the first bucket
    whose bound is at least the amount, as ``Histogram.observe`` does, by bisection."""
    bounds, buckets, total = histogram._upper_bounds, histogram._buckets, histogram._sum

    def observe(amount: float) -> None:
        total.inc(amount)
        at = bisect_left(bounds, amount)  # the last bound is +Inf: always one, except for NaN
        if amount <= bounds[at]:  # NaN: in no bucket, as prometheus_client does
            buckets[at].inc(1)

    return observe


def _observer(metric, *labels):
    key = (id(metric), *labels)
    observe = _observers.get(key)
    if observe is None:
        observe = _observers[key] = _histogram_observer(_child(metric, *labels) if labels else metric)
    return observe


def observe_overhead(seconds: float) -> None:
    """The gateway's own time of one request (OVERHEAD)."""
    _observer(OVERHEAD)(seconds)


def count_request(key: str, model: str, status: int, priority: str) -> None:
    _adder(REQUESTS, key, model, str(status), priority)(1)


def count_tokens(key: str, model: str, prompt: int, completion: int) -> None:
    if prompt:
        _adder(PROMPT_TOKENS, key, model)(prompt)
    if completion:
        _adder(COMPLETION_TOKENS, key, model)(completion)


def count_cost(principal, model: str, micro: int) -> None:
    """The key's settled cost (micro-units) in its price list's currency."""
    key = principal.key
    _adder(COST, principal.currency or "", key.namespace, key.name, model)(micro / 1_000_000)


def count_demoted(principal, decision) -> None:
    kind = "AtlasQuota" if principal.subjects[decision.demoted_by - 1].startswith("q:") else "AtlasKey"
    _child(DEMOTED, principal.ref, decision.demoted, kind).inc()


def count_rejection(key: str, reason: str) -> None:
    _child(REJECTIONS, key, reason).inc()


def count_admitted(model: str, tokens: int) -> None:
    _adder(ADMITTED_TOKENS, model)(tokens)


def count_refused(model: str, reason: str, tokens: int) -> None:
    _child(REFUSED_TOKENS, model, reason).inc(tokens)


def upstream_started(model: str) -> None:
    _adder(UPSTREAM_INFLIGHT, model)(1)


def upstream_finished(model: str) -> None:
    _adder(UPSTREAM_INFLIGHT, model)(-1)


def observe_upstream(model: str, seconds: float) -> None:
    _observer(UPSTREAM_LATENCY, model)(seconds)


def count_overrun(key: str, tokens: int) -> None:
    _child(OVERRUNS, key).inc()
    _child(OVERRUN_TOKENS, key).inc(tokens)


def count_redis_error(op: str) -> None:
    _child(REDIS_ERRORS, op).inc()


def count_redis_reply_error(op: str, kind: str) -> None:
    _child(REDIS_REPLY_ERRORS, op, kind).inc()


CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()


def render() -> bytes:
    """This process's metrics, in Prometheus's text format (:data:`CONTENT_TYPE`)."""
    return generate_latest()
