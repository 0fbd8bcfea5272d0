"""Deploy a Serve config (the YAML as a dict) on the running Ray, as ``serve run`` does.

Used by the integration tests, the load-test runner and the benchmarks, so that all of
them run exactly what the YAML describes: same builder (``import_path``), same ``args``,
same per-deployment options (``num_cpus``, ``autoscaling_config``, ``max_ongoing_requests``,
``max_queued_requests``, ``user_config``), same ``http_options`` and ``logging_config``.
It is test and benchmark tooling, so it lives here and not in the ``serve_app`` wheel.

Public API only. How a config is applied, and why this way:

* The config is validated with :class:`ray.serve.schema.ServeDeploySchema` (public) and
  handed to the public ``serve`` CLI: ``serve run --non-blocking --address <GCS> FILE``,
  against the cluster this process has already ``ray.init()``-ed. That is, to the line,
  the code path of ``serve run configs/config.yaml``: the controller builds the app
  from ``import_path`` + ``args`` in its own build task, applies each YAML deployment's
  options over the decorators', and derives the code version from the config, so that a
  redeploy that changes only ``user_config`` or ``autoscaling_config`` is applied in place
  (the replicas keep running; ``test_user_config_change_applies_without_restart``
  depends on that). ``--non-blocking`` makes it return once the controller has taken the
  config; :func:`deploy_config` then waits for RUNNING through ``serve.status()``. It
  needs no dashboard. Ray has no public Python call that takes a config
  (ray-project/ray#41359 asks for one; its workaround is this subprocess).
* Not ``serve.start()`` + ``serve.run(build_app(args))`` with each deployment's options
  applied by ``Deployment.options()``: the public ``Application`` does not expose the
  deployments bound *inside* the builder (Model, FeatureFetcher, JobWorker), so only
  the ingress could be given its YAML options; ``serve.run`` gives every deployment a
  random code version on each call (``version`` was removed from ``options()``), so
  every redeploy, even of ``user_config`` alone, restarts all replicas; and the builder
  would run in this process instead of the controller. Not what ``serve run`` deploys.
* Not the Serve REST API (``PUT /api/serve/applications/``) nor ``serve deploy`` (which
  calls it): they are served by the dashboard, which the tests' and benchmarks'
  ``ray.init(include_dashboard=False)`` does not start.

The cost: one short-lived ``serve`` process per deploy (a few seconds of imports).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Environment for Ray Serve's throughput-optimised mode with HAProxy; must be set before
# Ray starts (its processes inherit it).
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}

SUBMITTED = "Submitted deploy config successfully"


def serve_cli() -> str:
    """The ``serve`` entry point of this interpreter's environment."""
    beside = Path(sys.executable).with_name("serve")
    found = str(beside) if beside.exists() else shutil.which("serve")
    if not found:
        raise RuntimeError("the `serve` CLI (ray[serve]) is not installed beside python")
    return found


def submit_config(config: dict[str, Any], timeout_s: float = 120) -> None:
    """``serve run --non-blocking`` of ``config`` against the Ray this process is on."""
    import ray
    from ray.serve.schema import ServeDeploySchema

    if not ray.is_initialized():
        raise RuntimeError("ray.init() first: the config is deployed on that cluster")
    ServeDeploySchema.model_validate(config)  # a bad config fails here, with its reason
    address = ray.get_runtime_context().gcs_address
    with tempfile.TemporaryDirectory(prefix="serve_config_") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        command = [serve_cli(), "run", "--non-blocking", "--address", address, str(path)]
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        proc = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    output = proc.stdout + proc.stderr
    # On an error after connecting, `serve run` prints it and exits 0: read what it said.
    if proc.returncode != 0 or SUBMITTED not in output:
        raise RuntimeError(f"`serve run` did not submit the config ({proc.returncode}):\n{output}")


def deploy_config(config: dict[str, Any], timeout_s: float = 180) -> None:
    """Apply a Serve config (the YAML as a dict) and wait until every app is RUNNING."""
    from ray import serve

    submit_config(config)
    names = [app["name"] for app in config["applications"]]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        statuses = serve.status().applications
        states = [statuses[name].status if name in statuses else None for name in names]
        if all(state == "RUNNING" for state in states):
            return
        for name, state in zip(names, states, strict=True):
            if state == "DEPLOY_FAILED":
                raise RuntimeError(f"deploy of {name} failed: {statuses[name].message}")
        time.sleep(0.5)
    raise TimeoutError(f"apps {names} not RUNNING after {timeout_s}s: {serve.status()}")


def wait_ready(base_url: str, timeout_s: float = 60) -> None:
    """Poll ``/readyz`` until it answers 200."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/readyz", timeout=5)
            if response.status_code == 200:
                return
            last = response.text
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"service not ready: {last}")


def replica_counts(app_name: str) -> dict[str, int]:
    """RUNNING replicas per deployment of ``app_name`` (cheap: ~20 ms)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {name: d.replica_states.get("RUNNING", 0) for name, d in app.deployments.items()}


def replica_pids(app_name: str, deployment: str) -> list[int]:
    """PIDs of the live replicas of ``deployment``, from the GCS actor table (the chaos
    test and the replica-kill benchmark SIGKILL them). ``ray.util.state`` would need the
    dashboard, which tests and benchmarks do not start."""
    from ray._private import state

    wanted = f"ServeReplica:{app_name}:{deployment}"
    return [
        int(actor["Pid"])
        for actor in state.actors().values()
        if actor["ActorClassName"] == wanted and actor["State"] == "ALIVE" and actor["Pid"]
    ]


def free_port() -> int:
    """A free TCP port (for tests, benchmarks and load tests), below the kernel's
    ephemeral range.

    A port picked now is often bound much later (HAProxy's stats port: minutes later, by
    a process Ray starts). Port 0 would hand out one of the ephemeral range, which every
    outgoing connection of the machine draws from meanwhile: a CI run of 2026-12-07 lost
    HAProxy's stats port that way ("cannot bind socket (Address already in use)"), and
    every test of that app errored. Below the range (and above Ray's worker ports) only
    an explicit bind can take it.
    """
    low = _ephemeral_range_start()
    for _ in range(200):
        port = _PORTS.randrange(_LOWEST, low)
        with socket.socket() as sock:
            try:
                sock.bind(("", port))  # free on every interface: HAProxy binds 0.0.0.0
            except OSError:
                continue
        return port
    with socket.socket() as sock:  # a crowded machine: an ephemeral port after all
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_PORTS = random.SystemRandom()  # not the global RNG: tests seed that one
# Ray's workers bind their own ports in 10002-19999 (min/max_worker_port) as they start.
_LOWEST = 20_000


def _ephemeral_range_start() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32_768
    return max(low, _LOWEST + 1_000)


def set_nested(mapping: dict[str, Any], dotted: str, value: Any) -> None:
    """``mapping[a][b][c] = value`` for ``"a.b.c"``, creating missing (or null) levels.

    The YAMLs state only what differs from the defaults, so a level may be absent.
    """
    *parents, leaf = dotted.split(".")
    for key in parents:
        if not isinstance(mapping.get(key), dict):
            mapping[key] = {}
        mapping = mapping[key]
    mapping[leaf] = value


def app_args(config: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """The ``args`` of application ``index``, created empty when the YAML leaves it out."""
    application = config["applications"][index]
    if not isinstance(application.get("args"), dict):
        application["args"] = {}
    args: dict[str, Any] = application["args"]
    return args


def local_config(config_path: Path, workdir: Path, port: int) -> dict[str, Any]:
    """A Serve YAML with every file of the app under ``workdir`` and HTTP on ``port``.

    Keys and the webhook secret then come only from the environment
    (``SERVE_APP_API_KEYS``, ``SERVE_APP_WEBHOOK_SECRET``).
    """
    config: dict[str, Any] = yaml.safe_load(config_path.read_text())
    set_nested(config, "http_options.port", port)
    args = app_args(config)
    set_nested(args, "artifacts.model_dir", str(workdir / "model"))
    set_nested(args, "store.url", f"sqlite:///{workdir / 'features.db'}")
    set_nested(args, "auth.keys_file", None)
    set_nested(args, "jobs.queue_url", f"sqlite:///{workdir / 'jobs.db'}")
    set_nested(args, "jobs.webhooks.secret_file", None)
    return config
