"""The dev stack (`make dev-up`) brought up once, driven by the official openai SDK and kubectl."""

from __future__ import annotations

import json
import os
import subprocess
import time

import openai
import pytest

from atlas_devstack.processes import pid_alive
from atlas_devstack.stack import DevStack, wait_for
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


def test_usage_shows_in_kubectl_get(stack):
    for _ in range(2):
        client(stack).chat.completions.create(model="llama-3.1-8b-instruct", max_tokens=8,
                                              messages=[{"role": "user", "content": "count me"}])

    def tokens_today():
        obj = json.loads(kubectl(stack, "get", "atlaskey", "search-frontend", "-o", "json").stdout)
        usage = (obj.get("status") or {}).get("usage") or {}
        return usage.get("requestsToday", 0) >= 2 and usage["tokensToday"]

    assert wait_for("usage in status", tokens_today, 20) > 0
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

    value = wait_for("the generated Secret", key, 15)

    def works():
        try:
            return client(stack, value).chat.completions.create(
                model="qwen2.5-7b-instruct", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        except openai.AuthenticationError:
            return None

    wait_for("the new key to work", works, 15, interval=0.05)
    assert time.monotonic() - started < 15
    kubectl(stack, "delete", "atlaskey", "e2e-key", "--wait=false")
    deleted = time.monotonic()

    def refused():
        try:
            client(stack, value).models.list()
            return False
        except openai.AuthenticationError:
            return True

    wait_for("the deleted key to be refused", refused, 5, interval=0.05)
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

    wait_for("the first key to work", lambda: works(first), 15, interval=0.05)
    kubectl(stack, "apply", "-f", "-", input=secret(second))
    rotated = time.monotonic()
    wait_for("both keys to work during the grace", lambda: works(second) and works(first), 4, interval=0.05)
    assert time.monotonic() - rotated < 5
    wait_for("the old key refused after the grace", lambda: not works(first), 15, interval=0.1)
    assert works(second)

    def status():
        return json.loads(kubectl(stack, "get", "atlaskey", "e2e-grace", "-o", "json").stdout).get("status") or {}

    wait_for("previousKey gone from status", lambda: "previousKey" not in status(), 10)
    wait_for("one usage identity for both keys", lambda: (status().get("usage") or {}).get("requestsToday", 0) >= 4, 20)


def test_down_stops_everything_and_is_idempotent(stack):
    pids = [int(p.read_text()) for p in stack.dir.glob("**/*.pid")]
    assert len(pids) >= 6  # redis, etcd, kube-apiserver, operator, gateway, mock upstream, OIDC issuer
    stopped = stack.down()
    assert {"gateway", "operator", "mock-upstream", "oidc-issuer", "redis", "kube-apiserver", "etcd"} <= set(stopped)
    assert not [p for p in pids if pid_alive(p)]
    assert stack.down() == []
