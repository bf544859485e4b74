# Offline stand-in for otel/opentelemetry-collector-contrib (CI cannot pull images): Rotel, a
# Rust OpenTelemetry collector published on PyPI as a wheel that carries its binary. It receives
# OTLP on 4317 (gRPC) and 4318 (HTTP); deploy/compose/offline.yml has it print every span it
# receives to its log (`--debug-log traces`), which the CI test reads.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG ROTEL_VERSION=0.0.1a15
# The agent binary links libpython3.11 (the official python image has it; Debian's python3 does not).
RUN set -eu; \
    if ! ldconfig -p | grep -q 'libpython3\.11\.so\.1\.0'; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libpython3.11; \
        apt-get clean; rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/rotel; \
    /opt/rotel/bin/pip install --no-cache-dir --disable-pip-version-check "rotel==${ROTEL_VERSION}"; \
    agent="$(/opt/rotel/bin/python -c 'import os, rotel; print(os.path.dirname(rotel.__file__))')/rotel-agent"; \
    chmod 0755 "$agent"; ln -s "$agent" /usr/local/bin/rotel-agent; \
    rotel-agent --version; \
    useradd --system --no-create-home --shell /usr/sbin/nologin rotel
USER rotel
EXPOSE 4317 4318
ENTRYPOINT ["rotel-agent"]
CMD ["start", "--otlp-grpc-endpoint", "0.0.0.0:4317", "--otlp-http-endpoint", "0.0.0.0:4318", \
     "--exporter", "blackhole", "--debug-log", "traces", "--debug-log-verbosity", "detailed"]
