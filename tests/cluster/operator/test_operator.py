"""The operator as a real process against the real kube-apiserver, real Redis and the real
gateway: apply -> working key, traffic -> usage in kubectl, suspend/expire/delete -> refused,
rotation, a missing quota, Redis flushed, and an operator restart that changes nothing."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from typing import ClassVar

import pytest

from atlas_core import contract

from .procs import key_manifest, quota_manifest, secret_manifest, wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture(autouse=True)
def _stack(operator, gateway):
    """Every test here needs the operator and the gateway running."""


def status_of(gateway, key):
    return lambda: gateway.chat(key)[0]


def test_apply_makes_a_working_key_and_usage_shows_in_kubectl(kube, gateway, redis_client, record):
    kube.apply(quota_manifest("team", tokensPerDay=100000))
    started = time.monotonic()
    kube.apply(key_manifest("frontend", quotaRef="team", limits={"tokensPerDay": 50000}))
    key = wait_until("the generated Secret", lambda: kube.secret_key("frontend-api-key"), 30)
    wait_until("the gateway to accept the key", lambda: status_of(gateway, key)() == 200, 30)
    record("apply_to_working_key", time.monotonic() - started)

    obj = kube.get("atlaskey", "frontend")
    assert obj["metadata"]["finalizers"] == ["atlas.bugvanquisher.io/finalizer"]
    annotations = obj["metadata"].get("annotations") or {}
    assert "atlas.bugvanquisher.io/last-handled-configuration" in annotations
    assert all(a.startswith("atlas.bugvanquisher.io/") for a in annotations if "kopf" in a or "last-handled" in a)
    assert "kopf" not in obj["status"]
    assert obj["status"]["keyId"] == contract.key_id_of(contract.hash_api_key(key))
    assert kube.condition("atlaskey", "frontend")["status"] == "True"
    secret = kube.get("secret", "frontend-api-key")
    assert secret["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]

    for _ in range(3):
        assert gateway.chat(key)[0] == 200
    cols = wait_until(
        "usage in kubectl get atlaskeys",
        lambda: (c := kube.columns("atlaskey", "frontend"))["TOKENS TODAY"] not in ("", "0", "<none>") and c,
        30,
    )
    assert cols["QUOTA"] == "team" and cols["TOKENS/DAY"] == "50000" and cols["READY"] == "True"
    assert int(cols["TOKENS TODAY"]) > 0 and int(cols["TOKENS THIS MONTH"]) >= int(cols["TOKENS TODAY"])
    quota = wait_until(
        "usage and key count on the quota",
        lambda: (
            (c := kube.columns("atlasquota", "team"))["TOKENS TODAY"] not in ("", "0", "<none>")
            and c["KEYS"] == "1"
            and c
        ),
        30,
    )
    assert quota["READY"] == "True"
    usage = wait_until(
        "requestsToday 4",
        lambda: (u := (kube.get("atlaskey", "frontend")["status"]["usage"]))["requestsToday"] == 4 and u,
        30,
    )
    assert usage["day"] == contract.day_of(datetime.now(timezone.utc))


def test_suspend_and_resume(kube, gateway):
    kube.apply(key_manifest("batch"))
    key = wait_until("the generated Secret", lambda: kube.secret_key("batch-api-key"), 30)
    wait_until("accepted", lambda: status_of(gateway, key)() == 200, 30)
    kube("patch", "atlaskey", "batch", "--type=merge", "-p", '{"spec":{"suspended":true}}')
    wait_until("refused while suspended", lambda: status_of(gateway, key)() == 403, 10)
    # suspended on purpose: in effect as declared (Ready=True, so GitOps tools read it Current),
    # Serving=False saying it refuses traffic
    wait_until(
        "Serving=False/Suspended",
        lambda: kube.condition("atlaskey", "batch", "Serving").get("reason") == "Suspended",
        10,
    )
    assert (
        kube.condition("atlaskey", "batch")["status"] == "True"
        and kube.columns("atlaskey", "batch")["SERVING"] == "False"
    )
    kube("patch", "atlaskey", "batch", "--type=merge", "-p", '{"spec":{"suspended":false}}')
    wait_until("accepted again", lambda: status_of(gateway, key)() == 200, 10)


def test_expiry_takes_effect_without_another_event(kube, gateway):
    expires = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=6)
    kube.apply(key_manifest("temp", expiresAt=expires.strftime("%Y-%m-%dT%H:%M:%SZ")))
    key = wait_until("the generated Secret", lambda: kube.secret_key("temp-api-key"), 30)
    wait_until("accepted before expiry", lambda: status_of(gateway, key)() == 200, 10)
    wait_until("refused after expiry", lambda: status_of(gateway, key)() == 403, 15)
    assert datetime.now(timezone.utc) >= expires
    cond = wait_until(
        "Serving=False/Expired",
        lambda: (c := kube.condition("atlaskey", "temp", "Serving")).get("reason") == "Expired" and c,
        10,
    )
    assert cond["status"] == "False" and kube.condition("atlaskey", "temp")["status"] == "True"


def test_delete_refuses_within_two_seconds_and_keeps_usage(kube, gateway, redis_client, record):
    kube.apply(key_manifest("gone"))
    key = wait_until("the generated Secret", lambda: kube.secret_key("gone-api-key"), 30)
    wait_until("accepted", lambda: status_of(gateway, key)() == 200, 30)
    day_key, _ = contract.usage_keys(contract.key_subject(kube.ns, "gone"), datetime.now(timezone.utc))
    # The gateway settles right after answering: wait for the counter rather than race it.
    wait_until("usage settled", lambda: int(redis_client.hget(day_key, "settled") or 0) > 0, 5)
    started = time.monotonic()
    kube("delete", "atlaskey", "gone", "--wait=false")
    wait_until("refused after delete", lambda: status_of(gateway, key)() == 401, 5)
    elapsed = time.monotonic() - started
    record("delete_to_refused", elapsed)
    assert elapsed < 2.5
    settled = int(redis_client.hget(day_key, "settled"))  # includes the polls accepted before
    wait_until("the AtlasKey gone (finalizer removed)", lambda: kube.get("atlaskey", "gone") is None, 10)
    assert int(redis_client.hget(day_key, "settled")) == settled


def test_rotation_old_refused_new_accepted_usage_kept(kube, gateway):
    kube.apply(secret_manifest("ext", "sk-first-0123456789abcdef", atlaskey="rot"))
    kube.apply(key_manifest("rot", secretName="ext"))
    wait_until("first key accepted", lambda: status_of(gateway, "sk-first-0123456789abcdef")() == 200, 30)
    wait_until(
        "usage written",
        lambda: (kube.get("atlaskey", "rot")["status"].get("usage") or {}).get("requestsToday", 0) >= 1,
        15,
    )
    kube.apply(secret_manifest("ext", "sk-second-0123456789abcdef", atlaskey="rot"))
    wait_until("new key accepted", lambda: status_of(gateway, "sk-second-0123456789abcdef")() == 200, 15)
    wait_until("old key refused", lambda: status_of(gateway, "sk-first-0123456789abcdef")() == 401, 5)
    wait_until(
        "usage kept across rotation", lambda: kube.get("atlaskey", "rot")["status"]["usage"]["requestsToday"] >= 2, 15
    )
    assert kube.get("atlaskey", "rot")["status"]["keyId"] == contract.key_id_of(
        contract.hash_api_key("sk-second-0123456789abcdef")
    )
    # A Secret without `api-key` makes the key invalid and refused.
    kube("patch", "secret", "ext", "--type=json", "-p", '[{"op":"remove","path":"/data/api-key"}]')
    wait_until("SecretInvalid", lambda: kube.condition("atlaskey", "rot").get("reason") == "SecretInvalid", 10)
    wait_until("refused", lambda: status_of(gateway, "sk-second-0123456789abcdef")() == 401, 5)


def test_missing_quota_refuses_until_it_exists(kube, gateway):
    kube.apply(key_manifest("orphan", quotaRef="later"))
    key = wait_until("the generated Secret", lambda: kube.secret_key("orphan-api-key"), 30)
    wait_until("QuotaNotFound", lambda: kube.condition("atlaskey", "orphan").get("reason") == "QuotaNotFound", 10)
    assert gateway.chat(key)[0] == 403
    kube.apply(quota_manifest("later", tokensPerDay=1000))
    wait_until("accepted once the quota exists", lambda: status_of(gateway, key)() == 200, 10)
    wait_until("Ready", lambda: kube.condition("atlaskey", "orphan").get("status") == "True", 10)
    kube("delete", "atlasquota", "later", "--wait=false")
    wait_until("refused again without its quota", lambda: status_of(gateway, key)() == 403, 10)
    wait_until("QuotaNotFound again", lambda: kube.condition("atlaskey", "orphan").get("reason") == "QuotaNotFound", 10)


def test_redis_flush_restores_config(kube, gateway, redis_client, record):
    kube.apply(quota_manifest("q", tokensPerDay=1000))
    kube.apply(key_manifest("survivor", quotaRef="q"))
    key = wait_until("the generated Secret", lambda: kube.secret_key("survivor-api-key"), 30)
    wait_until("accepted", lambda: status_of(gateway, key)() == 200, 30)
    config_key = contract.key_config_key(contract.hash_api_key(key))
    before = redis_client.get(config_key)
    redis_client.flushall()
    started = time.monotonic()
    # The gateway's 1 s config cache may hide the gap; watch Redis itself.
    wait_until("config restored after FLUSHALL", lambda: redis_client.exists(contract.CONFIG_EPOCH), 30, interval=0.1)
    record("flush_to_restored", time.monotonic() - started)
    assert redis_client.get(config_key) == before
    assert redis_client.exists(contract.quota_config_key(kube.ns, "q"))
    assert redis_client.hget(contract.KEY_INDEX, f"{kube.ns}/survivor") == contract.hash_api_key(key).encode()
    wait_until("accepted after the restore", lambda: status_of(gateway, key)() == 200, 5)


class _KeyWrites:
    """Which Redis keys are written from now on, by keyspace notifications: exact per key, so
    the operator's own forecast history samples (written when a counter moved, at most once a
    minute per subject) can be told apart from config rewrites."""

    WRITES: ClassVar[set[str]] = {"set", "hset", "del", "unlink", "sadd", "srem", "hdel", "expire"}

    def __init__(self, redis_client) -> None:
        redis_client.config_set("notify-keyspace-events", "Kg$h")
        self.pubsub = redis_client.pubsub()
        self.pubsub.psubscribe(f"__keyspace@*__:{contract.PREFIX}*")
        self.pubsub.get_message(timeout=1)  # the psubscribe confirmation: listening from here on

    def collect(self) -> set[str]:
        written = set()
        while (message := self.pubsub.get_message(timeout=0.5)) is not None:
            if message["type"] == "pmessage" and message["data"].decode() in self.WRITES:
                written.add(message["channel"].decode().split(":", 1)[1])
        self.pubsub.close()
        return {k for k in written if not k.startswith(contract.PREFIX + "history:")}


def test_restart_changes_nothing(kube, gateway, redis_client, operator, kubectl):
    kube.apply(quota_manifest("q", tokensPerDay=1000))
    kube.apply(key_manifest("steady", quotaRef="q"))
    key = wait_until("the generated Secret", lambda: kube.secret_key("steady-api-key"), 30)
    wait_until("accepted", lambda: status_of(gateway, key)() == 200, 30)
    wait_until(
        "usage settled in status",
        lambda: (kube.get("atlaskey", "steady")["status"].get("usage") or {}).get("requestsToday") == 1,
        15,
    )
    wait_until("quota status settled", lambda: kube.columns("atlasquota", "q")["KEYS"] == "1", 15)

    def versions():
        return {
            kind: kube.get(kind, name)["metadata"]["resourceVersion"]
            for kind, name in (("atlaskey", "steady"), ("atlasquota", "q"), ("secret", "steady-api-key"))
        }

    before, writes = versions(), _KeyWrites(redis_client)

    def steady_events():
        out = kube("get", "events", "-o", "jsonpath={range .items[*]}{.involvedObject.name}{'\\n'}{end}").stdout
        return out.split().count("steady")

    events_before = steady_events()
    operator.stop()
    resumed = operator.log_text().count(f"[{kube.ns}/steady] Handler 'atlaskey_changed' succeeded")
    operator.start()
    wait_until(
        "the restarted operator resumed the key",
        lambda: operator.log_text().count(f"[{kube.ns}/steady] Handler 'atlaskey_changed' succeeded") > resumed,
        30,
    )
    # A canary whose usage reaches its status proves the restarted operator got past its
    # resume work and through at least one full usage write-back cycle.
    # (No gateway traffic here: its Lua scripts' writes would count in commandstats too.)
    kube.apply(key_manifest("canary"))
    wait_until("canary Ready", lambda: kube.condition("atlaskey", "canary").get("status") == "True", 30)
    day_key, _ = contract.usage_keys(contract.key_subject(kube.ns, "canary"), datetime.now(timezone.utc))
    redis_client.hincrby(day_key, "requests", 1)
    wait_until(
        "canary usage written back",
        lambda: (kube.get("atlaskey", "canary")["status"].get("usage") or {}).get("requestsToday") == 1,
        15,
    )
    assert versions() == before
    # The canary's own config and this test's counter bump; nothing for "steady" or "q".
    canary_day = day_key
    written = writes.collect() - {canary_day}
    assert contract.key_config_key(contract.hash_api_key(key)) not in written
    assert contract.quota_config_key(kube.ns, "q") not in written
    assert not [k for k in written if "steady" in k or k.endswith(f"{kube.ns}/q")], written
    assert any(k.startswith(contract.key_config_key("")) for k in written), written  # the canary's config
    assert steady_events() == events_before


def test_namespace_selection(control_plane, kubectl, kube, tmp_path):
    """ATLAS_NAMESPACES limits what an operator touches: a second operator (own Redis) that
    watches only this test's namespace writes config for its keys and ignores another one's."""
    import redis as redislib

    from atlas_devstack.redis_server import RedisServer

    from .procs import Kube, operator_proc

    other = Kube(kubectl, f"{kube.ns}-x")
    kubectl("create", "namespace", other.ns)
    with RedisServer() as own_redis:
        proc = operator_proc(control_plane.kubeconfig, own_redis.url, tmp_path / "scoped.log")
        proc.env["ATLAS_NAMESPACES"] = kube.ns
        proc.start()
        try:
            client = redislib.Redis.from_url(own_redis.url)
            other.apply(key_manifest("outside"))
            kube.apply(key_manifest("inside"))
            wait_until(
                "the scoped operator wrote its namespace's key",
                lambda: client.hget(contract.KEY_INDEX, f"{kube.ns}/inside"),
                30,
            )
            # "outside" is handled by the session operator (cluster-wide) but never by this one.
            wait_until(
                "outside Ready (session operator)",
                lambda: other.condition("atlaskey", "outside").get("status") == "True",
                30,
            )
            assert client.hget(contract.KEY_INDEX, f"{other.ns}/outside") is None
            assert f"{other.ns}/outside" not in proc.log_text()
            client.close()
        finally:
            proc.stop()
            kubectl("delete", "namespace", other.ns, "--wait=false", check=False)


def test_events_posted_and_no_permission_errors(kube, operator):
    """Runs last: the operator (with only the chart's RBAC) posted Events and was never
    refused by the API server."""
    kube.apply(key_manifest("evented", quotaRef="missing"))
    wait_until("QuotaNotFound", lambda: kube.condition("atlaskey", "evented").get("reason") == "QuotaNotFound", 30)
    reasons = wait_until(
        "Events for the key",
        lambda: (
            set(
                kube(
                    "get",
                    "events",
                    "--field-selector",
                    "involvedObject.name=evented",
                    "-o",
                    "jsonpath={.items[*].reason}",
                ).stdout.split()
            )
            >= {"SecretGenerated", "QuotaNotFound"}
            and True
        ),
        10,
    )
    assert reasons
    log = operator.log_text()
    # An RBAC denial reads `... is forbidden: User "system:serviceaccount:..." cannot ...`.
    assert "is forbidden: User" not in log, log[-3000:]
    assert "NamespaceTerminating" not in log  # left-over test namespaces are handled quietly
    assert "sk-atlas-" not in log  # no key material in logs


def test_shrink_from_the_manifest_lowers_the_forwarded_cap(kube, gateway):
    import urllib.request

    kube.apply(
        key_manifest("shrinker", limits={"tokensPerDay": 300}, onBudgetShortfall="Shrink", minCompletionTokens=16)
    )
    key = wait_until("the generated Secret", lambda: kube.secret_key("shrinker-api-key"), 30)
    wait_until("accepted", lambda: status_of(gateway, key)() == 200, 30)
    body = json.dumps(
        {"model": "llama-3.1-8b-instruct", "max_tokens": 5000, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    request = urllib.request.Request(
        gateway.url + "/v1/chat/completions",
        body,
        method="POST",
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
        cap = int(resp.headers["x-atlas-max-tokens"])
    assert 16 <= cap < 300  # what the day budget still held, not a 429
    kube(
        "patch",
        "atlaskey",
        "shrinker",
        "--type=merge",
        "-p",
        '{"spec":{"onBudgetShortfall":"Reject","minCompletionTokens":null}}',
    )
    wait_until("Reject again: the same request is refused", lambda: gateway.chat(key, tokens=5000)[0] == 429, 15)
