# Atlas — developer entry points. `make dev` starts everything, `make test` runs every tier.
# Every target does its own set-up on a fresh machine (virtual env, packages, Redis, tools).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
STAMP := $(VENV)/.installed
IMAGES_DIR ?= .images
# Everything the project downloads or builds outside the checkout lives under one cache folder
# (hack/tools/lib.sh puts Go's caches there too), which `make distclean` removes.
TOOLS_CACHE := $(or $(ATLAS_TOOLS_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/atlas-tools)
export PIP_CACHE_DIR ?= $(TOOLS_CACHE)/pip

.PHONY: help venv system-deps tools jaeger node-tools deps test test-unit test-integration test-cluster test-e2e \
        bench dev dev-up dev-down dev-logs clean distclean kind-up images images-load helm-install lint format \
        docker-up docker-down test-images deploy-up deploy-down test-deploy

help:  ## list targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(STAMP)  ## create .venv and install Atlas with its test dependencies

system-deps:  ## redis-server and wrk from Debian's packages (skipped when present)
	@bash hack/system-deps.sh

tools:  ## build kube-apiserver, etcd, kubectl, helm, the GitOps health runners and jaeger from source (cached outside the checkout)
	@bash hack/tools/build.sh

jaeger:  ## build only Jaeger (the trace backend of the integration tier and the dev stack)
	@bash hack/tools/build.sh jaeger

node-tools: tools  ## build the deploy node's binaries from source (kubelet, containerd, CNI, CoreDNS...)
	@bash hack/system-deps.sh node
	@bash hack/tools/build.sh node

deps: venv system-deps tools

test: deps node-tools  ## run every test tier (unit, integration, cluster, e2e, images, deploy)
	$(PYTEST) tests

# Seconds, before any test tier (.ci/run): the bug-finding lint rules, import order and format
# (ruff), types (mypy) and the packages' import rules (.importlinter). docs/contributing.md.
lint: venv  ## ruff (bugs, import order, format --check), mypy, the import rules: seconds
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache --no-logo .importlinter

format: venv  ## sort imports and format the code in place (ruff); then `make lint` for what is left
	$(VENV)/bin/ruff check --select I --fix .
	$(VENV)/bin/ruff format .

test-unit: venv  ## fast tier: pure functions and fakeredis
	$(PYTEST) tests/unit

test-integration: venv system-deps jaeger  ## real redis-server, real Jaeger
	$(PYTEST) tests/integration

test-cluster: deps  ## real kube-apiserver + etcd + operator
	$(PYTEST) tests/crdcel tests/cluster tests/chart

test-e2e: deps  ## the dev stack driven by the openai SDK and kubectl
	$(PYTEST) tests/e2e

bench: venv jaeger  ## gateway vs nginx, nginx as a proxy, a bare forward on its own stack, LiteLLM and the mock: latency, fixed rate, CPU/request and its ratio to the floors; writes docs/benchmarks.md
	@bash hack/system-deps.sh bench
	$(PY) -m benchmarks

dev-up: deps  ## start the whole stack in the background and write .dev/env
	$(PY) -m atlas_devstack up

dev-down:  ## stop everything dev-up started
	@if [ -x $(PY) ]; then $(PY) -m atlas_devstack down; fi

images:  ## build the gateway, operator and mock-upstream images; docker save them to .images/
	bash hack/images.sh save $(IMAGES_DIR)

deploy-up: deps node-tools  ## Atlas as pods on a single-node cluster from source; writes .deploy/env
	$(PY) -m atlas_devstack.deploy up

deploy-down:  ## remove everything deploy-up started (pods, node, processes, mounts, devices)
	@if [ -x $(PY) ]; then $(PY) -m atlas_devstack.deploy down; fi

test-deploy: deps node-tools  ## the deploy tier: images as pods on the node, faults under traffic
	$(PYTEST) tests/deploy

docker-up:  ## start Debian's Docker engine (off the network) unless one answers
	@bash hack/docker.sh start

docker-down:  ## stop the engine docker-up started
	@bash hack/docker.sh stop

test-images: venv system-deps tools  ## run the images as the chart runs them (needs root for dockerd)
	$(PYTEST) tests/images

dev-logs:
	$(PY) -m atlas_devstack logs

dev: dev-up  ## dev-up, follow the logs, dev-down on Ctrl-C
	@trap '$(MAKE) --no-print-directory dev-down' EXIT; trap 'exit 0' INT TERM; $(PY) -m atlas_devstack logs --follow

clean: dev-down deploy-down  ## stop the stacks; remove .venv, bin and the stacks' state in the checkout
	rm -rf $(VENV) bin .dev .deploy .pytest_cache

distclean:  ## return the machine to fresh: stop everything, remove installed packages, caches, state (DRY_RUN=1 lists)
	@bash hack/distclean.sh

# kind, images and helm targets for users with Docker (see docs/deploy.md)
include hack/kind.mk
