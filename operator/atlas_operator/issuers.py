"""The token issuers the gateway trusts, published into Redis (contract.IDENTITY_ISSUERS).

* The cluster's own issuer (``ATLAS_SERVICE_ACCOUNT_TOKENS``, on by default): the API server's
  OIDC discovery (``/.well-known/openid-configuration``) names the issuer its ServiceAccount
  tokens carry; its signing keys are read from the API server's ``/openid/v1/jwks`` (the
  document the discovery's ``jwks_uri`` serves; read from the API server even when a cluster
  publishes that URI elsewhere, so that the operator's RBAC is these two non-resource URLs).
* OIDC issuers (``ATLAS_JWT_ISSUERS``, the chart's ``workloadIdentity.jwt``): a JSON list shaped
  like kube-apiserver's structured authentication configuration ``jwt`` entries, whose names it
  keeps: ``issuer.url``, ``issuer.discoveryURL``, ``issuer.audiences``,
  ``issuer.certificateAuthority`` (PEM), ``claimMappings.username.claim``/``prefix`` and
  ``claimMappings.groups.claim``/``prefix``. Anything else (validation rules, user info
  mappings) is refused at start-up rather than silently not enforced.

Every ``ATLAS_JWKS_REFRESH_SECONDS`` the keys are fetched again and written when they changed
(a rotation adds a key before signing with it). A failed fetch keeps what was published: an
issuer that is briefly unreachable does not lock its tokens out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.request
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import urlparse

from atlas_core import contract
from atlas_core.contract import Issuer

log = logging.getLogger(__name__)

DISCOVERY_PATH = "/.well-known/openid-configuration"
CLUSTER_JWKS_PATH = "/openid/v1/jwks"
FETCH_TIMEOUT = 10.0
MAX_DOCUMENT_BYTES = 1 << 20  # a discovery document or a JWKS is a few KB


class IssuerConfigError(ValueError):
    """``ATLAS_JWT_ISSUERS`` cannot be used as written (the message names the entry and field)."""


@dataclass(frozen=True)
class OidcIssuer:
    """One configured OIDC issuer (an ``ATLAS_JWT_ISSUERS`` entry)."""

    url: str
    audiences: tuple[str, ...]
    discovery_url: str = ""
    certificate_authority: str = ""  # PEM; "": the system's trust store
    username_claim: str = "sub"
    username_prefix: str = ""
    groups_claim: str = ""
    groups_prefix: str = ""

    def unpublished(self) -> Issuer:
        """What the gateway is told about this issuer, before its keys are known."""
        return Issuer(
            url=self.url,
            audiences=self.audiences,
            username_claim=self.username_claim,
            username_prefix=self.username_prefix,
            groups_claim=self.groups_claim,
            groups_prefix=self.groups_prefix,
        )


_ENTRY_FIELDS = {"issuer", "claimMappings"}
_ISSUER_FIELDS = {"url", "discoveryURL", "audiences", "audienceMatchPolicy", "certificateAuthority"}
_MAPPING_FIELDS = {"username", "groups"}
_CLAIM_FIELDS = {"claim", "prefix"}


def _unknown(where: str, doc: Any, allowed: set[str]) -> None:
    if not isinstance(doc, dict):
        raise IssuerConfigError(f"{where}: must be an object")
    extra = sorted(set(doc) - allowed)
    if extra:
        raise IssuerConfigError(f"{where}: unsupported field(s) {', '.join(extra)} (Atlas would not enforce them)")


def _https(where: str, url: Any) -> str:
    if not isinstance(url, str) or urlparse(url).scheme != "https" or not urlparse(url).netloc:
        raise IssuerConfigError(f"{where}: must be an https:// URL, got {url!r}")
    return url


def parse_oidc_issuers(text: str | None, default_audience: str) -> tuple[OidcIssuer, ...]:
    """``ATLAS_JWT_ISSUERS`` (JSON; empty: none) -> the issuers; IssuerConfigError names what is wrong."""
    if not text or not text.strip():
        return ()
    try:
        entries = json.loads(text)
    except ValueError as exc:
        raise IssuerConfigError(f"ATLAS_JWT_ISSUERS is not JSON: {exc}") from None
    if not isinstance(entries, list):
        raise IssuerConfigError("ATLAS_JWT_ISSUERS must be a JSON list of jwt entries")
    out: list[OidcIssuer] = []
    for i, entry in enumerate(entries):
        where = f"jwt[{i}]"
        _unknown(where, entry, _ENTRY_FIELDS)
        issuer = entry.get("issuer")
        _unknown(f"{where}.issuer", issuer, _ISSUER_FIELDS)
        url = _https(f"{where}.issuer.url", issuer.get("url"))
        if url.endswith("/") or any(o.url == url for o in out):
            raise IssuerConfigError(
                f"{where}.issuer.url: {url!r} must be unique and written as the tokens' iss (no trailing slash)"
            )
        audiences = issuer.get("audiences") or [default_audience]
        if not isinstance(audiences, list) or not all(isinstance(a, str) and a for a in audiences):
            raise IssuerConfigError(f"{where}.issuer.audiences: must be a list of non-empty strings")
        if issuer.get("audienceMatchPolicy") not in (None, "MatchAny"):
            raise IssuerConfigError(f"{where}.issuer.audienceMatchPolicy: only MatchAny is supported")
        discovery = issuer.get("discoveryURL") or ""
        if discovery:
            _https(f"{where}.issuer.discoveryURL", discovery)
        ca = issuer.get("certificateAuthority") or ""
        if ca and "-----BEGIN CERTIFICATE-----" not in ca:
            raise IssuerConfigError(f"{where}.issuer.certificateAuthority: must be PEM certificates")
        mappings = entry.get("claimMappings") or {}
        _unknown(f"{where}.claimMappings", mappings, _MAPPING_FIELDS)
        username = mappings.get("username") or {}
        groups = mappings.get("groups") or {}
        _unknown(f"{where}.claimMappings.username", username, _CLAIM_FIELDS)
        _unknown(f"{where}.claimMappings.groups", groups, _CLAIM_FIELDS)
        for name, value in (
            ("username.claim", username.get("claim")),
            ("username.prefix", username.get("prefix")),
            ("groups.claim", groups.get("claim")),
            ("groups.prefix", groups.get("prefix")),
        ):
            if value is not None and not isinstance(value, str):
                raise IssuerConfigError(f"{where}.claimMappings.{name}: must be a string")
        out.append(
            OidcIssuer(
                url=url,
                audiences=tuple(audiences),
                discovery_url=discovery,
                certificate_authority=ca,
                username_claim=username.get("claim") or "sub",
                username_prefix=username.get("prefix") or "",
                groups_claim=groups.get("claim") or "",
                groups_prefix=groups.get("prefix") or "",
            )
        )
    return tuple(out)


# --------------------------------------------------------------------------- fetching


def _get_json(url: str, context: ssl.SSLContext) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"accept": "application/json"})
    with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT, context=context) as response:
        body = response.read(MAX_DOCUMENT_BYTES + 1)
    if len(body) > MAX_DOCUMENT_BYTES:
        raise ValueError(f"{url}: document larger than {MAX_DOCUMENT_BYTES} bytes")
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise ValueError(f"{url}: not a JSON object")
    return doc


def _jwks_keys(where: str, jwks: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    keys = contract.public_jwks(jwks)
    if not keys:
        raise ValueError(f"{where}: no RSA, EC or OKP signing key in the JWKS")
    return tuple(keys)


async def fetch_oidc(issuer: OidcIssuer, now: float) -> Issuer:
    """Discovery (its ``issuer`` must be the configured URL), then its ``jwks_uri``."""
    context = ssl.create_default_context(cadata=issuer.certificate_authority or None)
    discovery_url = issuer.discovery_url or issuer.url + DISCOVERY_PATH
    discovery = await asyncio.to_thread(_get_json, discovery_url, context)
    if discovery.get("issuer") != issuer.url:
        raise ValueError(
            f"{discovery_url}: discovery names issuer {discovery.get('issuer')!r}, not the configured {issuer.url!r}"
        )
    jwks_uri = _https(f"{discovery_url} jwks_uri", discovery.get("jwks_uri"))
    jwks = await asyncio.to_thread(_get_json, jwks_uri, context)
    return replace(issuer.unpublished(), keys=_jwks_keys(jwks_uri, jwks), fetched_at=now)


async def fetch_cluster(get_json: Callable[[str], Awaitable[dict[str, Any]]], audience: str, now: float) -> Issuer:
    """The API server's own issuer, through the operator's (authenticated) API client."""
    discovery = await get_json(DISCOVERY_PATH)
    url = discovery.get("issuer")
    if not isinstance(url, str) or not url:
        raise ValueError(f"{DISCOVERY_PATH}: no issuer")
    jwks = await get_json(CLUSTER_JWKS_PATH)
    return Issuer(
        url=url, audiences=(audience,), keys=_jwks_keys(CLUSTER_JWKS_PATH, jwks), service_accounts=True, fetched_at=now
    )


# --------------------------------------------------------------------------- publishing


def _decoded(raw: dict[Any, Any]) -> dict[str, Issuer | None]:
    out: dict[str, Issuer | None] = {}
    for field, value in raw.items():
        url = field.decode() if isinstance(field, bytes) else field
        try:
            out[url] = Issuer.decode(value)
        except (ValueError, KeyError, TypeError):
            out[url] = None  # damaged: rewritten
    return out


async def publish(
    redis: Any, fetched: Iterable[Issuer], configured: Iterable[str], keep_cluster: bool = False
) -> list[str]:
    """Write the issuers whose keys changed and drop those no longer configured; an issuer
    configured but not fetched yet keeps what it had (``keep_cluster``: the cluster's issuer,
    whose URL is known only once fetched). Returns the URLs written."""
    current = _decoded(await redis.hgetall(contract.IDENTITY_ISSUERS))
    wanted = set(configured)
    writes = {i.url: i for i in fetched if not i.same_publication(current.get(i.url))}
    stale = [
        url
        for url, issuer in current.items()
        if url not in wanted and not (keep_cluster and issuer is not None and issuer.service_accounts)
    ]
    if writes or stale:
        tx = redis.pipeline(transaction=True)
        if writes:
            tx.hset(contract.IDENTITY_ISSUERS, mapping={url: i.encode() for url, i in writes.items()})
        if stale:
            tx.hdel(contract.IDENTITY_ISSUERS, *stale)
        await tx.execute()
    return sorted(writes)


class IssuerRefresher:
    """Fetches every trusted issuer's keys and publishes them; remembers the last fetch of each
    so that self-healing can rewrite them without fetching."""

    def __init__(
        self,
        oidc: tuple[OidcIssuer, ...],
        cluster_audience: str | None,
        get_json: Callable[[str], Awaitable[dict[str, Any]]] | None,
    ) -> None:
        self.oidc = oidc
        self.cluster_audience = cluster_audience  # None: ServiceAccount tokens are not trusted
        self.get_json = get_json
        self.last: dict[str, Issuer] = {}  # configured source ("cluster" or its URL) -> last fetch
        self.errors: dict[str, str] = {}  # source -> why its last fetch failed

    @property
    def enabled(self) -> bool:
        return bool(self.oidc) or self.cluster_audience is not None

    def unfetched(self) -> bool:
        """Some trusted issuer has never been fetched (so nothing of it is published yet)."""
        sources = [i.url for i in self.oidc] + (["cluster"] if self.cluster_audience is not None else [])
        return any(s not in self.last for s in sources)

    async def _fetch(self, source: str, fetch: Awaitable[Issuer]) -> None:
        try:
            self.last[source] = await fetch
        except Exception as exc:  # noqa: BLE001 - one issuer's failure is its own
            message = f"{type(exc).__name__}: {exc}"
            if self.errors.get(source) != message:
                log.warning(
                    "token issuer %s: fetching its signing keys failed: %s (kept what was published)", source, message
                )
            self.errors[source] = message
        else:
            if self.errors.pop(source, None) is not None:
                log.info("token issuer %s: signing keys fetched again", source)

    async def refresh(self, redis: Any) -> list[str]:
        now = time.time()
        jobs = [self._fetch(i.url, fetch_oidc(i, now)) for i in self.oidc]
        if self.cluster_audience is not None and self.get_json is not None:
            jobs.append(self._fetch("cluster", fetch_cluster(self.get_json, self.cluster_audience, now)))
        await asyncio.gather(*jobs)
        written = await self.republish(redis)
        if written:
            log.info("token issuers published: %s", ", ".join(written))
        return written

    async def republish(self, redis: Any) -> list[str]:
        """Publish the last fetch of each issuer (self-healing after Redis lost its data)."""
        cluster = self.last.get("cluster")
        urls = [i.url for i in self.oidc] + ([cluster.url] if cluster is not None else [])
        return await publish(
            redis, self.last.values(), urls, keep_cluster=cluster is None and self.cluster_audience is not None
        )
