"""``serve-app run CONFIG``: ``serve run CONFIG`` with the environment it needs.

Ray Serve reads its throughput and HAProxy settings only from the environment of the
process that starts Ray, so this sets ``configs/serve.env`` (as ``set -a; .
configs/serve.env`` would) and then becomes ``serve run``. Two things a shell line
could not do safely:

* **HAProxy's private files.** Ray's template makes HAProxy's admin socket mode 0666 at
  level ``admin``, in ``/tmp/haproxy-serve/`` by default: a directory any local user can
  enter (or create first). Whoever reaches that socket can point a backend at a port of
  theirs and read API traffic, bearer keys included. Unless the environment already
  names them, the socket, config and state files go into a directory of this user's
  (``$XDG_RUNTIME_DIR/serve-app``, else ``/tmp/serve-app-$UID``), mode 0700, which is
  refused if someone else owns it, it is a symlink, or others can enter it. Short on purpose: Ray appends a 56-character node id and HAProxy refuses
  socket paths over 97 characters.
* **Ctrl-C.** A process started in the background of a non-interactive shell ignores
  SIGINT, and ``serve run`` would inherit that: SIGINT is restored before the exec.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import sys
from pathlib import Path

from serve_app.config import read_env_file
from serve_app.errors import ConfigError
from serve_app.offline.ray_token import AUTH_MODE_ENV, ensure_token

# Ray's variables for HAProxy's files, and the name of each file in the private directory
# ("" for the directory itself).
HAPROXY_FILES = {
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
}


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can enter: made 0700 when missing, refused
    when it is a symlink, belongs to someone else or lets others in."""
    with contextlib.suppress(FileExistsError):  # checked below, whoever made it
        path.mkdir(mode=0o700)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{path} is not a directory (a symlink?): remove it and start again")
    if info.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to uid {info.st_uid}, not to you: remove it")
    if info.st_mode & 0o077:
        raise ConfigError(
            f"{path} is open to other users (mode {stat.S_IMODE(info.st_mode):o}): chmod 700"
        )
    return path


def run_environment(env_file: Path, base: dict[str, str], haproxy_dir: Path) -> dict[str, str]:
    """``base`` with ``env_file``'s variables set, and each of HAProxy's files that is not
    named already in ``haproxy_dir`` (made private): naming one must not send the admin
    socket back to Ray's shared default."""
    env = {**base, **read_env_file(env_file)}
    unnamed = [name for name in HAPROXY_FILES if name not in env]
    if unnamed:
        directory = private_dir(haproxy_dir)
        for name in unnamed:
            file_name = HAPROXY_FILES[name]
            env[name] = str(directory / file_name) if file_name else str(directory)
    return env


def default_haproxy_dir(env: dict[str, str]) -> Path:
    """``$XDG_RUNTIME_DIR/serve-app`` where the login session has one (no other user can
    create it first), else ``/tmp/serve-app-$UID``. Both short: see the module docstring."""
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if runtime and Path(runtime).is_dir() and len(runtime) <= 24:
        return Path(runtime) / "serve-app"
    return Path("/tmp") / f"serve-app-{os.getuid()}"


def installed_command(name: str) -> str:
    """The path of Ray's command ``name``: the one beside this Python first (its venv)."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise ConfigError(f"`{name}` (Ray's command) is not installed here")
    return found


def serve_command(config: str) -> list[str]:
    """``serve run CONFIG``, with the ``serve`` of this Python's environment first."""
    return [installed_command("serve"), "run", config]


def ray_address_file(env: dict[str, str]) -> Path:
    """Where ``ray start`` notes its cluster's address for a later ``ray.init()``: Ray's
    ``get_ray_address_file(None)`` (``$RAY_TMPDIR/ray``, else ``/tmp/ray``, on Linux),
    computed here so as not to import Ray to find a file name."""
    return Path(env.get("RAY_TMPDIR") or "/tmp") / "ray" / "ray_current_cluster"


def forget_dead_cluster(address_file: Path) -> str | None:
    """Remove Ray's note of the last ``ray start`` cluster when nothing listens there.

    With no ``RAY_ADDRESS``, ``ray.init()`` (so ``serve run``) joins the cluster that file
    names, and a ``ray start --block`` stopped by a signal (``serve-app node`` and Ctrl-C)
    leaves it behind: ``serve run`` then waited for a dead GCS forever, deaf to Ctrl-C.
    A live cluster is joined as before (Ray's own behaviour).
    """
    try:
        address = address_file.read_text().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    try:  # "[::1]:6379" too: a live IPv6 head must not read as gone
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return None  # alive
    except (OSError, ValueError):  # refused, unreachable, or not an address at all
        pass
    try:
        address_file.unlink(missing_ok=True)
    except OSError as exc:  # another user's note in the shared /tmp/ray
        raise ConfigError(
            f"{address_file} names a Ray cluster that is gone ({address}) and cannot be "
            f"removed ({exc.strerror}): remove it, or serve run waits for that cluster"
        ) from exc
    return f"removed {address_file}: the Ray cluster it named ({address}) is gone"


def exec_serve_run(config: str, env_file: Path) -> None:
    """Replace this process by ``serve run`` (never returns)."""
    env = run_environment(env_file, dict(os.environ), default_haproxy_dir(dict(os.environ)))
    # A local cluster (Ray's default for it: token auth on) gets its token file made
    # 0600 before Ray makes it 0644; joining a cluster (RAY_ADDRESS) is left to Ray.
    if not env.get("RAY_ADDRESS"):
        if forgotten := forget_dead_cluster(ray_address_file(env)):
            print(f"run: {forgotten}", file=sys.stderr)
        if env.get(AUTH_MODE_ENV, "token") == "token":
            print(f"run: {ensure_token(env, create=True)}", file=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # kept across exec, unlike a handler
    command = serve_command(config)
    os.execve(command[0], command, env)
