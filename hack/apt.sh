# apt_install PACKAGE...: install Debian packages (root only); sourced by the set-up scripts.
# Waits for the dpkg lock instead of failing when another set-up step (a parallel `make` target,
# a test fixture starting the Docker engine) installs at the same time, and records every package
# the install added (dependencies included, packages already present excluded) in a state file,
# so that `make distclean` (hack/distclean.sh) removes exactly those and nothing else.
APT_STATE_FILE="${ATLAS_APT_STATE:-/var/lib/atlas/apt-installed}"

_installed_packages() { dpkg-query -W -f='${db:Status-Status} ${Package}\n' 2>/dev/null | sed -n 's/^installed //p' | sort -u; }

apt_install() {
  [ "$#" -gt 0 ] || return 0
  export DEBIAN_FRONTEND=noninteractive
  local apt=(apt-get -o DPkg::Lock::Timeout=600 -y -qq --no-install-recommends) before rc=0
  before="$(_installed_packages)"
  "${apt[@]}" install "$@" >/dev/null 2>&1 || {
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    "${apt[@]}" install "$@" >/dev/null
  } || rc=$?
  # Whatever got in, even by a failed install, is ours to remove again.
  mkdir -p "$(dirname "$APT_STATE_FILE")"
  comm -13 <(printf '%s\n' "$before") <(_installed_packages) >>"$APT_STATE_FILE"
  return "$rc"
}
