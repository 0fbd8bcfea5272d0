#!/usr/bin/env bash
# Build the Docker image and run it end to end on a machine without a Docker engine
# (Debian/Ubuntu, as root): podman builds the Dockerfile on a local Debian bookworm base made
# with mmdebstrap; the image's filesystem is exported and started with chroot as the image's
# user, in a network namespace of its own (so no port of this machine is taken or needed).
#
#   sudo bash tests/image/build_and_run.sh
#
# Checks, each printed as a `CHECK <name> ok|FAIL ...` line (tests/image/test_image.py reads
# them): own layers <= 450 MB, /healthz, /v1/predict of E0000042 against
# tests/image/expected_model.json, a job to `succeeded`, the model dir not writable by the
# service user, /data writable, a clean stop on SIGTERM, no process left, everything unmounted.
# Prints image sizes, build, start and stop times. Exits non-zero on any failure; cleans up
# (processes, mounts, temp dir) on every exit. Keeps the images (the base is made once).
#
# Environment: SERVE_APP_IMAGE, SERVE_APP_BASE_IMAGE (a bookworm base with python3 and
# python3-venv; made if missing), DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR, START_TIMEOUT_S,
# STOP_TIMEOUT_S, MAX_OWN_LAYERS_MB, RAY_START_WAIT_S (Ray's raylet start wait; this machine
# may be shared and loaded), LOG_DIR (where logs are kept when a run fails), BUILD_ONLY=1 (make
# the base and the image, then stop: tests/image/conftest.py starts that early in a test run).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
IMAGE=${SERVE_APP_IMAGE:-localhost/serve_app:e2e}
BASE_IMAGE=${SERVE_APP_BASE_IMAGE:-localhost/serve-app-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
START_TIMEOUT_S=${START_TIMEOUT_S:-180}
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-60}
MAX_OWN_LAYERS_MB=${MAX_OWN_LAYERS_MB:-450}
RAY_START_WAIT_S=${RAY_START_WAIT_S:-180}
LOG_DIR=${LOG_DIR:-/tmp/serve-app-image-logs}
EXPECTED=$ROOT/tests/image/expected_model.json

WORK=""
ROOTFS=""
CID=""
SERVER_PID=""
FAILED=0

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
check() { # check NAME ok|FAIL [detail...]
  local name=$1 verdict=$2
  shift 2
  printf 'CHECK %s %s%s\n' "$name" "$verdict" "${*:+ $*}"
  if [ "$verdict" != ok ]; then FAILED=1; fi
}
die() { printf 'ERROR %s\n' "$*"; exit 1; }
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }

# PIDs of processes whose root directory is our rootfs: exactly the ones we started in it.
chroot_pids() {
  local proc
  [ -n "$ROOTFS" ] || return 0
  for proc in /proc/[0-9]*; do
    if [ "$(readlink "$proc/root" 2>/dev/null)" = "$ROOTFS" ]; then echo "${proc#/proc/}"; fi
  done
}

# Mount points at or under our temp dir, deepest first.
our_mounts() {
  [ -n "$WORK" ] || return 0
  awk -v w="$WORK" '$5 == w || index($5, w "/") == 1 {print $5}' /proc/self/mountinfo | sort -r
}

alive() { # a process that exists and is not a zombie
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)
  [ -n "$state" ] && [ "$state" != Z ]
}

cleanup() {
  local rc=$? pids pid mounts
  set +e
  trap - EXIT INT TERM
  if [ -n "$SERVER_PID" ] && alive "$SERVER_PID"; then
    log "cleanup: SIGTERM to the server ($SERVER_PID)"
    kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 1 100); do alive "$SERVER_PID" || break; sleep 0.2; done
  fi
  if [ -n "$SERVER_PID" ]; then wait "$SERVER_PID" 2>/dev/null; fi
  if [ "$rc" != 0 ] && [ -n "$WORK" ] && [ -d "$WORK" ]; then
    mkdir -p "$LOG_DIR"
    cp "$WORK"/*.log "$LOG_DIR"/ 2>/dev/null
    cp -r "$ROOTFS"/tmp/ray/session_*/logs "$LOG_DIR"/ray-logs 2>/dev/null
    log "cleanup: logs kept in $LOG_DIR"
  fi
  pids=$(chroot_pids)
  if [ -n "$pids" ]; then
    log "cleanup: SIGKILL to processes left in the rootfs: ${pids//$'\n'/ }"
    for pid in $pids; do kill -KILL "$pid" 2>/dev/null; done
    sleep 1
  fi
  if [ -n "$CID" ]; then podman rm -f "$CID" >/dev/null 2>&1; fi
  for mount in $(our_mounts); do umount "$mount" 2>/dev/null || umount -l "$mount" 2>/dev/null; done
  mounts=$(our_mounts)
  if [ -n "$WORK" ]; then
    if [ -z "$mounts" ]; then
      rm -rf "$WORK"
    else # never rm -rf through a bind mount of /dev
      log "cleanup: NOT removing $WORK, still mounted: $mounts"
      rc=1
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$(id -u)" = 0 ] || die "run as root (podman build, chroot and mount need it)"
[ -f "$EXPECTED" ] || die "missing $EXPECTED"

# --- 1. tools ------------------------------------------------------------------------------
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v ip >/dev/null || missing+=(iproute2)
command -v unshare >/dev/null && command -v nsenter >/dev/null || missing+=(util-linux)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

WORK=$(mktemp -d /tmp/serve-app-image.XXXXXX)
chmod 0755 "$WORK"
ROOTFS=$WORK/rootfs

# --- 2. the local base (made once, then cached) ---------------------------------------------
if podman image exists "$BASE_IMAGE"; then
  log "base $BASE_IMAGE exists (cached)"
else
  log "making $BASE_IMAGE with mmdebstrap (bookworm minbase + python3, python3-venv)"
  t0=$(now)
  mmdebstrap --variant=minbase --quiet \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --format=tar bookworm "$WORK/base.tar" \
    "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" \
    "deb $SECURITY_MIRROR bookworm-security main"
  podman import --quiet --change 'CMD ["python3"]' "$WORK/base.tar" "$BASE_IMAGE" >/dev/null
  rm -f "$WORK/base.tar"
  log "base made in $(elapsed "$t0" "$(now)") s"
fi

# --- 3. build ----------------------------------------------------------------------------------
# This machine's pip configuration and CA bundle, read-only at build time only (never in a
# layer): pip in the build reaches the package index the way pip on this machine does.
mounts=()
seen=" "
for path in /etc/pip.conf /etc/xdg/pip "${PIP_CONFIG_FILE:-}" "${PIP_CERT:-}" \
            "${SSL_CERT_FILE:-}" "${REQUESTS_CA_BUNDLE:-}" /etc/ssl/certs/ca-certificates.crt; do
  if [ -n "$path" ] && [ -e "$path" ] && [[ "$seen" != *" $path "* ]]; then
    mounts+=(-v "$path:$path:ro")
    seen+="$path "
  fi
done
log "building $IMAGE from $ROOT (build-time mounts: ${seen# })"
t0=$(now)
podman build --isolation=chroot --network=host --format=docker --layers \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" "${mounts[@]}" \
  -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT" >"$WORK/build.log" 2>&1 \
  || { tail -n 40 "$WORK/build.log"; die "podman build failed"; }
BUILD_S=$(elapsed "$t0" "$(now)")
log "built in $BUILD_S s"
if [ "${BUILD_ONLY:-0}" = 1 ]; then
  echo "BUILT $IMAGE in $BUILD_S s"
  exit 0
fi

image_bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
base_bytes=$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE")
own_mb=$(( (image_bytes - base_bytes) / 1000000 ))
total_mb=$(( image_bytes / 1000000 ))
echo "SIZE own_layers_mb=$own_mb total_mb=$total_mb base_mb=$(( base_bytes / 1000000 ))"
podman history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | cut -c1-110 | head -n 12 >&2
if [ "$own_mb" -le "$MAX_OWN_LAYERS_MB" ]; then
  check size ok "own layers ${own_mb} MB <= ${MAX_OWN_LAYERS_MB} MB"
else
  check size FAIL "own layers ${own_mb} MB > ${MAX_OWN_LAYERS_MB} MB"
fi

# --- 4. export the filesystem and read the image's config ------------------------------------
CID=$(podman create --no-healthcheck "$IMAGE")
mkdir -p "$ROOTFS"
podman export "$CID" | tar -x -p --numeric-owner -C "$ROOTFS"
podman rm "$CID" >/dev/null
CID=""
podman image inspect --format '{{json .Config}}' "$IMAGE" > "$WORK/config.json"
python3 - "$WORK/config.json" "$WORK" <<'EOF'
import json, shlex, sys
config = json.load(open(sys.argv[1]))
out = sys.argv[2]
open(f"{out}/env", "w").write("\n".join(config.get("Env") or []) + "\n")
open(f"{out}/cmd", "w").write("\n".join((config.get("Entrypoint") or []) + (config.get("Cmd") or [])) + "\n")
open(f"{out}/user", "w").write((config.get("User") or "0:0") + "\n")
open(f"{out}/workdir", "w").write((config.get("WorkingDir") or "/") + "\n")
EOF
mapfile -t image_env < "$WORK/env"
mapfile -t image_cmd < "$WORK/cmd"
user=$(cat "$WORK/user")
workdir=$(cat "$WORK/workdir")
[[ "$user" =~ ^[0-9]+(:[0-9]+)?$ ]] || die "image USER must be numeric, got $user"
uid=${user%%:*}
gid=${user#*:}
[ "$uid" != 0 ] || die "the image runs as root"
log "image: USER $user, WORKDIR $workdir, CMD ${image_cmd[*]}"
if [ ! -s "$ROOTFS/etc/pip.conf" ] && [ ! -e "$ROOTFS/etc/xdg/pip" ] \
   && [ ! -e "$ROOTFS/root/.config/pip" ]; then
  check no_build_config_in_image ok
else
  check no_build_config_in_image FAIL "pip configuration left in the image"
fi

# What a container runtime provides: /etc/hosts, /etc/hostname.
# (The UTS namespace is the host's, so the hostname is too.)
printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t%s\n' "$(hostname)" > "$ROOTFS/etc/hosts"
hostname > "$ROOTFS/etc/hostname"

port=$(python3 - "$ROOTFS$workdir/${image_cmd[-1]}" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
print(re.search(r"^http_options:\n(?:[ ].*\n)*?\s+port:\s*(\d+)", text, re.M).group(1))
EOF
)

# --- 5. mounts: a private tree with /proc, /dev, /dev/shm, /tmp --------------------------------
mount --bind "$ROOTFS" "$ROOTFS"
mount --make-rprivate "$ROOTFS"
mount -t proc proc "$ROOTFS/proc"
mount --bind /dev "$ROOTFS/dev"
mount -t tmpfs -o mode=1777 shm "$ROOTFS/dev/shm"
mount -t tmpfs -o mode=1777 tmp "$ROOTFS/tmp"

# --- 6. start: as the image's user, its env and CMD, secrets via env only ----------------------
api_key=$(python3 -c 'import secrets; print("sk_" + secrets.token_urlsafe(32))')
webhook_secret=$(python3 -c 'import base64, os; print("whsec_" + base64.b64encode(os.urandom(32)).decode())')
log "starting ${image_cmd[*]} as $uid:$gid in its own network namespace (port $port inside)"
T_START=$(now)
# unshare --net and chroot exec in place: $! is the server's PID all along (what docker stop
# would signal).
setsid unshare --net -- sh -c 'ip link set lo up && exec "$@"' sh \
  chroot --userspec="$uid:$gid" --groups="$gid" "$ROOTFS" \
  /usr/bin/env -i -C "$workdir" "${image_env[@]}" \
  "SERVE_APP_API_KEYS=$api_key" "SERVE_APP_WEBHOOK_SECRET=$webhook_secret" \
  "RAY_raylet_start_wait_time_s=$RAY_START_WAIT_S" \
  "${image_cmd[@]}" >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!

in_netns() { nsenter --target "$SERVER_PID" --net -- "$@"; }

healthy=0
deadline=$(( $(date +%s) + START_TIMEOUT_S ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  alive "$SERVER_PID" || break
  if in_netns python3 -c "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:$port/healthz', timeout=2).status != 200)" 2>/dev/null; then
    healthy=1
    break
  fi
  sleep 0.5
done
START_S=$(elapsed "$T_START" "$(now)")
if [ "$healthy" = 1 ]; then
  check healthz ok "healthy after $START_S s"
else
  tail -n 60 "$WORK/serve.log"
  check healthz FAIL "not healthy after $START_S s"
  die "the server did not become healthy"
fi

# --- 7. predict, compare, a job ---------------------------------------------------------------
in_netns python3 - "http://127.0.0.1:$port" "$api_key" "$EXPECTED" <<'EOF' || FAILED=1
import json, sys, time, urllib.error, urllib.request

base, key, expected_path = sys.argv[1:4]
expected = json.load(open(expected_path))
failed = False


def check(name, ok, detail=""):
    global failed
    failed |= not ok
    print(f"CHECK {name} {'ok' if ok else 'FAIL'} {detail}".rstrip(), flush=True)


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")[:500]


context = {"amount": 59.9, "channel": "web", "hour": 14}
status, answer = call("POST", "/v1/predict", {"entity_id": "E0000042", "context": context})
if status != 200:
    check("predict", False, f"status {status}: {answer}")
else:
    want = expected["score_E0000042"]
    got = round(answer["score"], 6)
    check("predict", True, f"E0000042 score={got} model={answer['model_version']} "
          f"degraded={answer['degraded']}")
    check("model_version", answer["model_version"] == expected["version"],
          f"image {answer['model_version']} expected {expected['version']}")
    check("score", abs(got - want) < 1e-6 and not answer["degraded"],
          f"image {got} expected {want}")

items = [{"entity_id": f"E{n:07d}", "context": {"hour": n % 24}} for n in range(1, 51)]
items.append({"entity_id": "E0000042", "context": context})
status, job = call("POST", "/v1/jobs", {"items": items})
if status != 202:
    check("job", False, f"submit status {status}: {job}")
else:
    deadline = time.monotonic() + 60
    while True:
        status, state = call("GET", f"/v1/jobs/{job['id']}")
        if status != 200 or state.get("state") in ("succeeded", "failed", "cancelled"):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.3)
    ok = status == 200 and state.get("state") == "succeeded" \
        and state["progress"] == {"done": len(items), "total": len(items), "failed": 0}
    check("job", ok, f"{job['id']} state={state.get('state') if status == 200 else status} "
          f"progress={state.get('progress') if status == 200 else state}")
sys.exit(1 if failed else 0)
EOF

# Ray's dashboard answers, and HAProxy fronts Serve (RAY_SERVE_ENABLE_HA_PROXY=1).
# (Ray 2.60 enables token auth: the dashboard API may answer 401 without the token.)
dashboard=$(in_netns python3 - <<'EOF' || true
import urllib.error, urllib.request
try:
    print(urllib.request.urlopen("http://127.0.0.1:8265/api/version", timeout=10).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
except OSError as exc:
    print(f"unreachable: {exc}")
EOF
)
if [[ "$dashboard" =~ ^(200|401|403)$ ]]; then
  check dashboard ok "http://127.0.0.1:8265/api/version inside: HTTP $dashboard"
else
  check dashboard FAIL "8265: $dashboard"
fi
haproxy_pids=""
for pid in $(chroot_pids); do
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = haproxy ]; then haproxy_pids+="$pid "; fi
done
if [ -n "$haproxy_pids" ]; then
  # configs/serve.env reached Ray through the image's CMD: its two-line HAProxy setting is
  # in the config HAProxy runs with (the path after -f, inside the image's root).
  first=${haproxy_pids%% *}
  cfg=$(tr '\0' '\n' < "/proc/$first/cmdline" | grep -A1 -x -e -f | tail -n1)
  if grep -q -x '    option http-buffer-request' "$ROOTFS$cfg" 2>/dev/null; then
    check haproxy ok "pid ${haproxy_pids% }, $cfg has option http-buffer-request"
  else
    check haproxy FAIL "pid ${haproxy_pids% }: no option http-buffer-request in $cfg"
  fi
  # `serve-app run` (the CMD) put HAProxy's admin socket and config in a 0700 directory
  # of the service user's, not in Ray's shared /tmp/haproxy-serve/.
  private="/tmp/serve-app-$uid"
  mode=$(stat -c '%a %u' "$ROOTFS$private" 2>/dev/null || echo missing)
  if [[ "$cfg" == "$private/"* ]] && [ "$mode" = "700 $uid" ]; then
    check haproxy_private ok "$cfg, $private mode $mode"
  else
    check haproxy_private FAIL "$cfg; $private: $mode (want 700 $uid)"
  fi
else
  check haproxy FAIL "no haproxy process"
fi

# --- 8. the model is read-only for the service user; /data is writable -----------------------
as_service() { chroot --userspec="$uid:$gid" --groups="$gid" "$ROOTFS" "$@"; }
if as_service /usr/bin/touch "/app/var/model/x" 2>/dev/null; then
  check model_dir_readonly FAIL "uid $uid could create /app/var/model/x"
elif as_service /usr/bin/touch "/app/var/model/model.joblib" 2>/dev/null; then
  check model_dir_readonly FAIL "uid $uid could write /app/var/model/model.joblib"
else
  check model_dir_readonly ok "$(stat -c '%U:%G %a' "$ROOTFS/app/var/model") /app/var/model; touch as uid $uid fails"
fi
if as_service /usr/bin/touch /data/.probe 2>/dev/null && rm -f "$ROOTFS/data/.probe"; then
  check data_writable ok "/data ($(stat -c '%u:%g %a' "$ROOTFS/data"))"
else
  check data_writable FAIL "uid $uid cannot write /data"
fi

# --- 9. stop with SIGTERM, nothing left -------------------------------------------------------
T_STOP=$(now)
kill -TERM "$SERVER_PID"
deadline=$(( $(date +%s) + STOP_TIMEOUT_S ))
while alive "$SERVER_PID" && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.1; done
STOP_S=$(elapsed "$T_STOP" "$(now)")
if alive "$SERVER_PID"; then
  check stop FAIL "still running $STOP_S s after SIGTERM"
else
  server_rc=0
  wait "$SERVER_PID" || server_rc=$?
  SERVER_PID=""
  check stop ok "exited (status $server_rc) $STOP_S s after SIGTERM"
fi
left=""
for _ in $(seq 1 50); do
  left=$(chroot_pids)
  [ -z "$left" ] && break
  sleep 0.2
done
LEFT_S=$(elapsed "$T_STOP" "$(now)")
if [ -z "$left" ]; then
  check no_processes_left ok "none $LEFT_S s after SIGTERM"
else
  check no_processes_left FAIL "$(for p in $left; do tr '\0' ' ' < "/proc/$p/cmdline" | cut -c1-80; echo; done)"
fi
for mount in $(our_mounts); do umount "$mount"; done
if [ -z "$(our_mounts)" ]; then check unmounted ok; else check unmounted FAIL "$(our_mounts)"; fi

grep -E "Deployed app|Application .* is ready|ERROR|Traceback" "$WORK/serve.log" | head -n 5 >&2 || true
echo "TIME build_s=$BUILD_S start_s=$START_S stop_s=$STOP_S"
echo "SIZE own_layers_mb=$own_mb total_mb=$total_mb"
if [ "$FAILED" = 0 ]; then echo "RESULT ok"; else echo "RESULT FAIL"; exit 1; fi
