#!/usr/bin/env bash
# Build Atlas' images with the Docker engine from Debian's packages, without any registry:
#   bash hack/images.sh [save] [OUTPUT_DIR]  build, then docker save (`make images`; OUTPUT_DIR
#                                            default .images/)
#   bash hack/images.sh build                build only (tests/images does this)
#   bash hack/images.sh tags                 the references it builds, one per line
# ATLAS_PYTHON_IMAGE=python:3.11.11-slim-bookworm (a registry at hand): use that base instead
# of the debootstrap one (then neither root nor debootstrap is needed).
#
# It builds (targets of ./Dockerfile), tagged with the references the chart's DEFAULT values use
# (charts/atlas/values.yaml repository + Chart.yaml appVersion), so the chart needs no override:
#   ghcr.io/bugvanquisher/atlas-gateway:<appVersion>    -> OUTPUT_DIR/gateway.tar
#   ghcr.io/bugvanquisher/atlas-operator:<appVersion>   -> OUTPUT_DIR/operator.tar
#   localhost/atlas-mock-upstream:<appVersion>          -> OUTPUT_DIR/mock-upstream.tar
#     (test fixture for the deploy tier: python -m atlas_devstack.mock_upstream on :8000)
# The tarballs are `docker save` archives: load them into a node with
#   ctr -n k8s.io images import OUTPUT_DIR/gateway.tar
#
# Steps (each prints its time):
#  1. the engine: hack/docker.sh (installs docker.io + debootstrap when missing, starts dockerd);
#  2. the base: Debian bookworm + python3, python3-venv, python-is-python3, ca-certificates, made
#     with debootstrap from Debian's archive (then upgraded from bookworm-updates and
#     bookworm-security) ONCE and cached outside the checkout under
#     ${ATLAS_TOOLS_CACHE:-~/.cache/atlas-tools}/images/, keyed by the recipe below; imported with
#     `docker import` and passed as the Dockerfile's PYTHON_IMAGE (a registry's python:*-slim
#     is what users with network access get by default);
#  3. the images: `docker build --network host`; pip reaches PyPI through this machine's
#     intercepting proxy with the system CA bundle handed in as a build secret (never in a
#     layer). The images themselves are exactly what a plain `docker build` makes;
#  4. `docker save` of each image to OUTPUT_DIR (rewritten only when the image changed).
# Warm runs reuse the cached base and Docker's layer cache.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${HOME:=$(getent passwd "$(id -u)" | cut -d: -f6)}"
export HOME
CACHE_ROOT="${ATLAS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/atlas-tools}"
# The Docker CLI is resolved by hack/docker.sh once it has installed and started the engine
# (main, step 1), never here: on a fresh machine Debian's CLI does not exist yet, and the machine
# image's own /usr/local/bin/docker needs a buildx plugin Debian does not package.
DOCKER="${DOCKER:-}"
# With a registry at hand: ATLAS_PYTHON_IMAGE=python:3.11.11-slim-bookworm skips debootstrap.
PYTHON_IMAGE="${ATLAS_PYTHON_IMAGE:-}"
CA_BUNDLE="${ATLAS_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

# The base recipe: change any of these and the cache key (and so the base) changes.
BASE_SUITE=bookworm
BASE_MIRROR="${ATLAS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
BASE_SECURITY_MIRROR="${ATLAS_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
BASE_RECIPE_REVISION=2  # bump when the steps in build_base change

log() { printf '[images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# timed NAME COMMAND...: run COMMAND, then print how long it took.
timed() {
  local name="$1" start=$SECONDS; shift
  "$@"
  log "$(printf '%-28s %4ds' "$name" $((SECONDS - start)))"
}

app_version() { sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "${REPO_ROOT}/charts/atlas/Chart.yaml"; }
# chart_repository NAME: the default image repository values.yaml gives NAME (gateway/operator).
chart_repository() {
  sed -n "s|^ *repository: *\([^ ]*/atlas-$1\) *\$|\1|p" "${REPO_ROOT}/charts/atlas/values.yaml" | head -n1
}

VERSION="$(app_version)"
[ -n "$VERSION" ] || die "no appVersion in charts/atlas/Chart.yaml"
GATEWAY_REF="$(chart_repository gateway):${VERSION}"
OPERATOR_REF="$(chart_repository operator):${VERSION}"
MOCK_REF="localhost/atlas-mock-upstream:${VERSION}"
IMAGE_SOURCE="https://github.com/bugvanquisher/atlas"  # the Dockerfile's source label
case "$GATEWAY_REF$OPERATOR_REF" in :*|*::*) die "no image repository found in charts/atlas/values.yaml" ;; esac

SAVE=1
case "${1:-save}" in
  tags) printf '%s\n' "$GATEWAY_REF" "$OPERATOR_REF" "$MOCK_REF"; exit 0 ;;
  build) SAVE=0; shift ;;
  save) [ $# -eq 0 ] || shift ;;
  -*) die "usage: $0 [save [OUTPUT_DIR] | build | tags]" ;;
  *) ;;  # a bare OUTPUT_DIR: save into it
esac
OUT_DIR="${1:-${REPO_ROOT}/.images}"
LOG_DIR="${OUT_DIR}"

BASE_KEY="$(printf '%s\n' "$BASE_SUITE" "$BASE_MIRROR" "$BASE_SECURITY_MIRROR" "$BASE_PACKAGES" \
  "$BASE_RECIPE_REVISION" "$(uname -m)" \
  | sha256sum | cut -c1-12)"
BASE_DIR="${CACHE_ROOT}/images"
BASE_TAR="${BASE_DIR}/debian-${BASE_SUITE}-python-${BASE_KEY}.tar"
BASE_REF="localhost/atlas-build-base:${BASE_SUITE}-${BASE_KEY}"

build_base() {
  mkdir -p "$BASE_DIR"
  # One builder at a time; a second run waits, then finds the tarball.
  exec 9>"${BASE_DIR}/.lock"
  flock 9
  if [ -s "$BASE_TAR" ]; then log "base cached: ${BASE_TAR}"; return; fi
  [ "$(id -u)" = 0 ] || die "building the base with debootstrap needs root; with a registry at hand set ATLAS_PYTHON_IMAGE=python:3.11.11-slim-bookworm"
  command -v debootstrap >/dev/null || bash "${REPO_ROOT}/hack/docker.sh" deps
  local root="${BASE_DIR}/rootfs-${BASE_KEY}.tmp"
  rm -rf "$root"
  log "debootstrap ${BASE_SUITE} (${BASE_PACKAGES}) from ${BASE_MIRROR}"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$BASE_SUITE" "$root" "$BASE_MIRROR" \
    >"${BASE_DIR}/debootstrap-${BASE_KEY}.log" 2>&1 \
    || die "debootstrap failed; see ${BASE_DIR}/debootstrap-${BASE_KEY}.log"
  # The point releases' and security updates, as the official python images carry them.
  printf 'deb %s %s main\n' "$BASE_MIRROR" "$BASE_SUITE" "$BASE_MIRROR" "${BASE_SUITE}-updates" \
    "$BASE_SECURITY_MIRROR" "${BASE_SUITE}-security" >"$root/etc/apt/sources.list"
  log "apt-get upgrade from ${BASE_SUITE}-updates and ${BASE_SUITE}-security"
  { chroot "$root" apt-get update -qq && DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get -qq -y upgrade \
    && chroot "$root" apt-get clean; } >>"${BASE_DIR}/debootstrap-${BASE_KEY}.log" 2>&1 \
    || die "upgrading the base failed; see ${BASE_DIR}/debootstrap-${BASE_KEY}.log"
  # What a container never needs: package lists and caches, docs, man pages, translations.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/var/log/*.log "$root"/tmp/* "$root"/debootstrap
  # The build host's own name and resolver: the engine provides a container's.
  rm -f "$root"/etc/resolv.conf "$root"/etc/hostname
  tar --numeric-owner --xattrs -C "$root" -cf "${BASE_TAR}.tmp" .
  mv "${BASE_TAR}.tmp" "$BASE_TAR"
  rm -rf "$root"
}

import_base() {
  if "$DOCKER" image inspect "$BASE_REF" >/dev/null 2>&1; then return; fi
  # The official python image's defaults that matter to a build: PATH, a UTF-8 locale.
  "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$BASE_TAR" "$BASE_REF" >/dev/null
}

# build TARGET REF
build() {
  local secret=()
  [ -s "$CA_BUNDLE" ] && secret=(--secret "id=pip-ca,src=${CA_BUNDLE}")
  DOCKER_BUILDKIT=1 "$DOCKER" build --network host --progress plain \
    --build-arg "PYTHON_IMAGE=${PYTHON_IMAGE:-$BASE_REF}" "${secret[@]}" \
    --target "$1" -t "$2" "$REPO_ROOT" >"${LOG_DIR}/build-$1.log" 2>&1 \
    || { tail -n 30 "${LOG_DIR}/build-$1.log" >&2; die "docker build --target $1 failed; see ${LOG_DIR}/build-$1.log"; }
}

# save REF FILE: docker save, unless FILE already holds this exact image.
save() {
  local id stamp="${2}.id"
  id="$("$DOCKER" image inspect --format '{{.Id}}' "$1")"
  if [ -s "$2" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$id" ]; then return; fi
  "$DOCKER" save -o "${2}.tmp" "$1"
  chmod 0644 "${2}.tmp"
  mv "${2}.tmp" "$2"
  echo "$id" >"$stamp"
}

main() {
  local total=$SECONDS
  mkdir -p "$OUT_DIR"
  timed "engine" bash "${REPO_ROOT}/hack/docker.sh" start
  DOCKER="$(bash "${REPO_ROOT}/hack/docker.sh" cli)"
  export DOCKER
  if [ -z "$PYTHON_IMAGE" ]; then
    timed "base (debootstrap once)" build_base
    timed "base import" import_base
  fi
  timed "build gateway" build gateway "$GATEWAY_REF"
  timed "build operator" build operator "$OPERATOR_REF"
  timed "build mock-upstream" build mock-upstream "$MOCK_REF"
  # Earlier builds of these images, now untagged: only ours (by label), never anyone else's.
  "$DOCKER" image prune --force --filter "label=org.opencontainers.image.source=${IMAGE_SOURCE}" >/dev/null
  if [ "$SAVE" = 1 ]; then
    timed "save gateway" save "$GATEWAY_REF" "${OUT_DIR}/gateway.tar"
    timed "save operator" save "$OPERATOR_REF" "${OUT_DIR}/operator.tar"
    timed "save mock-upstream" save "$MOCK_REF" "${OUT_DIR}/mock-upstream.tar"
  fi
  log "total $((SECONDS - total))s"
  "$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' \
    | grep -F -e "$GATEWAY_REF" -e "$OPERATOR_REF" -e "$MOCK_REF" >&2 || true
  [ "$SAVE" = 1 ] || return 0
  printf '%s\n' "${OUT_DIR}/gateway.tar" "${OUT_DIR}/operator.tar" "${OUT_DIR}/mock-upstream.tar"
}

main
