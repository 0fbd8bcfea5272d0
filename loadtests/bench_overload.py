"""Overload: goodput, shed share and latencies at 1x, 2x and 4x capacity, and recovery.

    python loadtests/bench_overload.py [--duration 15] [--multiples 1,2,4]

What it does, on loopback and in a temp dir:

1. starts a local Ray (2 CPUs) and deploys ``configs/config.yaml`` as the integration
   tests do (HAProxy + throughput-optimised mode, API key from the environment);
2. **capacity**: wrk in closed loop with 32 connections (``--connections``) on
   ``/v1/predict`` with fresh ids (uniform over all entities, random context: the
   prediction cache cannot hit); capacity = the 2xx answers per second;
3. **unloaded**: an open-loop rate of ``--unloaded`` x capacity (0.25): its p99 is the
   yardstick of "3x the unloaded p99";
4. for each multiple k: an **open-loop** rate of k x capacity for ``--duration`` seconds
   (``loadtests/wrk_overload.lua``: each wrk thread sends on a fixed schedule, with
   enough connections that a slow answer does not slow the offer), then at once a
   **recovery** run at the unloaded rate: the seconds until its per-second p99 is back
   under 1.5x the unloaded p99;
5. prints and writes (``loadtests/results/bench_overload.md``) per row: offered and
   really sent req/s, goodput (2xx/s and as a share of capacity), shed share (503s),
   p50/p99 of successes and of refusals, the Retry-After values seen, other failures,
   recovery time, and the cores each process group used, wrk's own included.

A closed-loop generator cannot offer 4x: its clients wait for answers, so it slows down
with the server. Refusals that come back in a millisecond would make a closed loop send
again at once (a retry storm, not the offered load), so the rate is fixed instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python loadtests/<this>.py

from loadtests.harness import (
    APP_NAME,
    DEPLOYMENTS,
    LOADTESTS,
    RESULTS,
    build_example_artifacts,
    cmdline,
    command_line,
    cpu_meter,
    local_ray,
    md_header,
    md_row,
    new_api_key,
    noise_notes,
    serve_app_up,
    serve_config,
    serve_environment,
    write_report,
)

LUA = LOADTESTS / "wrk_overload.lua"
CPU_GROUPS = (
    *DEPLOYMENTS,
    "JobWorker",
    "other replicas",
    "HAProxy",
    "HAProxy manager",
    "Ray other",
    "wrk",
)


def cpu_group(pid: int, name: str) -> str:
    """A process's group; Ray retitles a busy replica ``...:Ingress.method``, hence the
    split at the dot."""
    command = cmdline(pid)
    if f"ServeReplica:{APP_NAME}:" in command:
        title = command.split(f"ServeReplica:{APP_NAME}:")[1].split()[0].strip("\0")
        deployment = title.split(".")[0]
        return deployment if deployment in (*DEPLOYMENTS, "JobWorker") else "other replicas"
    if name.startswith("haproxy"):
        return "HAProxy"
    return "HAProxy manager" if "HAProxyManager" in command else "Ray other"


def idle_rss() -> dict[str, list[float]]:
    """Resident memory (MB) of each replica process we started, by deployment, at idle."""
    from loadtests.harness import descendants

    by_group: dict[str, list[float]] = {}
    for pid, (name, _) in descendants().items():
        group = cpu_group(pid, name)
        if group in DEPLOYMENTS or group == "JobWorker":
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            kb = next(
                int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")
            )
            by_group.setdefault(group, []).append(round(kb / 1024, 1))
    return by_group


def wrk_command(
    url: str, token: str, rate: float, connections: int, seconds: float, args: argparse.Namespace
) -> list[str]:
    """wrk with wrk_overload.lua: ``rate`` req/s open loop (0: closed loop)."""
    return [
        "wrk",
        f"-t{args.threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        f"{args.wrk_timeout}s",
        "-s",
        str(LUA),
        f"{url}/v1/predict",
        "--",
        f"{rate:.1f}",
        str(args.n_ids),
        str(secrets.randbelow(1_000_000)),
        token,
        str(args.threads),
    ]


def overload_json(returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    """The OVERLOAD_JSON line wrk_overload.lua prints at the end, with ``seconds``."""
    for line in stdout.splitlines():
        if line.startswith("OVERLOAD_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("OVERLOAD_JSON "))
            result["seconds"] = result["duration_us"] / 1e6
            return result
    raise RuntimeError(f"wrk failed ({returncode}): {stdout}\n{stderr}")


def wrk_overload(
    url: str, token: str, rate: float, connections: int, seconds: float, args: argparse.Namespace
) -> dict[str, Any]:
    """One wrk run of wrk_overload.lua; its OVERLOAD_JSON line."""
    command = wrk_command(url, token, rate, connections, seconds, args)
    proc = subprocess.run(
        command,
        capture_output=True,
        encoding="utf-8",
        errors="replace",  # wrk once printed a byte that was not UTF-8: show it, go on
        timeout=seconds + args.wrk_timeout + 60,
    )
    if "\ufffd" in proc.stdout:
        print(f"wrk printed bytes that are not UTF-8:\n{proc.stdout}", flush=True)
    return overload_json(proc.returncode, proc.stdout, proc.stderr)


@dataclass
class Row:
    label: str
    offered: float  # req/s asked for (0: closed loop)
    run: dict[str, Any]
    cpu: dict[str, float] = field(default_factory=dict)
    recovery_s: float | None = None

    @property
    def sent_per_s(self) -> float:
        return float(self.run["sent"]) / self.run["seconds"]

    @property
    def goodput(self) -> float:
        return float(self.run["ok"]["n"]) / self.run["seconds"]

    @property
    def shed(self) -> int:
        return int(self.run["refused"]["n"])

    @property
    def failed(self) -> int:
        """Answers that are neither 2xx nor a 503/429 refusal, plus socket errors."""
        errors = self.run["errors"]
        sockets = errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
        return int(self.run["other"]["n"] + self.run["no_id"] + sockets)


def connections_for(rate: float, args: argparse.Namespace) -> int:
    """Enough connections that a rate keeps being offered while answers take up to
    ``--slack`` seconds (open loop): rate x slack, at least --connections, at most
    --max-connections.

    Why a ceiling: wrk holds each connection waiting for its next slot on a timer, and
    its event loop walks every timer on each turn, so idle connections cost the load
    generator CPU on the very cores it measures. Against a static HAProxy answer at
    7,000 req/s, wrk took 0.40 cores with 1,800 connections and 0.28 with 600. 1,024
    still cover 4x here (at most 288 requests inside the replicas plus 40 ms of
    HAProxy's queue); a row whose offer they starve shows it as sent < offered."""
    wanted = max(args.connections, math.ceil(rate * args.slack))
    return min(wanted, max(args.connections, args.max_connections))


def recovery_seconds(run: dict[str, Any], limit_ms: float) -> float | None:
    """Seconds into the recovery run after which every second's ok p99 stays <= limit."""
    series = sorted((int(s), v[1]) for s, v in run["ok_p99_by_second"].items())
    bad = [second for second, p99 in series if p99 > limit_ms]
    if not series:
        return None
    if not bad:
        return 0.0
    last_bad = max(bad)
    return float(last_bad + 1) if last_bad + 1 <= series[-1][0] else None


def measure(
    label: str,
    rate: float,
    conns: int,
    seconds: float,
    url: str,
    token: str,
    args: argparse.Namespace,
) -> Row:
    cpu: dict[str, float] = {}
    with cpu_meter(cpu, cpu_group, CPU_GROUPS):
        run = wrk_overload(url, token, rate, conns, seconds, args)
    row = Row(label, rate, run, cpu)
    print(progress(row), flush=True)
    return row


def progress(row: Row) -> str:
    ok, refused = row.run["ok"], row.run["refused"]
    return (
        f"{row.label:14} offered {row.offered:7.0f}/s sent {row.sent_per_s:7.0f}/s "
        f"goodput {row.goodput:7.0f}/s shed {row.shed:6d} failed {row.failed:4d} "
        f"ok p50/p99 {ok['p50']:.1f}/{ok['p99']:.1f} ms  503 p50/p99 "
        f"{refused['p50']:.1f}/{refused['p99']:.1f} ms  retry-after {row.run['retry_after']}"
        f"  wrk {row.cpu.get('wrk', 0):.2f} cores  codes {row.run['codes']}"
        f"  socket errors {row.run['errors']}  without our id {row.run['no_id']}"
    )


# ---- the report ------------------------------------------------------------------------


def ms(value: float) -> str:
    return "-" if value < 0 else f"{value:,.1f}"


def table(rows: list[Row], capacity: float, unloaded_p99: float) -> str:
    lines = md_header(
        [
            "load",
            "offered req/s",
            "sent req/s",
            "goodput req/s",
            "goodput / capacity",
            "shed share",
            "ok p50 ms",
            "ok p99 ms",
            "ok p99 / unloaded p99",
            "503 p50 ms",
            "503 p99 ms",
            "Retry-After seen",
            "failed",
            "back to normal after",
        ]
    )
    for row in rows:
        answered = row.run["ok"]["n"] + row.shed
        ok, refused = row.run["ok"], row.run["refused"]
        recovery = "-" if row.recovery_s is None else f"{row.recovery_s:.0f} s"
        retry = ", ".join(f"{k}: {v}" for k, v in sorted(row.run["retry_after"].items())) or "-"
        lines.append(
            md_row(
                [
                    row.label,
                    "closed loop" if row.offered == 0 else f"{row.offered:,.0f}",
                    f"{row.sent_per_s:,.0f}",
                    f"{row.goodput:,.0f}",
                    f"{100 * row.goodput / capacity:.0f} %",
                    f"{100 * row.shed / max(1, answered):.1f} %",
                    ms(ok["p50"]),
                    ms(ok["p99"]),
                    f"{ok['p99'] / unloaded_p99:.1f}x" if unloaded_p99 > 0 else "-",
                    ms(refused["p50"]),
                    ms(refused["p99"]),
                    retry,
                    str(row.failed),
                    recovery,
                ]
            )
        )
    return "\n".join(lines)


REPLICA_GROUPS = (*DEPLOYMENTS, "JobWorker", "other replicas")


def replica_cores(row: Row) -> float:
    return sum(row.cpu.get(group, 0.0) for group in REPLICA_GROUPS)


def per_replica_core(row: Row) -> float:
    """Goodput per core the replicas used (every deployment's): what the service made of
    its CPU.

    On this machine the load generator and HAProxy's refusals share the replicas' cores
    and take more of them the higher the load: goodput / capacity mixes that in, this
    does not.
    """
    return row.goodput / max(0.01, replica_cores(row))


def cpu_table(rows: list[Row]) -> str:
    lines = md_header(
        [
            "load",
            *CPU_GROUPS,
            "whole machine",
            "wrk cores per 1,000 req/s sent",
            "replica cores",
            "goodput per replica core",
            "vs capacity row",
        ]
    )
    base = next((per_replica_core(r) for r in rows if r.label == "capacity"), None)
    for row in rows:
        cells = [f"{row.cpu.get(group, 0.0):.2f}" for group in CPU_GROUPS]
        per_k = 1000 * row.cpu.get("wrk", 0.0) / max(1.0, row.sent_per_s)
        efficiency = per_replica_core(row)
        versus = "-" if base is None else f"{100 * efficiency / base:.0f} %"
        lines.append(
            md_row(
                [
                    row.label,
                    *cells,
                    f"{row.cpu.get('machine', 0.0):.2f}",
                    f"{per_k:.2f}",
                    f"{replica_cores(row):.2f}",
                    f"{efficiency:,.0f}",
                    versus,
                ]
            )
        )
    return "\n".join(lines)


def measured_how(args: argparse.Namespace) -> str:
    if args.capacity > 0:
        return "given with --capacity"
    return f"closed loop, {args.connections} connections"


def report(
    rows: list[Row],
    capacity: float,
    unloaded_p99: float,
    args: argparse.Namespace,
    notes: list[str],
) -> str:
    head = [
        f"## bench_overload: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"`{command_line()}`: `/v1/predict`, fresh ids, wrk -t{args.threads}, "
        f"{args.duration:g} s per row, {os.cpu_count()} CPUs ({platform.machine()}), load "
        f"average before: {notes[0]}. Capacity = {capacity:,.0f} req/s ({measured_how(args)}); "
        f"unloaded p99 = {unloaded_p99:.1f} ms (open loop at "
        f"{args.unloaded:g}x capacity).",
        "",
    ]
    overrides = [f"- serve.env overridden: `{key}={value}`" for key, value in args.env]
    legend = [
        "",
        "- offered: the open-loop rate asked of wrk; sent: what it really sent (slots with "
        "every connection busy are not sent). Connections per row: rate x "
        f"{args.slack:g} s, at least {args.connections}, at most {args.max_connections}.",
        "- shed share: 503 (or 429) answers / all answers. failed: any other status, "
        "answers without our X-Request-ID (HAProxy's own errors) and socket errors.",
        "- back to normal after: a run at the unloaded rate starts the moment the row "
        "ends; the seconds until its per-second p99 of successes stays within 1.5x the "
        "unloaded p99.",
        *[f"- {note}" for note in notes[1:]],
        *overrides,
    ]
    cpu = [
        "",
        "CPU during each row in cores busy (user+system / wall; the machine has "
        f"{os.cpu_count()}). wrk is the load generator; Ray other = controller, raylet, "
        "GCS, HAProxy manager. Goodput per replica core: goodput / the cores the "
        "replicas used (Ingress, Model, FeatureFetcher, JobWorker, any other), against the "
        "capacity "
        "row's: what the service made of the CPU it got, with the load generator and "
        "HAProxy's refusals on the same cores.",
        "",
        cpu_table(rows),
    ]
    return "\n".join([*head, table(rows, capacity, unloaded_p99), *legend, *cpu]) + "\n"


# ---- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=15, help="seconds per row")
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--connections", type=int, default=32, help="closed loop; minimum")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--multiples", default="1,2,4", help="offered load / capacity")
    parser.add_argument("--unloaded", type=float, default=0.25, help="x capacity")
    parser.add_argument("--recovery", type=float, default=10, help="seconds per recovery run")
    parser.add_argument("--slack", type=float, default=0.25, help="see connections_for")
    parser.add_argument("--max-connections", type=int, default=1024, help="see connections_for")
    parser.add_argument("--wrk-timeout", type=int, default=15)
    parser.add_argument("--config", type=Path, default=Path("configs/config.yaml"))
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_overload.md")
    parser.add_argument(
        "--capacity", type=float, default=0, help="req/s: skip the closed-loop run, use this"
    )
    add_env_argument(parser)
    args = parser.parse_args(argv)
    args.n_ids = 100_000
    return args


def env_setting(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (the value may hold newlines and ``=``), for ``--env``."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text[:40]!r}")
    return key, value


def add_env_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        type=env_setting,
        metavar="KEY=VALUE",
        help="override a configs/serve.env setting (A/B of HAProxy settings); repeatable",
    )


@contextlib.contextmanager
def app_on_local_ray(args: argparse.Namespace, api_key: str, name: str) -> Iterator[str]:
    """serve_app as ``configs/config.yaml`` and ``configs/serve.env`` (with ``--env``)
    describe it, on a fresh local Ray in a temp dir; yields its URL, settled 5 s.
    Sets ``args.n_ids``, the example store's entity count."""
    with tempfile.TemporaryDirectory(prefix="b_", dir="/tmp") as tmp:  # short: socket paths
        workdir = Path(tmp)
        config = serve_config(workdir, args.config.resolve())
        args.n_ids = build_example_artifacts(config).artifacts.n_entities
        env = serve_environment(workdir, api_key)  # configs/serve.env included
        env.update(args.env)
        with local_ray(env, namespace=name):
            url = serve_app_up(config, ready_s=60)
            time.sleep(5)
            yield url


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    notes = noise_notes()
    api_key = new_api_key()
    multiples = [float(x) for x in args.multiples.split(",")]
    rows: list[Row] = []
    with app_on_local_ray(args, api_key, "bench_overload") as url:
        rss = idle_rss()
        notes.append(f"idle RSS per replica (MB): {rss}")
        print(f"idle RSS per replica (MB): {rss}", flush=True)
        wrk_overload(url, api_key, 0, args.connections, args.warmup, args)
        if args.capacity > 0:
            capacity = args.capacity
        else:
            cap_row = measure("capacity", 0, args.connections, args.duration, url, api_key, args)
            capacity = cap_row.goodput
            if capacity <= 0:
                raise RuntimeError(f"no successful request at capacity: {cap_row.run}")
            rows.append(cap_row)
        unloaded_rate = args.unloaded * capacity
        base = measure(
            f"{args.unloaded:g}x",
            unloaded_rate,
            connections_for(unloaded_rate, args),
            args.duration,
            url,
            api_key,
            args,
        )
        rows.append(base)
        unloaded_p99 = base.run["ok"]["p99"]
        for k in multiples:
            rate = k * capacity
            row = measure(
                f"{k:g}x", rate, connections_for(rate, args), args.duration, url, api_key, args
            )
            after = wrk_overload(
                url,
                api_key,
                unloaded_rate,
                connections_for(unloaded_rate, args),
                args.recovery,
                args,
            )
            row.recovery_s = recovery_seconds(after, 1.5 * unloaded_p99)
            print(f"  recovery: {row.recovery_s} s; per second {after['ok_p99_by_second']}")
            rows.append(row)
    write_report(report(rows, capacity, unloaded_p99, args, notes), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
