#!/usr/bin/env bash
# A Docker engine from Debian's packages, for building Atlas' images on a machine without an init
# system (CI runners, sandboxes). Idempotent:
#   bash hack/docker.sh [start]   when `docker info` does not answer: install docker.io (and
#                                 debootstrap) when missing, start the engine, wait until it answers
#   bash hack/docker.sh deps      install docker.io and debootstrap when missing (no start)
#   bash hack/docker.sh stop      stop the engine this script started (dockerd, then containerd)
#   bash hack/docker.sh status    exit 0 when the engine answers
#   bash hack/docker.sh cli       print the Docker CLI to use with that engine (after `start`)
#
# The engine is kept off the network: no docker0 bridge, no iptables rules, no IP forwarding.
# Builds use `--network host` (hack/images.sh does). It runs its own containerd (Debian's) on a
# private socket, so that a Kubernetes containerd on /run/containerd (the deploy tier's node) is
# never picked up by dockerd, and neither daemon touches the other's state.
# Where things live (override with the variables):
#   ATLAS_DOCKER_RUN=/run/atlas-docker     pidfiles, logs, sockets, daemon configs
#   ATLAS_DOCKER_DATA=/var/lib/atlas-docker  images, layers, build cache (survives restarts)
#   DOCKER_HOST stays the default unix:///var/run/docker.sock so a plain `docker` works.
set -euo pipefail

RUN_DIR="${ATLAS_DOCKER_RUN:-/run/atlas-docker}"
DATA_DIR="${ATLAS_DOCKER_DATA:-/var/lib/atlas-docker}"
SOCKET=/var/run/docker.sock
START_TIMEOUT="${ATLAS_DOCKER_START_TIMEOUT:-60}"
# The CLI is Debian's, the one that matches the engine this script installs and starts: it has
# BuildKit built in, whereas another CLI on PATH (a machine image's /usr/local/bin/docker 28)
# needs the buildx plugin, which Debian does not package. It is resolved only once docker.io is
# installed (install_packages), never before: `DOCKER=...` overrides it for an engine of one's own.
DEBIAN_CLI=/usr/bin/docker
cli() { printf '%s\n' "${DOCKER:-$DEBIAN_CLI}"; }

log() { printf '[docker] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

engine_answers() { command -v "$(cli)" >/dev/null && "$(cli)" -H "unix://${SOCKET}" info >/dev/null 2>&1; }

install_packages() {
  local missing=()
  [ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  [ ${#missing[@]} -eq 0 ] && return
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}: sudo apt-get install -y ${missing[*]}"
  log "installing ${missing[*]} from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
  apt_install "${missing[@]}"
}

# pid_alive FILE: true when FILE names a running process.
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# engine_up: the engine answers; fails fast (exit) when dockerd has died meanwhile.
engine_up() {
  engine_answers && return 0
  pid_alive "${RUN_DIR}/dockerd.pid" || {
    tail -n 20 "${RUN_DIR}/dockerd.log" >&2 || true
    die "dockerd exited; see ${RUN_DIR}/dockerd.log"
  }
  return 1
}

# wait_for SECONDS COMMAND...: poll COMMAND until it succeeds or the deadline passes.
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

write_configs() {
  mkdir -p "${RUN_DIR}" "${DATA_DIR}"
  # containerd: only what dockerd needs. No CRI plugin (that is the Kubernetes node's containerd).
  cat >"${RUN_DIR}/containerd.toml" <<EOF
version = 2
root = "${DATA_DIR}/containerd"
state = "${RUN_DIR}/containerd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "${RUN_DIR}/containerd.sock"
[ttrpc]
  address = "${RUN_DIR}/containerd.sock.ttrpc"
EOF
  # dockerd: off the network (no bridge, no iptables, no forwarding/masquerading), its own
  # containerd, BuildKit on (20.10 has it built in; no buildx plugin in Debian's package).
  cat >"${RUN_DIR}/daemon.json" <<EOF
{
  "hosts": ["unix://${SOCKET}"],
  "bridge": "none",
  "iptables": false,
  "ip-forward": false,
  "ip-masq": false,
  "containerd": "${RUN_DIR}/containerd.sock",
  "data-root": "${DATA_DIR}/docker",
  "exec-root": "${RUN_DIR}/exec",
  "pidfile": "${RUN_DIR}/dockerd.engine.pid",
  "features": { "buildkit": true }
}
EOF
}

start() {
  # An engine that answers is used as it is (Docker Desktop, docker-ce, a previous start).
  if engine_answers; then log "engine already answering on ${SOCKET}"; return; fi
  install_packages
  [ "$(id -u)" = 0 ] || die "the engine is not running and starting it needs root"
  write_configs
  # One starter at a time (e.g. `make deploy-up` and a test session); the second then finds
  # the engine answering.
  exec 9>"${RUN_DIR}/.start.lock"
  flock 9
  if engine_answers; then log "engine already answering on ${SOCKET}"; return; fi
  if ! pid_alive "${RUN_DIR}/containerd.pid"; then
    log "starting containerd (log: ${RUN_DIR}/containerd.log)"
    # setsid: a daemon of its own, not killed with the shell that started it.
    setsid /usr/bin/containerd --config "${RUN_DIR}/containerd.toml" \
      >>"${RUN_DIR}/containerd.log" 2>&1 </dev/null &
    echo $! >"${RUN_DIR}/containerd.pid"
    wait_for "$START_TIMEOUT" test -S "${RUN_DIR}/containerd.sock" \
      || die "containerd did not open its socket in ${START_TIMEOUT}s; see ${RUN_DIR}/containerd.log"
  fi
  if ! pid_alive "${RUN_DIR}/dockerd.pid"; then
    log "starting dockerd (log: ${RUN_DIR}/dockerd.log)"
    setsid /usr/sbin/dockerd --config-file "${RUN_DIR}/daemon.json" \
      >>"${RUN_DIR}/dockerd.log" 2>&1 </dev/null &
    # dockerd writes its own pidfile (dockerd.engine.pid) once up; ours is there at once.
    echo $! >"${RUN_DIR}/dockerd.pid"
  fi
  wait_for "$START_TIMEOUT" engine_up || {
    tail -n 20 "${RUN_DIR}/dockerd.log" >&2 || true
    die "docker info did not answer within ${START_TIMEOUT}s; see ${RUN_DIR}/dockerd.log"
  }
  log "engine ready: $("$(cli)" version --format 'server {{.Server.Version}}, API {{.Server.APIVersion}}')"
}

# stop_pid NAME PIDFILE: SIGTERM, wait up to 30 s, then SIGKILL. Only the process this script
# started: its command line must name our config in RUN_DIR (a reused pid is left alone).
stop_pid() {
  local name="$1" file="$2" pid
  pid_alive "$file" || { rm -f "$file"; return 0; }
  pid="$(cat "$file")"
  if ! tr '\0' ' ' <"/proc/${pid}/cmdline" 2>/dev/null | grep -qF -- "${RUN_DIR}/"; then
    log "pid ${pid} in ${file} is not our ${name}; leaving it alone"
    rm -f "$file"
    return 0
  fi
  log "stopping ${name} (pid ${pid})"
  kill -TERM "$pid"
  if ! wait_for 30 bash -c "! kill -0 $pid 2>/dev/null"; then
    log "${name} did not exit in 30s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

stop() {
  stop_pid dockerd "${RUN_DIR}/dockerd.pid"
  stop_pid containerd "${RUN_DIR}/containerd.pid"
}

case "${1:-start}" in
  start) start ;;
  deps) install_packages ;;
  stop) stop ;;
  status) engine_answers ;;
  cli) cli ;;
  *) die "usage: $0 [start|stop|status|deps|cli]" ;;
esac
