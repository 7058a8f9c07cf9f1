# CityGrid services: one image, one command per service (citygrid ingest | rules run | gateway
# | simulate | …). Multi-stage: dependencies are built in the first stage only.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cityctl/ cityctl/
COPY citygrid/ citygrid/
COPY ingest/ ingest/
COPY rules/ rules/
COPY billing/ billing/
COPY simulators/ simulators/
COPY gateway/ gateway/
COPY dashboards/ dashboards/
COPY adapters/ adapters/
RUN python -m venv /opt/citygrid && /opt/citygrid/bin/pip install --no-cache-dir .

FROM python:3.11-slim
COPY --from=build /opt/citygrid /opt/citygrid
ENV PATH=/opt/citygrid/bin:$PATH \
    CITYGRID_DATA_DIR=/var/lib/citygrid \
    PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 citygrid && mkdir -p /var/lib/citygrid \
    && chown citygrid /var/lib/citygrid
USER citygrid
WORKDIR /var/lib/citygrid
ENTRYPOINT ["citygrid"]
CMD ["--help"]
