"""`kubectl atlas` run by the real kubectl (found on PATH) against the real kube-apiserver: usage,
top, key reveal and rotate, kubeconfig/context/namespace handling and errors. No operator runs
here: statuses are written through the status subresource, as the operator writes them, so the
figures are exact. tests/cluster/operator/test_kubectl_atlas_live.py runs it beside the operator."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from atlas_core import contract
from atlas_devstack.redis_server import free_port

pytestmark = pytest.mark.cluster

API = "atlas.bugvanquisher.io/v1alpha1"


def today() -> dict:
    now = datetime.now(timezone.utc)
    return {"day": now.strftime("%Y-%m-%d"), "month": now.strftime("%Y-%m")}


def apply(
    kubectl, namespace: str, kind: str, name: str, spec: dict, status: dict | None = None, labels: dict | None = None
) -> None:
    meta = {"name": name, "namespace": namespace, **({"labels": labels} if labels else {})}
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": API, "kind": kind, "metadata": meta, "spec": spec}))
    if status is not None:
        kubectl(
            "patch",
            kind.lower(),
            name,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": status}),
        )


def secret(
    kubectl, namespace: str, name: str, value: str, labels: dict | None = None, owner: dict | None = None
) -> None:
    meta = {"name": name, "namespace": namespace, "labels": labels or {}}
    if owner:
        meta["ownerReferences"] = [owner]
    kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": {"api-key": value}}),
    )


def table(text: str) -> list[dict[str, str]]:
    """Rows of a kubectl-style table as {HEADER: cell}; columns are 3+ spaces apart."""
    import re

    lines = text.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+(?: \S+)*", lines[0])]
    heads = [lines[0][s:e].strip() for s, e in zip(starts, starts[1:] + [None])]
    return [{h: line[s:e].strip() for h, s, e in zip(heads, starts, starts[1:] + [None])} for line in lines[1:]]


@pytest.fixture
def team(kubectl, namespace):
    """A namespace with a quota and three keys at known usage."""
    apply(
        kubectl,
        namespace,
        "AtlasQuota",
        "shared",
        {"limits": {"tokensPerDay": 10000, "tokensPerMonth": 100000}},
        {"usage": {**today(), "tokensToday": 2500, "tokensThisMonth": 9000}},
    )
    apply(
        kubectl,
        namespace,
        "AtlasKey",
        "busy",
        {"quotaRef": "shared", "limits": {"tokensPerDay": 1000}},
        {
            "usage": {**today(), "tokensToday": 900, "requestsToday": 30},
            "forecast": {"tokensPerHour": 120000, "basis": "last 5m"},
        },
        labels={"tier": "gold"},
    )
    apply(
        kubectl,
        namespace,
        "AtlasKey",
        "calm",
        {"limits": {"tokensPerDay": 1000}},
        {"usage": {**today(), "tokensToday": 100, "requestsToday": 2}},
    )
    apply(kubectl, namespace, "AtlasKey", "open", {}, {"usage": {**today(), "tokensToday": 4000}})
    return namespace


def test_usage_shows_each_budget_used_limit_percent_and_forecast(kubectl_atlas, team):
    rows = table(kubectl_atlas("usage", "-n", team).stdout)
    got = {(r["KIND"], r["NAME"], r["BUDGET"]): r for r in rows}
    assert set(got) == {
        ("quota", "shared", "tokensPerDay"),
        ("quota", "shared", "tokensPerMonth"),
        ("key", "busy", "tokensPerDay"),
        ("key", "calm", "tokensPerDay"),
        ("key", "open", "<none>"),
    }
    busy = got["key", "busy", "tokensPerDay"]
    assert (busy["USED"], busy["LIMIT"], busy["USED%"], busy["TOKENS/HOUR"]) == ("900", "1000", "90.0%", "120000")
    # 100 tokens left at 120000/hour: three seconds from now
    exhausts = datetime.fromisoformat(busy["EXHAUSTS"].replace("Z", "+00:00"))
    assert abs((exhausts - datetime.now(timezone.utc)).total_seconds()) < 60
    assert got["key", "calm", "tokensPerDay"]["EXHAUSTS"] == "<none>"  # no burn rate: no forecast
    assert (got["key", "open", "<none>"]["USED"], got["key", "open", "<none>"]["LIMIT"]) == ("4000", "<none>")
    assert "NAMESPACE" not in rows[0]


def test_usage_sorts_and_filters_like_kubectl(kubectl_atlas, team):
    by_percent = table(kubectl_atlas("usage", "-n", team, "--sort-by", "percent").stdout)
    assert [(r["NAME"], r["USED%"]) for r in by_percent] == [
        ("busy", "90.0%"),
        ("shared", "25.0%"),
        ("calm", "10.0%"),
        ("shared", "9.0%"),
        ("open", "<none>"),
    ]
    gold = table(kubectl_atlas("usage", "-n", team, "-l", "tier=gold").stdout)
    assert [r["NAME"] for r in gold] == ["busy"]
    rows = json.loads(kubectl_atlas("usage", "-n", team, "-o", "json").stdout)
    assert {
        "namespace": team,
        "kind": "key",
        "name": "calm",
        "budget": "tokensPerDay",
        "used": 100,
        "limit": 1000,
        "percent": 10.0,
        "tokensPerHour": None,
        "exhaustsAt": None,
    } in rows


def test_all_namespaces_adds_the_namespace_column(kubectl_atlas, kubectl, team, namespace_factory):
    other = namespace_factory()
    apply(
        kubectl,
        other,
        "AtlasKey",
        "elsewhere",
        {"limits": {"tokensPerDay": 10}},
        {"usage": {**today(), "tokensToday": 10}},
    )
    rows = table(kubectl_atlas("usage", "-A", "--sort-by", "percent").stdout)
    mine = [(r["NAMESPACE"], r["NAME"], r["EXHAUSTS"]) for r in rows if r["NAMESPACE"] in (team, other)]
    assert mine[0] == (other, "elsewhere", "spent")
    assert {n for _, n, _ in mine} == {"busy", "calm", "open", "shared", "elsewhere"}


def test_top_lists_the_burn_rate_busiest_first(kubectl_atlas, team):
    rows = table(kubectl_atlas("top", "-n", team).stdout)
    assert [(r["NAME"], r["TOKENS/HOUR"], r["BASIS"]) for r in rows][0] == ("busy", "120000", "last 5m")
    assert {r["NAME"]: r["TOKENS/HOUR"] for r in rows[1:]} == {"shared": "<none>", "calm": "<none>", "open": "<none>"}
    by_requests = table(kubectl_atlas("top", "-n", team, "--sort-by", "requests").stdout)
    assert [r["NAME"] for r in by_requests][:2] == ["busy", "calm"]


def test_namespace_and_context_come_from_the_kubeconfig_as_kubectl_reads_it(
    kubectl_atlas, control_plane, team, namespace_factory, tmp_path
):
    elsewhere = namespace_factory()
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    (ctx,) = config["contexts"]
    config["contexts"] = [
        {"name": "team", "context": {**ctx["context"], "namespace": team}},
        {"name": "other", "context": {**ctx["context"], "namespace": elsewhere}},
    ]
    config["current-context"] = "team"
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(config))
    assert {r["NAME"] for r in table(kubectl_atlas("usage", kubeconfig=path).stdout)} == {
        "busy",
        "calm",
        "open",
        "shared",
    }
    empty = kubectl_atlas("usage", "--context", "other", kubeconfig=path)
    assert empty.stdout == "" and f'namespace "{elsewhere}"' in empty.stderr
    # --kubeconfig wins over $KUBECONFIG, and -n over the context's namespace
    res = kubectl_atlas(
        "usage", "--kubeconfig", str(path), "-n", team, "--context", "other", kubeconfig=tmp_path / "missing"
    )
    assert "busy" in res.stdout
    # $KUBECONFIG may list several files: the first that names a current context wins (kubectl's
    # rule; the kubernetes client alone would take the last)
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_text(yaml.safe_dump({**config, "contexts": config["contexts"][:1], "current-context": "team"}))
    second.write_text(yaml.safe_dump({**config, "contexts": config["contexts"][1:], "current-context": "other"}))
    merged = kubectl_atlas("usage", kubeconfig=f"{first}:{second}")
    assert "busy" in merged.stdout


def test_reveal_prints_the_key_and_nothing_else(kubectl_atlas, kubectl, namespace):
    apply(kubectl, namespace, "AtlasKey", "k", {"secretName": "held-elsewhere"})
    secret(kubectl, namespace, "held-elsewhere", "sk-user-supplied-0123456789\n")
    res = kubectl_atlas("key", "reveal", "k", "-n", namespace)
    assert res.stdout == "sk-user-supplied-0123456789\n" and res.stderr == ""


@pytest.mark.parametrize(
    "setup,message",
    [
        ("no-key", 'AtlasKey "ghost" not found in namespace'),
        ("no-secret", 'Secret "ghost-api-key" not found in namespace'),
        ("empty", "the Secret has no data key 'api-key'"),
    ],
)
def test_reveal_says_clearly_what_is_missing(kubectl_atlas, kubectl, namespace, setup, message):
    if setup != "no-key":
        apply(kubectl, namespace, "AtlasKey", "ghost", {})
    if setup == "empty":
        kubectl("create", "secret", "generic", "ghost-api-key", "-n", namespace, "--from-literal=other=x")
    res = kubectl_atlas("key", "reveal", "ghost", "-n", namespace, check=False)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.startswith("error: ") and message in res.stderr


def secret_value(kubectl, namespace: str, name: str) -> tuple[str, dict]:
    obj = json.loads(kubectl("get", "secret", name, "-n", namespace, "-o", "json").stdout)
    return base64.b64decode(obj["data"]["api-key"]).decode(), obj["metadata"].get("labels") or {}


def test_rotate_writes_a_fresh_key_into_the_same_secret_and_labels_it(kubectl_atlas, kubectl, namespace):
    apply(kubectl, namespace, "AtlasKey", "k", {"rotationGracePeriod": "10m"})
    secret(kubectl, namespace, "k-api-key", "sk-old-key-0123456789")
    res = kubectl_atlas("key", "rotate", "k", "-n", namespace, "--wait=false")
    value, labels = secret_value(kubectl, namespace, "k-api-key")
    assert value.startswith("sk-atlas-") and len(value) == len("sk-atlas-") + 32
    assert labels["atlas.bugvanquisher.io/atlaskey"] == "k"  # else the operator would not notice
    old_id = contract.key_id_of(contract.hash_api_key("sk-old-key-0123456789"))
    new_id = contract.key_id_of(contract.hash_api_key(value))
    assert f"key {old_id} replaced by {new_id}" in res.stdout
    assert "keeps working for 10m" in res.stdout and value not in res.stdout + res.stderr
    assert kubectl_atlas("key", "reveal", "k", "-n", namespace).stdout.strip() == value


def test_rotate_refuses_a_secret_another_controller_owns(kubectl_atlas, kubectl, namespace):
    apply(kubectl, namespace, "AtlasKey", "sealed", {})
    secret(
        kubectl,
        namespace,
        "sealed-api-key",
        "sk-from-git-0123456789",
        owner={
            "apiVersion": "bitnami.com/v1alpha1",
            "kind": "SealedSecret",
            "name": "sealed-api-key",
            "uid": "0b8c3f4e-0000-4000-8000-000000000001",
            "controller": True,
        },
    )
    res = kubectl_atlas("key", "rotate", "sealed", "-n", namespace, check=False)
    assert res.returncode == 1 and "managed by SealedSecret/sealed-api-key" in res.stderr
    assert secret_value(kubectl, namespace, "sealed-api-key")[0] == "sk-from-git-0123456789"


def test_rotate_waits_out_a_running_grace_period_unless_forced(kubectl_atlas, kubectl, namespace):
    until = (datetime.now(timezone.utc) + timedelta(minutes=9)).strftime("%Y-%m-%dT%H:%M:%SZ")
    apply(
        kubectl,
        namespace,
        "AtlasKey",
        "k",
        {"rotationGracePeriod": "10m"},
        {"keyId": "bbbbbbbb", "previousKey": {"keyId": "aaaaaaaa", "expiresAt": until}},
    )
    secret(kubectl, namespace, "k-api-key", "sk-current-0123456789", labels={"atlas.bugvanquisher.io/atlaskey": "k"})
    res = kubectl_atlas("key", "rotate", "k", "-n", namespace, check=False)
    assert res.returncode == 1
    assert f"key aaaaaaaa is still in its rotationGracePeriod until {until}" in res.stderr and "--force" in res.stderr
    assert secret_value(kubectl, namespace, "k-api-key")[0] == "sk-current-0123456789"
    kubectl_atlas("key", "rotate", "k", "-n", namespace, "--force", "--wait=false")
    assert secret_value(kubectl, namespace, "k-api-key")[0] != "sk-current-0123456789"


def test_rotate_without_an_operator_says_so_after_its_timeout(kubectl_atlas, kubectl, namespace):
    apply(kubectl, namespace, "AtlasKey", "k", {})
    secret(kubectl, namespace, "k-api-key", "sk-current-0123456789")
    res = kubectl_atlas("key", "rotate", "k", "-n", namespace, "--timeout", "2s", check=False)
    assert res.returncode == 1 and "is the operator running?" in res.stderr


def test_errors_name_the_cause(kubectl_atlas, control_plane, namespace, tmp_path):
    nobody = control_plane.user_kubeconfig("nobody", path=tmp_path / "nobody", namespace=namespace)
    res = kubectl_atlas("usage", kubeconfig=nobody, check=False)
    assert res.returncode == 1
    assert 'User "nobody" cannot list resource "atlasquotas"' in res.stderr and "atlas-view" in res.stderr

    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    dead = tmp_path / "dead"
    dead.write_text(yaml.safe_dump(config))
    res = kubectl_atlas("top", kubeconfig=dead, check=False)
    assert res.returncode == 1 and "cannot reach the API server at https://127.0.0.1:" in res.stderr

    res = kubectl_atlas("usage", "--context", "nope", check=False)
    assert res.returncode == 1 and "nope" in res.stderr and "Traceback" not in res.stderr

    res = kubectl_atlas("usage", kubeconfig=tmp_path / "absent", check=False)
    assert res.returncode == 1 and "error:" in res.stderr and "Traceback" not in res.stderr
