"""``serve-app k8s``: a KubeRay ``RayService`` manifest made from ``configs/cluster.yaml``.

The manifest is derived, never hand-edited, so it cannot drift from the config:

* ``serveConfigV2`` is the cluster YAML itself (its ``applications`` exactly, with its
  proxy, HTTP and logging options);
* the worker group's CPU request is what the deployments need at peak
  (``num_cpus x max_replicas`` summed), spread over ``workers - 1`` pods so that the
  app still fits after losing one pod; Ray's ``num-cpus`` equals the pod's request;
* Ray's token auth is on (``authOptions``, KubeRay 1.5.1 or newer); configs that only
  work on one machine (SQLite files, HAProxy on loopback) are refused;
* every Ray container (head and workers) gets the variables of ``configs/serve.env``
  (throughput mode, HAProxy's retries and server timeout, the ingress drain: what the
  README's run command sources; at least ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` and
  ``RAY_SERVE_ENABLE_HA_PROXY=1``) and, from one Kubernetes Secret, every ``${VAR}`` the
  config reads plus the API keys and webhook secret. No secret value is ever written
  into the manifest.

There is no Kubernetes here; ``kubectl apply -f`` of the output is how it would be run
(README, "Scale out").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from serve_app.config import ENV_REFERENCE, AppConfig, read_serve_yaml, variables_read
from serve_app.errors import ConfigError

RAY_VERSION = "2.60.0"
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


@dataclass(frozen=True)
class ManifestOptions:
    image: str = "serve_app:0.1.0"
    secret_name: str = "serve-app"
    worker_replicas: int = 2
    name: str = "serve-app"
    worker_memory: str = "3Gi"
    head_cpus: str = "1"
    head_memory: str = "2Gi"
    ray_env: tuple[tuple[str, str], ...] = ()  # from configs/serve.env (read_env_file)


def peak_cpus(serve_config: dict[str, Any]) -> float:
    """CPUs every deployment of every application needs with all its replicas."""
    total = 0.0
    for application in serve_config["applications"]:
        for deployment in application.get("deployments", []):
            cpus = (deployment.get("ray_actor_options") or {}).get("num_cpus", 1)
            autoscaling = deployment.get("autoscaling_config") or {}
            replicas = autoscaling.get("max_replicas", deployment.get("num_replicas", 1))
            total += float(cpus) * int(replicas)
    return total


def worker_cpus(serve_config: dict[str, Any], workers: int) -> int:
    """Per worker pod, in whole CPUs (``ray start --num-cpus`` takes an integer only: a
    half made every worker pod fail to start): the peak fits on ``workers - 1`` pods."""
    if workers < 2:
        raise ConfigError(
            f"--workers {workers}: at least 2, so that the app still fits after losing a pod"
        )
    return max(1, math.ceil(peak_cpus(serve_config) / (workers - 1)))


def _container(
    name: str, options: ManifestOptions, secrets: list[str], cpus: str, memory: str
) -> dict[str, Any]:
    plain = {**THROUGHPUT_ENV, **dict(options.ray_env)}
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in plain.items()]
    env += [
        {"name": var, "valueFrom": {"secretKeyRef": {"name": options.secret_name, "key": var}}}
        for var in secrets
    ]
    return {
        "name": name,
        "image": options.image,
        "env": env,
        "resources": {
            "requests": {"cpu": cpus, "memory": memory},
            "limits": {"cpu": cpus, "memory": memory},
        },
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
    }


def refuse_inline_credentials(serve_config: dict[str, Any]) -> None:
    """A URL with a literal password would be copied into the manifest (serveConfigV2):
    refused, with the way to pass it as a Secret instead."""
    for application in serve_config["applications"]:
        config = AppConfig.model_validate(application.get("args") or {})
        urls = {
            "store.url": config.store.url,
            "jobs.queue_url": config.jobs.queue_url,
            "prediction_cache.url": config.prediction_cache.url or "",
        }
        for name, url in urls.items():
            parts = urlsplit(url) if "://" in url else None
            passwords = [] if parts is None else [parts.password or ""]
            if parts is not None:  # libpq and redis-py also read ?password=
                passwords += parse_qs(parts.query).get("password", [])
            if any(p and not ENV_REFERENCE.fullmatch(p) for p in passwords):
                raise ConfigError(
                    f"{name} carries a password, which the manifest would show in plain "
                    f"text: write it as ${{VAR}} (e.g. {name.split('.')[0].upper()}_URL) "
                    "and put the value in the Secret"
                )


def refuse_node_local(serve_config: dict[str, Any]) -> None:
    """Settings that only work on one machine: HAProxy bound to loopback inside a pod is
    unreachable from a Service, and a SQLite file is a different database on every pod."""
    for application in serve_config["applications"]:
        config = AppConfig.model_validate(application.get("args") or {})
        urls = {"store.url": config.store.url}
        if config.jobs.enabled:
            urls["jobs.queue_url"] = config.jobs.queue_url
        for name, url in urls.items():
            if url.startswith("sqlite:") and not config.allow_sqlite_on_cluster:
                raise ConfigError(
                    f"{name} is a SQLite file ({url}), which each pod would have apart: "
                    "use Redis or PostgreSQL, as configs/cluster.yaml does (or set "
                    "allow_sqlite_on_cluster: true if every pod mounts the same file)"
                )
    host = (serve_config.get("http_options") or {}).get("host", "127.0.0.1")
    if host != "0.0.0.0":
        raise ConfigError(
            f"http_options.host is {host}: inside a pod only 0.0.0.0 is reachable from a "
            "Kubernetes Service (configs/cluster.yaml sets it)"
        )


def build_manifest(serve_config: dict[str, Any], options: ManifestOptions) -> dict[str, Any]:
    """The RayService as a dict (see the module docstring for what is derived from what)."""
    refuse_inline_credentials(serve_config)
    refuse_node_local(serve_config)
    secrets = variables_read(serve_config)
    per_worker_text = str(worker_cpus(serve_config, options.worker_replicas))
    head = _container("ray-head", options, secrets, options.head_cpus, options.head_memory)
    head["ports"] = [
        {"containerPort": 6379, "name": "gcs"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": 8000, "name": "serve"},
    ]
    worker = _container("ray-worker", options, secrets, per_worker_text, options.worker_memory)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": options.name},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                # Ray's token auth on GCS, dashboard and client ports (KubeRay >= 1.5.1
                # makes the token Secret and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN in every
                # pod): without it `ray start` runs open, and anyone on the pod network
                # could submit Ray jobs that read the API keys and database URLs.
                "authOptions": {"mode": "token"},
                "headGroupSpec": {
                    # the head runs the controller and GCS, no replicas
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": {"spec": {"containers": [head]}},
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "workers",
                        "replicas": options.worker_replicas,
                        "minReplicas": options.worker_replicas,
                        "maxReplicas": options.worker_replicas,
                        "rayStartParams": {"num-cpus": per_worker_text},
                        "template": {"spec": {"containers": [worker]}},
                    }
                ],
            },
        },
    }


def render_manifest(config_path: Path, options: ManifestOptions) -> str:
    """The manifest as YAML, with a header saying where it came from."""
    manifest = build_manifest(read_serve_yaml(config_path), options)
    header = (
        f"# Generated by `serve-app k8s --config {config_path}`; do not edit, regenerate.\n"
        f"# Needs the Secret {options.secret_name!r} with keys: "
        f"{', '.join(variables_read(read_serve_yaml(config_path)))}\n"
    )
    return header + yaml.dump(manifest, Dumper=_BlockDumper, sort_keys=False)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as readable ``|`` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)
