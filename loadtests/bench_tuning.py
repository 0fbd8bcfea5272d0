"""Compare tuning variants of one running serve_app, rounds interleaved (A, B, A, B, ...).

Why a separate script: on this shared 2-core machine the speed of the same build drifts by
30-50 % within minutes (a row measured early and one measured late differ more than most
changes do). Variants that are ``user_config`` (applied in place, no restart) are
therefore measured alternately on ONE deployment, so the drift falls on all of them alike,
and each variant's figures are the mean over its rounds::

    python loadtests/bench_tuning.py --variant base= \\
        --variant c512=Ingress.coalesce_max_batch_size=512 --rounds 3

A variant is ``name=`` followed by comma-separated ``Deployment.field=value`` settings
(values parsed as YAML: numbers, booleans). It prints req/s, items/s, p50, p99 and
serve_app's cores per variant and load, and CPU-milliseconds per item, the figure that
drifts least.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python loadtests/<this>.py

from loadtests.bench_peers import (
    READY_PATH,
    Result,
    make_loads,
    run_rows,
    serve_target,
    wait_200,
)
from loadtests.harness import (
    CONFIG_YAML,
    add_load_arguments,
    build_example_artifacts,
    fmt,
    local_ray,
    md_header,
    md_row,
    new_api_key,
    serve_config,
    serve_environment,
)
from loadtests.launch import deploy_config


@dataclass
class Variant:
    name: str
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # deployment -> fields


def parse_variant(text: str) -> Variant:
    """``name=Dep.field=value,Dep.field=value`` (nothing after ``=``: the config as is)."""
    name, _, rest = text.partition("=")
    variant = Variant(name)
    for setting in filter(None, rest.split(",")):
        target, _, value = setting.partition("=")
        deployment, _, key = target.partition(".")
        if not (deployment and key and value):
            raise argparse.ArgumentTypeError(f"not Deployment.field=value: {setting!r}")
        variant.settings.setdefault(deployment, {})[key] = yaml.safe_load(value)
    return variant


def apply_variant(base: dict[str, Any], config: dict[str, Any], variant: Variant) -> None:
    """The base config's user_config of every deployment, then the variant's settings."""
    deployments = config["applications"][0].setdefault("deployments", [])
    originals = {d["name"]: d.get("user_config") for d in base["applications"][0]["deployments"]}
    for deployment in deployments:
        user_config = dict(originals.get(deployment["name"]) or {})
        user_config.update(variant.settings.get(deployment["name"], {}))
        deployment["user_config"] = user_config
    missing = set(variant.settings) - {d["name"] for d in deployments}
    for name in missing:
        deployments.append({"name": name, "user_config": dict(variant.settings[name])})


def table(variants: list[Variant], rows: dict[str, list[Result]]) -> list[str]:
    lines = md_header(
        ["load", "variant", "rounds", "req/s", "items/s", "p50 ms", "p99 ms", "non-2xx",
         "cores", "CPU ms per item", "items/s vs first variant"]
    )  # fmt: skip
    loads = sorted({row.load.name for rs in rows.values() for row in rs if row.load}, key=str)
    for load in loads:
        first: float | None = None
        for variant in variants:
            mine = [row for row in rows[variant.name] if row.load and row.load.name == load]
            if not mine:
                continue
            n = len(mine)
            items = sum(row.items_s for row in mine) / n
            cores = sum(row.cores for row in mine) / n
            first = items if first is None else first
            lines.append(
                md_row(
                    [
                        load,
                        variant.name,
                        str(n),
                        fmt(sum(row.req_s for row in mine) / n),
                        fmt(items),
                        fmt(sum(row.wrk["latency_us"]["p50"] for row in mine) / n / 1000, 1),
                        fmt(sum(row.wrk["latency_us"]["p99"] for row in mine) / n / 1000, 1),
                        str(sum(row.non_2xx for row in mine)),
                        fmt(cores, 2),
                        fmt(1000 * cores / items, 3) if items else "-",
                        f"{items / first:.2f}x" if first else "-",
                    ]
                )
            )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_arguments(parser, duration=10, wrk_timeout=10, timeout_help="seconds")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per variant")
    parser.add_argument("--predict-connections", type=int, nargs="*", default=[32])
    parser.add_argument("--batch-connections", type=int, default=32)
    parser.add_argument("--variant", type=parse_variant, action="append", required=True)
    parser.add_argument("--config", type=Path, default=CONFIG_YAML)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loads = make_loads(args)
    api_key = new_api_key()
    seed = [secrets.randbelow(1_000_000)]
    rows: dict[str, list[Result]] = {variant.name: [] for variant in args.variant}
    with tempfile.TemporaryDirectory(prefix="bt_", dir="/tmp") as tmp:  # short: socket paths
        workdir = Path(tmp)
        config = serve_config(workdir, args.config.resolve())
        base = yaml.safe_load(yaml.safe_dump(config))
        n_ids = build_example_artifacts(config).artifacts.n_entities
        url = f"http://127.0.0.1:{config['http_options']['port']}"
        round_args = argparse.Namespace(**{**vars(args), "rounds": 1})
        with local_ray(serve_environment(workdir, api_key), namespace="bench_tuning"):
            headers = {"Authorization": f"Bearer {api_key}"}
            with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
                for round_no in range(1, args.rounds + 1):
                    for variant in args.variant:
                        apply_variant(base, config, variant)
                        deploy_config(config, timeout_s=300)
                        wait_200(url + READY_PATH, 120)
                        time.sleep(2)  # let the in-place reconfigure reach every replica
                        print(f"round {round_no}: {variant.name} {variant.settings}", flush=True)
                        target = serve_target(variant.name, url)
                        got = run_rows(target, loads, round_args, api_key, n_ids, seed, client)
                        rows[variant.name] += got
    print("\n".join(["", *table(args.variant, rows)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
