"""The autoscaling load test, in one command.

    python loadtests/run_autoscaling.py --shape step            # ~2.5 min, starts its own app
    python loadtests/run_autoscaling.py --shape spike --scale 0.5
    python loadtests/run_autoscaling.py --target http://127.0.0.1:8000 --api-key KEY

It starts the application from ``configs/loadtest.yaml`` on a local Ray (or targets a
running one), runs locust headless as a subprocess with a load shape, samples the
replica count of every deployment each second, shows progress on stderr (a tqdm bar on
a terminal, and a line per stage of the shape: elapsed/total seconds, users, req/s,
failures so far, replicas), and writes ``timeline.csv``, ``autoscaling.png`` and
``summary.md`` into ``--out``. It exits non-zero when any request
failed, or when no deployment scaled up under load, or one that did failed to scale back
down after it. The run is bounded: the shape ends by itself and locust is killed at a
hard deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python loadtests/<this>.py

from loadtests.harness import (
    APP_NAME,
    LOADTESTS,
    RESULTS,
    ROOT,
    local_ray,
    new_api_key,
    replica_counts,
    serve_app_up,
    serve_config,
    serve_environment,
)
from loadtests.progress import LoadProgress
from loadtests.stages import SHAPES, scaled, total_duration

FAST_METRICS_ENV = {
    # replicas and handles report load every 0.5 s instead of 10 s: scaling within seconds
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}


@dataclass
class Sampler:
    """Samples replica counts once a second in a thread."""

    started: float = field(default_factory=time.monotonic)
    rows: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.rows.append((time.monotonic() - self.started, replica_counts(APP_NAME)))
            except Exception as exc:  # a failed sample is a gap, not a failed run
                print(f"sample failed: {exc}", file=sys.stderr)
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()

    def latest(self) -> dict[str, int] | None:
        """The newest replica counts (for the progress display), if any were sampled."""
        rows = self.rows
        return rows[-1][1] if rows else None


@contextlib.contextmanager
def attached_ray() -> Iterator[None]:
    """The Ray of an app started elsewhere (``--target``): sample it, leave it running."""
    import ray

    ray.init(address="auto", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def run_locust(
    url: str, out: Path, args: argparse.Namespace, api_key: str, sampler: Sampler | None = None
) -> int:
    """Locust headless in a subprocess, bounded by a hard deadline; its exit code.

    While it runs, progress goes to stderr (:mod:`loadtests.progress`): elapsed/total
    seconds, users, requests/s, failures so far and the sampled replica counts.
    """
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LOAD_SHAPE": args.shape,
        "SHAPE_SCALE": str(args.scale),
        "SERVE_APP_API_KEY": api_key,
        "TASK_WEIGHTS": args.weights,
    }
    deadline = total_duration(args.shape, args.scale) + 60
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOADTESTS / "locustfile.py"),
        "--headless",
        "--host",
        url,
        "--csv",
        str(out / "locust"),
        "--csv-full-history",
        "--only-summary",
        "--loglevel",
        "WARNING",
    ]
    stages = scaled(SHAPES[args.shape], args.scale)
    with (out / "locust.log").open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        progress = LoadProgress(stages, out / "locust_stats_history.csv")
        hard_deadline = time.monotonic() + deadline
        code: int | None = None
        try:
            while code is None:
                try:
                    code = process.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= hard_deadline:
                        process.kill()
                        process.wait()
                        code = -9
                    else:
                        progress.tick(replicas=sampler.latest() if sampler else None)
        finally:
            if process.poll() is None:  # interrupted (Ctrl-C): never leave locust behind
                process.kill()
                process.wait()
            progress.close(replicas=sampler.latest() if sampler else None)
    assert code is not None
    if code == -9:
        print(f"locust killed at the hard deadline ({deadline:.0f}s)", file=sys.stderr)
    return code


def read_history(out: Path) -> list[dict[str, Any]]:
    """Per-second aggregated locust stats (users, RPS, p50, p99, failures)."""
    rows = []
    with (out / "locust_stats_history.csv").open() as handle:
        for row in csv.DictReader(handle):
            if row["Name"] != "Aggregated":
                continue

            def number(key: str, row: dict[str, str] = row) -> float:
                value = row.get(key, "")
                return float(value) if value not in ("", "N/A") else float("nan")

            rows.append(
                {
                    "timestamp": float(row["Timestamp"]),
                    "users": number("User Count"),
                    "rps": number("Requests/s"),
                    "p50_ms": number("50%"),
                    "p99_ms": number("99%"),
                    "requests": number("Total Request Count"),
                    "failures": number("Total Failure Count"),
                }
            )
    # locust's own Requests/s is a sliding window that freezes when traffic stops;
    # the difference of the running total is what was really served each second
    for previous, row in itertools.pairwise(rows):
        elapsed = row["timestamp"] - previous["timestamp"]
        if elapsed > 0:
            row["rps"] = (row["requests"] - previous["requests"]) / elapsed
    return rows


def analyse(
    samples: list[tuple[float, dict[str, int]]], load_start: float, load_end: float
) -> dict[str, dict[str, Any]]:
    """Per deployment: initial and peak replicas, time to scale up, and the end state."""
    report: dict[str, dict[str, Any]] = {}
    names = sorted({name for _, counts in samples for name in counts})
    for name in names:
        series = [(t, counts.get(name, 0)) for t, counts in samples]
        before = [n for t, n in series if t <= load_start] or [series[0][1]]
        initial = before[-1]
        _, peak = max(series, key=lambda point: (point[1], -point[0]))
        up = next((t for t, n in series if t > load_start and n > initial), None)
        final = series[-1][1]
        report[name] = {
            "initial": initial,
            "peak": peak,
            "final": final,
            "scaled_up": peak > initial,
            "time_to_scale_up_s": None if up is None else round(up - load_start, 1),
            "scaled_down": peak > initial and final < peak,
        }
    return report


def write_outputs(
    out: Path,
    history: list[dict[str, Any]],
    samples: list[tuple[float, dict[str, int]]],
    offset: float,
) -> None:
    """timeline.csv and autoscaling.png on one time axis (seconds since the app was up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for _, counts in samples for name in counts})
    with (out / "timeline.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["t_s", "source", "users", "rps", "p50_ms", "p99_ms", *names])
        for row in history:
            t = row["timestamp"] - offset
            writer.writerow(
                [
                    f"{t:.1f}",
                    "locust",
                    row["users"],
                    row["rps"],
                    row["p50_ms"],
                    row["p99_ms"],
                    *[""] * len(names),
                ]
            )
        for t, counts in samples:
            writer.writerow(
                [f"{t:.1f}", "serve", "", "", "", "", *[counts.get(n, 0) for n in names]]
            )

    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    times = [row["timestamp"] - offset for row in history]
    axes[0].plot(times, [r["users"] for r in history], color="black")
    axes[0].set_ylabel("users")
    axes[1].plot(times, [r["rps"] for r in history], color="tab:blue")
    axes[1].set_ylabel("requests/s")
    axes[2].plot(times, [r["p50_ms"] for r in history], label="p50")
    axes[2].plot(times, [r["p99_ms"] for r in history], label="p99")
    axes[2].set_ylabel("latency (ms)")
    axes[2].legend()
    for name in names:
        axes[3].step(
            [t for t, _ in samples], [c.get(name, 0) for _, c in samples], where="post", label=name
        )
    axes[3].set_ylabel("replicas")
    axes[3].set_xlabel("seconds")
    axes[3].legend()
    fig.suptitle("serve_app under load: users, throughput, latency, replicas")
    fig.tight_layout()
    fig.savefig(out / "autoscaling.png", dpi=90)
    plt.close(fig)


def summarise(
    out: Path,
    args: argparse.Namespace,
    report: dict[str, dict[str, Any]],
    history: list[dict[str, Any]],
    verdict: list[str],
) -> str:
    last = history[-1] if history else {"requests": 0, "failures": 0}
    loaded = [r for r in history if r["users"] > 0]
    peak_rps = max((r["rps"] for r in loaded), default=0.0)
    lines = [
        f"# Autoscaling load test: shape `{args.shape}` x{args.scale}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
        f"config `{args.config}`, task weights `{args.weights}`.",
        "",
        f"Requests: {last['requests']:.0f}, failures: {last['failures']:.0f}, "
        f"peak {peak_rps:.0f} req/s.",
        "",
        "| deployment | initial | peak | final | scaled up after | scaled down |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in report.items():
        up = "-" if row["time_to_scale_up_s"] is None else f"{row['time_to_scale_up_s']} s"
        lines.append(
            f"| {name} | {row['initial']} | {row['peak']} | {row['final']} | {up} | "
            f"{'yes' if row['scaled_down'] else 'no'} |"
        )
    lines += ["", "Verdict: " + ("PASS" if not verdict else "FAIL: " + "; ".join(verdict)), ""]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


def verdict_of(report: dict[str, dict[str, Any]], history: list[dict[str, Any]]) -> list[str]:
    problems = []
    failures = history[-1]["failures"] if history else 0
    if not history or history[-1]["requests"] == 0:
        problems.append("no requests were made")
    if failures:
        problems.append(f"{failures:.0f} requests failed")
    risen = [name for name, row in report.items() if row["scaled_up"]]
    if not risen:
        problems.append("no deployment scaled up under load")
    problems += [
        f"{name} did not scale back down" for name in risen if not report[name]["scaled_down"]
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "loadtest.yaml")
    parser.add_argument("--shape", choices=["step", "spike", "rampdown"], default="step")
    parser.add_argument("--scale", type=float, default=1.0, help="stretch the shape's durations")
    parser.add_argument("--weights", default="single=8,batch=2,job=0")
    parser.add_argument("--target", help="URL of a running app (else one is started)")
    parser.add_argument("--api-key", default=os.environ.get("SERVE_APP_API_KEY"))
    parser.add_argument("--settle-s", type=float, default=5.0, help="sampling after locust")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or RESULTS / f"{args.shape}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)

    started_here = args.target is None
    api_key = args.api_key or new_api_key("loadtest")
    with tempfile.TemporaryDirectory(prefix="ra_", dir="/tmp") as tmp:  # short: socket paths
        workdir = Path(tmp)
        env = {**serve_environment(workdir, api_key), **FAST_METRICS_ENV}
        with local_ray(env) if started_here else attached_ray():
            if started_here:
                print(f"deploying {args.config.name} on a local Ray ...", flush=True)
                url = serve_app_up(serve_config(workdir, args.config), timeout_s=180, ready_s=60)
            else:
                url = args.target.rstrip("/")
            sampler = Sampler()
            thread = threading.Thread(target=sampler.run, daemon=True)
            thread.start()
            time.sleep(3)  # a few samples at rest
            load_start = time.monotonic() - sampler.started
            wall_start = time.time()
            code = run_locust(url, out, args, api_key, sampler)
            load_end = time.monotonic() - sampler.started
            time.sleep(args.settle_s)
            sampler.stop()
            thread.join()

    history = read_history(out)
    offset = wall_start - load_start  # locust wall-clock -> sampler seconds
    report = analyse(sampler.rows, load_start, load_end)
    write_outputs(out, history, sampler.rows, offset)
    problems = verdict_of(report, history)
    if code not in (0, 1):  # locust exits 1 when requests failed; that is in the verdict
        problems.append(f"locust exited with {code}")
    print(summarise(out, args, report, history, problems))
    print(f"wrote {out}/timeline.csv, autoscaling.png, summary.md")
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
