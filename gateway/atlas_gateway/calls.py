"""The Lua script calls (admit, settle, undo, refresh, inflight): which KEYS and ARGV each one gets.

This is the one place that knows each script's KEYS/ARGV layout (documented at the top of each
``.lua`` file); both Redis clients run what it builds (scripts.py: :class:`FastScript` over the
hot-path client, :class:`RedisPyScript` over redis-py or fakeredis).

An argument list is split in two: what changes per request (request id, tokens, costs, times)
comes first, the rest is per key and fixed until its config changes or the UTC day turns.
That fixed part is a :class:`CallShape`, built once per key and day: it holds the KEYS, the
fixed ARGV and, for the hot-path client, their RESP encoding (encoding ~35 arguments per call
was the largest Python cost of a Redis call).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from atlas_core import contract

if TYPE_CHECKING:
    from .auth import Principal

NO_COST = (b"0", b"0")  # the two per-subject cost arguments of an unpriced request


class CallShape:
    """KEYS and the fixed ARGV of one script call for one key (and day); ``encoded`` is the
    hot-path client's cache of their RESP form (see scripts.FastScript)."""

    __slots__ = ("keys", "static", "encoded")

    def __init__(self, keys: Sequence[bytes], static: Sequence[bytes]) -> None:
        self.keys = list(keys)
        self.static = tuple(static)
        self.encoded: tuple[bytes, bytes] | None = None


def _num(value: Any) -> bytes:
    """A limit as a script argument; 0 means "no limit of this kind"."""
    if value is None:
        return b"0"
    text = repr(value) if isinstance(value, float) and not value.is_integer() else str(int(value))
    return text.encode()


def _micro(value: Any) -> bytes:
    """A cost limit (currency) as integer micro-units; 0 means "no limit of this kind"."""
    return b"0" if value is None else str(contract.to_micro(value)).encode()


def limit_args(limits: contract.Limits, shortfall: contract.Shortfall) -> list[bytes]:
    """admit.lua's 10 arguments per subject."""
    return [
        _num(limits.requests_per_second),
        _num(limits.effective_burst),
        _num(limits.tokens_per_minute),
        _num(limits.tokens_per_day),
        _num(limits.tokens_per_month),
        _num(limits.max_concurrent),
        b"1" if shortfall.shrink else b"0",
        _num(shortfall.min_completion_tokens),
        _micro(limits.cost_per_day),
        _micro(limits.cost_per_month),
    ]


def settle_limit_args(limits: contract.Limits) -> list[bytes]:
    """settle.lua's (and undo.lua's) 2 arguments per subject."""
    return [_num(limits.tokens_per_minute), b"1" if limits.cost_limited else b"0"]


def cost_args(prices: tuple["contract.Price | None", ...] | None, prompt: int, completion: int,
              cached: int = 0) -> tuple[bytes, bytes]:
    """The two per-subject cost arguments of admit/settle/undo (micro-units; ``0`` = none)."""
    if prices is None:
        return NO_COST
    costs = [str(p.cost(prompt, completion, cached)).encode() if p is not None else b"0" for p in prices]
    return (costs[0], costs[1] if len(costs) > 1 else b"0")


class ScriptCalls:
    """Builds every script call of this gateway (one per process: the lease and hash TTLs are
    settings). The per-key parts are cached on the :class:`Principal` (``call_shapes``, ``refresh_call``)."""

    def __init__(self, lease_ttl_seconds: float) -> None:
        self.lease_ttl_ms = str(int(lease_ttl_seconds * 1000)).encode()
        self.day_ttl = str(contract.DAY_TTL_SECONDS).encode()
        self.month_ttl = str(contract.MONTH_TTL_SECONDS).encode()

    # ------------------------------------------------------------------ fixed parts, per key

    def shapes(self, principal: "Principal", day: str, month: str) -> tuple[CallShape, CallShape]:
        """(admit, settle) shapes of ``principal`` for this UTC day, rebuilt when it changes."""
        cached = principal.call_shapes
        if cached is None or cached[0] != day:
            admit_keys: list[bytes] = []
            settle_keys: list[bytes] = []
            tag = principal.tag  # one hash tag for all: one Redis Cluster slot per call
            for subject in principal.subjects:
                bucket_req = contract.request_bucket_key(subject, tag).encode()
                bucket_tok = contract.token_bucket_key(subject, tag).encode()
                lease = contract.lease_key(subject, tag).encode()
                lease_tok = contract.lease_tokens_key(subject, tag).encode()
                day_key = contract.day_usage_key(subject, day, tag).encode()
                month_key = contract.month_usage_key(subject, month, tag).encode()
                lease_cost = contract.lease_cost_key(subject, tag).encode()
                admit_keys += [bucket_req, bucket_tok, lease, lease_tok, day_key, month_key, lease_cost]
                settle_keys += [bucket_tok, lease, lease_tok, day_key, month_key, lease_cost]
            admit_keys.append(contract.undone_key(principal.subjects[0], tag).encode())  # tombstones (undo.lua)
            count = str(len(principal.subjects)).encode()
            admit_static = (self.lease_ttl_ms, count, self.day_ttl, self.month_ttl, *principal.limit_args)
            settle_static = (count, self.day_ttl, self.month_ttl, *principal.settle_args)
            cached = principal.call_shapes = (day, CallShape(admit_keys, admit_static), CallShape(settle_keys, settle_static))
        return cached[1], cached[2]

    def undo_shape(self, principal: "Principal", day: str, month: str) -> CallShape:
        """settle.lua's KEYS + the tombstones admit.lua checks; settle's fixed ARGV + the lease
        TTL (as the tombstone TTL). Rare (only after a Redis failure): not cached."""
        admit, settle = self.shapes(principal, day, month)
        return CallShape([*settle.keys, admit.keys[-1]], (*settle.static, self.lease_ttl_ms))

    @staticmethod
    def refresh_shape(principal: "Principal") -> CallShape:
        """refresh.lua: lease zset, lease:tok and lease:cost hashes per subject (not day-dependent)."""
        shape = principal.refresh_call
        if shape is None:
            tag = principal.tag
            keys = [k.encode() for s in principal.subjects
                    for k in (contract.lease_key(s, tag), contract.lease_tokens_key(s, tag),
                              contract.lease_cost_key(s, tag))]
            shape = principal.refresh_call = CallShape(keys, ())
        return shape

    # ------------------------------------------------------------------ per-request parts

    @staticmethod
    def admit_args(request_id: str, reserve: int, ms_to_day_end: int, ms_to_month_end: int, prompt: int,
                   sequences: int, costs: tuple[bytes, bytes]) -> tuple[bytes, ...]:
        return (request_id.encode(), str(reserve).encode(), str(ms_to_day_end).encode(),
                str(ms_to_month_end).encode(), str(prompt).encode(), str(sequences).encode(), *costs)

    @staticmethod
    def settle_args(request_id: str, actual: int, reserved: int, costs: tuple[bytes, bytes]) -> tuple[bytes, ...]:
        """settle.lua's (and undo.lua's) first five arguments."""
        return (request_id.encode(), str(max(0, int(actual))).encode(), str(reserved).encode(), *costs)

    def refresh_args(self, request_id: str) -> tuple[bytes, ...]:
        return (request_id.encode(), self.lease_ttl_ms)

    @staticmethod
    def undo_tail(admission: bool) -> tuple[bytes, ...]:
        """undo.lua's last argument: 1 = undo the admission itself, 0 = a settlement."""
        return (b"1" if admission else b"0",)

    # ------------------------------------------------------------------ the shared shed view

    @staticmethod
    def inflight_shape() -> CallShape:
        """inflight.lua (load_view.py): KEYS[1] the shed:inflight hash; nothing fixed in ARGV."""
        return CallShape([contract.INFLIGHT_KEY.encode()], ())

    @staticmethod
    def inflight_args(process_id: str, inflight: int, ttl_ms: int) -> tuple[bytes, ...]:
        return (process_id.encode(), str(int(inflight)).encode(), str(int(ttl_ms)).encode())
