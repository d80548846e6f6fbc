"""Who is calling, decided in one place for every endpoint: the key presented -> its
:class:`Principal` (config_cache.py) -> whether it may be served right now, on one clock. A
workload identity token presented as the key is its AtlasKey's Principal (identity_tokens.py)."""

from __future__ import annotations

import time
from typing import Any, Callable

from atlas_core.contract import hash_api_key

from .. import metrics
from ..http import errors
from ..store.failures import REDIS_FAILURES, is_transport_failure, reply_error
from .config_cache import ConfigCache
from .identity_tokens import TokenAuthenticator, TokenRefused, looks_like_jwt
from .principal import Principal

MISSING_KEY = "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key'."


class Authenticator:
    """The key a request presents -> the :class:`Principal` it may be served as, or the
    :class:`~atlas_gateway.http.errors.GatewayError` refusing it: 401 (no key, unknown key), 403 (not
    usable now: suspended, expired, refused by the operator, quota missing), 503/500 (Redis
    unreachable / refusing, subject to the fail mode). ``clock`` (wall time, seconds) is the one
    clock ``expiresAt`` is compared with.

    The hot path calls the three steps apart (it checks the declared body size between the
    first two, and labels a 403 with the key); every other endpoint calls :meth:`authenticate`."""

    def __init__(
        self,
        cache: ConfigCache,
        redis_health: Any,
        fail_open: bool,
        tokens: TokenAuthenticator | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self.redis_health = redis_health  # runtime.RedisHealth: fail-open logging
        self.fail_open = fail_open
        self.tokens = tokens  # None: tokens are not accepted (every credential is a static key)
        self.clock = clock
        if tokens is not None:
            tokens.clock = clock  # exp and expiresAt on the same clock

    @staticmethod
    def presented(api_key: str | None) -> str:
        """The key the request presents (headers.RequestHeaders); 401 when it presents none."""
        if api_key is None:
            raise errors.invalid_api_key(MISSING_KEY)
        return api_key

    async def identify(self, api_key: str) -> Principal:
        """The key's Principal, or a token's AtlasKey's; 401 for an unknown key or a refused
        token. Only hashes are looked up."""
        credential_hash = hash_api_key(api_key)
        tokens = self.tokens if looks_like_jwt(api_key) else None  # None: a static key
        try:
            key_hash = (
                await self._token_key(tokens, api_key, credential_hash) if tokens is not None else credential_hash
            )
            principal = await self.cache.lookup(key_hash)
        except REDIS_FAILURES as exc:
            if not is_transport_failure(exc):
                raise reply_error("config", exc) from None
            metrics.count_redis_error("config")
            self.redis_health.failed(self.fail_open, exc)
            key_hash = (tokens.stale(credential_hash) if tokens is not None else None) or credential_hash
            principal = self.cache.stale(key_hash) if self.fail_open else None
            if principal is None:
                raise errors.redis_unavailable() from None
        if principal is None:
            raise errors.invalid_api_key("Incorrect API key provided.")
        return principal

    async def _token_key(self, tokens: TokenAuthenticator, token: str, token_hash: str) -> str:
        """The key hash of the AtlasKey a token authenticates as (TokenRefused otherwise)."""
        try:
            return await tokens.key_hash(token, token_hash)
        except TokenRefused as refusal:
            # a Secret's key may look like a JWS: when it is no token of ours, it may be a key
            if refusal.foreign and await self.cache.lookup(token_hash) is not None:
                return token_hash
            raise

    def check_usable(self, principal: Principal) -> None:
        """403 when ``principal`` may not be served now (checked on every request)."""
        refusal = principal.refusal(self.clock())
        if refusal is not None:
            raise refusal

    async def authenticate(self, api_key: str | None) -> Principal:
        """All three steps: the Principal a usable key is served as."""
        principal = await self.identify(self.presented(api_key))
        self.check_usable(principal)
        return principal
