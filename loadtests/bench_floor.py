"""What a request costs before any scoring: Ray Serve's floor, serve_app's edge, a full
prediction, and the strongest peer's full prediction, measured in the same minutes::

    python loadtests/bench_floor.py [--duration 12] [--rounds 3]

Why: ``bench_peers.py`` says how far serve_app is from the peers; this says how much of
that distance is the ingress itself. On one local Ray it deploys serve_app
(``configs/config.yaml``, HAProxy throughput mode) and beside it ``loadtests/floor_app.py``
(a bare FastAPI deployment answering a constant, as many replicas as the Ingress).
Rounds interleave (the machine's speed drifts within minutes):

* ``GET /floor/ping``: HAProxy + Ray's direct ingress + FastAPI, nothing of ours;
* ``GET /healthz``: the same through serve_app's middlewares (metrics, admission, ids);
* ``POST /v1/predict``: a full prediction (auth, validation, the hops to the Model and
  the FeatureFetcher), fresh ids as in ``bench_peers.py``.

Then, with Ray stopped, the FastAPI peer of ``bench_peers.py`` (2 workers) does the full
prediction on the same artifact and store. Per row: req/s, p99, and the CPU of the
ingress replicas (or the peer) per request.
"""

from __future__ import annotations

import argparse
import copy
import os
import secrets
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python loadtests/<this>.py

from loadtests.bench_peers import PEER_GROUPS, READY_PATH, peer, peer_env, wait_200
from loadtests.harness import (
    ROOT,
    Case,
    add_load_arguments,
    build_example_artifacts,
    cmdline,
    cpu_meter,
    fmt,
    local_ray,
    md_header,
    md_row,
    new_api_key,
    serve_config,
    serve_environment,
    wrk_post,
)
from loadtests.launch import deploy_config

PREDICT = Case("predict (1 entity)", "/v1/predict", 0)
GROUPS = ("ingress", "HAProxy", "other")


@dataclass
class Figures:
    label: str
    rps: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    ingress_cores: list[float] = field(default_factory=list)
    non_2xx: int = 0

    def add(self, wrk: dict[str, Any], cores: float) -> None:
        seconds = wrk["duration_us"] / 1e6
        self.rps.append(wrk["requests"] / seconds)
        self.p99_ms.append(wrk["latency_us"]["p99"] / 1000)
        self.ingress_cores.append(cores)
        self.non_2xx += sum(n for code, n in wrk["codes"].items() if not 200 <= int(code) < 300)

    def row(self) -> list[str]:
        rps = sum(self.rps) / len(self.rps)
        cores = sum(self.ingress_cores) / len(self.ingress_cores)
        cpu_us = cores / rps * 1e6
        spread = f"{min(self.rps):,.0f}-{max(self.rps):,.0f}"
        p99 = max(self.p99_ms)
        return [
            self.label,
            fmt(rps),
            spread,
            fmt(p99, 1),
            str(self.non_2xx),
            fmt(cores, 2),
            fmt(cpu_us),
        ]


def serve_group(pid: int, name: str) -> str:
    command = cmdline(pid)
    if "ServeReplica:serve_app:Ingress" in command or "ServeReplica:floor:Floor" in command:
        return "ingress"
    return "HAProxy" if name.startswith("haproxy") else "other"


def with_floor(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` plus the floor app, with the Ingress's replica count."""
    ingress = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress")
    replicas = ingress.get("autoscaling_config", {}).get("min_replicas", 1)
    floor = {
        "name": "floor",
        "route_prefix": "/floor",
        "import_path": "loadtests.floor_app:app",
        "runtime_env": {"env_vars": {"PYTHONPATH": str(ROOT)}},
        "deployments": [
            {
                "name": "Floor",
                "num_replicas": replicas,
                "max_ongoing_requests": ingress.get("max_ongoing_requests", 1024),
                # Reserves no CPU (the app reserves all 2); Ray does not cap what it uses.
                "ray_actor_options": {"num_cpus": 0},
            }
        ],
    }
    return {**config, "applications": [*config["applications"], floor]}


def measure(
    figures: Figures,
    run: Callable[[float], dict[str, Any]],
    group_of: Callable[[int, str], str],
    groups: tuple[str, ...],
    own: str,
    args: argparse.Namespace,
) -> None:
    run(args.warmup)
    cpu: dict[str, float] = {}
    with cpu_meter(cpu, group_of, groups):
        wrk = run(args.duration)
    figures.add(wrk, cpu.get(own, 0.0))
    print(f"{figures.label:44s} {figures.rps[-1]:8,.0f} req/s  {own} cores {cpu.get(own, 0):.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_arguments(parser, duration=12, wrk_timeout=10, timeout_help="seconds")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    api_key = new_api_key()
    seed = secrets.randbelow(1_000_000)
    floor = Figures("Ray Serve alone: `GET /floor/ping`")
    healthz = Figures("serve_app's edge: `GET /healthz`")
    predict = Figures("serve_app: `POST /v1/predict`")
    fastapi = Figures("FastAPI + uvicorn, 2 workers: `POST /v1/predict`")
    with tempfile.TemporaryDirectory(prefix="bf_", dir="/tmp") as tmp:  # short: socket paths
        workdir = Path(tmp)
        config = with_floor(serve_config(workdir))
        n_ids = build_example_artifacts(config).artifacts.n_entities
        url = f"http://127.0.0.1:{config['http_options']['port']}"

        def get(path: str) -> Callable[[float], dict[str, Any]]:
            return lambda seconds: wrk_post(
                url, Case(path, path, -1), 1, "uniform", 0, "", seconds, args
            )

        def post(base_url: str) -> Callable[[float], dict[str, Any]]:
            def run(seconds: float) -> dict[str, Any]:
                nonlocal seed
                seed += 1
                return wrk_post(base_url, PREDICT, n_ids, "uniform", seed, api_key, seconds, args)

            return run

        with local_ray(serve_environment(workdir, api_key), namespace="bench_floor"):
            deploy_config(config, timeout_s=300)
            wait_200(url + READY_PATH, 120)
            wait_200(url + "/floor/ping", 60)
            for _ in range(args.rounds):
                for figures, run in (
                    (floor, get("/floor/ping")),
                    (healthz, get("/healthz")),
                    (predict, post(url)),
                ):
                    measure(figures, run, serve_group, GROUPS, "ingress", args)
        peer_args = copy.copy(args)
        env = peer_env(workdir, api_key)
        with peer(fastapi.label, "fastapi_peer.py", ["--workers", "2"], env, workdir) as (
            target,
            _facts,
        ):
            for _ in range(args.rounds):
                measure(
                    fastapi,
                    post(target.base_url),
                    target.group_of,
                    PEER_GROUPS,
                    "server",
                    peer_args,
                )
    print()
    print(
        f"wrk -t{args.threads} -c{args.connections}, {args.duration:g} s rows, {args.rounds} "
        f"rounds (mean; req/s range; p99 the worst round); {os.cpu_count()} CPUs. "
        "Cores: the ingress replicas' (Floor or Ingress; HAProxy not included) or the "
        "peer's whole process group."
    )
    print()
    print(
        "\n".join(
            md_header(
                ["load", "req/s", "range", "p99 ms", "non-2xx", "cores", "CPU us per request"]
            )
        )
    )
    for figures in (floor, healthz, predict, fastapi):
        print(md_row(figures.row()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
