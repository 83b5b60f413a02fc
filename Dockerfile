# syntax=docker/dockerfile:1
#
# One image for every ap4k component: `ap4k serve`, `ap4k carrier`, `ap4k operator`.
#
#   docker build -t ap4k .
#   docker run --rm --read-only --tmpfs /tmp -p 7438:7438 \
#       -e AP4K_DATABASE_URL=postgresql://user:pass@db.example:5432/ap4k ap4k serve
#
# Stage 1 builds the ap4k wheel and a wheel for every dependency; stage 2 installs them
# offline into a clean slim image, so no compiler, build backend or pip cache ships.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Only what the wheel is built from (pyproject's hatch targets); see .dockerignore.
COPY pyproject.toml README.md ./
COPY core/ core/
COPY server/ server/
COPY carrier/ carrier/
COPY operator/ operator/
COPY client/ client/
COPY bench/ bench/

# `pip wheel '.[all]'` builds ap4k through its PEP 517 backend (hatchling, fetched in an
# isolated build environment) and collects wheels for the runtime dependencies of every
# component (the `all` extra: server, carrier, operator, forwarder) into /wheels.
RUN pip wheel --wheel-dir /wheels '.[all]'


FROM ${PYTHON_IMAGE} AS runtime

ARG AP4K_UID=10001

LABEL org.opencontainers.image.title="ap4k" \
      org.opencontainers.image.description="Asynchronous processing for Kubernetes: a PostgreSQL-backed queue that delivers messages as HTTP requests" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="https://github.com/ap4k/ap4k"

# The root filesystem is meant to be mounted read-only (Kubernetes
# readOnlyRootFilesystem, `docker run --read-only`): everything the process may write
# (home, caches, platformdirs' data dir for an embedded PostgreSQL, sockets) lives under
# /tmp, which the chart and the docs mount as an emptyDir / tmpfs.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    XDG_DATA_HOME=/tmp/.local/share \
    XDG_STATE_HOME=/tmp/.local/state \
    XDG_RUNTIME_DIR=/tmp/.runtime

# Install from the wheels of stage 1 only (--no-index): the image gets exactly what was
# resolved there. The wheel file is named by path, so pip does not resolve a version;
# `[all]` adds every component's extra. --compile: bytecode is written now, since nothing can
# be written at run time.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    set -- /wheels/ap4k-*.whl \
    && pip install --no-index --compile --find-links=/wheels "/wheels/${1##*/}[all]" \
    && ap4k --help >/dev/null

# A numeric, non-root user (Kubernetes' runAsNonRoot can only verify numeric ids), with no
# home directory of its own: HOME is /tmp.
RUN groupadd --system --gid "${AP4K_UID}" ap4k \
    && useradd --system --uid "${AP4K_UID}" --gid "${AP4K_UID}" --no-create-home \
        --home-dir /tmp --shell /usr/sbin/nologin ap4k

USER ${AP4K_UID}:${AP4K_UID}
WORKDIR /tmp

# 7438: the server's HTTP API and /metrics. 7439: a carrier's /metrics and /healthz.
# 8080: the operator's /metrics and /healthz.
EXPOSE 7438 7439 8080

ENTRYPOINT ["ap4k"]
CMD ["serve"]
