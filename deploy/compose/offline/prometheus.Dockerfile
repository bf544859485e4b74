# Offline stand-in for prom/prometheus (CI cannot pull images): Debian's own `prometheus` package on
# the same base image as Switchyard. Same entrypoint shape as the official image (flags in the
# command), same config path, plus wget for the compose healthcheck.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
RUN set -eu; \
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus wget; \
    apt-get clean; rm -rf /var/lib/apt/lists/*; \
    mkdir -p /prometheus; chown prometheus:prometheus /prometheus; \
    /usr/bin/prometheus --version
USER prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
