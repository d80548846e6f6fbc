# Atlas images: one Dockerfile, one target per process. Build from the repository root:
#   docker build --target gateway       -t ghcr.io/bugvanquisher/atlas-gateway:0.1.0 .
#   docker build --target operator      -t ghcr.io/bugvanquisher/atlas-operator:0.1.0 .
#   docker build --target mock-upstream -t localhost/atlas-mock-upstream:0.1.0 .  # test fixture
# (`make images` / hack/images.sh builds all three with the tags the chart's defaults use.)
#
# Why one file with targets rather than one Dockerfile per component: the images share their
# base, their venv recipe and their runtime hardening (numeric non-root user, HOME on the
# chart's /tmp volume, no pip, no source tree). Written once, they cannot drift apart, and the
# shared stages are built and cached once for all targets.
#
# Each image installs only its process's extra from pyproject.toml (atlas[gateway],
# atlas[operator], atlas[mock-upstream]) and copies only the package folders it runs: the
# product images hold no devstack, benchmarks or tests.
#
# No `# syntax=` line on purpose: it makes BuildKit pull the Dockerfile frontend from Docker Hub,
# which fails without a registry. The engine's built-in frontend (Docker >= 20.10, BuildKit on)
# has everything used here.
#
# Behind a TLS-intercepting proxy, hand its CA bundle in as a build secret. It is mounted only
# while pip runs and never stored in a layer; without it (the normal case) pip uses its own CAs:
#   docker build --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt ...
# Checked statically by tests/chart/test_dockerfiles.py, run as the chart runs it by tests/images/.

# Pinned to an exact Python patch release on Debian bookworm; bump deliberately. Without a
# registry, hack/images.sh passes a base built with debootstrap from Debian's archive instead.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- venv: an empty virtual env plus the requirements reader, shared by every build stage
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/atlas
WORKDIR /src
# Only what the dependency layers read: a README or source edit must not re-download them.
COPY pyproject.toml ./
COPY hack/pyproject_requirements.py hack/

# ---- one build stage per image. Dependencies first, from pyproject.toml alone (a layer that
# survives source edits), then the project itself (README.md is its long description) without
# dependencies or build isolation (no network needed), then the installers are dropped.
FROM venv AS gateway-build
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python hack/pyproject_requirements.py gateway > /tmp/requirements.txt \
 && /opt/atlas/bin/pip install --no-compile -r /tmp/requirements.txt
COPY README.md ./
COPY core/ core/
COPY gateway/ gateway/
# The wheel holds atlas_core and atlas_gateway only (setuptools finds what was copied); drop
# the other console scripts (the other plane's, kubectl-atlas), which would only fail with
# ModuleNotFoundError.
RUN /opt/atlas/bin/pip install --no-compile --no-deps --no-build-isolation . \
 && rm -f /opt/atlas/bin/atlas-operator /opt/atlas/bin/kubectl-atlas \
 && /opt/atlas/bin/pip uninstall -y pip setuptools wheel

FROM venv AS operator-build
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python hack/pyproject_requirements.py operator > /tmp/requirements.txt \
 && /opt/atlas/bin/pip install --no-compile -r /tmp/requirements.txt
COPY README.md ./
COPY core/ core/
COPY operator/ operator/
RUN /opt/atlas/bin/pip install --no-compile --no-deps --no-build-isolation . \
 && rm -f /opt/atlas/bin/atlas-gateway /opt/atlas/bin/kubectl-atlas \
 && /opt/atlas/bin/pip uninstall -y pip setuptools wheel

FROM venv AS mock-upstream-build
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python hack/pyproject_requirements.py mock-upstream > /tmp/requirements.txt \
 && /opt/atlas/bin/pip install --no-compile -r /tmp/requirements.txt
COPY README.md ./
COPY devstack/ devstack/
RUN /opt/atlas/bin/pip install --no-compile --no-deps --no-build-isolation . \
 && rm -f /opt/atlas/bin/atlas-gateway /opt/atlas/bin/atlas-operator /opt/atlas/bin/kubectl-atlas \
 && /opt/atlas/bin/pip uninstall -y pip setuptools wheel

# ---- runtime: the same base, a venv only; no compiler, no pip, no source
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.source="https://github.com/bugvanquisher/atlas" \
      org.opencontainers.image.licenses="Apache-2.0"
# UID 10001 has no passwd entry, so nothing may look the user up: HOME points at the chart's
# writable /tmp volume (the root filesystem is read-only), and the operator names its kopf
# identity itself (operator/atlas_operator/main.py).
ENV PATH=/opt/atlas/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
WORKDIR /tmp

FROM runtime AS mock-upstream
LABEL org.opencontainers.image.title="atlas-mock-upstream" \
      org.opencontainers.image.description="Atlas test fixture: OpenAI-compatible mock upstream (not a product image)"
COPY --from=mock-upstream-build /opt/atlas /opt/atlas
ENV MOCK_HOST=0.0.0.0 \
    MOCK_PORT=8000
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["python", "-m", "atlas_devstack.mock_upstream"]

FROM runtime AS operator
LABEL org.opencontainers.image.title="atlas-operator" \
      org.opencontainers.image.description="Atlas operator: AtlasKey/AtlasQuota to Redis config, usage to status"
COPY --from=operator-build /opt/atlas /opt/atlas
ENV ATLAS_LIVENESS_HOST=0.0.0.0 \
    ATLAS_LIVENESS_PORT=8081
# A numeric UID/GID without a passwd entry: Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8081
ENTRYPOINT ["python", "-m", "atlas_operator"]

# Last, so a plain `docker build .` builds the gateway.
FROM runtime AS gateway
LABEL org.opencontainers.image.title="atlas-gateway" \
      org.opencontainers.image.description="Atlas token-quota gateway for OpenAI-compatible LLM servers"
COPY --from=gateway-build /opt/atlas /opt/atlas
ENV ATLAS_HOST=0.0.0.0 \
    ATLAS_PORT=8080
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["python", "-m", "atlas_gateway"]
