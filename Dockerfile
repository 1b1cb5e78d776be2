# pdp sidecar image. No GeoIP database inside: mount one (see helm/pdp, geoip.*).
# Build: make image (docker, podman or buildah), then push it and set the chart's image.repository/tag.
# tests/test_wheel.py installs pdp the way these two stages do and serves a decision from it.

# --- build: a wheel of pdp and of every runtime dependency
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY pdp ./pdp
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[otlp,prometheus]'

# --- runtime: only the wheels, installed into a venv owned by root, run as a numeric non-root uid
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/pdp/bin:$PATH
COPY --from=build /wheels /wheels
# xds-protos (Envoy's stubs) ships copies of these two packages' files, older ones, and pip lets
# the last installed win: reinstalled, they are their own again, or the OTLP exporter fails at
# import (grpc/grpc#42830, #42926; scripts/proto_overlap.py does the same for `make`).
RUN python -m venv /opt/pdp \
 && /opt/pdp/bin/pip install --no-cache-dir --no-index --find-links=/wheels 'pdp[otlp,prometheus]' \
 && /opt/pdp/bin/pip install --no-cache-dir --no-index --find-links=/wheels --force-reinstall --no-deps \
    opentelemetry-proto googleapis-common-protos \
 && rm -rf /wheels
USER 10001:10001
EXPOSE 50051 8081
ENTRYPOINT ["pdp"]
CMD ["serve"]
