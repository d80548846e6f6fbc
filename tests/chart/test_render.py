"""`helm lint --strict` and `helm template` of every values file in charts/atlas/ci/, with
assertions on what is rendered: hardened pods, probes, RBAC exactly as intended, PDB/HPA rules,
the gateway's token-less identity, Redis wiring, CRDs equal to crds/, monitoring objects that
only use metrics the gateway really exports."""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml

from atlas_devstack.tools import REPO_ROOT

from .helmlib import CHART, CI_VALUES, RELEASE_NAMESPACE, Manifests, ci_values

WORKLOAD_KINDS = ("Deployment", "StatefulSet")

# The operator's permissions, rule by rule; the chart must render exactly these (tests/chart/
# test_operator_rbac.py proves against the real API server that they suffice).
OPERATOR_RULES = [
    {
        "apiGroups": ["atlas.bugvanquisher.io"],
        "resources": ["atlaskeys", "atlasquotas"],
        "verbs": ["get", "list", "watch", "patch"],
    },
    {"apiGroups": ["atlas.bugvanquisher.io"], "resources": ["atlaspricelists"], "verbs": ["get", "list", "watch"]},
    {
        "apiGroups": ["atlas.bugvanquisher.io"],
        "resources": ["atlaskeys/status", "atlasquotas/status", "atlaspricelists/status"],
        "verbs": ["patch"],
    },
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
# workloadIdentity.serviceAccountTokens: the bound ServiceAccounts' UIDs, and (a ClusterRole of its
# own in both modes) the API server's OIDC discovery
SERVICE_ACCOUNTS_RULE = {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["list", "watch"]}
TOKEN_ISSUER_RULES = [{"nonResourceURLs": ["/.well-known/openid-configuration", "/openid/v1/jwks"], "verbs": ["get"]}]


@pytest.fixture(scope="module", params=[p.name for p in CI_VALUES])
def rendered(request, helm) -> tuple[str, Manifests]:
    return request.param, helm.render(CHART / "ci" / request.param)


def values_of(name: str) -> dict:
    merged = yaml.safe_load((CHART / "values.yaml").read_text())

    def merge(base, over):
        for k, v in over.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                merge(base[k], v)
            else:
                base[k] = v

    merge(merged, yaml.safe_load((CHART / "ci" / name).read_text()) or {})
    return merged


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# --------------------------------------------------------------------------- lint


@pytest.mark.parametrize("values_file", [p.name for p in CI_VALUES])
def test_helm_lint_strict(helm, values_file):
    res = helm.run("lint", "--strict", CHART, "--namespace", RELEASE_NAMESPACE, "--values", CHART / "ci" / values_file)
    assert "1 chart(s) linted, 0 chart(s) failed" in res.stdout, res.stdout


def test_ci_values_cover_the_documented_scenarios():
    names = {p.name for p in CI_VALUES}
    for wanted in (
        "default",
        "external-redis-tls",
        "external-redis-sentinel",
        "external-redis-cluster",
        "ha-gateway-hpa",
        "monitoring",
        "namespaced-rbac",
        "kind",
    ):
        assert f"{wanted}-values.yaml" in names


# --------------------------------------------------------------------------- every values file


def test_pods_are_hardened(rendered):
    name, objs = rendered
    workloads = [o for o in objs if o["kind"] in WORKLOAD_KINDS]
    assert workloads, name
    for obj in workloads:
        spec = pod_spec(obj)
        where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, where
        assert psc["runAsUser"] > 0, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        for c in spec["containers"] + spec.get("initContainers", []):
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, where
            assert csc["readOnlyRootFilesystem"] is True, where
            assert csc["privileged"] is False, where
            assert csc["capabilities"] == {"drop": ["ALL"]}, where
            assert csc["seccompProfile"]["type"] == "RuntimeDefault", where
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], where
            assert c["resources"]["limits"]["memory"], where
            image = c["image"]
            assert re.fullmatch(r"[\w./-]+(:\d+)?/?[\w./-]*:[\w.-]+", image), f"{where}: {image}"
            assert not image.endswith(":latest"), where
            # A read-only root filesystem needs an explicit writable scratch or data dir.
            assert c.get("volumeMounts"), where
        assert spec.get("hostNetwork") is not True and spec.get("hostPID") is not True, where


def test_operator_deployment(rendered):
    name, objs = rendered
    dep = objs.one("Deployment", "-operator")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    spec = pod_spec(dep)
    (c,) = spec["containers"]
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port == {"healthz": 8081, "metrics": 8082}
    probe = c["livenessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": "healthz"}
    env = env_of(c)
    assert env["ATLAS_LIVENESS_PORT"]["value"] == "8081"
    assert env["ATLAS_LIVENESS_HOST"]["value"] == "0.0.0.0"
    assert env["ATLAS_METRICS_PORT"]["value"] == "8082" and env["ATLAS_METRICS_HOST"]["value"] == "0.0.0.0"
    assert env["ATLAS_USAGE_INTERVAL_SECONDS"]["value"] == "10"
    writes = values_of(name)["operator"]["statusWrites"]
    assert env["ATLAS_STATUS_WRITES_PER_SECOND"]["value"] == str(writes["perSecond"])
    assert env["ATLAS_STATUS_WRITE_BURST"]["value"] == str(writes["burst"])
    assert env["ATLAS_NAMESPACES"]["value"] == ",".join(values_of(name)["watchNamespaces"])
    assert "ATLAS_REDIS_URL" in env
    assert spec["serviceAccountName"] == objs.one("ServiceAccount", "-operator")["metadata"]["name"]


def test_gateway_deployment_service_and_probes(rendered):
    name, objs = rendered
    values = values_of(name)
    dep = objs.one("Deployment", "-gateway")
    spec = pod_spec(dep)
    (c,) = spec["containers"]
    assert [p["containerPort"] for p in c["ports"]] == [8080]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    env = env_of(c)
    assert env["ATLAS_HOST"]["value"] == "0.0.0.0"
    assert env["ATLAS_PORT"]["value"] == "8080"
    assert env["ATLAS_UPSTREAM_URL"]["value"] == values["gateway"]["upstream"]["url"]
    assert env["ATLAS_FAIL_MODE"]["value"] in ("closed", "open")
    if values["gateway"]["upstream"]["models"]:
        assert json.loads(env["ATLAS_UPSTREAM_MODELS"]["value"]) == values["gateway"]["upstream"]["models"]
    svc = objs.one("Service", "-gateway")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "http" and port["port"] == values["gateway"]["service"]["port"]
    if values["gateway"]["service"]["type"] == "NodePort" and values["gateway"]["service"]["nodePort"]:
        assert port["nodePort"] == values["gateway"]["service"]["nodePort"]


def test_gateway_identity_has_no_token_and_no_rbac(rendered):
    _, objs = rendered
    sa = objs.one("ServiceAccount", "-gateway")
    assert sa["automountServiceAccountToken"] is False
    dep = objs.one("Deployment", "-gateway")
    assert pod_spec(dep)["automountServiceAccountToken"] is False
    assert pod_spec(dep)["serviceAccountName"] == sa["metadata"]["name"]
    for binding in objs.of("RoleBinding") + objs.of("ClusterRoleBinding"):
        for subject in binding["subjects"]:
            assert subject["name"] != sa["metadata"]["name"], binding["metadata"]["name"]


def test_rbac_is_exactly_the_operators_needs(rendered):
    name, objs = rendered
    watch = values_of(name)["watchNamespaces"]
    tokens = values_of(name)["workloadIdentity"]["serviceAccountTokens"]
    operator_sa = objs.one("ServiceAccount", "-operator")["metadata"]["name"]
    issuer_roles = [r for r in objs.of("ClusterRole") if r["metadata"]["name"].endswith("-token-issuer")]
    assert [r["rules"] for r in issuer_roles] == ([TOKEN_ISSUER_RULES] if tokens else [])
    cluster_roles = [r for r in objs.of("ClusterRole") if not is_aggregated(r) and r not in issuer_roles]
    for role in cluster_roles + objs.of("Role"):
        assert role["rules"] == OPERATOR_RULES + ([SERVICE_ACCOUNTS_RULE] if tokens else []), role["metadata"]["name"]
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
    bindings = objs.of("ClusterRoleBinding") + objs.of("RoleBinding")
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": operator_sa, "namespace": RELEASE_NAMESPACE}]
    issuer_bindings = [b for b in objs.of("ClusterRoleBinding") if b["roleRef"]["name"].endswith("-token-issuer")]
    assert [b["roleRef"]["name"] for b in issuer_bindings] == [r["metadata"]["name"] for r in issuer_roles]
    if watch:
        assert not cluster_roles and objs.of("ClusterRoleBinding") == issuer_bindings
        assert sorted(r["metadata"]["namespace"] for r in objs.of("Role")) == sorted(watch)
        assert sorted(b["metadata"]["namespace"] for b in objs.of("RoleBinding")) == sorted(watch)
        for b in objs.of("RoleBinding"):
            assert b["roleRef"]["kind"] == "Role"
    else:
        operator_bindings = [b for b in objs.of("ClusterRoleBinding") if b not in issuer_bindings]
        assert len(cluster_roles) == 1 and len(operator_bindings) == 1
        assert not objs.of("Role") and not objs.of("RoleBinding")
        assert operator_bindings[0]["roleRef"]["name"] == cluster_roles[0]["metadata"]["name"]


def is_aggregated(role: dict) -> bool:
    return any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in role["metadata"]["labels"])


ATLAS_RESOURCES = ["atlaskeys", "atlasquotas", "atlaspricelists"]
# guardrails.aggregatedRoles: role suffix -> (the roles it joins, its only rule's verbs)
AGGREGATED = {
    "-view": ({"view", "edit", "admin"}, ["get", "list", "watch"]),
    "-edit": ({"edit", "admin"}, ["create", "update", "patch", "delete", "deletecollection"]),
}


def test_aggregated_roles_only_when_asked_and_only_atlas_kinds(rendered):
    name, objs = rendered
    roles = {r["metadata"]["name"]: r for r in objs.of("ClusterRole") if is_aggregated(r)}
    if not values_of(name)["guardrails"]["aggregatedRoles"]:
        assert not roles
        return
    assert set(roles) == {f"atlas{suffix}" for suffix in AGGREGATED}
    for suffix, (joins, verbs) in AGGREGATED.items():
        role = roles[f"atlas{suffix}"]
        labels = role["metadata"]["labels"]
        assert {
            k.rsplit("-", 1)[-1] for k in labels if k.startswith("rbac.authorization.k8s.io/aggregate-to-")
        } == joins
        assert role["rules"] == [
            {"apiGroups": ["atlas.bugvanquisher.io"], "resources": ATLAS_RESOURCES, "verbs": verbs}
        ]


def test_pdb_and_hpa_presence(rendered):
    name, objs = rendered
    gw = values_of(name)["gateway"]
    dep = objs.one("Deployment", "-gateway")
    multi = gw["autoscaling"]["enabled"] or gw["replicas"] > 1
    assert bool(objs.of("PodDisruptionBudget")) == (multi and gw["podDisruptionBudget"]["enabled"]), name
    assert bool(objs.of("HorizontalPodAutoscaler")) == gw["autoscaling"]["enabled"], name
    if gw["autoscaling"]["enabled"]:
        hpa = objs.one("HorizontalPodAutoscaler")
        assert "replicas" not in dep["spec"], "the HPA owns the replica count"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": dep["metadata"]["name"],
        }
        assert hpa["spec"]["minReplicas"] == gw["autoscaling"]["minReplicas"] >= 2
    else:
        assert dep["spec"]["replicas"] == gw["replicas"]
    for pdb in objs.of("PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_redis_wiring(rendered):
    name, objs = rendered
    redis = values_of(name)["redis"]
    urls = {
        c["name"]: env_of(c)["ATLAS_REDIS_URL"]["value"]
        for d in objs.of("Deployment")
        for c in pod_spec(d)["containers"]
    }
    assert set(urls) == {"operator", "gateway"} and len(set(urls.values())) == 1
    url = next(iter(urls.values()))
    if redis["mode"] == "bundled":
        sts = objs.one("StatefulSet", "-redis")
        svc = objs.one("Service", "-redis")
        assert url == f"redis://{svc['metadata']['name']}:6379/0"
        assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
        args = pod_spec(sts)["containers"][0]["args"]
        assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
        if redis["bundled"]["persistence"]["enabled"]:
            (claim,) = sts["spec"]["volumeClaimTemplates"]
            assert claim["spec"]["resources"]["requests"]["storage"] == redis["bundled"]["persistence"]["size"]
            assert args[args.index("--appendonly") + 1] == "yes"
        else:
            assert "volumeClaimTemplates" not in sts["spec"]
        assert bool(objs.of("NetworkPolicy")) == redis["bundled"]["networkPolicy"]["enabled"]
    else:
        assert not objs.of("StatefulSet")
        assert not any(o["metadata"]["name"].endswith("-redis") for o in objs)
        for d in objs.of("Deployment"):
            (c,) = pod_spec(d)["containers"]
            names = [e["name"] for e in c["env"]]
            if redis["external"]["passwordSecret"]["name"]:
                # Defined before the URL that expands it, and never inlined.
                assert names.index("ATLAS_REDIS_PASSWORD") < names.index("ATLAS_REDIS_URL")
                assert (
                    env_of(c)["ATLAS_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
                    == redis["external"]["passwordSecret"]
                )
                assert "$(ATLAS_REDIS_PASSWORD)@" in url
            sentinel = redis["external"].get("sentinel") or {}
            assert url.startswith(("redis+sentinel://", "rediss+sentinel://")) == bool(sentinel.get("addresses"))
            cluster = env_of(c).get("ATLAS_REDIS_CLUSTER", {}).get("value")
            assert cluster == ("true" if redis["external"].get("cluster") else None)
            tls = sentinel.get("tls") if sentinel.get("addresses") else url.startswith("rediss://")
            if redis["external"]["tls"]["caSecret"]["name"] and tls:
                assert "ssl_ca_certs=/etc/atlas/redis-ca/ca.crt" in url
                mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
                assert mounts["redis-ca"] == "/etc/atlas/redis-ca"
                vols = {v["name"]: v for v in pod_spec(d)["volumes"]}
                assert vols["redis-ca"]["secret"]["secretName"] == redis["external"]["tls"]["caSecret"]["name"]


def _strip_chart_metadata(crd: dict) -> dict:
    crd = copy.deepcopy(crd)
    meta = crd["metadata"]
    for key in ("labels", "annotations"):
        meta.pop(key, None)
    return crd


def test_crds_rendered_equal_to_crds_dir(rendered):
    name, objs = rendered
    crds_values = values_of(name)["crds"]
    crds = {c["metadata"]["name"]: c for c in objs.of("CustomResourceDefinition")}
    if not crds_values["install"]:
        assert not crds
        return
    canonical = {}
    for path in sorted((REPO_ROOT / "crds").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        canonical[doc["metadata"]["name"]] = doc
    assert crds.keys() == canonical.keys()
    for crd_name, crd in crds.items():
        assert _strip_chart_metadata(crd) == _strip_chart_metadata(canonical[crd_name]), crd_name
        annotations = crd["metadata"].get("annotations") or {}
        assert (annotations.get("helm.sh/resource-policy") == "keep") == crds_values["keep"], crd_name


def test_every_object_is_labelled_and_namespaced_correctly(rendered):
    _, objs = rendered
    cluster_scoped = {
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    for o in objs:
        labels = o["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "atlas"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        if o["kind"] in cluster_scoped:
            assert "namespace" not in o["metadata"]
        elif o["kind"] not in ("Role", "RoleBinding"):
            assert o["metadata"]["namespace"] == RELEASE_NAMESPACE, o["metadata"]["name"]


# --------------------------------------------------------------------------- monitoring


def gateway_metric_names() -> set[str]:
    """Metric names the gateway and the operator export (prometheus_client adds _total/_bucket/...)."""
    source = "\n".join(
        p.read_text()
        for d in ("gateway/atlas_gateway", "operator/atlas_operator")
        for p in (REPO_ROOT / d).rglob("*.py")
    )
    names = set(re.findall(r"""["'](atlas_[a-z0-9_]+)["']""", source))
    expanded = set()
    for n in names:
        expanded |= {n, f"{n}_total", f"{n}_bucket", f"{n}_sum", f"{n}_count", f"{n}_created"}
    return expanded


def kube_state_metric_names() -> set[str]:
    """atlas_key_* / atlas_quota_* defined by the kube-state-metrics config we ship."""
    doc = yaml.safe_load((REPO_ROOT / "examples" / "monitoring" / "kube-state-metrics-values.yaml").read_text())
    names = set()
    for res in doc["customResourceState"]["config"]["spec"]["resources"]:
        assert res["groupVersionKind"]["group"] == "atlas.bugvanquisher.io"
        names |= {f"{res['metricNamePrefix']}_{m['name']}" for m in res["metrics"]}
    return names


def metrics_used(expr: str) -> set[str]:
    return set(re.findall(r"\b(atlas_[a-z0-9_]+)\b", expr))


def test_monitoring_objects(helm):
    objs = helm.render(ci_values("monitoring"))
    known = gateway_metric_names()
    assert known, "no atlas_* metrics found in gateway/atlas_gateway"
    known |= kube_state_metric_names()

    sm = objs.one("ServiceMonitor", "-gateway")
    svc = objs.one("Service", "-gateway")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == "http" and sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    # the operator's /metrics (forecast gauges, atlas_key_info): Service -> pod port named metrics
    op_sm, op_svc = objs.one("ServiceMonitor", "-operator"), objs.one("Service", "-operator")
    op_pod = objs.one("Deployment", "-operator")["spec"]["template"]
    assert op_sm["spec"]["selector"]["matchLabels"].items() <= op_svc["metadata"]["labels"].items()
    assert op_svc["spec"]["selector"].items() <= op_pod["metadata"]["labels"].items()
    assert op_sm["spec"]["endpoints"][0]["port"] == op_svc["spec"]["ports"][0]["name"] == "metrics"
    (container,) = op_pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    port = next(p for p in container["ports"] if p["name"] == "metrics")
    assert int(env["ATLAS_METRICS_PORT"]) == port["containerPort"] == op_svc["spec"]["ports"][0]["port"]

    rule = objs.one("PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    for wanted in (
        "AtlasKeyQuotaNearlySpent",
        "AtlasQuotaNearlySpent",
        "AtlasRedisErrors",
        "AtlasUpstreamErrors",
        "AtlasBudgetExhaustionForecast",
        "AtlasOperatorObjectFailing",
    ):
        assert wanted in alerts, sorted(alerts)
    for alert in alerts.values():
        used = metrics_used(alert["expr"])
        assert used and used <= known, f"{alert['alert']}: {used - known} not exported by the gateway"
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"]
    assert "0.8" in alerts["AtlasKeyQuotaNearlySpent"]["expr"]
    assert "atlas_budget_exhaustion_seconds" in alerts["AtlasBudgetExhaustionForecast"]["expr"]
    assert "< 3600" in alerts["AtlasBudgetExhaustionForecast"]["expr"]
    # Label values the rules match on are ones the gateway really emits.
    gateway_source = "\n".join(p.read_text() for p in (REPO_ROOT / "gateway" / "atlas_gateway").rglob("*.py"))
    for reason in re.findall(r'reason=~"([^"]+)"', alerts["AtlasKeyBudgetExhausted"]["expr"])[0].split("|"):
        assert f'"{reason}"' in gateway_source, reason
    job = svc["metadata"]["name"]  # the ServiceMonitor's job label is the Service name
    assert f'job="{job}"' in alerts["AtlasRedisErrors"]["expr"]

    cm = objs.one("ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (raw,) = cm["data"].values()
    dashboard = json.loads(raw)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    for expr in exprs:
        assert metrics_used(expr) <= known, expr
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("tokens", "rejections", "overhead"):
        assert topic in titles


def test_monitoring_is_off_by_default(helm):
    objs = helm.render(ci_values("default"))
    assert not {"ServiceMonitor", "PrometheusRule"} & objs.kinds()
    assert not [c for c in objs.of("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]


# --------------------------------------------------------------------------- values


def test_crds_keep_false_drops_the_keep_policy(helm):
    objs = helm.render(ci_values("default"), sets=["crds.keep=false"])
    for crd in objs.of("CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})


def test_external_redis_without_password_or_tls(helm):
    objs = helm.render(
        ci_values("default"), sets=["redis.mode=external", "redis.external.url=redis://redis.shared:6379/3"]
    )
    for d in objs.of("Deployment"):
        env = env_of(pod_spec(d)["containers"][0])
        assert env["ATLAS_REDIS_URL"]["value"] == "redis://redis.shared:6379/3"
        assert "ATLAS_REDIS_PASSWORD" not in env


def test_sentinel_url_is_what_the_processes_parse(helm):
    """The chart's Sentinel URL, with the Secrets Kubernetes expands, parses (atlas_core.sentinel)
    into the sentinels, master, database, credentials and TLS the values name."""
    from atlas_core import sentinel

    values = values_of("external-redis-sentinel-values.yaml")["redis"]["external"]
    objs = helm.render(ci_values("external-redis-sentinel"))
    for d in objs.of("Deployment"):
        (c,) = pod_spec(d)["containers"]
        env = env_of(c)
        names = [e["name"] for e in c["env"]]
        assert env["ATLAS_REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"] == values["sentinel"]["passwordSecret"]
        assert names.index("ATLAS_REDIS_SENTINEL_PASSWORD") < names.index("ATLAS_REDIS_URL")
        url = env["ATLAS_REDIS_URL"]["value"]
        expanded = url.replace("$(ATLAS_REDIS_PASSWORD)", "data-pw").replace(
            "$(ATLAS_REDIS_SENTINEL_PASSWORD)", "sent-pw"
        )
        parsed = sentinel.parse(expanded)
        assert parsed.sentinels == tuple((a.split(":")[0], 26379) for a in values["sentinel"]["addresses"])
        assert (parsed.master, parsed.db, parsed.tls) == ("atlas", 1, True)
        assert (parsed.username, parsed.password, parsed.sentinel_password) == ("atlas", "data-pw", "sent-pw")
        assert parsed.query["ssl_ca_certs"] == ["/etc/atlas/redis-ca/ca.crt"]
        assert {v["name"] for v in pod_spec(d)["volumes"]} >= {"redis-ca"}


def test_cluster_values_select_cluster_mode_in_both_processes(helm):
    objs = helm.render(ci_values("external-redis-cluster"))
    envs = [env_of(pod_spec(d)["containers"][0]) for d in objs.of("Deployment")]
    assert len(envs) == 2
    for env in envs:
        assert env["ATLAS_REDIS_CLUSTER"]["value"] == "true"
        assert env["ATLAS_REDIS_URL"]["value"] == "redis://:$(ATLAS_REDIS_PASSWORD)@redis-cluster.data:6379"


def test_upstream_api_key_from_secret(helm):
    objs = helm.render(ci_values("external-redis-tls"))
    env = env_of(pod_spec(objs.one("Deployment", "-gateway"))["containers"][0])
    assert env["ATLAS_UPSTREAM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "vllm-api-key", "key": "token"}


def test_inference_gateway_values_are_what_the_gateway_parses(helm):
    """gateway.inferenceGateway renders the variables the gateway reads into the rules it applies
    (settings.py, upstream/headers.py); unset, none is rendered."""
    from atlas_gateway.settings import Settings

    objs = helm.render(
        ci_values("default"),
        sets=[
            "gateway.inferenceGateway.objectives.Critical=chat-critical",
            "gateway.inferenceGateway.objectives.Sheddable=batch",
            "gateway.inferenceGateway.fairnessId=true",
            "gateway.inferenceGateway.stripHeaders={x-user-id,x-internal-*}",
        ],
    )
    env = env_of(pod_spec(objs.one("Deployment", "-gateway"))["containers"][0])
    settings = Settings.from_env({name: e["value"] for name, e in env.items() if "value" in e})
    assert settings.inference_objectives == {"Critical": "chat-critical", "Sheddable": "batch"}
    assert settings.stamp_fairness_id is True
    assert (settings.strip_headers, settings.strip_header_prefixes) == (("x-user-id",), ("x-internal-",))
    plain = env_of(pod_spec(helm.render(ci_values("default")).one("Deployment", "-gateway"))["containers"][0])
    assert not {"ATLAS_INFERENCE_OBJECTIVES", "ATLAS_STAMP_FAIRNESS_ID", "ATLAS_STRIP_HEADERS"} & set(plain)


def _mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_defaults_hold_ten_thousand_long_requests_per_process(helm):
    """Issue 19: the chart's defaults, as the gateway parses them, shed nothing below 10,000
    requests in flight per process (in-flight ceilings; the upstream's queue decides when it is
    read), and the memory limit holds the connection cap at the measured cost per request
    (docs/capacity.md: ~31 KiB held, streamed; 40 counted here) above the idle process."""
    from atlas_gateway.settings import Settings

    container = pod_spec(helm.render(ci_values("default")).one("Deployment", "-gateway"))["containers"][0]
    env = env_of(container)
    assert len(env) == len(container["env"]), "an environment variable is rendered twice"
    settings = Settings.from_env({name: e["value"] for name, e in env.items() if "value" in e})
    assert settings.max_connections >= 10_000 and settings.upstream_pool_size >= 10_000
    assert min(settings.shed_thresholds()) >= 10_000
    assert settings.queue_thresholds == (16, 64, 256) and settings.upstream_load_interval == 1
    assert not {"ATLAS_SHED_THRESHOLD", "ATLAS_UPSTREAM_SHEDDING"} & set(env)
    limit = _mib(container["resources"]["limits"]["memory"])
    assert limit >= 100 + settings.max_connections * 40 / 1024, limit


def test_shedding_values_are_what_the_gateway_parses(helm):
    from atlas_gateway.settings import Settings

    objs = helm.render(
        ci_values("default"),
        sets=[
            "gateway.capacity.maxConnections=2000",
            "gateway.capacity.upstreamPoolSize=1500",
            "gateway.shedding.queue.Sheddable=4",
            "gateway.shedding.loadIntervalSeconds=0.5",
            "gateway.shedding.inflight.Sheddable=900",
            "gateway.shedding.upstreams.http://vllm-batch:8000.Standard=8",
            "gateway.shedding.upstreams.http://tgi:80.metrics=false",
        ],
    )
    env = env_of(pod_spec(objs.one("Deployment", "-gateway"))["containers"][0])
    settings = Settings.from_env({name: e["value"] for name, e in env.items() if "value" in e})
    assert (settings.max_connections, settings.upstream_pool_size) == (2000, 1500)
    assert settings.queue_thresholds == (4, 64, 256) and settings.upstream_load_interval == 0.5
    assert settings.shed_threshold == 900 and settings.shed_threshold_standard is None
    assert settings.upstream_shedding["http://vllm-batch:8000"].queue_thresholds == (4, 8, 256)
    assert not settings.upstream_shedding["http://tgi:80"].read_metrics


def test_tracing_is_off_by_default_and_values_set_the_standard_variables(helm):
    """No endpoint: no OTEL_* variable at all (the gateway's tracing is then off). An endpoint:
    the standard variables, the pod's name and namespace as resource attributes."""
    default = env_of(pod_spec(helm.render(ci_values("default")).one("Deployment", "-gateway"))["containers"][0])
    assert not [name for name in default if name.startswith("OTEL_") or name == "ATLAS_USAGE_RECORDS"]
    objs = helm.render(
        ci_values("default"),
        sets=[
            "gateway.tracing.endpoint=http://otel-collector.observability:4317",
            "gateway.tracing.protocol=grpc",
            "gateway.tracing.samplerArg=0.25",
            "gateway.tracing.resourceAttributes.deployment\\.environment=prod",
            "gateway.usageRecords=otlp",
        ],
    )
    env = env_of(pod_spec(objs.one("Deployment", "-gateway"))["containers"][0])
    assert {name: env[name]["value"] for name in env if name.startswith("OTEL_") or name == "ATLAS_USAGE_RECORDS"} == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_SERVICE_NAME": "atlas-gateway",
        "OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),"
        "deployment.environment=prod",
        "ATLAS_USAGE_RECORDS": "otlp",
    }
    # `--set samplerArg=1` is an integer to Helm, as `samplerArg: 1` in a values file is a number
    whole = helm.render(
        ci_values("default"), sets=["gateway.tracing.endpoint=http://c:4318", "gateway.tracing.samplerArg=1"]
    )
    whole_env = env_of(pod_spec(whole.one("Deployment", "-gateway"))["containers"][0])
    assert whole_env["OTEL_TRACES_SAMPLER_ARG"]["value"] == "1"
    # $(POD_NAME) is expanded by the kubelet only from variables defined before it
    names = list(env)
    assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_names_follow_the_release(helm):
    objs = helm.render(ci_values("default"), release="prod")
    assert objs.one("Deployment", "-gateway")["metadata"]["name"] == "prod-atlas-gateway"
    objs = helm.render(ci_values("default"), release="atlas-prod")
    assert objs.one("Deployment", "-gateway")["metadata"]["name"] == "atlas-prod-gateway"


# Each bad value is refused by values.schema.json (or a `required`) with the field named.
BAD_VALUES = [
    (["gateway.replicas=0"], "replicas"),
    (["gateway.replica=3"], "replica"),
    (["gateway.failMode=maybe"], "failMode"),
    (["gateway.image.tag=latest"], "tag"),
    (["gateway.upstream.url=ftp://models"], "url"),
    (["gateway.service.nodePort=80"], "nodePort"),
    (["gateway.autoscaling.targetCPUUtilizationPercentage=150"], "targetCPUUtilizationPercentage"),
    (["redis.mode=sentinel"], "mode"),
    (["redis.mode=external"], "url"),
    (["redis.mode=external", "redis.external.url=http://redis:6379"], "url"),
    (["redis.mode=external", "redis.external.url=rediss://user:secret@redis:6380"], "url"),
    (["redis.mode=external", "redis.external.sentinel.addresses={s0:26379}"], "masterName"),
    (
        ["redis.mode=external", "redis.external.sentinel.addresses={s0}", "redis.external.sentinel.masterName=m"],
        "addresses",
    ),
    (
        [
            "redis.mode=external",
            "redis.external.sentinel.addresses={s0:26379}",
            "redis.external.sentinel.masterName=m",
            "redis.external.cluster=true",
        ],
        "cluster",
    ),
    (["redis.external.sentinel.masterName=a/b"], "masterName"),
    (["watchNamespaces={Team_Search}"], "watchNamespaces"),
    (["podSecurityContext.runAsNonRoot=false"], "runAsNonRoot"),
    (["containerSecurityContext.readOnlyRootFilesystem=false"], "readOnlyRootFilesystem"),
    (["containerSecurityContext.allowPrivilegeEscalation=true"], "allowPrivilegeEscalation"),
    (["containerSecurityContext.capabilities.add={NET_ADMIN}"], "add"),
    (["operator.usageIntervalSeconds=0"], "usageIntervalSeconds"),
    (["operator.statusWrites.perSecond=0"], "perSecond"),
    (["operator.statusWrites.burst=0"], "burst"),
    (["monitoring.prometheusRule.quotaNearlySpentRatio=1.5"], "quotaNearlySpentRatio"),
    (["crds.keep=maybe"], "keep"),
    (["gateway.inferenceGateway.objectives.Urgent=x"], "Urgent"),
    (["gateway.inferenceGateway.objectives.Critical=Not_A_Name"], "Critical"),
    (["gateway.inferenceGateway.stripHeaders={bad header:}"], "stripHeaders"),
    (["gateway.inferenceGateway.fairnessId=maybe"], "fairnessId"),
    (["gateway.tracing.protocol=http/json"], "protocol"),
    (["gateway.tracing.sampler=parentbased_traceidratoi"], "sampler"),
    (["gateway.tracing.samplerArg=1%"], "samplerArg"),
    (["gateway.tracing.endpoint=otel-collector:4317"], "endpoint"),
    (["gateway.usageRecords=kafka"], "usageRecords"),
    (["gateway.usageRecords=otlp"], "usageRecords"),  # OTLP records need tracing.endpoint
    (["gateway.capacity.maxConnections=0"], "maxConnections"),
    (["gateway.shedding.queue.Urgent=1"], "Urgent"),
    (["gateway.shedding.queue.Sheddable=-1"], "Sheddable"),
    (["gateway.shedding.upstreams.http://v:8000.Soon=1"], "Soon"),
    (["gateway.shedding.loadIntervalSeconds=-1"], "loadIntervalSeconds"),
]


@pytest.mark.parametrize("sets,field", BAD_VALUES, ids=[",".join(s) for s, _ in BAD_VALUES])
def test_schema_rejects_bad_values(helm, sets, field):
    res = helm.template(ci_values("default"), sets=sets, check=False)
    assert res.returncode != 0, f"{sets} was accepted"
    assert field in res.stderr, res.stderr


def test_upstream_url_is_required(helm):
    res = helm.template(check=False)
    assert res.returncode != 0
    assert "gateway.upstream.url is required" in res.stderr, res.stderr


def test_workload_identity_values_reach_the_operator_as_it_parses_them(rendered):
    from atlas_operator.settings import OperatorSettings

    name, objs = rendered
    values = values_of(name)["workloadIdentity"]
    container = objs.one("Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    settings = OperatorSettings.from_env(env)  # refuses an issuer entry it could not enforce
    assert settings.service_account_tokens is values["serviceAccountTokens"]
    assert settings.token_audience == values["audience"] and settings.jwks_refresh == values["jwksRefreshSeconds"]
    assert [i.url for i in settings.jwt_issuers] == [e["issuer"]["url"] for e in values["jwt"]]
