"""Locate the binaries built from source by hack/tools/build.sh (`make tools`).

Lookup order for each tool: the repo's bin/ (symlinks made by the build), then the
per-version cache directory outside the checkout. The pinned versions come from
hack/tools/versions.env, the single place they are written down.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "hack" / "tools" / "versions.env"
BIN_DIR = REPO_ROOT / "bin"

# tool -> (versions.env key, cache directory name template)
_CACHE_DIRS = {
    "kube-apiserver": "kubernetes-{KUBERNETES_VERSION}",
    "kubectl": "kubernetes-{KUBERNETES_VERSION}",
    "etcd": "etcd-{ETCD_VERSION}",
    "helm": "helm-{HELM_VERSION}-k8s{KUBE_MAJOR_MINOR}",
    # GitOps health runners (hack/tools/health/): Argo CD's Lua, kstatus, Flux's healthCheckExprs.
    "atlas-health-argocd": "health-argocd-lua-{GOPHER_LUA_VERSION}",
    "atlas-health-kstatus": "health-kstatus-{CLI_UTILS_VERSION}",
    "atlas-health-flux": "health-flux-cel-{FLUX_RUNTIME_VERSION}",
    # An inference gateway's endpoint picker (Gateway API Inference Extension), and the CRDs it watches
    # (a directory: inference-extension-crds/*.yaml).
    "epp": "epp-{GIE_VERSION}",
    # The single-node cluster of `make deploy-up` (`bash hack/tools/build.sh node`).
    "kube-scheduler": "kubernetes-node-{KUBERNETES_VERSION}",
    "kube-controller-manager": "kubernetes-node-{KUBERNETES_VERSION}",
    "kubelet": "kubernetes-node-{KUBERNETES_VERSION}",
    "kube-proxy": "kubernetes-node-{KUBERNETES_VERSION}",
    "containerd": "containerd-{CONTAINERD_VERSION}",
    "containerd-shim-runc-v2": "containerd-{CONTAINERD_VERSION}",
    "ctr": "containerd-{CONTAINERD_VERSION}",
    "coredns": "coredns-{COREDNS_VERSION}",
    "pause": "pause-{PAUSE_VERSION}-k8s-{KUBERNETES_VERSION}",
    # The trace backend of the integration tier and the dev stack (`bash hack/tools/build.sh jaeger`).
    "jaeger": "jaeger-{JAEGER_VERSION}",
}
# CNI plugins live in a directory of their own (containerd's CNI bin dir: plugins only).
CNI_PLUGINS = ("bridge", "loopback", "host-local", "portmap")
NODE_TOOLS = (
    "kube-scheduler",
    "kube-controller-manager",
    "kubelet",
    "kube-proxy",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "coredns",
    "pause",
)


class ToolNotFound(RuntimeError):
    """A binary that `make tools` builds is missing."""


def pinned_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parse versions.env (KEY=value lines, `#` comments)."""
    versions: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        versions[key.strip()] = value.strip()
    return versions


def cache_root() -> Path:
    if os.environ.get("ATLAS_TOOLS_CACHE"):
        return Path(os.environ["ATLAS_TOOLS_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "atlas-tools"


def _cache_dir(tool: str) -> Path:
    versions = pinned_versions()
    kube = versions["KUBERNETES_VERSION"].lstrip("v").split(".")
    versions["KUBE_MAJOR_MINOR"] = f"{kube[0]}.{kube[1]}"
    return cache_root() / _CACHE_DIRS[tool].format(**versions)


def inference_extension_crds() -> list[Path]:
    """The InferencePool and InferenceObjective CRDs of the pinned Gateway API Inference Extension
    (copied next to its endpoint picker by `make tools`)."""
    found = sorted((find_tool("epp").parent / "crds").glob("*.yaml"))
    if not found:
        raise ToolNotFound("the Gateway API Inference Extension's CRDs are missing next to epp: run `make tools`")
    return found


def cni_bin_dir() -> Path:
    """The directory holding the built CNI plugins (bin/cni, or the cache)."""
    versions = pinned_versions()
    candidates = [BIN_DIR / "cni", cache_root() / f"cni-plugins-{versions['CNI_PLUGINS_VERSION']}"]
    for d in candidates:
        if all((d / p).is_file() for p in CNI_PLUGINS):
            return (d / CNI_PLUGINS[0]).resolve().parent  # bin/cni holds links into the cache
    raise ToolNotFound(
        f"CNI plugins {', '.join(CNI_PLUGINS)} not found in {', '.join(map(str, candidates))}; run `make node-tools`"
    )


def find_tool(tool: str) -> Path:
    """Absolute path of a built tool, or ToolNotFound telling how to build it."""
    if tool not in _CACHE_DIRS:
        raise ValueError(f"unknown tool {tool!r}; known: {sorted(_CACHE_DIRS)}")
    candidates = [BIN_DIR / tool, _cache_dir(tool) / tool]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path.resolve()
    raise ToolNotFound(
        f"{tool} not found (looked in {', '.join(str(c) for c in candidates)}); "
        + (
            "run `make node-tools` (bash hack/tools/build.sh node)"
            if tool in NODE_TOOLS
            else "run `make tools` (bash hack/tools/build.sh)"
        )
        + " to build it from source"
    )


def missing_tools(tools: tuple[str, ...] = ("etcd", "kube-apiserver", "kubectl")) -> list[str]:
    """Names of the given tools that are not built yet (empty when all are present)."""
    missing = []
    for tool in tools:
        try:
            find_tool(tool)
        except ToolNotFound:
            missing.append(tool)
    return missing
