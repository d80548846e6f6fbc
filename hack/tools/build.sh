#!/usr/bin/env bash
# Builds kube-apiserver, kubectl, etcd and helm from source (Go module proxy only), the GitOps
# health runners of hack/tools/health/ and an inference gateway's endpoint picker, at the versions pinned in hack/tools/versions.env, once per version, into a cache outside the
# checkout, and links them into the repo's gitignored bin/. A second run is a no-op.
# With `node`, it builds the single-node cluster's binaries instead (make deploy-up):
# kube-scheduler, kube-controller-manager, kubelet, kube-proxy, containerd (+ its runc shim
# and ctr), the CNI plugins, CoreDNS and pause. `make tools` also builds Jaeger (the trace
# backend of the integration tier and the dev stack); with `jaeger`, only that.
#
#   bash hack/tools/build.sh            # what `make tools` runs
#   bash hack/tools/build.sh node       # what `make node-tools` runs
#   bash hack/tools/build.sh jaeger     # what `make test-integration` runs
#   ATLAS_TOOLS_CACHE=/some/dir bash hack/tools/build.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local
BIN_DIR="${ATLAS_TOOLS_BIN:-${REPO_ROOT}/bin}"  # override only for testing the script
mkdir -p "${CACHE_ROOT}" "${BIN_DIR}"

# One build at a time per cache (two `make tools` in parallel would only waste CPU).
if command -v flock >/dev/null 2>&1; then
  exec 9>"${CACHE_ROOT}/.lock"
  flock 9
fi

now() { date +%s; }

# Fingerprint of a wrapper module: a changed go.mod/go.sum (or, for a program of ours, its Go
# source) means a different build.
module_fingerprint() {
  cat "${TOOLS_DIR}/$1/go.mod" "${TOOLS_DIR}/$1/go.sum" $(find "${TOOLS_DIR}/$1" -maxdepth 1 -name '*.go' | sort) |
    sha256sum | cut -c1-16
}

# build_family <module dir> <cache name> <ldflags function> <binary>=<package> ...
# The ldflags function runs only when a build is needed (it may need Go; a cache hit does not).
build_family() {
  local moddir="$1" name="$2" ldflags_fn="$3"; shift 3
  local dest="${CACHE_ROOT}/${name}" fp spec bin pkg t0 t1 ldflags all_ok=1
  fp="$(module_fingerprint "$moddir")"
  if [ -f "${dest}/.complete" ] && [ "$(cat "${dest}/.complete")" = "$fp" ]; then
    for spec in "$@"; do [ -x "${dest}/${spec%%=*}" ] || all_ok=0; done
    if [ "$all_ok" = 1 ]; then
      log "${name}: cached in ${dest}"
      link_bins "$dest" "$@"
      return
    fi
  fi
  ensure_go
  ldflags="$("$ldflags_fn")"
  local tmp="${dest}.tmp.$$"
  rm -rf "$tmp"; mkdir -p "$tmp"
  : > "${tmp}/build-times.txt"
  for spec in "$@"; do
    bin="${spec%%=*}"; pkg="${spec#*=}"
    log "${name}: building ${bin} (${pkg}) with $("$GO" env GOVERSION)"
    t0="$(now)"
    (cd "${TOOLS_DIR}/${moddir}" && "$GO" build -trimpath -ldflags "-s -w ${ldflags}" -o "${tmp}/${bin}" "$pkg")
    t1="$(now)"
    log "${name}: built ${bin} in $((t1 - t0))s"
    printf '%s %ss %s %s\n' "$bin" "$((t1 - t0))" "$("$GO" env GOVERSION)" "$(date -u +%FT%TZ)" >> "${tmp}/build-times.txt"
  done
  echo "$fp" > "${tmp}/.complete"
  rm -rf "$dest"; mv "$tmp" "$dest"
  link_bins "$dest" "$@"
}

link_bins() {
  local dest="$1" spec; shift
  mkdir -p "${BIN_DIR}"
  for spec in "$@"; do ln -sfn "${dest}/${spec%%=*}" "${BIN_DIR}/${spec%%=*}"; done
}

# Commit time of a pinned module, used as build date so rebuilds are reproducible.
module_time() {
  (cd "${TOOLS_DIR}/$1" && "$GO" list -m -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' "$2" 2>/dev/null) || true
}

KUBE_MAJOR="${KUBERNETES_VERSION#v}"; KUBE_MAJOR="${KUBE_MAJOR%%.*}"
KUBE_MINOR="${KUBERNETES_VERSION#v*.}"; KUBE_MINOR="${KUBE_MINOR%%.*}"

# Kubernetes: the variables kubernetes/hack/lib/version.sh sets, in both version packages.
kube_ldflags() {
  local kdate pkgvar out=""
  kdate="$(module_time kube k8s.io/kubernetes)"
  for pkgvar in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    out+=" -X ${pkgvar}.gitVersion=${KUBERNETES_VERSION} -X ${pkgvar}.gitMajor=${KUBE_MAJOR}"
    out+=" -X ${pkgvar}.gitMinor=${KUBE_MINOR} -X ${pkgvar}.gitTreeState=clean"
    out+=" -X ${pkgvar}.buildDate=${kdate:-1970-01-01T00:00:00Z}"
  done
  echo "$out"
}

# etcd: the version is a constant in go.etcd.io/etcd/api/v3/version; its ./build script -X's
# GitSHA. The proxy knows no commit, so the tag is recorded instead.
etcd_ldflags() { echo "-X go.etcd.io/etcd/api/v3/version.GitSHA=${ETCD_VERSION}"; }

# helm: the variables helm's Makefile sets. The default .Capabilities.KubeVersion (used by
# `helm template` / `helm lint` without a cluster) is the Kubernetes we pin and run.
helm_ldflags() {
  local v=helm.sh/helm/v3
  echo "-X ${v}/internal/version.version=${HELM_VERSION} -X ${v}/internal/version.metadata=" \
       "-X ${v}/internal/version.gitTreeState=clean" \
       "-X ${v}/pkg/chartutil.k8sVersionMajor=${KUBE_MAJOR} -X ${v}/pkg/chartutil.k8sVersionMinor=${KUBE_MINOR}" \
       "-X ${v}/pkg/lint/rules.k8sVersionMajor=${KUBE_MAJOR} -X ${v}/pkg/lint/rules.k8sVersionMinor=${KUBE_MINOR}"
}

# containerd: the variables its Makefile sets.
containerd_ldflags() {
  local v=github.com/containerd/containerd/v2/version
  echo "-X ${v}.Version=${CONTAINERD_VERSION} -X ${v}.Revision=${CONTAINERD_VERSION}" \
       "-X ${v}.Package=github.com/containerd/containerd/v2"
}
cni_ldflags() {
  echo "-X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=${CNI_PLUGINS_VERSION}"
}
coredns_ldflags() { echo "-X github.com/coredns/coredns/coremain.GitCommit=${COREDNS_VERSION}"; }
# jaeger: the variables its scripts/makefiles/BuildInfo.mk sets (the proxy knows no commit: the tag).
jaeger_ldflags() {
  local v=github.com/jaegertracing/jaeger/internal/version jdate
  jdate="$(module_time jaeger github.com/jaegertracing/jaeger)"
  echo "-X ${v}.latestVersion=${JAEGER_VERSION} -X ${v}.commitSHA=${JAEGER_VERSION}" \
       "-X ${v}.date=${jdate:-1970-01-01T00:00:00Z}"
}
build_jaeger() {
  build_family jaeger "jaeger-${JAEGER_VERSION}" jaeger_ldflags \
    jaeger=github.com/jaegertracing/jaeger/cmd/jaeger
}
no_ldflags() { :; }

# The GitOps health runners (hack/tools/health/*/main.go): what Argo CD, kstatus and Flux conclude
# about an object, for the cluster tier's health-check tests.
build_health() {
  build_family health/argocd-lua "health-argocd-lua-${GOPHER_LUA_VERSION}" no_ldflags atlas-health-argocd=.
  build_family health/kstatus "health-kstatus-${CLI_UTILS_VERSION}" no_ldflags atlas-health-kstatus=.
  build_family health/flux-cel "health-flux-cel-${FLUX_RUNTIME_VERSION}" no_ldflags atlas-health-flux=.
}

# The endpoint picker of the Gateway API Inference Extension (cmd/epp) and the CRDs of what it
# watches, into one cache directory: `go install pkg@version` (its module has no replace directive:
# built in module mode with the module's own go.sum, checked against the checksum database, like
# vegeta), the CRDs copied from the same module. bin/epp and bin/inference-extension-crds link them.
build_epp() {
  local dest="${CACHE_ROOT}/epp-${GIE_VERSION}" module=sigs.k8s.io/gateway-api-inference-extension tmp src t0
  if [ -x "${dest}/epp" ] && [ -f "${dest}/.complete" ]; then
    log "epp-${GIE_VERSION}: cached in ${dest}"
  else
    ensure_go
    tmp="${dest}.tmp.$$"; rm -rf "$tmp"; mkdir -p "${tmp}/crds"
    log "epp-${GIE_VERSION}: building ${module}/cmd/epp with $("$GO" env GOVERSION)"
    t0="$(now)"
    (cd "$tmp" && GOBIN="$tmp" "$GO" install -trimpath -ldflags "-s -w" "${module}/cmd/epp@${GIE_VERSION}")
    src="$(cd "$tmp" && "$GO" mod download -json "${module}@${GIE_VERSION}" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
    cp "${src}/config/crd/bases/inference.networking.k8s.io_inferencepools.yaml" \
       "${src}/config/crd/bases/inference.networking.x-k8s.io_inferenceobjectives.yaml" "${tmp}/crds/"
    chmod -R u+w "${tmp}/crds"  # the module cache is read-only
    log "epp-${GIE_VERSION}: built in $(( $(now) - t0 ))s"
    echo "${GIE_VERSION}" > "${tmp}/.complete"
    rm -rf "$dest"; mv "$tmp" "$dest"
  fi
  ln -sfn "${dest}/epp" "${BIN_DIR}/epp"
  ln -sfn "${dest}/crds" "${BIN_DIR}/inference-extension-crds"
}

# pause: a static C binary (the pod sandbox's init), built as kubernetes' build/pause/Makefile
# builds it, from the pause.c of the pinned k8s.io/kubernetes module. Needs gcc and a static
# libc (hack/system-deps.sh node installs them).
build_pause() {
  local name="pause-${PAUSE_VERSION}-k8s-${KUBERNETES_VERSION}" dest tmp src
  dest="${CACHE_ROOT}/${name}"
  if [ -x "${dest}/pause" ] && [ -f "${dest}/.complete" ]; then
    log "${name}: cached in ${dest}"
  else
    ensure_go
    src="$(cd "${TOOLS_DIR}/kube-node" && "$GO" mod download -json "k8s.io/kubernetes@${KUBERNETES_VERSION}" |
      sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')/build/pause/linux/pause.c"
    tmp="${dest}.tmp.$$"; rm -rf "$tmp"; mkdir -p "$tmp"
    log "${name}: building pause from ${src}"
    "${CC:-gcc}" -Os -Wall -Werror -static "-DVERSION=v${PAUSE_VERSION}-atlas" -o "${tmp}/pause" "$src"
    strip "${tmp}/pause" 2>/dev/null || true
    echo "${PAUSE_VERSION}" > "${tmp}/.complete"
    rm -rf "$dest"; mv "$tmp" "$dest"
  fi
  ln -sfn "${dest}/pause" "${BIN_DIR}/pause"
}

build_node() {
  build_family kube-node "kubernetes-node-${KUBERNETES_VERSION}" kube_ldflags \
    kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler \
    kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
    kubelet=k8s.io/kubernetes/cmd/kubelet \
    kube-proxy=k8s.io/kubernetes/cmd/kube-proxy
  build_family containerd "containerd-${CONTAINERD_VERSION}" containerd_ldflags \
    containerd=github.com/containerd/containerd/v2/cmd/containerd \
    containerd-shim-runc-v2=github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
    ctr=github.com/containerd/containerd/v2/cmd/ctr
  # CNI plugins go to bin/cni/: containerd's CNI bin dir must hold plugins only.
  BIN_DIR="${BIN_DIR}/cni" build_family cni "cni-plugins-${CNI_PLUGINS_VERSION}" cni_ldflags \
    bridge=github.com/containernetworking/plugins/plugins/main/bridge \
    loopback=github.com/containernetworking/plugins/plugins/main/loopback \
    host-local=github.com/containernetworking/plugins/plugins/ipam/host-local \
    portmap=github.com/containernetworking/plugins/plugins/meta/portmap
  build_family coredns "coredns-${COREDNS_VERSION}" coredns_ldflags \
    coredns=github.com/coredns/coredns
  build_pause
}

main() {
  local start; start="$(now)"
  if [ "${1:-}" = jaeger ]; then
    build_jaeger
    return
  fi
  if [ "${1:-}" = node ]; then
    build_node
    log "node tools ready in ${BIN_DIR} ($(( $(now) - start ))s): kube-scheduler" \
        "kube-controller-manager kubelet kube-proxy containerd containerd-shim-runc-v2 ctr" \
        "cni/{bridge,loopback,host-local,portmap} coredns pause"
    return
  fi
  build_family kube "kubernetes-${KUBERNETES_VERSION}" kube_ldflags \
    kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
    kubectl=k8s.io/kubernetes/cmd/kubectl
  build_family etcd "etcd-${ETCD_VERSION}" etcd_ldflags \
    etcd=go.etcd.io/etcd/server/v3
  build_family helm "helm-${HELM_VERSION}-k8s${KUBE_MAJOR}.${KUBE_MINOR}" helm_ldflags \
    helm=helm.sh/helm/v3/cmd/helm
  build_health
  build_epp
  build_jaeger
  log "tools ready in ${BIN_DIR} ($(( $(now) - start ))s): kube-apiserver kubectl etcd helm" \
      "atlas-health-{argocd,kstatus,flux} epp jaeger"
}

main "$@"
