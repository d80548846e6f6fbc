#!/usr/bin/env bash
# Installs the system packages Atlas' tests and benchmarks use, from Debian's archive:
# redis-server (integration/cluster/e2e tiers, make dev) and wrk (make bench).
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v wrk >/dev/null || missing+=(wrk)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "missing: ${missing[*]} — install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]} from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian package may start a system-wide redis on :6379; Atlas never uses it (tests and the
# dev stack start their own on free ports), so leave it alone rather than guess the init system.
