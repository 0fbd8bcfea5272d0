"""serve_app against a plain FastAPI + uvicorn baseline, measured in one run with wrk.

    python loadtests/bench_predict.py [--duration 20] [--connections 32]

What it does, all on loopback and in a temp dir:

1. builds the example feature store and model (``serve_app.offline.artifacts.build_artifacts``);
2. starts ``loadtests/baseline_app.py`` (uvicorn, 1 worker, 1 sklearn thread, no cache)
   on the same artifact and SQLite file;
3. starts a local Ray (2 CPUs) and deploys ``configs/config.yaml`` as the integration
   tests do: HAProxy + throughput-optimised mode, an API key from the environment, HTTP
   on a free port, HAProxy's files and ports moved out of the shared defaults;
4. for ``/v1/predict`` (1 entity) and ``/v1/predict/batch`` (32 entities) runs wrk
   (``loadtests/wrk_post.lua``) against the baseline, against serve_app with ids drawn
   uniformly from all 100,000 entities and a random context per item (the prediction
   cache cannot hit), and against serve_app with ids from a hot set of 1,000 (context a
   function of the id: the cache-friendly case). Each run is preceded by a short warm-up.
5. prints a markdown table (req/s, items/s, p50, p99, errors, cache hits, the mean batch
   the Model saw, serve_app/baseline) and the cores each process group kept busy, and
   writes both to loadtests/results/bench_predict.md.

Everything it starts is stopped in ``finally`` blocks; a Ray process it started and that
outlives ``ray.shutdown()`` is reported and killed by PID (``loadtests/harness.py``).
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python loadtests/<this>.py

from loadtests.harness import (
    CONFIG_YAML,
    LOADTESTS,
    RESULTS,
    SERVE_CPU_GROUPS,
    Case,
    Row,
    add_load_arguments,
    build_example_artifacts,
    cmdline,
    command_line,
    cpu_meter,
    fetcher_delta,
    fmt,
    items_per_batch,
    local_ray,
    make_cases,
    md_header,
    md_row,
    new_api_key,
    noise_notes,
    non_2xx_notes,
    progress_line,
    serve_app_up,
    serve_config,
    serve_cpu_group,
    serve_environment,
    server,
    stats_delta,
    stats_snapshot,
    write_report,
    wrk_post,
)

CPU_GROUPS = (*SERVE_CPU_GROUPS, "baseline", "wrk")


@dataclass(frozen=True)
class Target:
    label: str
    base_url: str
    n_ids: int
    mode: str  # "uniform" or "hot", see wrk_post.lua
    serve: bool


@dataclass
class Result(Row):
    model: dict[str, float] | None = None  # Model counters during the row (serve_app)
    fetcher: dict[str, float] | None = None
    replicas: str = ""


def run_wrk(
    case: Case, target: Target, args: argparse.Namespace, seed: int, seconds: float, token: str
) -> dict[str, Any]:
    return wrk_post(target.base_url, case, target.n_ids, target.mode, seed, token, seconds, args)


def cpu_group(pid: int, name: str) -> str:
    """Which CPU_GROUPS column a process we started counts in."""
    return "baseline" if "baseline_app.py" in cmdline(pid) else serve_cpu_group(pid, name)


# ---- the report ------------------------------------------------------------------------


def batch_cell(result: Result) -> str:
    if not result.target.serve:
        return "-"
    model = result.model or {}
    return items_per_batch(model, f"{int(model.get('batches', 0))} batches")


def cache_cell(result: Result) -> str:
    scored = max(1, result.wrk["scored"])
    prediction = f"{100 * result.wrk['cached'] / scored:.0f}%"
    if result.fetcher is None:
        return f"{prediction} / n/a" if result.target.serve else "-"
    looked_up = result.fetcher["cache_hits"] + result.fetcher["cache_misses"]
    feature = f"{100 * result.fetcher['cache_hits'] / looked_up:.0f}%" if looked_up else "-"
    return f"{prediction} / {feature}"


def table(results: list[Result]) -> str:
    lines = md_header(
        [
            "case",
            "target",
            "req/s",
            "items/s",
            "p50 ms",
            "p99 ms",
            "non-2xx",
            "sock err / timeout",
            "failed / degraded items",
            "cache hits: prediction / feature",
            "Model items per batch (calls per batch)",
            "replicas I/M/F",
            "items/s vs baseline",
        ]
    )
    baseline: dict[str, float] = {}
    for result in results:
        if not result.target.serve:
            baseline[result.case.name] = result.items_s
        base = baseline.get(result.case.name)
        latency = result.wrk["latency_us"]
        errors = result.wrk["errors"]
        ratio = f"{result.items_s / base:.2f}x" if result.target.serve and base else "1.00x"
        lines.append(
            md_row(
                [
                    result.case.name,
                    result.target.label,
                    fmt(result.req_s),
                    fmt(result.items_s),
                    fmt(latency["p50"] / 1000, 1),
                    fmt(latency["p99"] / 1000, 1),
                    str(result.non_2xx),
                    f"{result.socket_errors - errors['timeout']} / {errors['timeout']}",
                    f"{result.wrk['failed_items']} / {result.wrk['degraded']}",
                    cache_cell(result),
                    batch_cell(result),
                    result.replicas or "-",
                    ratio,
                ]
            )
        )
    return "\n".join(lines)


def cpu_table(results: list[Result]) -> str:
    lines = md_header(["case", "target", *CPU_GROUPS, "all ours", "whole machine"])
    for result in results:
        cells = [f"{result.cpu.get(group, 0.0):.2f}" for group in CPU_GROUPS]
        ours = f"{sum(result.cpu.get(group, 0.0) for group in CPU_GROUPS):.2f}"
        machine = f"{result.cpu.get('machine', 0.0):.2f}"
        lines.append(md_row([result.case.name, result.target.label, *cells, ours, machine]))
    return "\n".join(lines)


def report(results: list[Result], args: argparse.Namespace, notes: list[str]) -> str:
    head = [
        f"## bench_predict: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"`{command_line()}`: wrk -t{args.threads} -c{args.connections}, "
        f"{args.duration:g} s per row after {args.warmup:g} s warm-up, "
        f"{os.cpu_count()} CPUs ({platform.machine()}), load average before: {notes[0]}.",
        "",
    ]
    legend = [
        "",
        "- ids: *uniform* = each item a random id of all 100,000 and a random context "
        "(the prediction cache cannot hit); *hot* = random ids of the first "
        f"{args.hot_ids:,}, context a function of the id (cache-friendly).",
        "- cache hits: share of scored items answered from the Ingress prediction cache / "
        "share of FeatureFetcher look-ups answered from its TTL cache (n/a with >1 replica).",
        "- Model items per batch: distinct items per predict_proba call in the Model during "
        "the row (calls = Ingress->Model calls merged into one batch). Baseline: 1 "
        "predict_proba per request, no caches.",
        *[f"- {note}" for note in notes[1:]],
        *non_2xx_notes(results),
    ]
    cpu = [
        "",
        "CPU during each row, in cores busy (user+system time / wall time; the machine has "
        f"{os.cpu_count()}). Ray other = controller, raylet, GCS, HAProxy manager, proxies; "
        "whole machine includes other people's processes.",
        "",
        cpu_table(results),
    ]
    return "\n".join([*head, table(results), *legend, *cpu]) + "\n"


# ---- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_load_arguments(parser, duration=20, wrk_timeout=10, timeout_help="seconds, as the app's")
    parser.add_argument("--hot-ids", type=int, default=1_000)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_predict.md")
    parser.add_argument(
        "--config",
        type=Path,
        default=CONFIG_YAML,
        help="Serve YAML to deploy (default configs/config.yaml); e.g. one with one replica "
        "per deployment, to compare with runs made before two became the default",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = make_cases(args.batch_size)
    notes = noise_notes()
    api_key = new_api_key()
    seed = secrets.randbelow(1_000_000)
    results: list[Result] = []

    with tempfile.TemporaryDirectory(prefix="bp_", dir="/tmp") as tmp:  # short: socket paths
        workdir = Path(tmp)
        model_dir, sqlite = workdir / "model", workdir / "features.db"
        config = serve_config(workdir, args.config)
        n_ids = build_example_artifacts(config).artifacts.n_entities
        baseline_argv = [
            str(LOADTESTS / "baseline_app.py"),
            *["--model-dir", str(model_dir), "--sqlite", str(sqlite)],
        ]
        with (
            local_ray(serve_environment(workdir, api_key), namespace="bench_predict"),
            server("baseline", baseline_argv, "/healthz", workdir) as (baseline_url, _),
        ):
            serve_url = serve_app_up(config, ready_s=60)
            targets = [
                Target("baseline (FastAPI, no Ray)", baseline_url, n_ids, "uniform", False),
                Target(f"serve_app, uniform {n_ids:,} ids", serve_url, n_ids, "uniform", True),
                Target(
                    f"serve_app, hot {args.hot_ids:,} ids", serve_url, args.hot_ids, "hot", True
                ),
            ]
            with httpx.Client(
                base_url=serve_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
            ) as client:
                for case in cases:
                    for target in targets:
                        token = api_key if target.serve else ""
                        seed += 1
                        run_wrk(case, target, args, seed, args.warmup, token)
                        before = stats_snapshot(client) if target.serve else None
                        seed += 1
                        cpu: dict[str, float] = {}
                        with cpu_meter(cpu, cpu_group, CPU_GROUPS):
                            measured = run_wrk(case, target, args, seed, args.duration, token)
                        result = Result(case, target, measured, cpu=cpu)
                        if before is not None:
                            after = stats_snapshot(client)
                            result.model = stats_delta(before, after)
                            result.fetcher = fetcher_delta(before, after)
                            result.replicas = after["replicas"]
                        results.append(result)
                        print(progress_line(result), flush=True)

    write_report(report(results, args, notes), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
