"""The dev stack (`make dev-up`) brought up once, driven by the official openai SDK and kubectl."""

from __future__ import annotations

import json
import os
import subprocess
import time

import openai
import pytest

from atlas_devstack.processes import pid_alive
from atlas_devstack.stack import DevStack
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
    return openai.OpenAI(base_url=stack.env["ATLAS_GATEWAY_URL"] + "/v1",
                         api_key=key or stack.env["ATLAS_DEMO_KEY"], max_retries=0, timeout=10)


def kubectl(stack, *args, **kw):
    return stack.control_plane.kubectl(*args, **kw)


def test_env_file_is_sourceable(stack):
    out = subprocess.run(["bash", "-c", f". {stack.env_file} && echo $ATLAS_DEMO_KEY && command -v kubectl "
                          "&& kubectl get atlaskeys -o name"], capture_output=True, text=True, check=True,
                         env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}).stdout.split()
    assert out[0] == stack.env["ATLAS_DEMO_KEY"] and out[0].startswith("sk-atlas-")
    assert out[1].endswith("/kubectl") and "bin" in out[1]
    assert "atlaskey.atlas.bugvanquisher.io/search-frontend" in out[2:]


def test_demo_key_works_with_the_openai_sdk(stack):
    reply = client(stack).chat.completions.create(
        model="llama-3.1-8b-instruct", max_tokens=8, messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content and reply.usage.total_tokens > 0
    with pytest.raises(openai.AuthenticationError):
        client(stack, "sk-atlas-not-a-real-key-000000000000000").models.list()


def test_a_request_is_traced_into_the_stacks_jaeger_with_its_usage_record(stack):
    from atlas_devstack.jaeger import attributes, trace_spans

    trace_id, parent = os.urandom(16).hex(), os.urandom(8).hex()
    raw = client(stack).chat.completions.with_raw_response.create(
        model="llama-3.1-8b-instruct", max_tokens=8, messages=[{"role": "user", "content": "trace me"}],
        extra_headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    spans = wait_for("the trace in the stack's Jaeger", lambda: len(s := trace_spans(stack.env["ATLAS_JAEGER_URL"],
                                                                                      trace_id)) >= 4 and s, 30)
    [server] = [s for s in spans if s["name"] == "POST /v1/chat/completions"]
    assert server["parentSpanId"] == parent
    assert attributes(server)["atlas.key"] == "default/search-frontend"
    request_id = raw.headers["x-request-id"]
    log = stack.logs / "gateway.log"
    [record] = wait_for("the usage record in gateway.log", lambda: [
        json.loads(line) for line in log.read_text().splitlines() if line.startswith("{") and request_id in line], 10)
    assert record["traceId"] == trace_id and record["key"] == "default/search-frontend"


def test_usage_shows_in_kubectl_get(stack):
    for _ in range(2):
        client(stack).chat.completions.create(model="llama-3.1-8b-instruct", max_tokens=8,
                                              messages=[{"role": "user", "content": "count me"}])

    def tokens_today():
        obj = json.loads(kubectl(stack, "get", "atlaskey", "search-frontend", "-o", "json").stdout)
        usage = (obj.get("status") or {}).get("usage") or {}
        return usage.get("requestsToday", 0) >= 2 and usage["tokensToday"]

    assert wait_for("usage in status", tokens_today, 20, interval=0.1, retry=(Exception,)) > 0
    table = kubectl(stack, "get", "atlaskeys").stdout
    assert "TOKENS TODAY" in table and "search-frontend" in table


def test_key_applied_with_kubectl_works_then_delete_refuses(stack):
    manifest = json.dumps({"apiVersion": "atlas.bugvanquisher.io/v1alpha1", "kind": "AtlasKey",
                           "metadata": {"name": "e2e-key"}, "spec": {"priority": "Standard"}})
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
                model="qwen2.5-7b-instruct", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
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
        return json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {
            "name": "e2e-grace", "labels": {"atlas.bugvanquisher.io/atlaskey": "e2e-grace"}},
                           "stringData": {"api-key": value}})

    kubectl(stack, "apply", "-f", "-", input=secret(first))
    kubectl(stack, "apply", "-f", "-", input=json.dumps({
        "apiVersion": "atlas.bugvanquisher.io/v1alpha1", "kind": "AtlasKey", "metadata": {"name": "e2e-grace"},
        "spec": {"secretName": "e2e-grace", "rotationGracePeriod": "5s"}}))

    def works(key):
        try:
            return bool(client(stack, key).chat.completions.create(
                model="llama-3.1-8b-instruct", max_tokens=2, messages=[{"role": "user", "content": "hi"}]))
        except (openai.AuthenticationError, openai.PermissionDeniedError):
            return False

    wait_for("the first key to work", lambda: works(first), 15, interval=0.05, retry=(Exception,))
    kubectl(stack, "apply", "-f", "-", input=secret(second))
    rotated = time.monotonic()
    wait_for("both keys to work during the grace", lambda: works(second) and works(first), 4, interval=0.05,
             retry=(Exception,))
    assert time.monotonic() - rotated < 5
    wait_for("the old key refused after the grace", lambda: not works(first), 15, interval=0.1, retry=(Exception,))
    assert works(second)

    def status():
        return json.loads(kubectl(stack, "get", "atlaskey", "e2e-grace", "-o", "json").stdout).get("status") or {}

    wait_for("previousKey gone from status", lambda: "previousKey" not in status(), 10, interval=0.1,
             retry=(Exception,))
    wait_for("one usage identity for both keys",
             lambda: (status().get("usage") or {}).get("requestsToday", 0) >= 4, 20, interval=0.1, retry=(Exception,))


def test_down_stops_everything_and_is_idempotent(stack):
    pids = [int(p.read_text()) for p in stack.dir.glob("**/*.pid")]
    assert len(pids) >= 5  # redis, etcd, kube-apiserver, operator, gateway, mock upstream, jaeger
    stopped = stack.down()
    assert {"gateway", "operator", "mock-upstream", "jaeger", "redis", "kube-apiserver", "etcd"} <= set(stopped)
    assert not [p for p in pids if pid_alive(p)]
    assert stack.down() == []
