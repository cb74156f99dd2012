# syntax=docker/dockerfile:1
#
# skr — Secure Key Release sidecar for Azure confidential containers (drop-in for mcr.microsoft.com/aci/skr).
#
#   docker build -t <registry>/skr:0.1.0 .
#
# What this image guarantees:
# - Every third-party package comes from requirements.lock and is checked against its sha256 there
#   (`pip install --require-hashes --only-binary=:all:`): no unpinned download, no compiler, no sdist.
#   Refresh both lock files with `make lock` (pip-tools `pip-compile --generate-hashes`, see the Makefile);
#   the locks are resolved for CPython 3.11 on Linux, the same minor version as the base image below —
#   change both together.
# - The project itself is installed from its own wheel with `--no-deps`, so nothing outside the lock can
#   slip in through the project's dependency list.
# - It runs as the numeric non-root user 65532 and works with a read-only root filesystem: Python writes no
#   bytecode at run time (stdlib and site-packages are compiled at build time); the only writable paths are
#   the volumes /var/lib/skr (state) and /var/log/skr (audit log).
# - ENTRYPOINT is `skr serve`, no shell script: skr reads the Go sidecar's environment contract itself
#   (SkrSideCarArgs, Port, LogLevel, LogFile) as well as its own SKR_* variables. Extra flags go in the
#   container's `args` (Kubernetes) or after the image name (`docker run IMAGE --port 9000`).
#
# Base image: pinned by tag. Pin it by digest as well for reproducible builds (the tag moves with Debian
# security updates — rebuild regularly either way):
#   docker buildx imagetools inspect python:3.11-slim-bookworm --format '{{json .Manifest.Digest}}'
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------------
# build: resolve nothing, download only what the locks name, build the project wheel, assemble /opt/skr.
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

# Build backend (setuptools, wheel) from its own hash-pinned lock; only this stage sees it.
COPY requirements-build.lock /tmp/requirements-build.lock
RUN python -m pip install --require-hashes --only-binary=:all: --no-deps -r /tmp/requirements-build.lock

# Runtime dependencies into a pip-less virtual environment (pip is driven from outside with --python), so
# the final image carries no package manager that could fetch code at run time.
COPY requirements.lock /tmp/requirements.lock
RUN python -m venv --without-pip /opt/skr \
 && python -m pip --python /opt/skr/bin/python install --require-hashes --only-binary=:all: --no-deps \
        -r /tmp/requirements.lock

# The project: its wheel, installed without dependencies (they all came from the lock above).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY skr ./skr
RUN python -m pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/dist . \
 && python -m pip --python /opt/skr/bin/python install --no-deps /tmp/dist/skr-*.whl \
 && /opt/skr/bin/python -m compileall -q /opt/skr/lib

# ---------------------------------------------------------------------------------------------------------
# runtime: the same base image, the virtual environment, nothing else.
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="skr" \
      org.opencontainers.image.description="Secure Key Release sidecar for Azure confidential containers (AMD SEV-SNP, MAA, Key Vault / Managed HSM)" \
      org.opencontainers.image.licenses="MIT"

# SKR_STATE_DIR and HOME point into the state volume: skr's default state directory is under $HOME, and
# the image's user has no home directory on a read-only root.
ENV PATH=/opt/skr/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SKR_STATE_DIR=/var/lib/skr \
    HOME=/var/lib/skr

COPY --from=build /opt/skr /opt/skr

# Compile the stdlib's bytecode once here (the official python images strip .pyc files to stay small; where
# they are present this is a no-op), so start-up does not recompile on every start — the root filesystem
# is read-only at run time. Then create the two writable directories, owned by the runtime user and closed
# to everyone else.
RUN python -c "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_path('stdlib'), quiet=1)" \
 && mkdir -p /var/lib/skr /var/log/skr \
 && chown 65532:65532 /var/lib/skr /var/log/skr \
 && chmod 0700 /var/lib/skr /var/log/skr

# Numeric user and group (no /etc/passwd entry needed): Kubernetes' runAsNonRoot can verify a numeric UID.
USER 65532:65532
WORKDIR /var/lib/skr
VOLUME ["/var/lib/skr", "/var/log/skr"]

# Documentation only: skr binds 127.0.0.1 by default, reachable from the containers of the same pod or
# container group, never from outside.
EXPOSE 8080

ENTRYPOINT ["skr", "serve"]
