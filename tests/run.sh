#!/usr/bin/env bash
# The README's test command: install what the tests need on a fresh machine, then pytest.
#   bash tests/run.sh [pytest args...]
# Debian packages need root (or sudo); Python packages go into .venv, pinned by the lock.
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

# Servers and tools the tests start for real (Debian packages). Installed when missing;
# a test whose server is missing fails, it never skips.
need=()
for pair in redis-server:redis-server postgres:postgresql prometheus:prometheus \
            chromium:chromium wrk:wrk podman:podman mmdebstrap:mmdebstrap; do
  binary=${pair%%:*} package=${pair##*:}
  if [ "$binary" = postgres ]; then
    ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=("$package")
  else
    command -v "$binary" >/dev/null || need+=("$package")
  fi
done
# Python 3.11+ with venv: Debian ships venv's ensurepip in a package of its own.
python3 -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || need+=(python3 python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  # The tests start each server themselves on a free port: keep apt from starting (and
  # enabling) system-wide daemons that would outlive the run, listening on every
  # interface (policy-rc.d is Debian's switch for that; ours only if none exists).
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    # removed however the install ends: left behind, no service would ever start again
    trap '$SUDO rm -f "$policy"' EXIT
    trap '$SUDO rm -f "$policy"; exit 130' INT TERM
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod 755 "$policy"
  fi
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  installed=$?
  [ -z "$policy" ] || { $SUDO rm -f "$policy"; trap - EXIT INT TERM; }
  [ $installed = 0 ] || { echo "FAIL: could not install ${need[*]}" >&2; exit 1; }
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "FAIL: python3 is $(python3 --version 2>&1); serve_app needs 3.11 or newer" >&2; exit 1; }

# uv (from PyPI, pinned) installs the lock in about a minute where pip takes about five;
# the lock is uv's own output. Packages come from PyPI as with pip.
# --compile-bytecode: uv, unlike pip, writes no .pyc, and where PYTHONDONTWRITEBYTECODE is
# set (CI shells often set it) no process ever caches one: then every Ray worker parses
# Ray, Serve and pandas from source as it starts. Measured on 2 cores: importing what an
# Ingress replica imports took 3.4-3.9 CPU-s without bytecode, 1.5-1.6 s with; an Ingress
# replica SIGKILLed under load was replaced after 11-15 s, 5-7 s with. Compiling costs
# about 16 s once, here.
python3 -m venv .venv \
  && .venv/bin/pip install -q 'uv==0.13.9' \
  && .venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python \
       -c requirements.lock -e '.[test]' \
  || { echo "FAIL: could not install the Python packages" >&2; exit 1; }
exec .venv/bin/python -m pytest "$@"
