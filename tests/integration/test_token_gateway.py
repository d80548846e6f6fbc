"""A real gateway process: a Secret's key that happens to look like a JWS still works as the
static key it is; a JWS that is neither a trusted token nor a key gets the token's refusal."""

from __future__ import annotations

import base64
import json

import httpx

from atlas_core import contract
from tests.fixtures.gateway import write_key

BODY = {"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def jws_shaped(claims: dict) -> str:
    part = lambda doc: base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


def test_a_static_key_shaped_like_a_jws_is_still_a_static_key(redis_url, mock_upstream, start_gateway):
    key = jws_shaped({"iss": "https://vendor.example", "sub": "imported-key"})
    write_key(redis_url, key, "imported", contract.Limits(tokens_per_day=10_000))
    gw = start_gateway(redis_url, mock_upstream.url)
    served = httpx.post(gw.url + "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})
    assert served.status_code == 200, served.text
    other = jws_shaped({"iss": "https://vendor.example", "sub": "not-a-key"})
    refused = httpx.post(gw.url + "/v1/chat/completions", json=BODY, headers={"x-api-key": other})
    assert refused.status_code == 401
    assert refused.json()["error"] == {
        "message": "Token algorithm 'HS256' is not accepted: only asymmetric signatures (RS*, PS*, ES*, EdDSA).",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
