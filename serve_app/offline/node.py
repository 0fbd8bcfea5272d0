"""``serve-app node -- RAY_START_ARGS``: ``ray start`` for one node of a cluster serving this app.

A replica reads its settings from the environment of the ``ray start`` that started its
node: Ray Serve's throughput and HAProxy options (``configs/serve.env``) and every
variable the cluster config reads (``${SERVE_APP_REDIS_URL}``, the API keys, ...). A
node started without them joined the cluster looking healthy, and only the replicas
placed on it failed, over and over. So before it becomes ``ray start --block``:

* ``configs/serve.env`` is applied and HAProxy's files go to a private directory, as for
  ``serve-app run`` (:mod:`serve_app.offline.run`);
* every variable the config reads must be set and non-empty, or the node is refused
  with their names (never their values); the API keys and the webhook secret must parse
  as a replica will parse them;
* Ray's token auth is on (``RAY_AUTH_MODE=token``). Ray 2.60 leaves it off for
  ``ray start`` unless a token file happens to exist, and anyone who reaches an open GCS
  or dashboard can run code on every node. The head creates the token file (mode 0600; Ray writes it 0644) when missing;
  any other node needs the head's token and is refused without one;
* SIGINT is restored and ``--block`` added, so Ctrl-C, or a service manager's SIGTERM,
  stops the node's Ray processes with it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from serve_app.api.auth import env_entries
from serve_app.config import ENV_REFERENCE, AppConfig, read_serve_yaml, variables_read
from serve_app.errors import ConfigError
from serve_app.jobs.webhooks import read_secret
from serve_app.offline.ray_token import AUTH_MODE_ENV, ensure_token
from serve_app.offline.run import default_haproxy_dir, installed_command, run_environment


def role(ray_args: list[str]) -> str:
    """``head`` or ``worker``, from ``ray start``'s own arguments (exactly one of
    ``--head`` and ``--address``)."""
    head = "--head" in ray_args
    address = any(arg == "--address" or arg.startswith("--address=") for arg in ray_args)
    if head == address:
        raise ConfigError(
            "give ray start either --head (the first node) or --address HEAD:6379 (any "
            "other), after --: serve-app node -- --head"
        )
    return "head" if head else "worker"


def missing_variables(serve_config: dict[str, Any], env: dict[str, str]) -> list[str]:
    """The variables the config reads that ``env`` does not set (or sets empty).

    The ``${VAR}`` references are read as text too: validating the config (which names
    the key and secret variables) expands them, and fails on an empty one.
    """
    referenced = set(ENV_REFERENCE.findall(yaml.safe_dump(serve_config)))
    try:
        every = set(variables_read(serve_config))
    except ValidationError:  # an empty ${VAR}: it is among ``referenced``
        every = referenced
    return sorted(name for name in every | referenced if not env.get(name))


def check_node_variables(serve_config: dict[str, Any]) -> None:
    """Refuse a node whose replicas could not start: a variable the config reads unset,
    or API keys or a webhook secret a replica would not parse (read from this process's
    environment, which ``ray start`` passes on). Errors name variables, never values."""
    missing = missing_variables(serve_config, dict(os.environ))
    if missing:
        raise ConfigError(
            f"the config reads {', '.join(missing)}, not set here: every node needs them "
            "in the environment of its ray start (its replicas read them)"
        )
    for application in serve_config.get("applications", []):
        config = AppConfig.model_validate(application.get("args") or {})
        if config.auth.enabled:
            env_entries(config.auth)
        if config.jobs.enabled:
            read_secret(config.jobs.webhooks)


def node_environment(
    env_file: Path, base: dict[str, str], head: bool
) -> tuple[dict[str, str], list[str]]:
    """The environment ``ray start`` gets, and what was done (for the log)."""
    env = run_environment(env_file, base, default_haproxy_dir(base))
    haproxy_dir = Path(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent
    notes = [f"{env_file} applied", f"HAProxy's files in {haproxy_dir}"]
    if env.setdefault(AUTH_MODE_ENV, "token") == "token":
        notes.append(ensure_token(env, create=head))
    else:
        notes.append(f"{AUTH_MODE_ENV}={env[AUTH_MODE_ENV]}: Ray's token auth is OFF")
    return env, notes


def ray_start_command(ray_args: list[str]) -> list[str]:
    """``ray start --block ARGS`` with the ``ray`` of this Python's environment first."""
    block = [] if "--block" in ray_args else ["--block"]
    return [installed_command("ray"), "start", *block, *ray_args]


def exec_ray_start(config_path: Path, env_file: Path, ray_args: list[str]) -> None:
    """Replace this process by ``ray start --block`` (never returns)."""
    head = role(ray_args) == "head"
    check_node_variables(read_serve_yaml(config_path))  # before anything is made
    env, notes = node_environment(env_file, dict(os.environ), head)
    command = ray_start_command(ray_args)
    for note in notes:
        print(f"node: {note}", file=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # kept across exec, unlike a handler
    os.execve(command[0], command, env)
