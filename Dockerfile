# The pdm-edge agent image: a gateway agent in a container (DEPLOYMENT.md, "Docker").
#
#   docker build -t pdm-edge .
#   docker run -d --name pdm-edge --restart unless-stopped --stop-timeout 30 \
#       -v pdm-edge-data:/var/lib/pdm-edge -v /srv/pdm-edge/agent.toml:/etc/pdm-edge/agent.toml:ro \
#       -e PDM_GATEWAY_ID=plant-a-line-3 pdm-edge
#
# Configuration: the TOML file at /etc/pdm-edge/agent.toml (the image holds a minimal one; mount yours over it) and
# PDM_ variables (.env.example lists them). Secrets as files: PDM_CENTRAL__TOKEN_FILE=/run/secrets/central-token.
# Data: the SQLite buffer in the volume /var/lib/pdm-edge. Runs as uid 10001, never root; RTU devices need
# `--device /dev/ttyUSB0 --group-add dialout`. The status API listens on 127.0.0.1:8080 inside the container (the
# healthcheck's address); to publish it, bind 0.0.0.0:8080 and set a token (PDM_STATUS__BIND, PDM_STATUS__TOKEN_FILE).
# tests/deploy/test_docker.py lints this file (hadolint) and runs its install steps in a clean virtual environment.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the project and its dependencies in a virtual environment, with pip's build tools -----------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY drivers ./drivers
COPY model ./model
COPY sync ./sync
COPY central ./central
COPY web ./web
RUN /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/pdm-edge model verify \
    && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools \
    && find /opt/venv -depth -name __pycache__ -type d -exec rm -rf {} +

# --- runtime: the virtual environment alone, a non-root user, no compilers, no pip, no caches --------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="pdm-edge" \
      org.opencontainers.image.description="Predictive-maintenance agent for factory gateways" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 pdm-edge \
    && useradd --system --uid 10001 --gid pdm-edge --groups dialout --home-dir /var/lib/pdm-edge --no-create-home \
       --shell /usr/sbin/nologin pdm-edge \
    && install -d -o pdm-edge -g pdm-edge -m 0750 /var/lib/pdm-edge \
    && install -d -m 0755 /etc/pdm-edge \
    && printf '%s\n' \
       '# The image default: every setting comes from PDM_ variables (PDM_GATEWAY_ID at least; see .env.example).' \
       '# Mount your own agent.toml over this file to configure devices: pdm-edge check-config checks it.' \
       > /etc/pdm-edge/agent.toml \
    && chmod 0644 /etc/pdm-edge/agent.toml
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PDM_CONFIG=/etc/pdm-edge/agent.toml \
    PDM_DATA_DIR=/var/lib/pdm-edge
VOLUME ["/var/lib/pdm-edge"]
WORKDIR /etc/pdm-edge
USER 10001:10001
EXPOSE 8080
# Liveness of the agent's status API (GET /healthz); the agent reads no request body and needs no token for it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status != 200)"]
# SIGTERM: the agent commits and acknowledges what is queued and exits within 20 s; give it 30 (docker stop -t 30,
# compose stop_grace_period: 30s), Docker's default of 10 s would SIGKILL it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pdm-edge"]
CMD ["run"]
