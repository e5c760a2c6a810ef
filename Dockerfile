# marketo-orchestrator as a container sidecar.
#
# Build:  docker build -t marketo-orchestrator:local \
#           --build-arg REVISION="$(git rev-parse HEAD)" \
#           --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
#           --build-arg SOURCE="$(git remote get-url origin)" .
# Run:    mount the TOML at /etc/marketo-orchestrator/orchestrator.toml, the client
#         secret at /run/secrets/marketo_client_secret and a volume at /data.
#         `docker run IMAGE` runs the daemon; `docker run IMAGE status` (or any
#         other subcommand) runs that command instead.
#
# Stage 1 builds the project's wheel; stage 2 installs only that wheel, with its
# dependencies at the versions pinned in constraints.txt (CI checks that file
# against pyproject.toml), into a slim runtime. Nothing of the build context but
# what .dockerignore lets through (pyproject.toml, README.md, constraints.txt,
# orchestrator/) is ever copied: no secrets, no test data.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
# OCI annotations from build arguments (see Build above); VERSION follows pyproject.toml.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="marketo-orchestrator" \
      org.opencontainers.image.description="Loads delimited files dropped into /data/inbox into Marketo's Bulk Import API." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}"

# A fixed, non-root UID/GID so volume ownership and Kubernetes' runAsUser agree.
RUN groupadd --system --gid 10001 orchestrator \
 && useradd --system --no-log-init --uid 10001 --gid 10001 \
      --home-dir /tmp --no-create-home --shell /usr/sbin/nologin orchestrator \
 && mkdir -p /data /etc/marketo-orchestrator \
 && chown 10001:10001 /data

# The postgres extra (several daemons on one subscription) is pure Python and
# loads the system's libpq. Debian's point releases replace libpq5's exact
# version, so a pin would break the build; the base image fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpq5 \
 && rm -rf /var/lib/apt/lists/*

# The wheel is compiled to bytecode at install time, so the read-only root
# filesystem costs nothing at import. Every dependency comes at its pinned version.
COPY --from=build /wheels /tmp/wheels
COPY --from=build /src/constraints.txt /tmp/wheels/constraints.txt
RUN for wheel in /tmp/wheels/*.whl; do \
      pip install --no-cache-dir --root-user-action=ignore \
        --constraint /tmp/wheels/constraints.txt "${wheel}[postgres]"; \
    done \
 && rm -rf /tmp/wheels

# Runtime: writes go only to /data (the volume) and /tmp (a tmpfs or emptyDir
# when the root filesystem is read-only). The status server listens on all
# interfaces inside the container only; the code's default stays loopback.
# MARKETO_CLIENT_SECRET_FILE holds a path, never the secret itself, so DL3064
# (sensitive data in ENV) does not apply.
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    ORCHESTRATOR_CONFIG=/etc/marketo-orchestrator/orchestrator.toml \
    ORCHESTRATOR_DATA_DIR=/data \
    ORCHESTRATOR_HTTP_LISTEN=0.0.0.0:9400 \
    MARKETO_CLIENT_SECRET_FILE=/run/secrets/marketo_client_secret

VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
EXPOSE 9400

# No curl in the image: the standard library asks /healthz on the port that
# ORCHESTRATOR_HTTP_LISTEN names; any error or non-2xx answer exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; port = os.environ['ORCHESTRATOR_HTTP_LISTEN'].rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

# Exec form: the daemon is PID 1 and receives SIGTERM itself, then drains and
# exits 0 within 10 s. The command is the subcommand: `run` by default; give
# `run --once`, `status` or `--version` as the container's arguments instead.
STOPSIGNAL SIGTERM
ENTRYPOINT ["marketo-orchestrator"]
CMD ["run"]
