"""A trace from a gateway pod: the chart's tracing values point the gateways at a Jaeger on this
host (where pods reach it, ATLAS_HOST_FROM_PODS); a request through the gateway Service is read
back from Jaeger's query API with the pod's name and namespace on its resource, and its usage
record is in that pod's log. The values are put back afterwards (later tests reuse them)."""

from __future__ import annotations

import json
import secrets

import openai

from atlas_devstack.deploy import CHART
from atlas_devstack.jaeger import Jaeger, attributes

from .conftest import MODEL, Cluster, wait_until


def _upgrade(cluster: Cluster, *sets: str) -> None:
    release = cluster.env.get("ATLAS_RELEASE", "atlas")
    args = ["upgrade", release, str(CHART), "--namespace", cluster.namespace, "--reuse-values"]
    for value in sets:
        args += ["--set", value]
    cluster.helm(*args, "--wait", "--timeout=300s")
    cluster.wait_ready("gateway", 2, timeout=180)


def test_a_trace_from_a_gateway_pod(cluster: Cluster, key_name: str):
    with Jaeger(host=cluster.env["ATLAS_HOST_FROM_PODS"]) as jaeger:
        _upgrade(
            cluster,
            f"gateway.tracing.endpoint={jaeger.otlp_http_url}",
            "gateway.tracing.samplerArg=1",
            "gateway.usageRecords=stdout",
        )
        try:
            api_key = cluster.apply_key(key_name, {"limits": {"tokensPerDay": 100000}})
            cluster.wait_gateways_settled(api_key)
            trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
            client = openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key=api_key, max_retries=0)
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL,
                max_tokens=8,
                messages=[{"role": "user", "content": "trace me"}],
                extra_headers={"traceparent": f"00-{trace_id}-{parent}-01"},
            )
            usage = raw.parse().usage
            spans = jaeger.wait_for_spans(trace_id, 4, timeout=60)
            [server] = [s for s in spans if s["name"] == "POST /v1/chat/completions"]
            assert server["parentSpanId"] == parent
            resource = attributes(server["resource"])
            pods = {p["metadata"]["name"] for p in cluster.running_pods("gateway")}
            assert resource["k8s.pod.name"] in pods and resource["host.name"] == resource["k8s.pod.name"]
            assert resource["k8s.namespace.name"] == cluster.namespace
            assert resource["service.name"] == "atlas-gateway"
            attrs = attributes(server)
            assert attrs["atlas.key"] == f"default/{key_name}"
            assert attrs["gen_ai.usage.output_tokens"] == usage.completion_tokens
            assert api_key not in json.dumps(spans)

            request_id = raw.headers["x-request-id"]

            def record() -> dict | None:
                log = cluster.kubectl("logs", "-n", cluster.namespace, resource["k8s.pod.name"]).stdout
                lines = [json.loads(line) for line in log.splitlines() if request_id in line and line.startswith("{")]
                return lines[0] if lines else None

            found = wait_until("the usage record in the pod's log", record, timeout=30)
            assert found["traceId"] == trace_id and found["key"] == f"default/{key_name}"
        finally:
            _upgrade(cluster, "gateway.tracing.endpoint=", "gateway.usageRecords=off")
