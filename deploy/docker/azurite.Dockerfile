# syntax=docker/dockerfile:1
#
# Azurite's Blob service for docker-compose.yml, from the npm package in the official Node.js image (Docker Hub):
# no mcr.microsoft.com pull, and the very version the local stack and the test suite run (package.json pins it;
# tests/unit/test_deploy_files.py checks that the two agree). Build context: deploy/docker (nothing is copied).
#
# --skipApiVersionCheck: the current Python SDK sends a newer API version than Azurite knows, and works regardless.
# --disableTelemetry: no usage data leaves the machine. Never --loose: unsupported headers must fail here as they
# would against Azure, not be ignored.
#
# NOT BUILT where it was written (a Docker client without an engine). hadolint passes it with no rule ignored
# (tests/deploy/test_validators.py).

ARG NODE_IMAGE=node:22-bookworm-slim
FROM ${NODE_IMAGE}
ARG AZURITE_VERSION=3.37.0
RUN npm install --global --no-audit --no-fund --loglevel=error "azurite@${AZURITE_VERSION}" \
    && npm cache clean --force \
    && mkdir -p /data && chown node:node /data
USER 1000:1000
VOLUME /data
EXPOSE 10000
ENTRYPOINT ["azurite-blob", "--blobHost", "0.0.0.0", "--blobPort", "10000", "--location", "/data", \
            "--skipApiVersionCheck", "--disableTelemetry"]
