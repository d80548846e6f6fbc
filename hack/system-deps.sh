#!/usr/bin/env bash
# Installs the system packages Atlas' tests and benchmarks use, from Debian's archive:
# redis-server (integration/cluster/e2e tiers, make dev; the Sentinel tests run it as
# `redis-server sentinel.conf --sentinel`, so Debian's redis-sentinel package is not needed)
# and wrk (make bench).
#   bash hack/system-deps.sh        # the above
#   bash hack/system-deps.sh bench  # also nginx, the static reference upstream of make bench
#                                   # (the bench configures and runs its own; the package's
#                                   # service is never used)
#   bash hack/system-deps.sh node   # also what the deploy tier's node needs (make deploy-up):
#                                   # runc, iptables, conntrack, iproute2, kmod, and gcc with a
#                                   # static libc for building pause (hack/tools/build.sh node)
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v wrk >/dev/null || missing+=(wrk)
if [ "${1:-}" = bench ]; then
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
fi
if [ "${1:-}" = node ]; then
  # command -> Debian package; sbin tools may be off a non-root PATH, so look there too.
  export PATH="${PATH}:/usr/sbin:/sbin"
  for pair in runc:runc iptables:iptables conntrack:conntrack ip:iproute2 modprobe:kmod \
              gcc:gcc nsenter:util-linux; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
  done
  [ -f /usr/lib/x86_64-linux-gnu/libc.a ] || [ -f /usr/lib/libc.a ] || missing+=(libc6-dev)
fi
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "missing: ${missing[*]} — install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]} from Debian's packages"
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
apt_install "${missing[@]}"
# The Debian packages may start a system-wide redis on :6379 (and nginx on :80); Atlas never uses
# them (tests, the dev stack and the bench start their own on free ports), so leave them alone
# rather than guess the init system.
