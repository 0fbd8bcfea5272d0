"""A replica dies under half-capacity load: failed requests and seconds to recover.

    python loadtests/bench_replica_kill.py [--load 0.5] [--before 5] [--after 20]

What it does, on loopback and in a temp dir:

1. starts a local Ray (2 CPUs) and deploys ``configs/config.yaml`` as the benchmarks do
   (HAProxy + throughput-optimised mode, ``configs/serve.env``);
2. **capacity**: wrk in closed loop, 128 connections (``--connections``), on
   ``/v1/predict`` with fresh ids (``--capacity`` skips it);
3. for each deployment in turn (Ingress, Model, FeatureFetcher, JobWorker): an
   **open-loop** rate of ``--load`` x capacity (``loadtests/wrk_overload.lua``) for
   ``--before`` + ``--after`` seconds, with SIGKILL of one of its replicas ``--before``
   seconds in; then waits until Serve has replaced it. The JobWorker is killed while it
   runs a job; the job must end with every item exactly once.
4. prints and writes (``loadtests/results/bench_replica_kill.md``) per kill: requests
   that did not succeed (any non-2xx, 503s included, and socket errors), the seconds
   until the successes per second are back to 90 % of the offered rate for two seconds
   in a row, the worst second, the p99 of successes before and after, and how long Serve
   took to have the replica running again.

An open loop keeps offering the rate while a replica is gone, so a stall shows as a dip
and then a burst of late answers; a closed loop would slow down with the service and
measure latency instead of throughput. The chaos test (``tests/integration/
test_chaos.py``) asserts the same zero failures in CI at a lighter load.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python loadtests/<this>.py

from loadtests.bench_overload import (
    add_env_argument,
    app_on_local_ray,
    overload_json,
    wrk_command,
    wrk_overload,
)
from loadtests.harness import (
    APP_NAME,
    RESULTS,
    command_line,
    md_header,
    md_row,
    new_api_key,
    noise_notes,
    write_report,
)
from loadtests.launch import replica_counts, replica_pids

KILLED = ("Ingress", "Model", "FeatureFetcher", "JobWorker")
JOB_ITEMS = 50_000
DIP_WINDOW_S = 10  # a dip later than this after the kill is the machine's noise


@dataclass
class Kill:
    deployment: str
    rate: float
    killed_at_s: float  # seconds since wrk started
    replaced_s: float | None
    run: dict[str, Any]
    job: str = "-"

    def ok_per_second(self) -> dict[int, int]:
        return {int(s): v[0] for s, v in self.run["ok_p99_by_second"].items()}

    def p99_per_second(self) -> dict[int, float]:
        return {int(s): v[1] for s, v in self.run["ok_p99_by_second"].items()}

    @property
    def failed(self) -> int:
        errors = self.run["errors"]
        sockets = errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
        return sum(self.run["failed_by_second"].values()) + sockets

    def recovery_s(self) -> float | None:
        """Seconds from the kill until the successes per second are back at 90 % of the
        offered rate for two whole seconds in a row, after the first second that fell
        short within ``DIP_WINDOW_S`` of the kill; 0 if none did. None if never back."""
        ok = self.ok_per_second()
        first = math.floor(self.killed_at_s)
        last = max(ok) - 1  # wrk's last second is partial
        bar = 0.9 * self.rate
        short = [s for s in range(first, min(last, first + DIP_WINDOW_S)) if ok.get(s, 0) < bar]
        if not short:
            return 0.0
        for second in range(short[0] + 1, last):
            if ok.get(second, 0) >= bar and ok.get(second + 1, 0) >= bar:
                return max(0.0, second - self.killed_at_s)
        return None

    def worst_second(self) -> int:
        ok = self.ok_per_second()
        after = [ok.get(s, 0) for s in range(math.floor(self.killed_at_s), max(ok))]
        return min(after, default=0)

    def p99s(self) -> tuple[float, float]:
        """Worst per-second p99 of successes before the kill and after it."""
        p99 = self.p99_per_second()
        before = [v for s, v in p99.items() if 1 <= s < math.floor(self.killed_at_s)]
        after = [v for s, v in p99.items() if s >= math.floor(self.killed_at_s)]
        return max(before, default=-1), max(after, default=-1)


def wait_replaced(deployment: str, killed_pid: int, want: int, timeout_s: float) -> float | None:
    """Seconds (from now) until ``want`` replicas are alive again, none of them the killed
    one, and Serve counts them RUNNING (right after a kill the GCS already knows the
    process is gone while Serve still counts it)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        pids = replica_pids(APP_NAME, deployment)
        fresh = killed_pid not in pids and len(pids) >= want
        if fresh and replica_counts(APP_NAME).get(deployment, 0) >= want:
            return time.monotonic() - started
        time.sleep(0.25)
    return None


def start_job(client: httpx.Client) -> str:
    items = [
        {"entity_id": f"E{i % 100_000:07d}", "context": {"amount": i}} for i in range(JOB_ITEMS)
    ]
    created = client.post("/v1/jobs", json={"items": items}, timeout=120)
    created.raise_for_status()
    job_id: str = created.json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job_id}", params={"limit": 1}).json()["progress"]["done"] == 0:
        if time.monotonic() > deadline:
            raise TimeoutError("the job did not start")
        time.sleep(0.1)
    return job_id


def job_outcome(client: httpx.Client, job_id: str, timeout_s: float = 300) -> str:
    """Waits for the job; "succeeded, every item once" or what went wrong."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/jobs/{job_id}", params={"limit": 1}).json()
        if job["state"] in ("succeeded", "failed"):
            break
        if time.monotonic() > deadline:
            return f"not done after {timeout_s:.0f} s: {job['progress']}"
        time.sleep(0.5)
    indexes: list[int] = []
    offset: int | None = 0
    while offset is not None:
        page = client.get(f"/v1/jobs/{job_id}", params={"offset": offset, "limit": 1000}).json()
        indexes.extend(result["index"] for result in page["results"])
        offset = page["next_offset"]
    once = sorted(indexes) == list(range(JOB_ITEMS))
    return f"{job['state']}, {JOB_ITEMS:,} items, each exactly once: {once}"


def kill_under_load(
    deployment: str, url: str, token: str, rate: float, args: argparse.Namespace
) -> Kill:
    want = replica_counts(APP_NAME)[deployment]
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=auth, timeout=30) as client:
        job_id = start_job(client) if deployment == "JobWorker" else None
        kill = kill_during_wrk(deployment, url, token, rate, want, args)
        if job_id is not None:
            kill.job = job_outcome(client, job_id)
    print(progress(kill), flush=True)
    return kill


def kill_during_wrk(
    deployment: str, url: str, token: str, rate: float, want: int, args: argparse.Namespace
) -> Kill:
    """wrk at ``rate`` for --before + --after seconds, one replica SIGKILLed in between."""
    seconds = args.before + args.after
    connections = max(64, math.ceil(rate * 0.25))
    command = wrk_command(url, token, rate, connections, seconds, args)
    wrk = subprocess.Popen(  # errors="replace": see bench_overload.wrk_overload
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        errors="replace",
    )
    started = time.monotonic()
    time.sleep(args.before)
    pid = replica_pids(APP_NAME, deployment)[0]
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic() - started
    replaced = wait_replaced(deployment, pid, want, timeout_s=90)
    stdout, stderr = wrk.communicate(timeout=seconds + args.wrk_timeout + 60)
    return Kill(
        deployment, rate, killed_at, replaced, overload_json(wrk.returncode, stdout, stderr)
    )


def progress(kill: Kill) -> str:
    recovery = kill.recovery_s()
    return (
        f"SIGKILL {kill.deployment:15} failed {kill.failed:4d}  back to 90 % after "
        f"{'never' if recovery is None else f'{recovery:.1f} s'}  worst second "
        f"{kill.worst_second()}/{kill.rate:.0f}  replaced after {kill.replaced_s} s  "
        f"codes {kill.run['codes']}  socket errors {kill.run['errors']}  without our id "
        f"{kill.run['no_id']}  Retry-After {kill.run['retry_after']}  refused "
        f"{kill.run['refused']}  job {kill.job}\n  ok per second "
        f"{dict(sorted(kill.ok_per_second().items()))}\n  failed per second "
        f"{kill.run['failed_by_second']}"
    )


def report(kills: list[Kill], capacity: float, args: argparse.Namespace, notes: list[str]) -> str:
    lines = [
        f"## bench_replica_kill: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"`{command_line()}`: `/v1/predict`, fresh ids, open loop at {args.load:g}x capacity "
        f"({kills[0].rate:,.0f} req/s of {capacity:,.0f}), SIGKILL {args.before:g} s in, "
        f"{args.after:g} s after; {os.cpu_count()} CPUs, load average before: {notes[0]}.",
        "",
        *md_header(
            [
                "SIGKILL of",
                "requests",
                "failed",
                "back to 90 % after",
                "worst second (ok/s)",
                "ok p99 before / after (worst second, ms)",
                "replica running again after",
                "job",
            ]
        ),
    ]
    for kill in kills:
        recovery = kill.recovery_s()
        before, after = kill.p99s()
        lines.append(
            md_row(
                [
                    kill.deployment,
                    f"{kill.run['requests']:,}",
                    str(kill.failed),
                    "never" if recovery is None else f"{recovery:.1f} s",
                    f"{kill.worst_second():,}",
                    f"{before:,.0f} / {after:,.0f}",
                    "-" if kill.replaced_s is None else f"{kill.replaced_s:.1f} s",
                    kill.job,
                ]
            )
        )
    lines += [
        "",
        "Successes per second (the kill in second "
        f"{math.floor(kills[0].killed_at_s)}; the last second is partial):",
        "",
    ]
    for kill in kills:
        series = ", ".join(str(n) for _, n in sorted(kill.ok_per_second().items()))
        lines.append(f"- {kill.deployment}: {series}")
    lines += [
        "",
        "- failed: answers other than 2xx (503 included) and socket errors.",
        "- back to 90 %: from the kill to the first two whole seconds in a row whose "
        f"successes reach 90 % of the offered rate, after the first second within "
        f"{DIP_WINDOW_S} s of the kill that fell short (0: none fell short).",
        *[f"- {note}" for note in notes[1:]],
        *[f"- serve.env overridden: `{key}={value}`" for key, value in args.env],
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--load", type=float, default=0.5, help="x capacity, open loop")
    parser.add_argument("--before", type=float, default=5, help="seconds of load before the kill")
    parser.add_argument("--after", type=float, default=20, help="seconds of load after it")
    parser.add_argument("--settle", type=float, default=5, help="seconds between kills")
    parser.add_argument("--connections", type=int, default=128, help="closed loop (capacity)")
    parser.add_argument("--capacity", type=float, default=0, help="req/s: skip measuring it")
    parser.add_argument("--deployments", default=",".join(KILLED))
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--wrk-timeout", type=int, default=15)
    parser.add_argument("--config", type=Path, default=Path("configs/config.yaml"))
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_replica_kill.md")
    add_env_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    notes = noise_notes()
    api_key = new_api_key()
    kills: list[Kill] = []
    with app_on_local_ray(args, api_key, "bench_replica_kill") as url:
        wrk_overload(url, api_key, 0, args.connections, 5, args)  # warm-up
        capacity = args.capacity
        if capacity <= 0:
            run = wrk_overload(url, api_key, 0, args.connections, 10, args)
            capacity = run["ok"]["n"] / run["seconds"]
        print(f"capacity {capacity:.0f} req/s", flush=True)
        for deployment in args.deployments.split(","):
            kills.append(kill_under_load(deployment, url, api_key, args.load * capacity, args))
            time.sleep(args.settle)
    write_report(report(kills, capacity, args, notes), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
