# syntax=docker/dockerfile:1
# Slim, multi-stage, non-root. Secrets are mounted at run time, never baked in:
#   docker build -t serve_app .
#   docker run --rm -p 127.0.0.1:8000:8000 --shm-size=2g \
#     -e SERVE_APP_API_KEYS="$(cat .secrets/api_keys | grep -v '^#')" -v serve_app_data:/data serve_app

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY serve_app ./serve_app
RUN /opt/venv/bin/pip install . \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} + \
 && find /opt/venv -name 'tests' -path '*site-packages/*' -prune -exec rm -rf {} +
# Build the example store and model at image build time (deterministic, no network).
COPY configs ./configs
RUN mkdir -p /app/var && /opt/venv/bin/python -c "from pathlib import Path; \
from serve_app.app import load_app_config; from serve_app.build import build_artifacts; \
build_artifacts(load_app_config(Path('configs/docker.yaml')))"

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 \
    RAY_SERVE_ENABLE_HA_PROXY=1 \
    RAY_USAGE_STATS_ENABLED=0
RUN useradd --create-home --uid 10001 app && mkdir -p /data /app && chown app:app /data /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=app:app /app/var /app/var
COPY --chown=app:app configs /app/configs
USER app
WORKDIR /app
EXPOSE 8000 8265
VOLUME ["/data"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
CMD ["serve", "run", "configs/docker.yaml"]
