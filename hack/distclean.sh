#!/usr/bin/env bash
# `make distclean`: return this machine to fresh as far as Atlas is concerned, so that the next
# `make test` (or `.ci/run` from a fresh clone) runs exactly as a new user's first one does.
# It removes what the project's own files installed or created, and nothing else:
#   - whatever is still running: the dev stack, the deploy stack (its node, mounts, devices),
#     the Docker engine hack/docker.sh started;
#   - the Debian packages the set-up scripts installed (the list hack/apt.sh recorded: each
#     package an install added, dependencies included, never one that was there before);
#   - the tools cache (${ATLAS_TOOLS_CACHE:-~/.cache/atlas-tools}: the binaries built from
#     source, Go's module and build caches, pip's cache, the image base, bench tools);
#   - the Docker engine's data and run directories (/var/lib/atlas-docker, /run/atlas-docker);
#   - in the checkout: .venv, bin, .dev, .deploy, .deploy-test, .images, .bench, .pytest_cache.
# DRY_RUN=1 prints what it would remove and removes nothing.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${HOME:=$(getent passwd "$(id -u)" | cut -d: -f6)}"
CACHE_ROOT="${ATLAS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/atlas-tools}"
DOCKER_RUN="${ATLAS_DOCKER_RUN:-/run/atlas-docker}"
DOCKER_DATA="${ATLAS_DOCKER_DATA:-/var/lib/atlas-docker}"
APT_STATE_FILE="${ATLAS_APT_STATE:-/var/lib/atlas/apt-installed}"
DRY_RUN="${DRY_RUN:-0}"

log() { printf '[distclean] %s\n' "$*" >&2; }
run() { log "$*"; [ "$DRY_RUN" = 1 ] || "$@"; }

cd "$REPO_ROOT"
PY="${REPO_ROOT}/.venv/bin/python"

# 1. What is running. Each stop is idempotent and only touches what the project started.
if [ -x "$PY" ]; then
  run "$PY" -m atlas_devstack down || log "dev-down failed; continuing"
  for state in .deploy .deploy-test; do
    [ -d "$state" ] && { run "$PY" -m atlas_devstack.deploy --state-dir "$state" down || log "deploy down ($state) failed; continuing"; }
  done
fi
[ -e "${DOCKER_RUN}" ] && { run bash hack/docker.sh stop || log "docker.sh stop failed; continuing"; }

# 2. The Debian packages the set-up scripts installed, and only those.
if [ -s "$APT_STATE_FILE" ]; then
  mapfile -t packages < <(sort -u "$APT_STATE_FILE")
  installed=()
  for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null | grep -qx installed && installed+=("$pkg")
  done
  if [ "${#installed[@]}" -gt 0 ]; then
    run env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 purge -y -qq "${installed[@]}"
  fi
fi
[ -e "$APT_STATE_FILE" ] && run rm -f "$APT_STATE_FILE"
[ -d "$(dirname "$APT_STATE_FILE")" ] && run rmdir --ignore-fail-on-non-empty "$(dirname "$APT_STATE_FILE")"

# 3. Caches and state outside the checkout, then inside it. A mount left below the engine's
# directories (dockerd binds its default network namespace under its exec root and does not
# always unmount it when stopped) would make rm fail with "Device or resource busy": unmount
# those first, the deepest first.
for root in "$DOCKER_DATA" "$DOCKER_RUN"; do
  awk -v root="$root" '$2 == root || index($2, root "/") == 1 {print $2}' /proc/mounts | sort -r |
    while read -r mountpoint; do run umount -l "$mountpoint"; done
done
for path in "$CACHE_ROOT" "$DOCKER_DATA" "$DOCKER_RUN" \
            .venv bin .dev .deploy .deploy-test .images .bench .pytest_cache; do
  [ -e "$path" ] || [ -L "$path" ] || continue
  run rm -rf "$path"
done
log "done: the next make test starts from nothing"
