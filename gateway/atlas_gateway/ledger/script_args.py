"""The ledger's script calls (admit, settle, undo, refresh): which KEYS and ARGV each one gets.

This is the one place that knows each script's KEYS/ARGV layout (documented at the top of each
``.lua`` file); both Redis clients run what it builds (store/scripts.py: ``FastScript`` over the
hot-path client, ``RedisPyScript`` over redis-py or fakeredis).

An argument list is split in two: what changes per request (request id, tokens, costs, times)
comes first, the rest is per key and fixed until its config changes or the UTC day turns.
That fixed part is a :class:`CallShape`, built once per key and day: it holds the KEYS, the
fixed ARGV and, for the hot-path client, their RESP encoding (the cost this saves:
docs/benchmarks.md, "Redis calls").
"""

from __future__ import annotations

from atlas_core import contract

from ..auth.principal import Principal
from ..store.scripts import CallShape
from .limits import holds_lease, limit_args, settle_limit_args

NO_COST = (b"0", b"0")  # the two per-subject cost arguments of an unpriced request


class KeyCalls:
    """What the ledger derives from one key's config, built on first use and kept on its
    :class:`Principal` (``principal.ledger``) for as long as that config holds."""

    __slots__ = ("limit_args", "settle_args", "leased", "day", "admit", "settle", "refresh")

    def __init__(self, principal: Principal) -> None:
        limits = principal.subject_limits
        # the per-subject fixed script arguments (limits.py)
        self.limit_args = tuple(arg for lim, short in limits for arg in limit_args(lim, short))
        self.settle_args = tuple(arg for lim, _ in limits for arg in settle_limit_args(lim))
        # some subject holds a lease per request: it is refreshed while in flight, undone on failure
        self.leased = any(holds_lease(lim) for lim, _ in limits)
        # the call shapes: admit and settle for ``day`` (rebuilt when the UTC day turns), refresh
        self.day: str | None = None
        self.admit: CallShape | None = None
        self.settle: CallShape | None = None
        self.refresh: CallShape | None = None


def key_calls(principal: Principal) -> KeyCalls:
    calls = principal.ledger
    if calls is None:
        calls = principal.ledger = KeyCalls(principal)
    return calls


def cost_args(
    prices: tuple["contract.Price | None", ...] | None, prompt: int, completion: int, cached: int = 0
) -> tuple[bytes, bytes]:
    """The two per-subject cost arguments of admit/settle/undo (micro-units; ``0`` = none)."""
    if prices is None:
        return NO_COST
    costs = [str(p.cost(prompt, completion, cached)).encode() if p is not None else b"0" for p in prices]
    return (costs[0], costs[1] if len(costs) > 1 else b"0")


class ScriptCalls:
    """Builds every script call of this gateway (one per process: the lease and hash TTLs are
    settings). The per-key parts are cached in the key's :class:`KeyCalls`."""

    def __init__(self, lease_ttl_seconds: float) -> None:
        self.lease_ttl_ms = str(int(lease_ttl_seconds * 1000)).encode()
        self.day_ttl = str(contract.DAY_TTL_SECONDS).encode()
        self.month_ttl = str(contract.MONTH_TTL_SECONDS).encode()

    # ------------------------------------------------------------------ fixed parts, per key

    def shapes(self, principal: Principal, day: str, month: str) -> tuple[CallShape, CallShape]:
        """(admit, settle) shapes of ``principal`` for this UTC day, rebuilt when it changes."""
        cached = principal.ledger or key_calls(principal)  # (twice per request: the call only once per config)
        if cached.day != day or cached.admit is None or cached.settle is None:
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
                lease_sum = contract.lease_sum_key(subject, tag).encode()
                admit_keys += [bucket_req, bucket_tok, lease, lease_tok, day_key, month_key, lease_cost, lease_sum]
                settle_keys += [bucket_tok, lease, lease_tok, day_key, month_key, lease_cost, lease_sum]
            admit_keys.append(contract.undone_key(principal.subjects[0], tag).encode())  # tombstones (undo.lua)
            count = str(len(principal.subjects)).encode()
            cached.admit = CallShape(
                admit_keys, (self.lease_ttl_ms, count, self.day_ttl, self.month_ttl, *cached.limit_args)
            )
            cached.settle = CallShape(settle_keys, (count, self.day_ttl, self.month_ttl, *cached.settle_args))
            cached.day = day
        return cached.admit, cached.settle

    def undo_shape(self, principal: Principal, day: str, month: str) -> CallShape:
        """settle.lua's KEYS + the tombstones admit.lua checks; settle's fixed ARGV + the lease
        TTL (as the tombstone TTL). Rare (only after a Redis failure): not cached."""
        admit, settle = self.shapes(principal, day, month)
        return CallShape([*settle.keys, admit.keys[-1]], (*settle.static, self.lease_ttl_ms))

    @staticmethod
    def refresh_shape(principal: Principal) -> CallShape:
        """refresh.lua: lease zset, lease:tok, lease:cost and lease:sum per subject (not day-dependent)."""
        cached = key_calls(principal)
        shape = cached.refresh
        if shape is None:
            tag = principal.tag
            keys = [
                k.encode()
                for s in principal.subjects
                for k in (
                    contract.lease_key(s, tag),
                    contract.lease_tokens_key(s, tag),
                    contract.lease_cost_key(s, tag),
                    contract.lease_sum_key(s, tag),
                )
            ]
            shape = cached.refresh = CallShape(keys, ())
        return shape

    # ------------------------------------------------------------------ per-request parts

    @staticmethod
    def admit_args(
        request_id: str,
        reserve: int,
        ms_to_day_end: int,
        ms_to_month_end: int,
        prompt: int,
        sequences: int,
        costs: tuple[bytes, bytes],
        shed_if_demoted: bool = False,
    ) -> tuple[bytes, ...]:
        return (
            request_id.encode(),
            str(reserve).encode(),
            str(ms_to_day_end).encode(),
            str(ms_to_month_end).encode(),
            str(prompt).encode(),
            str(sequences).encode(),
            *costs,
            b"1" if shed_if_demoted else b"0",
        )

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
