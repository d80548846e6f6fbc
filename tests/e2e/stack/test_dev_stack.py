"""The dev stack (`make dev-up`) brought up once, driven by the official openai SDK and kubectl."""

from __future__ import annotations

import json
import os
import subprocess
import time

import openai
import pytest

from atlas_devstack.oidc_issuer import OidcIssuer
from atlas_devstack.processes import pid_alive
from atlas_devstack.stack import DevStack, http
from atlas_devstack.waiting import wait_for
from tests.fixtures.cluster import require_tools

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    require_tools()
    # its own Redis whatever REDIS_URL the shell running the tests exports
    dev = DevStack(tmp_path_factory.mktemp("dev"), upstream_url="", usage_interval=1.0, redis_url="")
    with dev:
        yield dev


def client(stack, key=None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.env["ATLAS_GATEWAY_URL"] + "/v1",
        api_key=key or stack.env["ATLAS_DEMO_KEY"],
        max_retries=0,
        timeout=10,
    )


def kubectl(stack, *args, **kw):
    return stack.control_plane.kubectl(*args, **kw)


def test_env_file_is_sourceable(stack):
    out = subprocess.run(
        [
            "bash",
            "-c",
            f". {stack.env_file} && echo $ATLAS_DEMO_KEY && command -v kubectl && kubectl get atlaskeys -o name",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")},
    ).stdout.split()
    assert out[0] == stack.env["ATLAS_DEMO_KEY"] and out[0].startswith("sk-atlas-")
    assert out[1].endswith("/kubectl") and "bin" in out[1]
    assert "atlaskey.atlas.bugvanquisher.io/search-frontend" in out[2:]


def test_demo_key_works_with_the_openai_sdk(stack):
    reply = client(stack).chat.completions.create(
        model="llama-3.1-8b-instruct", max_tokens=8, messages=[{"role": "user", "content": "hello"}]
    )
    assert reply.choices[0].message.content and reply.usage.total_tokens > 0
    with pytest.raises(openai.AuthenticationError):
        client(stack, "sk-atlas-not-a-real-key-000000000000000").models.list()


def test_a_request_is_traced_into_the_stacks_jaeger_with_its_usage_record(stack):
    from atlas_devstack.jaeger import attributes, trace_spans

    trace_id, parent = os.urandom(16).hex(), os.urandom(8).hex()
    raw = client(stack).chat.completions.with_raw_response.create(
        model="llama-3.1-8b-instruct",
        max_tokens=8,
        messages=[{"role": "user", "content": "trace me"}],
        extra_headers={"traceparent": f"00-{trace_id}-{parent}-01"},
    )
    spans = wait_for(
        "the trace in the stack's Jaeger",
        lambda: len(s := trace_spans(stack.env["ATLAS_JAEGER_URL"], trace_id)) >= 4 and s,
        30,
    )
    [server] = [s for s in spans if s["name"] == "POST /v1/chat/completions"]
    assert server["parentSpanId"] == parent
    assert attributes(server)["atlas.key"] == "default/search-frontend"
    request_id = raw.headers["x-request-id"]
    log = stack.logs / "gateway.log"
    [record] = wait_for(
        "the usage record in gateway.log",
        lambda: [
            json.loads(line) for line in log.read_text().splitlines() if line.startswith("{") and request_id in line
        ],
        10,
    )
    assert record["traceId"] == trace_id and record["key"] == "default/search-frontend"


def test_usage_shows_in_kubectl_get(stack):
    for _ in range(2):
        client(stack).chat.completions.create(
            model="llama-3.1-8b-instruct", max_tokens=8, messages=[{"role": "user", "content": "count me"}]
        )

    def tokens_today():
        obj = json.loads(kubectl(stack, "get", "atlaskey", "search-frontend", "-o", "json").stdout)
        usage = (obj.get("status") or {}).get("usage") or {}
        return usage.get("requestsToday", 0) >= 2 and usage["tokensToday"]

    assert wait_for("usage in status", tokens_today, 20, interval=0.1, retry=(Exception,)) > 0
    table = kubectl(stack, "get", "atlaskeys").stdout
    assert "TOKENS TODAY" in table and "search-frontend" in table


def test_key_applied_with_kubectl_works_then_delete_refuses(stack):
    manifest = json.dumps(
        {
            "apiVersion": "atlas.bugvanquisher.io/v1alpha1",
            "kind": "AtlasKey",
            "metadata": {"name": "e2e-key"},
            "spec": {"priority": "Standard"},
        }
    )
    started = time.monotonic()
    kubectl(stack, "apply", "-f", "-", input=manifest)

    def key():
        res = kubectl(stack, "get", "secret", "e2e-key-api-key", "-o", "jsonpath={.data.api-key}", check=False)
        import base64

        return res.returncode == 0 and res.stdout and base64.b64decode(res.stdout).decode()

    value = wait_for("the generated Secret", key, 15, interval=0.1, retry=(Exception,))

    def works():
        try:
            return client(stack, value).chat.completions.create(
                model="qwen2.5-7b-instruct", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
            )
        except openai.AuthenticationError:
            return None

    wait_for("the new key to work", works, 15, interval=0.05, retry=(Exception,))
    assert time.monotonic() - started < 15
    kubectl(stack, "delete", "atlaskey", "e2e-key", "--wait=false")
    deleted = time.monotonic()

    def refused():
        try:
            client(stack, value).models.list()
            return False
        except openai.AuthenticationError:
            return True

    wait_for("the deleted key to be refused", refused, 5, interval=0.05, retry=(Exception,))
    assert time.monotonic() - deleted < 3


def test_rotation_grace_both_keys_work_then_only_the_new(stack):
    """spec.rotationGracePeriod through the whole stack: after the Secret changes, the old key
    keeps working (same usage) for the grace period, then only the new one does."""
    first, second = "sk-e2e-grace-first-0123456789", "sk-e2e-grace-second-012345678"

    def secret(value):
        # labelled: the operator watches only Secrets that carry its label (docs/operator.md)
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "e2e-grace", "labels": {"atlas.bugvanquisher.io/atlaskey": "e2e-grace"}},
                "stringData": {"api-key": value},
            }
        )

    kubectl(stack, "apply", "-f", "-", input=secret(first))
    kubectl(
        stack,
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "atlas.bugvanquisher.io/v1alpha1",
                "kind": "AtlasKey",
                "metadata": {"name": "e2e-grace"},
                "spec": {"secretName": "e2e-grace", "rotationGracePeriod": "5s"},
            }
        ),
    )

    def works(key):
        try:
            return bool(
                client(stack, key).chat.completions.create(
                    model="llama-3.1-8b-instruct", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
                )
            )
        except (openai.AuthenticationError, openai.PermissionDeniedError):
            return False

    wait_for("the first key to work", lambda: works(first), 15, interval=0.05, retry=(Exception,))
    kubectl(stack, "apply", "-f", "-", input=secret(second))
    rotated = time.monotonic()
    wait_for(
        "both keys to work during the grace",
        lambda: works(second) and works(first),
        4,
        interval=0.05,
        retry=(Exception,),
    )
    assert time.monotonic() - rotated < 5
    wait_for("the old key refused after the grace", lambda: not works(first), 15, interval=0.1, retry=(Exception,))
    assert works(second)

    def status():
        return json.loads(kubectl(stack, "get", "atlaskey", "e2e-grace", "-o", "json").stdout).get("status") or {}

    wait_for(
        "previousKey gone from status", lambda: "previousKey" not in status(), 10, interval=0.1, retry=(Exception,)
    )
    wait_for(
        "one usage identity for both keys",
        lambda: (status().get("usage") or {}).get("requestsToday", 0) >= 4,
        20,
        interval=0.1,
        retry=(Exception,),
    )


def workload_key(stack, name: str, subjects: list[dict], **spec) -> None:
    kubectl(
        stack,
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "atlas.bugvanquisher.io/v1alpha1",
                "kind": "AtlasKey",
                "metadata": {"name": name},
                "spec": {"subjects": subjects, **spec},
            }
        ),
    )


def answers(stack, token: str) -> int:
    """The status the gateway answers a chat request with this token (200 when served)."""
    try:
        client(stack, token).chat.completions.create(
            model="llama-3.1-8b-instruct", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code


def test_a_token_authenticated_request_is_traced_as_its_atlaskey_never_the_token(stack):
    from atlas_devstack.jaeger import attributes, trace_spans

    kubectl(stack, "create", "serviceaccount", "e2e-traced")
    workload_key(stack, "e2e-traced", [{"kind": "ServiceAccount", "name": "e2e-traced"}])
    token = kubectl(stack, "create", "token", "e2e-traced", "--audience", "atlas").stdout.strip()
    wait_for("the token to work", lambda: answers(stack, token) == 200, 30, interval=0.1)
    trace_id = os.urandom(16).hex()
    client(stack, token).chat.completions.create(
        model="llama-3.1-8b-instruct",
        max_tokens=2,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"},
    )
    spans = wait_for(
        "the trace in the stack's Jaeger",
        lambda: len(s := trace_spans(stack.env["ATLAS_JAEGER_URL"], trace_id)) >= 4 and s,
        30,
    )
    [server] = [s for s in spans if s["name"] == "POST /v1/chat/completions"]
    assert attributes(server)["atlas.key"] == "default/e2e-traced"
    assert token not in json.dumps(spans) and token.split(".")[2] not in json.dumps(spans)
    assert token.split(".")[2] not in (stack.logs / "gateway.log").read_text()


def test_a_service_account_token_is_its_atlaskey_through_the_openai_sdk(stack):
    """`kubectl create token SA --audience atlas` as the API key: limits, models, usage and
    metrics are the AtlasKey's; a deleted (then recreated) ServiceAccount's token is refused
    within 60 s; a token for another audience or an unbound account never."""
    kubectl(stack, "create", "serviceaccount", "e2e-runner")
    workload_key(
        stack,
        "e2e-workload",
        [{"kind": "ServiceAccount", "name": "e2e-runner"}],
        models=["llama-*"],
        limits={"tokensPerDay": 400},
    )
    token = kubectl(stack, "create", "token", "e2e-runner", "--audience", "atlas").stdout.strip()
    wait_for("the token to work", lambda: answers(stack, token) == 200, 30, interval=0.1)

    with pytest.raises(openai.PermissionDeniedError):  # the key's models
        client(stack, token).chat.completions.create(
            model="qwen2.5-7b", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
    usage = client(stack, token).get("/usage", cast_to=object)
    assert usage["key"]["name"] == "e2e-workload" and usage["usage"]["requestsToday"] >= 1
    with pytest.raises(openai.RateLimitError) as spent:  # the key's budget
        for _ in range(200):  # a bound: each request settles at least a few tokens
            client(stack, token).chat.completions.create(
                model="llama-3.1-8b-instruct", max_tokens=8, messages=[{"role": "user", "content": "spend"}]
            )
    assert spent.value.body["code"] == "insufficient_quota"
    metrics = http("GET", stack.env["ATLAS_GATEWAY_URL"] + "/metrics")[1].decode()
    assert 'key="default/e2e-workload"' in metrics and token not in metrics
    wait_for(
        "the key's usage in its status",
        lambda: (
            (json.loads(kubectl(stack, "get", "atlaskey", "e2e-workload", "-o", "json").stdout).get("status") or {})
            .get("usage", {})
            .get("tokensToday", 0)
            > 0
        ),
        20,
    )

    other_audience = kubectl(stack, "create", "token", "e2e-runner", "--audience", "kubernetes").stdout.strip()
    with pytest.raises(openai.AuthenticationError) as refused:
        client(stack, other_audience).models.list()
    assert "audience" in refused.value.body["message"] and refused.value.body["code"] == "invalid_api_key"
    kubectl(stack, "create", "serviceaccount", "e2e-stranger")
    stranger = kubectl(stack, "create", "token", "e2e-stranger", "--audience", "atlas").stdout.strip()
    with pytest.raises(openai.AuthenticationError) as refused:
        client(stack, stranger).models.list()
    assert "No AtlasKey binds ServiceAccount default/e2e-stranger" in refused.value.body["message"]

    kubectl(stack, "delete", "serviceaccount", "e2e-runner")
    deleted = time.monotonic()
    wait_for("the deleted account's token refused", lambda: answers(stack, token) == 401, 60, interval=0.1)
    print(f"\n[measure] service account deleted -> its token refused: {time.monotonic() - deleted:.2f} s")
    kubectl(stack, "create", "serviceaccount", "e2e-runner")
    fresh = kubectl(stack, "create", "token", "e2e-runner", "--audience", "atlas").stdout.strip()
    wait_for("the recreated account's new token accepted", lambda: answers(stack, fresh) in (200, 429), 60)
    assert answers(stack, token) == 401  # the old account's token stays refused


def test_oidc_tokens_of_a_bound_user_and_group_are_their_atlaskeys(stack):
    issuer = OidcIssuer(stack.env["ATLAS_OIDC_ISSUER_URL"], stack.env["ATLAS_OIDC_ISSUER_CA"])
    workload_key(stack, "e2e-alice", [{"kind": "User", "name": "alice@example.com"}])
    workload_key(stack, "e2e-search", [{"kind": "Group", "name": "team-search"}])
    alice = issuer.id_token("alice", {"email": "alice@example.com", "email_verified": True, "groups": ["team-search"]})
    bob = issuer.id_token("bob", {"email": "bob@example.com", "email_verified": True, "groups": ["team-search"]})
    eve = issuer.id_token("eve", {"email": "eve@example.com", "email_verified": True, "groups": ["eng"]})
    wait_for("alice's token to work", lambda: answers(stack, alice) == 200, 30, interval=0.1)
    assert client(stack, alice).get("/usage", cast_to=object)["key"]["name"] == "e2e-alice"  # her user first
    wait_for("bob's token to work", lambda: answers(stack, bob) == 200, 30, interval=0.1)
    assert client(stack, bob).get("/usage", cast_to=object)["key"]["name"] == "e2e-search"  # by his group
    with pytest.raises(openai.AuthenticationError) as refused:
        client(stack, eve).models.list()
    assert "No AtlasKey binds User 'eve@example.com'" in refused.value.body["message"]


def test_down_stops_everything_and_is_idempotent(stack):
    pids = [int(p.read_text()) for p in stack.dir.glob("**/*.pid")]
    assert len(pids) >= 6  # redis, etcd, kube-apiserver, operator, gateway, mock upstream, OIDC issuer, jaeger
    stopped = stack.down()
    assert {"gateway", "operator", "mock-upstream", "oidc-issuer", "jaeger", "redis", "kube-apiserver", "etcd"} <= set(
        stopped
    )
    assert not [p for p in pids if pid_alive(p)]
    assert stack.down() == []
