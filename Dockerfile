# The beacon operator image (`make docker-build`, IMG ?= beacon:dev).
# Two stages on the same exact base image: the builder installs beacon and its dependencies from pyproject.toml
# into a virtualenv; the final image gets only that virtualenv (no pip, no sources, no build cache), a numeric
# non-root user, and `python -m beacon operator` as its entrypoint. Every dependency ships wheels for this
# Python, so neither stage has (or needs) a compiler.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/beacon
COPY pyproject.toml README.md constraints.txt ./
COPY operator/ operator/
# An optional wheelhouse: hack/kind/operator-image.sh stages wheels/ into its build context (every dependency and
# the build backend, downloaded on the host), so the build needs no network at all. In a plain checkout `wheels*`
# matches nothing and only pyproject.toml is copied (listed so that the instruction always has a source).
COPY pyproject.toml wheels* wheels/
# A regular (not editable) install of the operator alone (never the dev tooling in dev/), at the versions of
# constraints.txt, from the wheelhouse alone when there is one (`--no-index`), byte-compiled
# here because the final root filesystem is read-only; then the installer itself goes, since nothing installs
# anything at run time.
RUN if ls wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links wheels; fi \
    && /opt/beacon/bin/python -m pip install -c constraints.txt "$@" . \
    && /opt/beacon/bin/python -m compileall -q /opt/beacon/lib \
    && /opt/beacon/bin/python -m pip uninstall -y pip

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="beacon" \
      org.opencontainers.image.description="Health-checked service discovery and layered configuration for Kubernetes (kopf operator)" \
      org.opencontainers.image.licenses="Apache-2.0"
# A named user for the numeric id, so getpass and friends work even without the Deployment's POD_ID.
RUN groupadd --gid 65532 beacon \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin beacon
COPY --from=builder /opt/beacon /opt/beacon
ENV PATH=/opt/beacon/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# 9090: /metrics; 8081: /healthz (kopf's liveness endpoint)
EXPOSE 9090 8081
ENTRYPOINT ["python", "-m", "beacon", "operator"]
