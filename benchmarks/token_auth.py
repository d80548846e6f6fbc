"""A workload identity token vs a static key: the gateway's CPU per request for the same bench key
(every limit kind, as benchmarks.keys writes it), authenticated once by its Secret's key and once
by a ServiceAccount token bound to it (goal: at most +10 %, design.md "Workload identity").

The token is real: ES256 (what kube-apiserver signs with here), the issuer, binding and account
UID published into Redis exactly as the operator publishes them (atlas_core.contract). The runs
alternate static / token in pairs (wrk, c=16), so a neighbour's load on this shared machine hits
both sides alike; the medians of the pairs are reported.

Also: the first-request cost of a token (its verification), per library, measured in-process.

``python -m benchmarks.token_auth`` runs it alone (this checkout's gateway, its own Redis and
nginx); ``make bench`` runs it as section 7 for this checkout's gateway.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

from . import nginx, tools
from .keys import BENCH_KEY, NAMESPACE, redis_client
from .runs import CHAT, Bench, Target

ISSUER = "https://bench-issuer.invalid"
ACCOUNT, ACCOUNT_UID = "bench-runner", "b3c8a6a2-0000-4000-8000-00000000beef"
PAIRS = 3
_SIGNING = None  # the bench issuer's signing key


def supported(contract) -> bool:
    """The gateway's contract has workload identity (a before/after run may compare older ones)."""
    return hasattr(contract, "IDENTITY_ISSUERS")


def write_token_binding(
    redis_url: str,
    connect=None,
    *,
    namespace: str = NAMESPACE,
    key_name: str = "bench",
    api_key: str = BENCH_KEY,
    account: str = ACCOUNT,
) -> str:
    """Publish an issuer, bind its ServiceAccount ``namespace/account`` to the AtlasKey
    ``namespace/key_name`` whose key is ``api_key`` (as the operator would), and return a token
    of that account, valid for an hour. (Also the tests' way to bind a token to a key.)"""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    from atlas_core import contract

    global _SIGNING
    signing = _SIGNING = _SIGNING or ec.generate_private_key(ec.SECP256R1())  # one issuer key per process
    public = {**ECAlgorithm.to_jwk(signing.public_key(), as_dict=True), "kid": "bench", "use": "sig"}
    r = (connect or redis_client)(redis_url)
    try:
        r.hset(
            contract.IDENTITY_ISSUERS,
            ISSUER,
            contract.Issuer(ISSUER, ("atlas",), (public,), service_accounts=True, fetched_at=time.time()).encode(),
        )
        subject = contract.TokenSubject("ServiceAccount", account, namespace)
        r.hset(contract.IDENTITY_BINDINGS, subject.encode(), f"{namespace}/{key_name}")
        r.hset(contract.IDENTITY_SERVICE_ACCOUNTS, subject.account_ref, ACCOUNT_UID)
        r.hset(contract.KEY_INDEX, f"{namespace}/{key_name}", contract.hash_api_key(api_key))
    finally:
        r.close()
    now = int(time.time())
    return jwt.encode(
        {
            "iss": ISSUER,
            "aud": ["atlas"],
            "sub": f"system:serviceaccount:{namespace}:{account}",
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": account, "uid": ACCOUNT_UID}},
        },
        signing,
        algorithm="ES256",
        headers={"kid": "bench"},
    )


@dataclass
class Comparison:
    static_us: list[float]  # gateway CPU µs per request, one per pair
    token_us: list[float]
    static_rps: list[float]
    token_rps: list[float]
    errors: int

    @property
    def ratio(self) -> float:
        return statistics.median(self.token_us) / statistics.median(self.static_us)

    def line(self) -> str:
        return (
            f"gateway CPU per request, median of {len(self.static_us)} alternating pairs (wrk c=16): "
            f"static key {statistics.median(self.static_us):,.0f} µs, token {statistics.median(self.token_us):,.0f} µs "
            f"({(self.ratio - 1) * 100:+.1f} %); req/s {statistics.median(self.static_rps):,.0f} vs "
            f"{statistics.median(self.token_rps):,.0f}" + (f"; {self.errors} ERRORS" if self.errors else "")
        )


def compare(bench: Bench, gateway_url: str, gateway_pid: int, token: str, pairs: int = PAIRS) -> Comparison:
    static = Target(
        "static key",
        gateway_url + CHAT,
        gateway_url + CHAT,
        {"Authorization": f"Bearer {BENCH_KEY}"},
        {"gateway": gateway_pid},
    )
    by_token = Target(
        "token", gateway_url + CHAT, gateway_url + CHAT, {"Authorization": f"Bearer {token}"}, {"gateway": gateway_pid}
    )
    out = Comparison([], [], [], [], 0)
    for _ in range(pairs):
        for target, cpu, rps in ((static, out.static_us, out.static_rps), (by_token, out.token_us, out.token_rps)):
            run = bench.closed(target, 16)
            cpu.append(run.cpu_us.get("gateway", float("nan")))
            rps.append(run.rps)
            out.errors += run.errors
    return out


def authentication_cost(rounds: int = 100_000) -> tuple[float, float]:
    """CPU µs per request of authenticating (credential -> Principal, the config and the token
    cached) by the static key and by a bound token, in-process on the gateway's own classes: the
    difference the wrk pairs above measure, without a shared machine's noise."""
    import asyncio

    import fakeredis

    from atlas_core import contract
    from atlas_gateway.auth.authenticator import Authenticator
    from atlas_gateway.auth.config_cache import ConfigCache
    from atlas_gateway.auth.identity_tokens import TokenAuthenticator

    from .keys import never_biting, write_key

    async def measure() -> tuple[float, float]:
        server = fakeredis.FakeServer()
        write_key(fakeredis.FakeRedis(server=server), contract, BENCH_KEY, "bench", never_biting(contract))
        token = write_token_binding("", lambda _: fakeredis.FakeRedis(server=server))
        redis = fakeredis.FakeAsyncRedis(server=server)
        auth = Authenticator(ConfigCache(redis, ttl=3600), None, False, TokenAuthenticator(redis, recheck=3600))
        identify = auth.identify  # what every request does first

        assert (await identify(BENCH_KEY)).ref == (await identify(token)).ref
        out: dict[str, list[float]] = {BENCH_KEY: [], token: []}
        for _ in range(3):
            for credential in (BENCH_KEY, token):
                started = time.process_time()
                for _ in range(rounds):
                    await identify(credential)
                out[credential].append((time.process_time() - started) / rounds * 1e6)
        return min(out[BENCH_KEY]), min(out[token])

    return asyncio.run(measure())


def first_request_cost(rounds: int = 300) -> dict[str, float]:
    """CPU µs of verifying one new token (signature and claims), per library and algorithm: what
    a token's first request adds."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    out = {}
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": ["atlas"], "sub": "s", "exp": now + 3600, "iat": now, "nbf": now}
    for alg, key, algorithm in (
        ("ES256", ec.generate_private_key(ec.SECP256R1()), ECAlgorithm),
        ("RS256", rsa.generate_private_key(65537, 2048), RSAAlgorithm),
    ):
        token = jwt.encode(claims, key, algorithm=alg)
        public = key.public_key()
        verify = {"pyjwt": lambda: jwt.decode(token, public, algorithms=[alg], audience="atlas", issuer=ISSUER)}  # noqa: B023 (run in this iteration)
        try:
            from joserfc import jwt as jose_jwt
            from joserfc.jwk import ECKey, RSAKey

            jwk = (ECKey if alg == "ES256" else RSAKey).import_key(algorithm.to_jwk(public, as_dict=True))
            verify["joserfc"] = lambda: jose_jwt.decode(token, jwk, algorithms=[alg])  # noqa: B023 (run in this iteration)
        except ImportError:
            pass
        for library, fn in verify.items():
            fn()
            started = time.process_time()
            for _ in range(rounds):
                fn()
            out[f"{library} {alg}"] = (time.process_time() - started) / rounds * 1e6
    return out


def main() -> int:
    from atlas_devstack.redis_server import RedisServer

    from .gateways import sources
    from .keys import write_bench_key

    duration = float(os.environ.get("BENCH_DURATION", "5"))
    tl = tools.ensure(profile=False, litellm=False)
    src = sources({})[-1]  # this checkout's gateway
    with (
        tempfile.TemporaryDirectory(prefix="atlas-bench-token-") as workdir,
        nginx.static_upstream(tl.nginx, workdir) as static,
        RedisServer() as redis,
    ):
        write_bench_key(redis.url)
        token = write_token_binding(redis.url)
        with src.start(redis.url, static.url + nginx.JSON_BASE, workdir) as gw:
            result = compare(Bench(tl, workdir, duration, 1.0), gw.url, gw.pid, token)
    print(result.line())
    static_us, token_us = authentication_cost()
    print(
        f"authentication alone, in-process (min of 3 x 100,000): static key {static_us:.2f} µs, token {token_us:.2f} µs"
    )
    print(
        "first request of a token (verification), CPU µs: "
        + json.dumps({k: round(v, 1) for k, v in first_request_cost().items()})
    )
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
