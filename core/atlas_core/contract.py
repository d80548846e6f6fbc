"""The Redis contract between the Atlas operator and the Atlas gateway.

This module is the single source of truth for every Redis key name Atlas uses and for the
encoding of what is stored under them. Both processes import it; nothing else builds a key
name by hand. See docs/redis-contract.md for the operator-facing description.

Ownership (who writes what):

* config (``key:*``, ``quota:*``, ``index:*``, ``identity:*``, ``config:epoch``): written only by
  the operator; the gateway only reads it.
* counters (``usage:*``, ``bucket:*``, ``lease:*``): written only by the gateway (from its Lua
  scripts); the operator only reads the day/month usage hashes for status write-back.
* ``shed:inflight``: the gateway processes' in-flight counts, written and read only by the
  gateway (shedding against cluster-wide thresholds).

Every key starts with ``atlas:v2:`` so that an incompatible change of encoding can live next to
the old one during an upgrade (the v1 names the operator's upgrade carry-over reads are at the end
of this module; docs/redis-contract.md describes the upgrade).

Redis Cluster: every key carries a hash tag (``{...}``) so that what one script touches lives in
one slot. Config keys share the tag ``{config}`` (the operator's MULTI blocks span a key's config
and the indexes); counters are tagged by their :func:`slot_tag`: the AtlasQuota's subject for a
key bound to a quota (so the key's counters and the quota's are in one slot, as one admission
needs), the key's own subject otherwise.

Counters are keyed by the AtlasKey's identity (``namespace/name``), not by the key material:
rotating a key's Secret, or deleting and re-creating the AtlasKey, keeps its usage.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from decimal import ROUND_CEILING, Decimal
from typing import Any, Iterable, Mapping

PREFIX = "atlas:v2:"
# Config (written by the operator, read by the gateway) lives in one slot: the operator's MULTI
# blocks write a key's config and the indexes together. It is small and read at most once per
# key per ATLAS_CONFIG_TTL_SECONDS per gateway process, so one shard serving it is no hot spot.
CONFIG_PREFIX = PREFIX + "{config}:"

PRIORITIES = ("Critical", "Standard", "Sheddable")
DEFAULT_PRIORITY = "Standard"

# spec.onBudgetShortfall / spec.minCompletionTokens (AtlasKey and AtlasQuota): what admission
# does when a day/month budget cannot hold a request's full reservation.
SHORTFALL_POLICIES = ("Reject", "Shrink")
DEFAULT_SHORTFALL = "Reject"
DEFAULT_MIN_COMPLETION_TOKENS = 16


@dataclass(frozen=True)
class Shortfall:
    """``Shrink``: lower the completion cap to what the budget still holds, if that is at least
    ``min_completion_tokens`` (or the request's own cap, when smaller). ``Reject``: 429."""

    policy: str = DEFAULT_SHORTFALL
    min_completion_tokens: int = DEFAULT_MIN_COMPLETION_TOKENS

    @property
    def shrink(self) -> bool:
        return self.policy == "Shrink"

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> "Shortfall":
        """From an AtlasKey/AtlasQuota spec (or from :meth:`encode_into` output)."""
        spec = spec or {}
        policy = spec.get("onBudgetShortfall") or DEFAULT_SHORTFALL
        minimum = spec.get("minCompletionTokens")
        return cls(
            policy if policy in SHORTFALL_POLICIES else DEFAULT_SHORTFALL,
            DEFAULT_MIN_COMPLETION_TOKENS if minimum is None else int(minimum),
        )

    def encode_into(self, doc: dict[str, Any]) -> None:
        """Stored only when not the default, so existing config stays byte-identical."""
        if self.policy != DEFAULT_SHORTFALL:
            doc["onBudgetShortfall"] = self.policy
        if self.min_completion_tokens != DEFAULT_MIN_COMPLETION_TOKENS:
            doc["minCompletionTokens"] = self.min_completion_tokens


# Written by the operator after every full sync. Its absence tells the operator that Redis lost
# its data (restart without persistence, FLUSHALL) and that all config must be written again.
CONFIG_EPOCH = CONFIG_PREFIX + "config:epoch"
# ``namespace/name`` -> key hash of every AtlasKey the operator has written: lets the operator
# find (and delete) the config of a previous hash on rotation or deletion without scanning.
KEY_INDEX = CONFIG_PREFIX + "index:keys"
# Set of ``namespace/name`` of every AtlasQuota the operator has written.
QUOTA_INDEX = CONFIG_PREFIX + "index:quotas"
# ``namespace/name`` -> "<key hash> <unix seconds>": the key a rotation replaced, kept working
# until then (spec.rotationGracePeriod). Its config entry is a copy of the current one (same
# usage identity) that expires at that time by itself, so no gateway change is needed.
PREVIOUS_KEY_INDEX = CONFIG_PREFIX + "index:previous-keys"


@dataclass(frozen=True)
class PreviousKey:
    key_hash: str
    until: float  # unix seconds: refused from then on

    def encode(self) -> str:
        return f"{self.key_hash} {self.until:.3f}"

    @classmethod
    def decode(cls, raw: bytes | str) -> "PreviousKey":
        """ValueError unless ``until`` is a time a Redis expiry (and a datetime) can hold."""
        text = raw.decode() if isinstance(raw, bytes) else raw
        key_hash, until = text.split(" ")
        seconds = float(until)
        if not 0 <= seconds <= MAX_UNIX_SECONDS:
            raise ValueError(f"previous key deadline out of range: {until!r}")
        return cls(key_hash, seconds)


# Numbers read back from Redis are checked against what their writers can produce, so that a
# damaged value is refused where it is read (ValueError), never carried into arithmetic or a
# datetime where it would overflow: counters are Redis integers, instants fit in year 9999.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_UNIX_SECONDS = 253402300799  # 9999-12-31T23:59:59Z


# --------------------------------------------------------------------------- key material


def hash_api_key(api_key: str) -> str:
    """SHA-256 hex digest of the key material: the only form Redis ever sees."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def key_id_of(key_hash: str) -> str:
    """The first 8 hex characters of the hash: safe to show in status, logs and metrics."""
    return key_hash[:8]


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    """The ``limits`` block shared by AtlasKey and AtlasQuota. ``None`` means "no limit"."""

    requests_per_second: float | None = None
    burst: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    max_concurrent: int | None = None
    cost_per_day: float | None = None  # in the price list's currency
    cost_per_month: float | None = None
    # soft budgets: once settled usage reaches one, requests are still admitted, demoted to
    # Sheddable (each below its hard one)
    soft_tokens_per_day: int | None = None
    soft_tokens_per_month: int | None = None
    soft_cost_per_day: float | None = None
    soft_cost_per_month: float | None = None

    _FIELDS = (
        ("requestsPerSecond", "requests_per_second"),
        ("burst", "burst"),
        ("tokensPerMinute", "tokens_per_minute"),
        ("tokensPerDay", "tokens_per_day"),
        ("tokensPerMonth", "tokens_per_month"),
        ("maxConcurrent", "max_concurrent"),
        ("costPerDay", "cost_per_day"),
        ("costPerMonth", "cost_per_month"),
        ("softTokensPerDay", "soft_tokens_per_day"),
        ("softTokensPerMonth", "soft_tokens_per_month"),
        ("softCostPerDay", "soft_cost_per_day"),
        ("softCostPerMonth", "soft_cost_per_month"),
    )
    _DECIMAL = frozenset(
        {"requests_per_second", "cost_per_day", "cost_per_month", "soft_cost_per_day", "soft_cost_per_month"}
    )

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> "Limits":
        """Build from the CRD's camelCase ``limits`` block (or from :meth:`to_spec` output)."""
        spec = spec or {}
        values: dict[str, Any] = {}
        for camel, attr in cls._FIELDS:
            raw = spec.get(camel)
            if raw is None:
                continue
            values[attr] = float(raw) if attr in cls._DECIMAL else int(raw)
        return cls(**values)

    def to_spec(self) -> dict[str, Any]:
        """camelCase dict with only the limits that are set (the stored and shown form)."""
        out: dict[str, Any] = {}
        for camel, attr in self._FIELDS:
            value = getattr(self, attr)
            if value is not None:
                out[camel] = value
        return out

    @property
    def cost_limited(self) -> bool:
        """A hard cost budget: an unpriced request cannot be admitted against it."""
        return self.cost_per_day is not None or self.cost_per_month is not None

    @property
    def soft_limited(self) -> bool:
        return any(getattr(self, attr) is not None for _, attr in SOFT_LIMITS)

    @property
    def effective_burst(self) -> int | None:
        """Token-bucket size for requests: ``burst``, else ``ceil(requestsPerSecond)``."""
        if self.requests_per_second is None:
            return None
        if self.burst is not None:
            return self.burst
        whole = int(self.requests_per_second)
        return whole if whole == self.requests_per_second else whole + 1


# The soft budgets in the order they are checked (tokens before cost, day before month): the
# CRD's field name (also what the gateway's x-atlas-demoted header and metric, the operator's
# Demoted condition and /v1/usage name) and the Limits attribute.
SOFT_LIMITS = (
    ("softTokensPerDay", "soft_tokens_per_day"),
    ("softTokensPerMonth", "soft_tokens_per_month"),
    ("softCostPerDay", "soft_cost_per_day"),
    ("softCostPerMonth", "soft_cost_per_month"),
)


# --------------------------------------------------------------------------- prices
#
# Cost is counted in integer micro-units of the price list's currency (1 USD = 1 000 000), so
# that sums in Redis are exact. A price is "currency per million tokens", so a price quantised to
# micro-units is also "micro-units per token" times 10^6: the cost of n tokens at price p is
# n * p_micro / 10^6 micro-units, rounded up (a reservation never undercounts).

MICRO = 1_000_000
CURRENCY_PATTERN = re.compile(r"^[A-Z]{3}$")  # ISO-4217-shaped (the CRD enforces the same)


def to_micro(value: Any) -> int:
    """An amount of currency (CRD number or string) as integer micro-units, rounded up."""
    return int((Decimal(str(value)) * MICRO).to_integral_value(rounding=ROUND_CEILING))


def format_micro(micro: int) -> str:
    """Micro-units as a decimal string without float drift: 1234567 -> ``1.234567``, 0 -> ``0``."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(int(micro)), MICRO)
    return sign + (f"{whole}.{frac:06d}".rstrip("0").rstrip(".") if frac else str(whole))


@dataclass(frozen=True)
class Price:
    """Prices of one model glob, in micro-units of currency per million tokens."""

    model: str
    input: int
    cached_input: int
    output: int

    def cost(self, prompt: int, completion: int, cached: int = 0) -> int:
        """Micro-units for a request; ``cached`` is the part of ``prompt`` read from a cache."""
        cached = max(0, min(int(cached), int(prompt)))
        total = (int(prompt) - cached) * self.input + cached * self.cached_input + int(completion) * self.output
        return -(-total // MICRO)

    def encode(self) -> list[Any]:
        return [self.model, self.input, self.cached_input, self.output]

    @classmethod
    def decode(cls, doc: list[Any]) -> "Price":
        return cls(str(doc[0]), int(doc[1]), int(doc[2]), int(doc[3]))

    @classmethod
    def from_spec(cls, model: str, spec: Mapping[str, Any]) -> "Price":
        """From a CRD price entry; ``cachedInput`` defaults to ``input``."""
        price_in = to_micro(spec.get("input") or 0)
        cached = spec.get("cachedInput")
        return cls(model, price_in, price_in if cached is None else to_micro(cached), to_micro(spec.get("output") or 0))


@dataclass(frozen=True)
class PriceTable:
    """An AtlasPriceList resolved by the operator into a key's or quota's config: the gateway
    never reads Kubernetes, and a changed price list re-writes config (future requests only)."""

    name: str
    currency: str
    prices: tuple[Price, ...] = ()
    default: Price | None = None

    def price_of(self, model: str) -> Price | None:
        """The first entry whose glob matches ``model`` (case-sensitive), else the default."""
        for price in self.prices:
            if fnmatch.fnmatchcase(model, price.model):
                return price
        return self.default

    @classmethod
    def from_spec(cls, name: str, spec: Mapping[str, Any]) -> "PriceTable":
        default = spec.get("default")
        return cls(
            name=name,
            currency=str(spec.get("currency") or ""),
            prices=tuple(Price.from_spec(str(p["model"]), p) for p in spec.get("prices") or ()),
            default=Price.from_spec("*", default) if default else None,
        )

    def encode_into(self, doc: dict[str, Any]) -> None:
        out: dict[str, Any] = {
            "name": self.name,
            "currency": self.currency,
            "prices": [p.encode() for p in self.prices],
        }
        if self.default is not None:
            out["default"] = self.default.encode()
        doc["priceList"] = out

    @classmethod
    def decode(cls, doc: Mapping[str, Any] | None) -> "PriceTable | None":
        if not doc:
            return None
        default = doc.get("default")
        return cls(
            str(doc["name"]),
            str(doc["currency"]),
            tuple(Price.decode(p) for p in doc.get("prices") or ()),
            Price.decode(default) if default else None,
        )


# --------------------------------------------------------------------------- config


def key_config_key(key_hash: str) -> str:
    return f"{CONFIG_PREFIX}key:{key_hash}"


def quota_config_key(namespace: str, name: str) -> str:
    return f"{CONFIG_PREFIX}quota:{namespace}/{name}"


def _dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


@dataclass(frozen=True)
class KeyConfig:
    """What the gateway needs to know about one API key, stored under :func:`key_config_key`.

    ``refusal`` is set when the operator knows the key must not be served (for example its
    quotaRef does not resolve, or its Secret is invalid): the gateway answers 403 with
    ``refusal_message`` instead of treating the key as unknown or, worse, unlimited.
    Suspension and expiry are separate fields so the gateway can enforce ``expires_at`` to the
    second without waiting for the operator.
    """

    namespace: str
    name: str
    key_id: str
    limits: Limits = field(default_factory=Limits)
    quota: str | None = None  # AtlasQuota name, same namespace
    models: tuple[str, ...] = ()  # allow-list globs; empty = all models
    priority: str = DEFAULT_PRIORITY
    suspended: bool = False
    expires_at: float | None = None  # unix seconds, UTC
    refusal: str | None = None  # condition reason, e.g. "QuotaNotFound"
    refusal_message: str | None = None
    shortfall: Shortfall = field(default_factory=Shortfall)
    price_list: PriceTable | None = None  # spec.priceListRef, resolved by the operator

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def quota_ref(self) -> str | None:
        return f"{self.namespace}/{self.quota}" if self.quota else None

    def encode(self) -> bytes:
        doc: dict[str, Any] = {
            "ns": self.namespace,
            "name": self.name,
            "keyId": self.key_id,
            "limits": self.limits.to_spec(),
            "priority": self.priority,
        }
        if self.quota:
            doc["quota"] = self.quota
        if self.models:
            doc["models"] = list(self.models)
        if self.suspended:
            doc["suspended"] = True
        if self.expires_at is not None:
            doc["expiresAt"] = self.expires_at
        if self.refusal:
            doc["refusal"] = self.refusal
            doc["refusalMessage"] = self.refusal_message or self.refusal
        self.shortfall.encode_into(doc)
        if self.price_list is not None:
            self.price_list.encode_into(doc)
        return _dumps(doc)

    @classmethod
    def decode(cls, raw: bytes | str) -> "KeyConfig":
        doc = json.loads(raw)
        return cls(
            namespace=doc["ns"],
            name=doc["name"],
            key_id=doc["keyId"],
            limits=Limits.from_spec(doc.get("limits")),
            quota=doc.get("quota"),
            models=tuple(doc.get("models") or ()),
            priority=doc.get("priority", DEFAULT_PRIORITY),
            suspended=bool(doc.get("suspended", False)),
            expires_at=doc.get("expiresAt"),
            refusal=doc.get("refusal"),
            refusal_message=doc.get("refusalMessage"),
            shortfall=Shortfall.from_spec(doc),
            price_list=PriceTable.decode(doc.get("priceList")),
        )


@dataclass(frozen=True)
class QuotaConfig:
    """A shared budget, stored under :func:`quota_config_key`. ``refusal``: why keys bound to
    it must be refused (e.g. ``PriceListNotFound``: never served unpriced)."""

    namespace: str
    name: str
    limits: Limits = field(default_factory=Limits)
    shortfall: Shortfall = field(default_factory=Shortfall)
    price_list: PriceTable | None = None
    refusal: str | None = None
    refusal_message: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def encode(self) -> bytes:
        doc: dict[str, Any] = {"ns": self.namespace, "name": self.name, "limits": self.limits.to_spec()}
        self.shortfall.encode_into(doc)
        if self.price_list is not None:
            self.price_list.encode_into(doc)
        if self.refusal:
            doc["refusal"] = self.refusal
            doc["refusalMessage"] = self.refusal_message or self.refusal
        return _dumps(doc)

    @classmethod
    def decode(cls, raw: bytes | str) -> "QuotaConfig":
        doc = json.loads(raw)
        return cls(
            namespace=doc["ns"],
            name=doc["name"],
            limits=Limits.from_spec(doc.get("limits")),
            shortfall=Shortfall.from_spec(doc),
            price_list=PriceTable.decode(doc.get("priceList")),
            refusal=doc.get("refusal"),
            refusal_message=doc.get("refusalMessage"),
        )


# --------------------------------------------------------------------------- workload identity
#
# A token (a projected ServiceAccount token, an OIDC token) authenticates as the AtlasKey whose
# spec.subjects binds its subject. The gateway never asks the Kubernetes API: the operator
# publishes what verifying a token needs (config, slot {config}, written only by the operator):
#
#   identity:issuers          hash  issuer URL (a token's ``iss``) -> Issuer (JSON): whose tokens
#                                   it signs, their audiences and claim mappings, and its public
#                                   signing keys (JWKS), refreshed by the operator on rotation
#   identity:bindings         hash  TokenSubject.encode() -> "<namespace>/<name>" of the AtlasKey
#                                   binding it (one AtlasKey per subject: a later one conflicts)
#   identity:serviceaccounts  hash  "<namespace>/<name>" of each bound ServiceAccount -> its current
#                                   UID; absent while it does not exist, so that a token of a
#                                   deleted (or deleted and recreated) ServiceAccount is refused

IDENTITY_ISSUERS = CONFIG_PREFIX + "identity:issuers"
IDENTITY_BINDINGS = CONFIG_PREFIX + "identity:bindings"
IDENTITY_SERVICE_ACCOUNTS = CONFIG_PREFIX + "identity:serviceaccounts"

SUBJECT_KINDS = ("ServiceAccount", "User", "Group")
# Asymmetric JWS algorithms only: ``none`` and HMAC (whose "secret" would be a public key the
# attacker knows: algorithm confusion) are never accepted.
TOKEN_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
DEFAULT_TOKEN_AUDIENCE = "atlas"
# The public members of a JWK (RFC 7517/7518/8037): nothing else of an issuer's JWKS is stored,
# so a private member an issuer publishes by mistake never reaches Redis.
_PUBLIC_JWK_MEMBERS = ("kty", "kid", "use", "alg", "n", "e", "crv", "x", "y")


@dataclass(frozen=True, order=True)
class TokenSubject:
    """A spec.subjects entry with its namespace resolved (ServiceAccount only)."""

    kind: str
    name: str
    namespace: str = ""

    def encode(self) -> str:
        if self.kind == "ServiceAccount":
            return f"ServiceAccount:{self.namespace}/{self.name}"
        return f"{self.kind}:{self.name}"

    @classmethod
    def decode(cls, raw: bytes | str) -> "TokenSubject":
        text = raw.decode() if isinstance(raw, bytes) else raw
        kind, _, rest = text.partition(":")
        if kind == "ServiceAccount":
            namespace, _, name = rest.partition("/")
            return cls(kind, name, namespace)
        if kind not in SUBJECT_KINDS:
            raise ValueError(f"not a token subject: {text!r}")
        return cls(kind, rest)

    @property
    def account_ref(self) -> str:
        """``namespace/name`` of a ServiceAccount subject (its IDENTITY_SERVICE_ACCOUNTS field)."""
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return self.encode()


def public_jwks(jwks: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The asymmetric keys of a JWKS document, public members only ("oct" keys dropped)."""
    keys = []
    for key in jwks.get("keys") or ():
        if isinstance(key, Mapping) and key.get("kty") in ("RSA", "EC", "OKP"):
            keys.append({m: key[m] for m in _PUBLIC_JWK_MEMBERS if isinstance(key.get(m), str)})
    return keys


@dataclass(frozen=True)
class Issuer:
    """A token issuer the gateway trusts, as the operator publishes it under its URL.

    ``service_accounts``: the cluster's own issuer (the API server's OIDC discovery): its tokens
    name a ServiceAccount (``kubernetes.io`` claim), checked against that account's current UID.
    Otherwise an OIDC issuer from the chart's values, whose tokens name a User (the username
    claim, with its prefix) and Groups (the groups claim, each with its prefix), the names
    kube-apiserver's structured authentication configuration uses.
    """

    url: str
    audiences: tuple[str, ...]
    keys: tuple[Mapping[str, Any], ...] = ()  # public JWKs (public_jwks)
    service_accounts: bool = False
    username_claim: str = "sub"
    username_prefix: str = ""
    groups_claim: str = ""  # "": the issuer's groups are not used
    groups_prefix: str = ""
    fetched_at: float = 0.0  # unix seconds of the last successful JWKS fetch

    def encode(self) -> bytes:
        doc: dict[str, Any] = {
            "url": self.url,
            "audiences": list(self.audiences),
            "keys": list(self.keys),
            "fetchedAt": round(self.fetched_at, 3),
        }
        if self.service_accounts:
            doc["serviceAccounts"] = True
        else:
            doc["claimMappings"] = {
                "username": {"claim": self.username_claim, "prefix": self.username_prefix},
                "groups": {"claim": self.groups_claim, "prefix": self.groups_prefix},
            }
        return _dumps(doc)

    @classmethod
    def decode(cls, raw: bytes | str) -> "Issuer":
        doc = json.loads(raw)
        mappings = doc.get("claimMappings") or {}
        username, groups = mappings.get("username") or {}, mappings.get("groups") or {}
        return cls(
            url=doc["url"],
            audiences=tuple(doc.get("audiences") or ()),
            keys=tuple(doc.get("keys") or ()),
            service_accounts=bool(doc.get("serviceAccounts")),
            username_claim=username.get("claim") or "sub",
            username_prefix=username.get("prefix") or "",
            groups_claim=groups.get("claim") or "",
            groups_prefix=groups.get("prefix") or "",
            fetched_at=float(doc.get("fetchedAt") or 0.0),
        )

    def same_publication(self, other: "Issuer | None") -> bool:
        """Equal but for ``fetched_at``: re-publishing it would change nothing the gateway uses."""
        return other is not None and replace(other, fetched_at=self.fetched_at) == self


# --------------------------------------------------------------------------- counters
#
# A "subject" is whatever a limit applies to: an AtlasKey (``k:<ns>/<name>``) or an AtlasQuota
# (``q:<ns>/<name>``). Per subject the gateway keeps (``{T}`` is the subject's slot tag):
#
#   {T}:usage:<subject>:d:<YYYY-MM-DD>   hash  settled (tokens), requests, last (unix ms), cost (micro)
#   {T}:usage:<subject>:m:<YYYY-MM>      hash  settled (tokens), cost (micro-units, priced subjects)
#                                              (field names: USAGE_* below)
#   {T}:bucket:req:<subject>             hash  token bucket for requestsPerSecond/burst
#   {T}:bucket:tok:<subject>             hash  token bucket for tokensPerMinute
#   {T}:lease:<subject>                  zset  in-flight request id -> lease expiry (unix ms)
#   {T}:lease:tok:<subject>              hash  in-flight request id -> tokens reserved
#   {T}:lease:cost:<subject>             hash  in-flight request id -> cost reserved (micro-units),
#                                              only for a subject with costPerDay/costPerMonth
#   {T}:lease:sum:<subject>              hash  n, tok, cost: the running totals of the three above
#                                              (lease count, tokens and cost reserved), kept by the
#                                              same scripts that add, settle, undo and purge leases
#   {T}:undone:<subject>                 zset  request ids the gateway undid -> tombstone expiry (unix ms)
#
# A lease is both the concurrency slot and the token reservation of one in-flight request; it
# carries a TTL so that a gateway that dies mid-request cannot leak either. Day/month budgets
# are checked against ``settled + sum(reserved of live leases) + this request``, the sum read
# from ``lease:sum`` (never by reading every lease: the cost of a call does not grow with the
# number of requests in flight).
#
# The slot tag T is the quota's subject for a key bound to an AtlasQuota and for that quota
# itself, the key's own subject otherwise (:func:`slot_tag`): every key one script call touches
# then hashes to one Redis Cluster slot. A key whose quotaRef changes gets new counter names (the
# operator carries its day/month usage over, see carry_over.lua). Every function below takes
# ``tag``; it defaults to the subject itself (a key without a quota, or a quota).

# The fields of the day/month usage hashes. The gateway's Lua scripts write them (Lua keeps them as
# literals, so that a script call's KEYS/ARGV layout stays fixed: tests/unit/gateway/test_script_layout.py
# checks the scripts' literals against these names); the operator reads them through :func:`parse_usage`.
USAGE_SETTLED = "settled"  # tokens settled (day and month hashes)
USAGE_REQUESTS = "requests"  # requests admitted (day hash)
USAGE_LAST = "last"  # unix ms of the last admission (day hash)
USAGE_COST = "cost"  # cost settled, micro-units (day and month hashes; priced subjects only)
DAY_USAGE_FIELDS = (USAGE_SETTLED, USAGE_REQUESTS, USAGE_LAST, USAGE_COST)
MONTH_USAGE_FIELDS = (USAGE_SETTLED, USAGE_COST)

DAY_TTL_SECONDS = 3 * 24 * 3600  # a day hash outlives its day: late settlements and status
MONTH_TTL_SECONDS = 35 * 24 * 3600 + 3600


def key_subject(namespace: str, name: str) -> str:
    return f"k:{namespace}/{name}"


def quota_subject(namespace: str, name: str) -> str:
    return f"q:{namespace}/{name}"


def slot_tag(namespace: str, key_name: str, quota: str | None) -> str:
    """The hash tag of an AtlasKey's counters: its quota's subject when it has a quotaRef, so
    that one admission (key + quota) touches one slot; else its own subject."""
    return quota_subject(namespace, quota) if quota else key_subject(namespace, key_name)


def _counter(kind: str, subject: str, tag: str | None) -> str:
    return f"{PREFIX}{{{tag or subject}}}:{kind}{subject}"


# Shedding from a cluster-wide view (gateway/atlas_gateway/load_view.py): one hash, a field per
# gateway process (its request-id prefix) holding "<in flight>:<expiry ms, Redis clock>". Written
# only by the gateway (inflight.lua), a few times a second per process; one key, so one Redis
# Cluster slot whatever the prefix.
INFLIGHT_KEY = PREFIX + "shed:inflight"


def day_of(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%d")


def month_of(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m")


def day_usage_key(subject: str, day: str, tag: str | None = None) -> str:
    return _counter("usage:", subject, tag) + f":d:{day}"


def month_usage_key(subject: str, month: str, tag: str | None = None) -> str:
    return _counter("usage:", subject, tag) + f":m:{month}"


def request_bucket_key(subject: str, tag: str | None = None) -> str:
    return _counter("bucket:req:", subject, tag)


def token_bucket_key(subject: str, tag: str | None = None) -> str:
    return _counter("bucket:tok:", subject, tag)


def lease_key(subject: str, tag: str | None = None) -> str:
    return _counter("lease:", subject, tag)


def lease_tokens_key(subject: str, tag: str | None = None) -> str:
    return _counter("lease:tok:", subject, tag)


def lease_cost_key(subject: str, tag: str | None = None) -> str:
    return _counter("lease:cost:", subject, tag)


def lease_sum_key(subject: str, tag: str | None = None) -> str:
    return _counter("lease:sum:", subject, tag)


# ``response:<id>`` (string, written by the gateway): which AtlasKey created a stored
# /v1/responses response, and how many tokens it holds (its input plus output), so that only
# that key can read, delete or continue it, and a continuation (previous_response_id) can be
# bounded. Kept as long as an upstream typically stores responses.
RESPONSE_TTL_SECONDS = 30 * 24 * 3600


def response_owner_key(response_id: str) -> str:
    return f"{PREFIX}response:{response_id}"


def encode_response_owner(subject: str, tokens: int) -> bytes:
    return f"{subject}\t{int(tokens)}".encode()


def decode_response_owner(raw: bytes | str | None) -> tuple[str, int] | None:
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    subject, _, tokens = text.rpartition("\t")
    return (subject, int(tokens or 0)) if subject else None


def undone_key(subject: str, tag: str | None = None) -> str:
    """Tombstones of requests whose admission or settlement outcome the gateway did not learn
    (a Redis timeout): undo.lua resolves them, admit.lua refuses to lease a tombstoned id."""
    return _counter("undone:", subject, tag)


@dataclass(frozen=True)
class Usage:
    """Settled usage of one subject, as shown in ``status.usage`` and ``/v1/usage``."""

    tokens_today: int = 0
    tokens_this_month: int = 0
    requests_today: int = 0
    day: str = ""
    month: str = ""
    last_request_ms: int | None = None
    cost_today: int | None = None  # micro-units; None: nothing was ever priced
    cost_this_month: int | None = None

    def to_status(self, priced: bool = False) -> dict[str, Any]:
        """``priced``: the subject names a price list, so cost is shown even while it is 0."""
        out: dict[str, Any] = {
            "tokensToday": self.tokens_today,
            "tokensThisMonth": self.tokens_this_month,
            "requestsToday": self.requests_today,
            "day": self.day,
            "month": self.month,
        }
        if priced or self.cost_today is not None or self.cost_this_month is not None:
            out["costToday"] = format_micro(self.cost_today or 0)
            out["costThisMonth"] = format_micro(self.cost_this_month or 0)
        if self.last_request_ms is not None:  # parse_usage checked its range
            stamp = datetime.fromtimestamp(self.last_request_ms / 1000, tz=timezone.utc)
            out["lastRequestTime"] = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
        return out


def soft_budgets(limits: Limits, usage: Usage) -> list[tuple[str, int, int]]:
    """(CRD name, limit, settled) of each soft budget ``limits`` sets, in :data:`SOFT_LIMITS`
    order; cost in micro-units."""
    used = {
        "soft_tokens_per_day": usage.tokens_today,
        "soft_tokens_per_month": usage.tokens_this_month,
        "soft_cost_per_day": usage.cost_today or 0,
        "soft_cost_per_month": usage.cost_this_month or 0,
    }
    out = []
    for name, attr in SOFT_LIMITS:
        limit = getattr(limits, attr)
        if limit is not None:
            out.append((name, to_micro(limit) if "cost" in attr else int(limit), used[attr]))
    return out


def soft_limit_passed(limits: Limits, usage: Usage) -> tuple[str, int] | None:
    """The first soft budget the settled ``usage`` has reached, as (CRD name, limit), or None:
    from then on every request of the subject is demoted (admit.lua checks the same, in the
    same order, in the admission itself)."""
    for name, limit, used in soft_budgets(limits, usage):
        if used >= limit:
            return name, limit
    return None


def _int(value: Any, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    """A counter field (absent: 0); ValueError for anything but a number in [low, high]."""
    if value is None:
        return 0
    if isinstance(value, bytes):
        value = value.decode()
    try:
        number = int(value)
    except ValueError:
        real = float(value)  # "12.0"; ValueError for words
        if not math.isfinite(real):  # int() would raise OverflowError for inf
            raise ValueError(f"not a finite number: {value!r}") from None
        number = int(real)
    if not low <= number <= high:
        raise ValueError(f"out of range: {value!r}")
    return number


def usage_keys(subject: str, now: datetime, tag: str | None = None) -> tuple[str, str]:
    """The (day hash, month hash) keys holding ``subject``'s usage at ``now``."""
    return day_usage_key(subject, day_of(now), tag), month_usage_key(subject, month_of(now), tag)


def parse_usage(day_hash: Mapping[Any, Any], month_hash: Mapping[Any, Any], now: datetime) -> Usage:
    """Decode the two hashes of :func:`usage_keys` (as returned by HGETALL) into a :class:`Usage`."""

    def get(h: Mapping[Any, Any], name: str) -> Any:
        return h.get(name, h.get(name.encode()))

    last = get(day_hash, USAGE_LAST)
    cost_day, cost_month = get(day_hash, USAGE_COST), get(month_hash, USAGE_COST)
    return Usage(
        tokens_today=_int(get(day_hash, USAGE_SETTLED)),
        tokens_this_month=_int(get(month_hash, USAGE_SETTLED)),
        requests_today=_int(get(day_hash, USAGE_REQUESTS)),
        day=day_of(now),
        month=month_of(now),
        last_request_ms=_int(last, 0, MAX_UNIX_SECONDS * 1000) if last is not None else None,
        cost_today=_int(cost_day) if cost_day is not None else None,
        cost_this_month=_int(cost_month) if cost_month is not None else None,
    )


async def read_usages(
    redis: Any,
    subjects: Iterable[str],
    now: datetime,
    tags: Mapping[str, str] | None = None,
    unreadable: dict[str, str] | None = None,
) -> dict[str, Usage]:
    """Read the usage of many subjects in one pipelined round trip (redis.asyncio client; on a
    Redis Cluster, redis-py's cluster pipeline sends one pipeline per node). ``tags``: subject ->
    slot tag, for the subjects whose tag is not the subject itself (keys bound to a quota).
    With ``unreadable``, a subject whose hashes do not parse is left out and the reason kept
    there (one damaged counter must not hide every other subject's usage); else ValueError."""
    subjects = list(subjects)
    tags = tags or {}
    pipe = redis.pipeline(transaction=False)
    for subject in subjects:
        day_key, month_key = usage_keys(subject, now, tags.get(subject))
        pipe.hgetall(day_key)
        pipe.hgetall(month_key)
    replies = await pipe.execute() if subjects else []
    if unreadable is None:
        return {subject: parse_usage(replies[2 * i], replies[2 * i + 1], now) for i, subject in enumerate(subjects)}
    usages = {}
    for i, subject in enumerate(subjects):
        try:
            usages[subject] = parse_usage(replies[2 * i], replies[2 * i + 1], now)
        except ValueError as exc:
            unreadable[subject] = f"its usage counters in Redis do not parse: {exc}"
    return usages


# --------------------------------------------------------------------------- forecast history
#
# Owned by the operator (derived from the counters it reads; the gateway never touches it):
#
#   history:<subject>   string  the subject's recent samples of its month counter, oldest first,
#                               comma-separated, each "<unix ms> <YYYY-MM> <settled that month>
#                               <running total>"; rewritten whole (one SET) when a sample is added
#
# The running total never goes down (a new month restarts the raw counter, not the total), so
# the burn between two samples is one subtraction. A restarted operator reads these back instead
# of forecasting from nothing; a quiet subject's entry simply expires.

HISTORY_MAX_SAMPLES = 32  # the operator keeps ~15 (recent ones, then one per 10 minutes)
HISTORY_TTL_SECONDS = 2 * 3600


def history_key(subject: str) -> str:
    return f"{PREFIX}history:{subject}"


@dataclass(frozen=True, slots=True)  # ~15 per subject in the operator's memory
class HistorySample:
    at_ms: int
    month: str
    settled: int  # tokensThisMonth as read
    total: int  # running total of tokens burnt since the history began

    def encode(self) -> str:
        return f"{self.at_ms} {self.month} {self.settled} {self.total}"

    @classmethod
    def decode(cls, raw: bytes | str) -> "HistorySample":
        text = raw.decode() if isinstance(raw, bytes) else raw
        at_ms, month, settled, total = text.split(" ")
        return cls(_int(at_ms, 0, MAX_UNIX_SECONDS * 1000), month, _int(settled), _int(total))


def encode_history(samples: Iterable[HistorySample]) -> bytes:
    return ",".join(s.encode() for s in list(samples)[-HISTORY_MAX_SAMPLES:]).encode()


def decode_history(raw: bytes | str | None) -> list[HistorySample]:
    """The samples of a :func:`history_key` value; damaged entries are skipped."""
    if not raw:
        return []
    text = raw.decode() if isinstance(raw, bytes) else raw
    out = []
    for item in text.split(","):
        try:
            out.append(HistorySample.decode(item))
        except ValueError:
            continue
    out.sort(key=lambda s: s.at_ms)
    return out


# --------------------------------------------------------------------------- upgrade from v1
#
# The v1 contract had no hash tags (a v1 admission is CROSSSLOT on a Redis Cluster). During an
# upgrade on the same Redis, the operator carries each subject's usage of the current day and
# month from the v1 hashes into the v2 ones (operator/atlas_operator/carry_over.py), for as long
# as the v1 config epoch exists. Nothing else reads a v1 name.

V1_PREFIX = "atlas:v1:"
V1_CONFIG_EPOCH = V1_PREFIX + "config:epoch"
# the fields carried over; ``v1:<field>`` in the v2 hash remembers how much came from v1 already
CARRIED_FIELDS = ("settled", "requests", "cost")


def v1_usage_keys(subject: str, now: datetime) -> tuple[str, str]:
    """The v1 (day hash, month hash) of ``subject`` at ``now``."""
    return (f"{V1_PREFIX}usage:{subject}:d:{day_of(now)}", f"{V1_PREFIX}usage:{subject}:m:{month_of(now)}")
