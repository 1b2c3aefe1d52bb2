# syntax=docker/dockerfile:1
#
# edgeroute gateway image.
#
#   docker build -t edgeroute .
#   docker run --rm -p 8080:8080 -v "$PWD/edgeroute.yaml:/etc/edgeroute/config.yaml:ro" \
#     -e EDGEROUTE_REDIS_URL=redis://redis:6379/0 -e EDGEROUTE_WORKERS=2 \
#     --read-only --tmpfs /tmp edgeroute
#
# The config must set `server.host: 0.0.0.0` (the default, 127.0.0.1, is unreachable from
# outside the container). The same image runs the other subcommands too, e.g.
#   docker run --rm edgeroute mock-provider --host 0.0.0.0 --port 9101
# Runs as uid 10001, writes nothing outside /tmp: fine with a read-only root filesystem.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: a wheel of the project (Lua scripts inside), installed into a venv ----------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# Only what the wheel is built from. pyproject.toml force-includes lua/ as edgeroute/lua/.
COPY pyproject.toml README.md ./
COPY edgeroute/ edgeroute/
COPY lua/ lua/

RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv /opt/edgeroute \
 && /opt/edgeroute/bin/pip install "$(ls /dist/edgeroute-*.whl)[fast]" \
 # Prove the installed package (not this checkout) carries its Lua scripts and uvloop.
 && cd / \
 && /opt/edgeroute/bin/python -c "import uvloop; from edgeroute.state.scripts import load_scripts; load_scripts()" \
 && /opt/edgeroute/bin/edgeroute --version

# ---- runtime: the venv on a clean base, non-root -----------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="edgeroute" \
      org.opencontainers.image.description="Cluster-consistent LLM routing gateway (OpenAI-compatible)" \
      org.opencontainers.image.licenses="Apache-2.0"

# EDGEROUTE_WORKERS: gateway processes sharing the port (`edgeroute serve --workers`): a
# number, or `auto` for the CPUs the container may use (its CPU quota included). Above 1 it
# needs Redis state (EDGEROUTE_REDIS_URL); the metrics directory they share lives in /tmp.
ENV PATH="/opt/edgeroute/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    EDGEROUTE_WORKERS=1

RUN groupadd --system --gid 10001 edgeroute \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin edgeroute \
 && mkdir -p /etc/edgeroute

COPY --from=builder /opt/edgeroute /opt/edgeroute

USER 10001:10001
EXPOSE 8080
# SIGTERM drains: /readyz turns 503, in-flight requests get server.shutdown_timeout_s.
STOPSIGNAL SIGTERM

# Liveness with the interpreter already in the image (no curl). Point it elsewhere with
# EDGEROUTE_HEALTHCHECK_URL (another port, or a mock-provider's /healthz).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('EDGEROUTE_HEALTHCHECK_URL', 'http://127.0.0.1:8080/healthz'), timeout=2)"]

ENTRYPOINT ["edgeroute"]
CMD ["serve", "--config", "/etc/edgeroute/config.yaml"]
