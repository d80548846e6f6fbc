"""Workload identity: a token (a projected ServiceAccount token, an OIDC ID token) presented as
the API key -> the hash of the AtlasKey it authenticates as, from what the operator publishes
in Redis (contract.IDENTITY_*): the gateway never talks to the Kubernetes API.

Verifying a token: it is a JWS with an asymmetric algorithm (``none`` and HMAC are refused: an
HMAC "secret" would be a public key anyone has); its ``iss`` is a published issuer; its
signature verifies with one of that issuer's keys (the one its ``kid`` names, or, without a
``kid``, any of them); its ``aud`` holds one of the issuer's audiences (``atlas`` by default);
``exp`` is required and, like ``nbf``, checked with a small leeway. A ServiceAccount token then
names its account (``kubernetes.io``), whose UID must still be the published one (a deleted or
recreated account is refused); an OIDC token names a User (the username claim) and Groups.

Then which AtlasKey: the binding of its ServiceAccount, or of its User, else of its Groups (two
groups binding different AtlasKeys is refused as ambiguous, never guessed).

Cost: the signature is verified once per token (its SHA-256 is the cache key, kept until the
token expires); the binding is re-read at most once per ``recheck`` seconds (the config TTL), so
that a token of a deleted ServiceAccount is refused within seconds of the operator noticing. A
cached token costs what a static key costs: one hash and a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import jwt
from jwt import PyJWK

from atlas_core import contract
from atlas_core.contract import Issuer, TokenSubject

from ..http import errors

# The JWK key types each algorithm family verifies with.
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
MAX_TOKEN_BYTES = 16 * 1024  # a header is capped anyway; a JWT of workload identity is ~1 KiB
MAX_KEYS_WITHOUT_KID = 8  # a token without ``kid`` is tried against at most this many keys


class TokenRefused(errors.GatewayError):
    """Why a token is refused, OpenAI-shaped: 401 ``invalid_api_key`` (not a valid token of a
    trusted issuer, or bound to nothing) or 403 (authenticated, but its AtlasKey cannot be
    chosen or used). Messages name claims, issuers and AtlasKeys, never the token."""

    def __init__(self, message: str, status: int = 401, code: str = "invalid_api_key", foreign: bool = False) -> None:
        super().__init__(status, message, "invalid_request_error" if status == 401 else "permission_error", code)
        # not a token of a trusted issuer at all: it may be a static key that looks like a JWS
        self.foreign = foreign


def looks_like_jwt(credential: str) -> bool:
    """A JWS compact serialisation (three base64url parts, a JSON header): static Atlas keys
    (``sk-atlas-...``) never have this shape, so the two paths cannot be confused."""
    return credential.startswith("eyJ") and credential.count(".") == 2


def _b64json(part: str) -> dict[str, Any]:
    try:
        doc = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise TokenRefused("The bearer token is not a well-formed JWT.", foreign=True) from None
    if not isinstance(doc, dict):
        raise TokenRefused("The bearer token is not a well-formed JWT.", foreign=True)
    return doc


@dataclass(frozen=True)
class VerifiedToken:
    """What a verified token says: whom it names and until when it may be used."""

    issuer: str
    expires_at: float  # unix seconds (exp)
    subjects: tuple[TokenSubject, ...]  # the ServiceAccount, or the User then the Groups
    account_uid: str | None = None  # a ServiceAccount token's account UID

    def describe(self) -> str:
        first = self.subjects[0] if self.subjects else None
        if first is None:
            return "this token"
        if first.kind == "ServiceAccount":
            return f"ServiceAccount {first.namespace}/{first.name}"
        groups = [s.name for s in self.subjects if s.kind == "Group"]
        user = next((s.name for s in self.subjects if s.kind == "User"), None)
        return f"User {user!r}" + (f" (groups {', '.join(repr(g) for g in groups)})" if groups else "")


class _Key:
    __slots__ = ("key", "kty", "alg")

    def __init__(self, key: Any, kty: str, alg: str | None) -> None:
        self.key, self.kty, self.alg = key, kty, alg  # alg: the only one it may verify, when the JWK says


class TrustedIssuer:
    """A published issuer with its keys ready to verify with (cryptography key objects)."""

    __slots__ = ("issuer", "by_kid", "keys")

    def __init__(self, issuer: Issuer) -> None:
        self.issuer = issuer
        self.by_kid: dict[str, _Key] = {}
        self.keys: list[_Key] = []
        for doc in issuer.keys:
            if doc.get("use") not in (None, "sig"):
                continue
            try:
                parsed = PyJWK(dict(doc), algorithm=_default_alg(doc))
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
                continue  # a key this library cannot use: tokens signed with it are refused
            key = _Key(parsed.key, doc["kty"], doc.get("alg"))  # (PyJWK refuses a JWK without kty)
            self.keys.append(key)
            if doc.get("kid"):
                self.by_kid[doc["kid"]] = key

    def candidates(self, alg: str, kid: str | None) -> list[Any]:
        """The keys a token signed with ``alg`` (naming ``kid``) may verify with."""
        kty = _KEY_TYPES.get(alg[:2])
        pool = [self.by_kid[kid]] if kid is not None and kid in self.by_kid else [] if kid is not None else self.keys
        return [k.key for k in pool if k.kty == kty and k.alg in (None, alg)][:MAX_KEYS_WITHOUT_KID]


def _default_alg(doc: Any) -> str:
    """An algorithm PyJWK accepts for this key (only to parse it: tokens name their own)."""
    if doc.get("kty") == "EC":
        return {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}.get(doc.get("crv"), "ES256")
    if doc.get("kty") == "OKP":
        return "EdDSA"
    return "RS256"


class IssuerDirectory:
    """contract.IDENTITY_ISSUERS, read whole (a handful of issuers) at most every ``ttl``
    seconds, and again on an unknown issuer or key id (at most once a second): a rotated key
    works as soon as the operator has published it."""

    def __init__(self, redis: Any, ttl: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.ttl = ttl
        self.clock = clock
        self.issuers: dict[str, TrustedIssuer] = {}
        self._fresh_until = 0.0
        self._loaded_at = -1.0
        self._loading: asyncio.Future | None = None

    async def get(self, url: str, kid: str | None = None, alg: str = "") -> TrustedIssuer | None:
        now = self.clock()
        if now >= self._fresh_until:
            await self._load()
        found = self.issuers.get(url)
        stale = found is None or (kid is not None and not found.candidates(alg, kid))
        if stale and self.clock() - self._loaded_at >= 1.0:
            await self._load()  # perhaps published since the last read
            found = self.issuers.get(url)
        return found

    async def _load(self) -> None:
        if self._loading is not None:
            await asyncio.shield(self._loading)
            return
        self._loading = asyncio.get_running_loop().create_future()
        try:
            raw = await self.redis.hgetall(contract.IDENTITY_ISSUERS)
            issuers = {}
            for value in raw.values():
                try:
                    issuer = Issuer.decode(value)
                except (ValueError, KeyError, TypeError):
                    continue  # a damaged entry trusts nothing
                issuers[issuer.url] = TrustedIssuer(issuer)
            self.issuers = issuers
            self._loaded_at = self.clock()
            self._fresh_until = self._loaded_at + self.ttl
            self._loading.set_result(None)
        except BaseException as exc:
            self._loading.set_exception(exc)
            self._loading.exception()  # retrieved: waiters re-raise it themselves
            raise
        finally:
            self._loading = None


def verify(token: str, issuers: TrustedIssuer, header: dict[str, Any], leeway: float) -> VerifiedToken:
    """Signature and claims of ``token`` (already split: its ``header``)."""
    issuer = issuers.issuer
    alg, kid = header["alg"], header.get("kid")
    keys = issuers.candidates(alg, kid if isinstance(kid, str) else None)
    if not keys:
        raise TokenRefused(
            f"Token key id {kid!r} is not a signing key of issuer {issuer.url!r}."
            if kid is not None
            else f"Issuer {issuer.url!r} has no {alg} signing key for this token."
        )
    verified = None
    for key in keys:
        try:
            verified = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=list(issuer.audiences),
                issuer=issuer.url,
                leeway=leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
            break
        except jwt.InvalidSignatureError:
            continue
        except jwt.ExpiredSignatureError:
            raise TokenRefused("The token has expired.") from None
        except jwt.ImmatureSignatureError:
            raise TokenRefused("The token is not valid yet (nbf/iat in the future).") from None
        except jwt.InvalidAudienceError:
            raise TokenRefused(
                "The token's audience is not this gateway's: request a token for audience "
                f"{' or '.join(repr(a) for a in issuer.audiences)}."
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRefused(f"The token has no {exc.claim!r} claim.") from None
        except jwt.InvalidTokenError as exc:
            raise TokenRefused(f"The token is not valid: {exc}.") from None
        except (ValueError, TypeError, OverflowError):  # a shape the library did not expect: never a 500
            raise TokenRefused("The token is not valid.") from None
    if verified is None:
        raise TokenRefused(f"The token's signature does not verify with issuer {issuer.url!r}'s keys.")
    exp = verified["exp"]
    if not isinstance(exp, (int, float)) or not 0 < exp <= contract.MAX_UNIX_SECONDS:
        raise TokenRefused("The token's exp is not a time.")
    expires_at = float(exp)
    if issuer.service_accounts:
        return _service_account(issuer.url, verified, expires_at)
    return _oidc(issuer, verified, expires_at)


def _service_account(url: str, claims: dict[str, Any], expires_at: float) -> VerifiedToken:
    info = claims.get("kubernetes.io")
    account = info.get("serviceaccount") if isinstance(info, dict) else None
    namespace = info.get("namespace") if isinstance(info, dict) else None
    if not (
        isinstance(account, dict)
        and isinstance(namespace, str)
        and isinstance(account.get("name"), str)
        and isinstance(account.get("uid"), str)
    ):
        raise TokenRefused("The token names no ServiceAccount (kubernetes.io claim).")
    name = account["name"]
    if claims.get("sub") != f"system:serviceaccount:{namespace}:{name}":
        raise TokenRefused("The token's subject does not match its ServiceAccount.")
    return VerifiedToken(url, expires_at, (TokenSubject("ServiceAccount", name, namespace),), account["uid"])


def _oidc(issuer: Issuer, claims: dict[str, Any], expires_at: float) -> VerifiedToken:
    username = claims.get(issuer.username_claim)
    if not isinstance(username, str) or not username:
        raise TokenRefused(f"The token has no {issuer.username_claim!r} claim (the username).")
    if issuer.username_claim == "email" and claims.get("email_verified", True) is not True:
        raise TokenRefused("The token's email is not verified (email_verified).")
    subjects = [TokenSubject("User", issuer.username_prefix + username)]
    if issuer.groups_claim:
        groups = claims.get(issuer.groups_claim) or []
        if isinstance(groups, str):
            groups = [groups]
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise TokenRefused(f"The token's {issuer.groups_claim!r} claim is not a list of groups.")
        subjects += [TokenSubject("Group", issuer.groups_prefix + g) for g in dict.fromkeys(groups) if g]
    return VerifiedToken(issuer.url, expires_at, tuple(subjects))


def split(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, unverified claims), or 401 for what cannot be a token Atlas accepts."""
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenRefused("The bearer token is too large.", foreign=True)
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise TokenRefused("The bearer token is not a well-formed JWT.", foreign=True)
    header, claims = _b64json(parts[0]), _b64json(parts[1])
    alg = header.get("alg")
    if alg not in contract.TOKEN_ALGORITHMS:
        raise TokenRefused(
            f"Token algorithm {alg!r} is not accepted: only asymmetric signatures (RS*, PS*, ES*, EdDSA).", foreign=True
        )
    if header.get("crit") is not None:
        raise TokenRefused("The token has critical header parameters this gateway does not understand.", foreign=True)
    if not isinstance(claims.get("iss"), str):
        raise TokenRefused("The token has no issuer (iss).", foreign=True)
    return header, claims


# --------------------------------------------------------------------------- which AtlasKey


async def bound_key(redis: Any, token: VerifiedToken) -> str:
    """The key hash of the AtlasKey ``token`` authenticates as (TokenRefused when none)."""
    pipe = redis.pipeline(transaction=False)
    pipe.hmget(contract.IDENTITY_BINDINGS, [s.encode() for s in token.subjects])
    if token.account_uid is not None:
        pipe.hget(contract.IDENTITY_SERVICE_ACCOUNTS, token.subjects[0].account_ref)
    replies = await pipe.execute()
    refs = [r.decode() if isinstance(r, bytes) else r for r in replies[0]]
    if token.account_uid is not None:
        current = replies[1].decode() if isinstance(replies[1], bytes) else replies[1]
        if refs[0] is not None and current != token.account_uid:
            raise TokenRefused(
                f"{token.describe()} no longer exists (deleted or recreated since the "
                "token was issued): its token is refused."
            )
    ref = _choose(token, refs)
    key_hash = await redis.hget(contract.KEY_INDEX, ref)
    if key_hash is None:
        raise TokenRefused(
            f"AtlasKey {ref}, which binds {token.describe()}, has no usable key: see its status.", 403, "key_not_ready"
        )
    return key_hash.decode() if isinstance(key_hash, bytes) else key_hash


def _choose(token: VerifiedToken, refs: list[str | None]) -> str:
    """The ServiceAccount's or User's binding, else the one AtlasKey its Groups bind."""
    if refs[0] is not None:
        return refs[0]
    by_groups = sorted({ref for subject, ref in zip(token.subjects, refs) if subject.kind == "Group" and ref})
    if len(by_groups) > 1:
        raise TokenRefused(
            f"{token.describe()}: its groups are bound by several AtlasKeys "
            f"({', '.join(by_groups)}); bind the user itself to choose one.",
            403,
            "ambiguous_subject",
        )
    if not by_groups:
        raise TokenRefused(f"No AtlasKey binds {token.describe()}.")
    return by_groups[0]


# --------------------------------------------------------------------------- the cache


class _Entry:
    __slots__ = ("token", "key_hash", "refusal", "recheck_at")

    def __init__(
        self, token: VerifiedToken | None, key_hash: str | None, refusal: TokenRefused | None, recheck_at: float
    ) -> None:
        self.token, self.key_hash, self.refusal, self.recheck_at = token, key_hash, refusal, recheck_at

    def live_key_hash(self, now: float, leeway: float) -> str | None:
        """The key hash while its token is unexpired at ``now``, else None."""
        if self.token is None or self.key_hash is None or now >= self.token.expires_at + leeway:
            return None
        return self.key_hash


class TokenAuthenticator:
    """token -> the key hash of its AtlasKey (then looked up like any key's), cached by the
    token's SHA-256: signature once per token, binding once per ``recheck`` seconds."""

    def __init__(
        self,
        redis: Any,
        *,
        leeway: float = 10.0,
        recheck: float = 1.0,
        issuer_ttl: float = 5.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.leeway = leeway
        self.recheck = recheck
        self.max_entries = max_entries
        self.clock = clock
        self.monotonic = monotonic
        self.issuers = IssuerDirectory(redis, issuer_ttl, monotonic)
        self._entries: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future[str]] = {}

    async def key_hash(self, token: str, token_hash: str) -> str:
        """The AtlasKey's key hash, or TokenRefused. Redis failures propagate (fail mode)."""
        entry = self._entries.get(token_hash)
        now = self.monotonic()
        if entry is not None and now < entry.recheck_at:
            if entry.refusal is not None:
                raise entry.refusal
            key_hash = entry.live_key_hash(self.clock(), self.leeway)
            if key_hash is not None:
                return key_hash
            raise TokenRefused("The token has expired.")
        # one resolution per token at a time: a burst of a new token's requests verifies it once
        pending = self._inflight.get(token_hash)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._inflight[token_hash] = future
        try:
            key_hash = await self._resolve(token, token_hash, entry.token if entry is not None else None, now)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters (if any) re-raise it themselves
            raise
        else:
            future.set_result(key_hash)
            return key_hash
        finally:
            del self._inflight[token_hash]

    async def _resolve(self, token: str, token_hash: str, verified: VerifiedToken | None, now: float) -> str:
        """Verify (unless already verified) and find the token's AtlasKey; remember the answer."""
        try:
            if verified is None:
                verified = await self._verify(token)
            if self.clock() >= verified.expires_at + self.leeway:
                raise TokenRefused("The token has expired.")
            key_hash = await bound_key(self.redis, verified)
        except TokenRefused as refusal:
            self._remember(token_hash, _Entry(verified, None, refusal, now + self.recheck))
            raise
        self._remember(token_hash, _Entry(verified, key_hash, None, now + self.recheck))
        return key_hash

    def stale(self, token_hash: str) -> str | None:
        """The last known key hash, however old (fail-open while Redis is unreachable)."""
        entry = self._entries.get(token_hash)
        return None if entry is None else entry.live_key_hash(self.clock(), self.leeway)

    def _remember(self, token_hash: str, entry: _Entry) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # a flood of distinct tokens must not grow memory without bound
        self._entries[token_hash] = entry

    async def _verify(self, token: str) -> VerifiedToken:
        header, claims = split(token)
        kid = header.get("kid") if isinstance(header.get("kid"), str) else None
        trusted = await self.issuers.get(claims["iss"], kid, header["alg"])
        if trusted is None:
            raise TokenRefused(f"Token issuer {claims['iss']!r} is not trusted by this gateway.", foreign=True)
        return verify(token, trusted, header, self.leeway)
