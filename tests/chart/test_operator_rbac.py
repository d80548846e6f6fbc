"""The operator runs with exactly the chart's RBAC, as its ServiceAccount, against the real API
server and a real Redis, and fully reconciles keys: the permissions suffice. `kubectl auth
can-i --list` as that identity shows nothing beyond them: the permissions are not wider.

The identity is a client certificate with the ServiceAccount's user name and groups
(ControlPlane.service_account_kubeconfig), which RBAC treats exactly like the SA's token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import redis
import yaml

from atlas_core import contract
from atlas_devstack.controlplane import ControlPlane, free_port
from atlas_devstack.redis_server import RedisServer
from atlas_devstack.waiting import wait_for

from .helmlib import CHART, Helm, Manifests, ci_values

GROUP = "atlas.bugvanquisher.io"
# What `kubectl auth can-i --list` must show for the operator in a namespace it watches, on
# top of what every authenticated identity may do (measured, not assumed: see baseline()).
OPERATOR_CAN = {
    f"atlaskeys.{GROUP}": {"get", "list", "watch", "patch"},
    f"atlasquotas.{GROUP}": {"get", "list", "watch", "patch"},
    f"atlaspricelists.{GROUP}": {"get", "list", "watch"},
    f"atlaskeys.{GROUP}/status": {"patch"},
    f"atlasquotas.{GROUP}/status": {"patch"},
    f"atlaspricelists.{GROUP}/status": {"patch"},
    "secrets": {"get", "list", "watch", "create"},
    "events": {"create"},
    "serviceaccounts": {"list", "watch"},  # workloadIdentity.serviceAccountTokens: bound accounts' UIDs
}
ROW = re.compile(r"^(\S*)\s+\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$")


def can_i_list(cp: ControlPlane, kubeconfig: Path, namespace: str) -> tuple[dict[str, set[str]], set[str]]:
    """({resource: verbs}, {non-resource URL rows}) from `kubectl auth can-i --list`."""
    out = cp.kubectl("auth", "can-i", "--list", "-n", namespace, kubeconfig=kubeconfig).stdout
    resources: dict[str, set[str]] = {}
    urls: set[str] = set()
    for line in out.splitlines()[1:]:
        m = ROW.match(line)
        assert m, f"unparsed can-i row: {line!r}"
        resource, non_resource, names, verbs = m.groups()
        assert not names, f"unexpected resourceNames rule: {line}"
        if resource:
            resources.setdefault(resource, set()).update(verbs.split())
        else:
            urls.add(f"{non_resource} {verbs}")
    return resources, urls


def baseline(cp: ControlPlane, namespace: str, tmp: Path) -> tuple[dict[str, set[str]], set[str]]:
    """What an authenticated identity without any binding of ours can do."""
    nobody = cp.service_account_kubeconfig(namespace, f"nobody-{secrets.token_hex(3)}", path=tmp / "nobody.kubeconfig")
    return can_i_list(cp, nobody, namespace)


def render_rbac(helm: Helm, release: str, namespace: str, sets: list[str]) -> Manifests:
    res = helm.run(
        "template",
        release,
        CHART,
        "--namespace",
        namespace,
        "--values",
        ci_values("default"),
        *(a for s in sets for a in ("--set", s)),
        "--show-only",
        "templates/operator/rbac.yaml",
        "--show-only",
        "templates/operator/serviceaccount.yaml",
        "--show-only",
        "templates/gateway/serviceaccount.yaml",
        "--show-only",
        "templates/operator/deployment.yaml",
    )
    return Manifests.parse(res.stdout)


def watching(proc: subprocess.Popen, log: Path) -> dict:
    """wait_for's options while the operator runs: its exit fails the wait at once, and its
    log's end is in every failure."""

    def exited() -> str | None:
        return f"operator exited ({proc.returncode})" if proc.poll() is not None else None

    def error(message: str) -> AssertionError:
        return AssertionError(f"{message}; operator log:\n{_tail(log)}")

    return {"interval": 0.1, "failed": exited, "error": error}


def _tail(log: Path | None) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log and log.exists() else ""


def get_json(cp: ControlPlane, *args) -> dict | None:
    res = cp.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else None


def ready(obj: dict | None) -> bool:
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_operator_reconciles_with_exactly_the_charts_rbac(helm, control_plane, namespace, tmp_path, mode):
    cp = control_plane
    release = f"rbac-{secrets.token_hex(3)}"
    release_ns = namespace  # where the chart (and the operator's SA) lives
    keys_ns = f"{namespace}-keys"[:63]  # where the keys live
    other_ns = f"{namespace}-other"[:63]  # a namespace the namespaced operator must not see
    for ns in (keys_ns, other_ns):
        cp.kubectl("create", "namespace", ns)
    sets = [f"watchNamespaces={{{keys_ns}}}"] if mode == "namespaced" else []
    objs = render_rbac(helm, release, release_ns, sets)
    operator_sa = objs.one("ServiceAccount", "-operator")["metadata"]["name"]
    gateway_sa = objs.one("ServiceAccount", "-gateway")["metadata"]["name"]
    deployment = objs.one("Deployment", "-operator")
    chart_env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    rbac_objs = Manifests(o for o in objs if o["kind"] != "Deployment")
    cp.kubectl("apply", "-f", "-", input=rbac_objs.dump())
    cluster_scoped = [
        f"{o['kind'].lower()}/{o['metadata']['name']}"
        for o in rbac_objs
        if o["kind"] in ("ClusterRole", "ClusterRoleBinding")
    ]
    try:
        _check_and_run(cp, tmp_path, mode, release_ns, keys_ns, other_ns, operator_sa, gateway_sa, chart_env)
    finally:
        if cluster_scoped:
            cp.kubectl("delete", *cluster_scoped, "--wait=false", check=False)
        for ns in (keys_ns, other_ns):
            cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _check_and_run(cp, tmp_path, mode, release_ns, keys_ns, other_ns, operator_sa, gateway_sa, chart_env):
    # ---- no wider than intended
    base_resources, base_urls = baseline(cp, keys_ns, tmp_path)
    operator_kc = cp.service_account_kubeconfig(release_ns, operator_sa, path=tmp_path / "operator.kubeconfig")
    resources, urls = can_i_list(cp, operator_kc, keys_ns)
    extra = {r: v - base_resources.get(r, set()) for r, v in resources.items()}
    extra = {r: v for r, v in extra.items() if v}
    assert extra == OPERATOR_CAN, f"operator can do more or less than intended in {keys_ns}: {extra}"
    assert urls == base_urls

    other_resources, _ = can_i_list(cp, operator_kc, other_ns)
    other_extra = {r: v - base_resources.get(r, set()) for r, v in other_resources.items()}
    other_extra = {r: v for r, v in other_extra.items() if v}
    assert other_extra == ({} if mode == "namespaced" else OPERATOR_CAN)
    # Nothing cluster-scoped at all (namespaces, nodes, CRDs ...).
    for verb, what in (
        ("list", "namespaces"),
        ("list", "customresourcedefinitions"),
        ("get", "nodes"),
        ("create", "clusterroles"),
        ("delete", "secrets"),
        ("update", "secrets"),
        ("delete", f"atlaskeys.{GROUP}"),
        ("create", f"atlaskeys.{GROUP}"),
    ):
        res = cp.kubectl("auth", "can-i", verb, what, "-n", keys_ns, kubeconfig=operator_kc, check=False)
        assert res.stdout.strip() == "no", f"operator can {verb} {what}"

    gateway_kc = cp.service_account_kubeconfig(release_ns, gateway_sa, path=tmp_path / "gateway.kubeconfig")
    assert can_i_list(cp, gateway_kc, keys_ns) == (base_resources, base_urls), "the gateway's SA must have no RBAC"

    # ---- sufficient: the operator, as that identity, fully reconciles keys
    external_key = "sk-atlas-" + secrets.token_hex(16)
    cp.kubectl(
        "apply",
        "-n",
        keys_ns,
        "-f",
        "-",
        input=yaml.safe_dump_all(
            [
                {
                    "apiVersion": f"{GROUP}/v1alpha1",
                    "kind": "AtlasQuota",
                    "metadata": {"name": "team"},
                    "spec": {"limits": {"tokensPerDay": 100000}},
                },
                {
                    "apiVersion": f"{GROUP}/v1alpha1",
                    "kind": "AtlasKey",
                    "metadata": {"name": "generated"},
                    "spec": {"quotaRef": "team", "limits": {"requestsPerSecond": 2, "tokensPerDay": 5000}},
                },
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "external-key", "labels": {"atlas.bugvanquisher.io/atlaskey": "external"}},
                    "stringData": {"api-key": external_key},
                },
                {
                    "apiVersion": f"{GROUP}/v1alpha1",
                    "kind": "AtlasKey",
                    "metadata": {"name": "external"},
                    "spec": {"secretName": "external-key", "priority": "Sheddable"},
                },
                # as an install from before the label: works, says the label is missing
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "unlabelled-key"},
                    "stringData": {"api-key": "sk-atlas-" + secrets.token_hex(16)},
                },
                {
                    "apiVersion": f"{GROUP}/v1alpha1",
                    "kind": "AtlasKey",
                    "metadata": {"name": "unlabelled"},
                    "spec": {"secretName": "unlabelled-key"},
                },
                {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "batch-runner"}},
                {
                    "apiVersion": f"{GROUP}/v1alpha1",
                    "kind": "AtlasKey",
                    "metadata": {"name": "workload"},
                    "spec": {"subjects": [{"kind": "ServiceAccount", "name": "batch-runner"}]},
                },
            ]
        ),
    )
    account_uid = get_json(cp, "serviceaccount", "batch-runner", "-n", keys_ns)["metadata"]["uid"]

    log = tmp_path / "operator.log"
    liveness = free_port()
    with RedisServer() as redis_server, open(log, "wb") as log_file:
        env = {
            **os.environ,
            "KUBECONFIG": str(operator_kc),
            "ATLAS_REDIS_URL": redis_server.url,
            # The chart's own settings for the rest (liveness on loopback here, not 0.0.0.0).
            "ATLAS_NAMESPACES": chart_env["ATLAS_NAMESPACES"],
            "ATLAS_USAGE_INTERVAL_SECONDS": chart_env["ATLAS_USAGE_INTERVAL_SECONDS"],
            "ATLAS_SERVICE_ACCOUNT_TOKENS": chart_env["ATLAS_SERVICE_ACCOUNT_TOKENS"],
            "ATLAS_TOKEN_AUDIENCE": chart_env["ATLAS_TOKEN_AUDIENCE"],
            "ATLAS_LIVENESS_HOST": "127.0.0.1",
            "ATLAS_LIVENESS_PORT": str(liveness),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "atlas_operator"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        watched = watching(proc, log)
        try:
            gen = wait_for(
                "AtlasKey generated Ready",
                lambda: (o := get_json(cp, "atlaskey", "generated", "-n", keys_ns)) and ready(o) and o,
                60,
                **watched,
            )
            secret = wait_for(
                "generated Secret", lambda: get_json(cp, "secret", "generated-api-key", "-n", keys_ns), 60, **watched
            )
            key = base64.b64decode(secret["data"]["api-key"]).decode()
            assert gen["status"]["keyId"] == hashlib.sha256(key.encode()).hexdigest()[:8]
            assert secret["metadata"]["ownerReferences"][0]["uid"] == gen["metadata"]["uid"]

            ext = wait_for(
                "AtlasKey external Ready",
                lambda: (o := get_json(cp, "atlaskey", "external", "-n", keys_ns)) and ready(o) and o,
                60,
                **watched,
            )
            assert ext["status"]["keyId"] == hashlib.sha256(external_key.encode()).hexdigest()[:8]
            ext_secret = get_json(cp, "secret", "external-key", "-n", keys_ns)
            assert not ext_secret["metadata"].get("ownerReferences"), "an external Secret must stay unowned"

            wait_for(
                "AtlasQuota Ready with 1 key",
                lambda: (
                    (o := get_json(cp, "atlasquota", "team", "-n", keys_ns))
                    and ready(o)
                    and (o["status"].get("keys") == 1)
                ),
                60,
                **watched,
            )

            # Config landed in Redis, keyed by the hash of the key material only.
            client = redis.Redis.from_url(redis_server.url)
            stored = b"\n".join(client.keys("atlas:v2:*"))
            assert hashlib.sha256(key.encode()).hexdigest().encode() in stored
            assert key.encode() not in stored

            # Workload identity: the API server's issuer keys (non-resource URLs) and the bound
            # ServiceAccount's UID (the serviceaccounts watch) are published.
            issuers = wait_for(
                "the cluster's token issuer published", lambda: client.hgetall(contract.IDENTITY_ISSUERS), 60, **watched
            )
            cluster_issuer = contract.Issuer.decode(issuers[cp.server.encode()])
            assert cluster_issuer.service_accounts and cluster_issuer.audiences == ("atlas",) and cluster_issuer.keys
            wait_for(
                "the bound ServiceAccount's UID published",
                lambda: (
                    client.hget(contract.IDENTITY_SERVICE_ACCOUNTS, f"{keys_ns}/batch-runner") == account_uid.encode()
                ),
                60,
                **watched,
            )
            assert (
                client.hget(contract.IDENTITY_BINDINGS, f"ServiceAccount:{keys_ns}/batch-runner")
                == f"{keys_ns}/workload".encode()
            )

            # Migration: an unlabelled Secret works, the message names the label; labelling it
            # brings it into the (label-selected) watch, which re-reconciles the key.
            def ready_message(name):
                obj = get_json(cp, "atlaskey", name, "-n", keys_ns)
                return next(
                    (
                        c.get("message", "")
                        for c in ((obj or {}).get("status") or {}).get("conditions") or []
                        if c["type"] == "Ready" and c["status"] == "True"
                    ),
                    None,
                )

            wait_for(
                "unlabelled AtlasKey Ready with a hint",
                lambda: "lacks the label" in (ready_message("unlabelled") or ""),
                60,
                **watched,
            )
            cp.kubectl("label", "secret", "unlabelled-key", "-n", keys_ns, f"{GROUP}/atlaskey=unlabelled")
            wait_for(
                "hint gone once labelled",
                lambda: (m := ready_message("unlabelled")) is not None and "lacks the label" not in m,
                60,
                **watched,
            )

            # Rotation: the operator notices a changed Secret (watch on secrets) and follows it.
            rotated = "sk-atlas-" + secrets.token_hex(16)
            cp.kubectl(
                "patch",
                "secret",
                "external-key",
                "-n",
                keys_ns,
                "--type=merge",
                "-p",
                json.dumps({"stringData": {"api-key": rotated}}),
            )
            wait_for(
                "rotated keyId",
                lambda: (
                    ((get_json(cp, "atlaskey", "external", "-n", keys_ns) or {}).get("status", {}).get("keyId"))
                    == hashlib.sha256(rotated.encode()).hexdigest()[:8]
                ),
                60,
                **watched,
            )

            # Deletion: the operator removes its finalizer (patch) and the object goes away.
            cp.kubectl("delete", "atlaskey", "external", "-n", keys_ns, "--wait=false")
            wait_for(
                "AtlasKey external deleted",
                lambda: get_json(cp, "atlaskey", "external", "-n", keys_ns) is None,
                60,
                **watched,
            )

            with urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=5) as resp:
                assert resp.status == 200
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)

    text = log.read_text(errors="replace")
    # RBAC denials only: in the shared session cluster other tests leave objects in Terminating
    # namespaces, where writes are refused for a different reason (not a permission problem).
    denied = [line for line in text.splitlines() if re.search(r"cannot \w+ resource|Not enough permissions", line)]
    hint = ""
    if any("customresourcedefinitions" in line or '"namespaces"' in line for line in denied):
        hint = (
            "\nkopf's cluster scanning (CRD/namespace watches) is not in the chart's RBAC on purpose: "
            "the operator must set settings.scanning.disabled = True in its startup handler."
        )
    assert not denied, "the operator hit RBAC denials:\n" + "\n".join(d[:400] for d in denied[:10]) + hint
