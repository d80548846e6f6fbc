#!/usr/bin/env bash
# Lists the running daemons of the kinds Atlas's set-up and tests start (one "pid name" a line,
# sorted), so that .ci/run can tell which of them a `make test` left behind.
set -euo pipefail
names='dockerd|containerd|containerd-shim.*|kubelet|kube-apiserver|kube-proxy|kube-scheduler|kube-control.*|etcd|coredns|redis-server|redis-sentinel|nginx|envoy|epp|jaeger|prometheus'
ps -eo pid=,comm= | awk -v re="^(${names})\$" '$2 ~ re {print $1, $2}' | sort
