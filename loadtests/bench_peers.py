"""serve_app against the servers a user would otherwise pick, measured in one run with wrk.

    python loadtests/bench_peers.py [--duration 20] [--rounds 2] [--profile-seconds 15]

Run it under the Ray lock (``flock /tmp/serve_app_ray.lock python loadtests/bench_peers.py``).
What it does, all on loopback and in a temp dir:

1. builds the example feature store and model (``build_artifacts``), once, for everyone;
2. starts each server alone, one after the other, each on the same artifact and SQLite
   file and with the same API key:

   * **FastAPI**: ``loadtests/peers/fastapi_peer.py``, uvicorn with 2 workers,
     ``OMP_NUM_THREADS=1``: one look-up and one ``predict_proba`` per request;
   * **LitServe**: ``loadtests/peers/litserve_peer.py``, dynamic batching as LitServe's
     docs say for CPU (``max_batch_size=64``, ``batch_timeout=0.005``, ``fast_queue``,
     ``workers_per_device`` = cores);
   * **serve_app**: a local Ray (2 CPUs) with ``configs/config.yaml`` deployed as the
     integration tests do it; measured with the FeatureFetcher's cache on (the default),
     then redeployed in place with ``user_config: {cache_enabled: false}``.

   Both peers do serve_app's work with serve_app's own code (``loadtests/peers/common.py``:
   ``KeyChecker``, ``parse_item`` / ``parse_items``, ``SQLiteFeatureStore``, the artifact,
   ``Scorer.predict``) and answer serve_app's bodies;
3. for each: start-up time (process start to the first 200 on ``/readyz``), idle memory
   (RSS and PSS summed over every process of the server, from ``/proc/PID/smaps_rollup``),
   the scores of a fixed set of items (checked equal across all servers), then the load
   cases with wrk (``loadtests/wrk_post.lua``): ``/v1/predict`` at 32 and 128
   connections, ``/v1/predict/batch`` with 32 items at 32 connections, entity ids uniform
   over all 100,000 with a random context per item (the prediction cache cannot hit);
   each row after a warm-up, ``--rounds`` times; CPU of the server's processes per row;
4. profiles serve_app's Ingress and Model replicas with py-spy under the same load
   (after the measured rows, so the sampling does not slow them);
5. writes the tables, the ratios to the strongest peer per case and the top profile frames
   to ``loadtests/reports/bench_peers.md``.

Everything it starts is stopped in ``finally`` blocks: a peer by its process group (it
was started in a session of its own), Ray as ``loadtests/harness.py`` does it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import os
import platform
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python loadtests/<this>.py

from loadtests.harness import (
    APP_NAME,
    CONFIG_YAML,
    LOADTESTS,
    ROOT,
    SERVE_CPU_GROUPS,
    Case,
    Row,
    add_load_arguments,
    build_example_artifacts,
    cmdline,
    command_line,
    cpu_meter,
    descendants,
    fetcher_delta,
    fmt,
    local_ray,
    md_header,
    md_row,
    new_api_key,
    noise_notes,
    non_2xx_notes,
    progress_line,
    serve_config,
    serve_cpu_group,
    serve_environment,
    stats_delta,
    stats_snapshot,
    write_report,
    wrk_post,
)
from loadtests.launch import deploy_config, free_port

REPORT = LOADTESTS / "reports" / "bench_peers.md"
PEERS = LOADTESTS / "peers"
READY_PATH = "/readyz"
PEER_GROUPS = ("server",)
CHECK_ITEMS = 48  # the fixed items whose scores must be equal everywhere
CHECK_SINGLE = 8  # of which this many also go one by one through /v1/predict


# ---- what is measured ------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One load case: a request shape at a number of connections."""

    case: Case
    connections: int

    @property
    def name(self) -> str:
        return (
            f"`{self.case.path}`"
            + (f" ({self.case.batch} items)" if self.case.batch else "")
            + f", {self.connections} conn"
        )


def make_loads(args: argparse.Namespace) -> list[Load]:
    single = Case("predict (1 entity)", "/v1/predict", 0)
    batch = Case(
        f"predict/batch ({args.batch_size} entities)", "/v1/predict/batch", args.batch_size
    )
    loads = [Load(single, c) for c in args.predict_connections]
    return [*loads, Load(batch, args.batch_connections)]


@dataclass(frozen=True)
class Target:
    """A server as measured: its label, URL, and which CPU groups are its own."""

    label: str
    base_url: str
    kind: str  # "peer" or "serve_app"
    groups: tuple[str, ...]
    group_of: Callable[[int, str], str]


@dataclass
class Result(Row):
    load: Load | None = None
    round_no: int = 0
    load_avg: float = 0.0  # 1-minute load average when the row started
    model: dict[str, float] | None = None
    fetcher: dict[str, float] | None = None
    replicas: str = ""

    @property
    def cores(self) -> float:
        return sum(self.cpu.get(group, 0.0) for group in self.target.groups)


@dataclass
class ServerFacts:
    """What is measured once per server: start-up, memory, the check scores."""

    label: str
    startup_s: float
    startup_note: str = ""
    idle: dict[str, float] = field(default_factory=dict)  # processes, rss_mib, pss_mib
    after: dict[str, float] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)


# ---- processes, memory -----------------------------------------------------------------


def group_pids(pgid: int) -> list[int]:
    """Every live process of a process group."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
    return pids


def memory_of(pids: Sequence[int]) -> dict[str, float]:
    """RSS and PSS (MiB) summed over ``pids``, from /proc/PID/smaps_rollup."""
    rss = pss = 0
    counted = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        values = {line.split(":")[0]: int(line.split()[1]) for line in lines if line.endswith("kB")}
        if "Rss" in values:
            counted += 1
            rss += values["Rss"]
            pss += values.get("Pss", 0)
    return {"processes": counted, "rss_mib": rss / 1024, "pss_mib": pss / 1024}


def serve_pids() -> list[int]:
    """Our Ray processes (the benchmark process itself, the Ray driver, is not counted)."""
    skip = ("wrk", "py-spy")
    return [pid for pid, (name, _) in descendants().items() if not name.startswith(skip)]


def wait_200(url: str, deadline_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll ``url`` every 0.1 s until it answers 200."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server died before {url} answered 200")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {deadline_s:.0f} s")


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 20) -> None:
    """SIGTERM to the peer's process group, SIGKILL to whatever of it is left after ``grace_s``."""
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(0.3)
    left = group_pids(pgid)
    if left:
        print(f"WARNING: peer processes {left} outlived SIGTERM; killing the group", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def peer(
    label: str, script: str, extra: list[str], env: dict[str, str], workdir: Path
) -> Iterator[tuple[Target, ServerFacts]]:
    """A peer in a session of its own on a free port; up once /readyz is 200."""
    port = free_port()
    log_path = workdir / f"{script}.log"
    command = [sys.executable, str(PEERS / script), "--port", str(port), *extra]
    with log_path.open("w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )
        try:
            url = f"http://127.0.0.1:{port}"
            try:
                wait_200(url + READY_PATH, 300, lambda: proc.poll() is None)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{label}: {exc}\n{log_path.read_text()[-3000:]}") from exc
            facts = ServerFacts(label, time.perf_counter() - started)
            print(f"{label} up on {url} (pgid {proc.pid}) in {facts.startup_s:.1f}s", flush=True)
            pgid = proc.pid

            def group_of(pid: int, _name: str) -> str:
                with contextlib.suppress(OSError):
                    if os.getpgid(pid) == pgid:
                        return "server"
                return "other"

            target = Target(label, url, "peer", PEER_GROUPS, group_of)
            facts.idle = settle_and_measure(lambda: group_pids(pgid))
            yield target, facts
            facts.after = settle_and_measure(lambda: group_pids(pgid))
        finally:
            stop_group(proc)


def settle_and_measure(pids: Callable[[], list[int]], settle_s: float = 5) -> dict[str, float]:
    time.sleep(settle_s)
    return memory_of(pids())


def peer_env(workdir: Path, api_key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SERVE_APP_"))}
    env.update(
        {
            "PEER_MODEL_DIR": str(workdir / "model"),
            "PEER_SQLITE": str(workdir / "features.db"),
            "SERVE_APP_API_KEYS": api_key,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


# ---- the fixed-items check -------------------------------------------------------------


def check_items(n_ids: int) -> list[dict[str, Any]]:
    """The same items for every server: fixed seed, ids over all entities, random context."""
    rng = random.Random(20_261_128)
    return [
        {
            "entity_id": f"E{rng.randrange(n_ids):07d}",
            "context": {
                "amount": rng.randrange(100, 99_999) / 100,
                "hour": rng.randrange(24),
                "channel": rng.choice(["web", "app", "store"]),
            },
        }
        for _ in range(CHECK_ITEMS)
    ]


def check_scores(base_url: str, token: str, items: list[dict[str, Any]]) -> list[float]:
    """The batch's scores, then the first few again one by one (they must agree)."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        response = client.post("/v1/predict/batch", json={"items": items})
        response.raise_for_status()
        scores = [float(result["score"]) for result in response.json()["results"]]
        for item, expected in zip(items[:CHECK_SINGLE], scores, strict=False):
            single = client.post("/v1/predict", json=item)
            single.raise_for_status()
            if float(single.json()["score"]) != expected:
                raise AssertionError(f"{base_url}: /v1/predict and /batch disagree on {item}")
    return scores


# ---- running the rows ------------------------------------------------------------------


def run_rows(
    target: Target,
    loads: Sequence[Load],
    args: argparse.Namespace,
    token: str,
    n_ids: int,
    seed: list[int],
    stats: httpx.Client | None,
) -> list[Result]:
    rows: list[Result] = []
    for load in loads:
        wrk_args = copy.copy(args)
        wrk_args.connections = load.connections
        for round_no in range(1, args.rounds + 1):
            seed[0] += 1
            wrk_post(
                target.base_url, load.case, n_ids, "uniform", seed[0], token, args.warmup, wrk_args
            )
            before = snapshot(stats)
            seed[0] += 1
            cpu: dict[str, float] = {}
            load_avg = os.getloadavg()[0]
            with cpu_meter(cpu, target.group_of, target.groups):
                measured = wrk_post(
                    target.base_url,
                    load.case,
                    n_ids,
                    "uniform",
                    seed[0],
                    token,
                    args.duration,
                    wrk_args,
                )
            row = Result(load.case, target, measured, cpu=cpu, load=load, round_no=round_no)
            row.load_avg = load_avg
            after = snapshot(stats)
            if before is not None and after is not None:
                row.model = stats_delta(before, after)
                row.fetcher = fetcher_delta(before, after)
                row.replicas = after["replicas"]
            rows.append(row)
            extra = f"  {load.connections} conn, round {round_no}, cores {row.cores:.2f}"
            print(progress_line(row, extra), flush=True)
    return rows


def snapshot(client: httpx.Client | None) -> dict[str, Any] | None:
    """serve_app's counters, or None (a peer, or /v1/stats changed under us)."""
    if client is None:
        return None
    try:
        return stats_snapshot(client)
    except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
        print(f"stats unavailable: {exc!r}", flush=True)
        return None


# ---- serve_app -------------------------------------------------------------------------


def serve_target(label: str, url: str) -> Target:
    return Target(label, url, "serve_app", SERVE_CPU_GROUPS, serve_cpu_group)


def set_fetcher_cache(config: dict[str, Any], enabled: bool) -> None:
    """``user_config.cache_enabled`` of the FeatureFetcher in the Serve config."""
    deployments = config["applications"][0].setdefault("deployments", [])
    for deployment in deployments:
        if deployment["name"] == "FeatureFetcher":
            break
    else:
        deployment = {"name": "FeatureFetcher"}
        deployments.append(deployment)
    user_config = deployment.get("user_config") or {}
    user_config["cache_enabled"] = enabled
    deployment["user_config"] = user_config


def replica_pids(deployment: str) -> list[int]:
    marker = f"ServeReplica:{APP_NAME}:{deployment}"
    return sorted(pid for pid in descendants() if marker in cmdline(pid))


# ---- profiling -------------------------------------------------------------------------


def py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else "py-spy"


def profile(
    target: Target, load: Load, args: argparse.Namespace, token: str, n_ids: int, workdir: Path
) -> dict[str, list[Path]]:
    """py-spy record (raw collapsed stacks) of every Ingress and Model replica under ``load``."""
    files: dict[str, list[Path]] = {}
    spies: list[subprocess.Popen[bytes]] = []
    for deployment in ("Ingress", "Model"):
        for pid in replica_pids(deployment):
            out = workdir / f"pyspy_{load.case.batch}_{load.connections}_{deployment}_{pid}.txt"
            files.setdefault(deployment, []).append(out)
            command = [
                py_spy(),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(args.profile_seconds),
                "--rate",
                "100",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out),
            ]
            spies.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
    wrk_args = copy.copy(args)
    wrk_args.connections = load.connections
    try:
        wrk_post(
            target.base_url,
            load.case,
            n_ids,
            "uniform",
            99,
            token,
            args.profile_seconds + 3,
            wrk_args,
        )
    finally:
        for spy in spies:
            try:
                spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
    # one dump of each replica's threads, idle ones included, for the appendix of the log
    for deployment in ("Ingress", "Model"):
        for pid in replica_pids(deployment):
            dump = subprocess.run(
                [py_spy(), "dump", "--pid", str(pid)], capture_output=True, text=True, check=False
            )
            (workdir / f"pyspy_dump_{deployment}_{pid}.txt").write_text(dump.stdout + dump.stderr)
    return files


def short_frame(frame: str) -> str:
    """``func (path:line)`` -> ``func (package/module.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for anchor in ("site-packages/", "lib/python3.11/", str(ROOT) + "/"):
        if anchor in path:
            path = path.split(anchor, 1)[1]
            break
    return f"{name} ({path})"


def area(frame: str) -> str:
    """Which library a (short) frame belongs to."""
    path = frame.rsplit("(", 1)[-1]
    for prefix, label in (
        ("serve_app/", "serve_app"),
        ("ray/", "ray"),
        ("sklearn/", "scikit-learn"),
        ("pandas/", "pandas"),
        ("numpy/", "numpy"),
        ("pydantic", "pydantic"),
        ("fastapi/", "fastapi/starlette"),
        ("starlette/", "fastapi/starlette"),
        ("uvicorn/", "uvicorn"),
        ("asyncio/", "asyncio"),
        ("grpc/", "grpc"),
        ("json/", "json"),
        ("concurrent/", "threads"),
        ("threading", "threads"),
        ("sqlite3", "sqlite3"),
        ("cachetools/", "cachetools"),
    ):
        if path.startswith(prefix):
            return label
    return "other"


def read_profile(paths: Sequence[Path]) -> tuple[int, Counter[str], Counter[str], Counter[str]]:
    """(samples, self time by frame, inclusive time by frame, self time by library)."""
    total = 0
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [short_frame(frame) for frame in stack.split(";") if frame]
            if not frames:
                continue
            total += n
            leaf[frames[-1]] += n
            areas[area(frames[-1])] += n
            for frame in set(frames):
                inclusive[frame] += n
    return total, leaf, inclusive, areas


def profile_section(profiles: dict[str, dict[str, list[Path]]], top: int) -> list[str]:
    lines = [
        "",
        "## Profile of serve_app's hot path (py-spy)",
        "",
        "`py-spy record --rate 100 --nonblocking` on every Ingress and Model replica while wrk "
        "drove the case (feature cache on, not during the measured rows); active samples only "
        "(threads waiting in the event loop's poll or on a lock are idle and not sampled). "
        "Self = the frame was running (py-spy sees Python frames only: time in Ray's C++ core "
        "worker and gRPC shows as the self time of the Python frame that called it, e.g. "
        "`Thread.run`, `Worker.main_loop`); inclusive = the frame was on the stack, listed "
        "for serve_app's own functions. Raw stacks: `--profile-dir`.",
    ]
    for case_name, files in profiles.items():
        for deployment, paths in files.items():
            lines += profile_tables(f"{deployment}, {case_name}", paths, top)
    return lines


def profile_tables(title: str, paths: Sequence[Path], top: int) -> list[str]:
    """Self time by library, the top frames by self time, serve_app's by inclusive time."""
    total, leaf, inclusive, areas = read_profile(paths)
    lines = ["", f"### {title}: {total:,} samples ({len(paths)} replica(s))", ""]
    if not total:
        return [*lines, "(no samples)"]
    lines.append(
        "Self time by library: "
        + ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in areas.most_common(9))
    )
    ours = Counter({frame: n for frame, n in inclusive.items() if area(frame) == "serve_app"})
    lines += ["", *md_header(["self %", "frame (self)", "incl. %", "serve_app frame (inclusive)"])]
    top_leaf, top_ours = leaf.most_common(top), ours.most_common(top)
    for index in range(max(len(top_leaf), len(top_ours))):
        cells: list[str] = []
        for ranked in (top_leaf, top_ours):
            if index < len(ranked):
                frame, n = ranked[index]
                cells += [f"{100 * n / total:.1f}", f"`{frame}`"]
            else:
                cells += ["", ""]
        lines.append(md_row(cells))
    return lines


# ---- the report ------------------------------------------------------------------------


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0


@dataclass
class Summary:
    """A (server, load) cell: the rounds averaged."""

    label: str
    kind: str
    req_s: float
    items_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    cores: float
    rounds: int


def summarise(rows: Sequence[Result]) -> dict[tuple[str, str], Summary]:
    grouped: dict[tuple[str, str], list[Result]] = {}
    for row in rows:
        assert row.load is not None
        grouped.setdefault((row.load.name, row.target.label), []).append(row)
    return {
        key: Summary(
            label=rs[0].target.label,
            kind=rs[0].target.kind,
            req_s=mean([r.req_s for r in rs]),
            items_s=mean([r.items_s for r in rs]),
            p50_ms=mean([r.wrk["latency_us"]["p50"] / 1000 for r in rs]),
            p99_ms=mean([r.wrk["latency_us"]["p99"] / 1000 for r in rs]),
            non_2xx=sum(r.non_2xx + r.socket_errors for r in rs),
            cores=mean([r.cores for r in rs]),
            rounds=len(rs),
        )
        for key, rs in grouped.items()
    }


def main_table(loads: Sequence[Load], summary: dict[tuple[str, str], Summary]) -> list[str]:
    lines = md_header(
        [
            "case",
            "server",
            "req/s",
            "items/s",
            "p50 ms",
            "p99 ms",
            "non-2xx + socket errors",
            "cores used (of 2)",
            "items/s vs strongest peer",
            "p99 vs that peer",
        ]
    )
    for load in loads:
        cells = [s for (name, _), s in summary.items() if name == load.name]
        peers = [s for s in cells if s.kind == "peer"]
        best = max(peers, key=lambda s: s.items_s) if peers else None
        for s in cells:
            ratio = f"{s.items_s / best.items_s:.2f}x" if best and best.items_s else "-"
            p99 = f"{s.p99_ms / best.p99_ms:.2f}x" if best and best.p99_ms else "-"
            if s is best:
                ratio, p99 = "1.00x (strongest peer)", "1.00x"
            lines.append(
                md_row(
                    [
                        load.name,
                        s.label,
                        fmt(s.req_s),
                        fmt(s.items_s),
                        fmt(s.p50_ms, 1),
                        fmt(s.p99_ms, 1),
                        str(s.non_2xx),
                        f"{s.cores:.2f}",
                        f"**{ratio}**" if s.kind == "serve_app" else ratio,
                        p99,
                    ]
                )
            )
    return lines


def facts_table(facts: Sequence[ServerFacts]) -> list[str]:
    lines = md_header(
        [
            "server",
            "start-up s (to first 200 on /readyz)",
            "processes",
            "idle RSS MiB",
            "idle PSS MiB",
            "RSS / PSS MiB after the load",
        ]
    )
    for f in facts:
        after = f"{f.after['rss_mib']:,.0f} / {f.after['pss_mib']:,.0f}" if f.after else "-"
        lines.append(
            md_row(
                [
                    f.label,
                    f"{f.startup_s:.1f}" + (f" ({f.startup_note})" if f.startup_note else ""),
                    str(int(f.idle.get("processes", 0))),
                    fmt(f.idle.get("rss_mib", 0)),
                    fmt(f.idle.get("pss_mib", 0)),
                    after,
                ]
            )
        )
    return lines


def check_lines(facts: Sequence[ServerFacts]) -> list[str]:
    reference = next((f for f in facts if f.label.startswith("serve_app")), facts[0])
    verdicts = []
    for f in facts:
        same = f.scores == reference.scores
        verdicts.append(f"{f.label}: {'equal' if same else 'DIFFERENT'}")
    equal = all(f.scores == reference.scores for f in facts)
    return [
        "",
        f"Scores of {CHECK_ITEMS} fixed items (seeded ids over all entities, random context; "
        f"`/v1/predict/batch`, the first {CHECK_SINGLE} also one by one through `/v1/predict`) "
        f"compared with serve_app's: {'**all equal**' if equal else '**NOT equal**'} "
        f"({'; '.join(verdicts)}). First three: {reference.scores[:3]}.",
    ]


def serve_cpu_table(rows: Sequence[Result]) -> list[str]:
    lines = md_header(
        [
            "case",
            "server",
            "round",
            *SERVE_CPU_GROUPS,
            "all serve_app",
            "wrk",
            "machine",
            "Model items/batch",
            "feature cache hits",
        ]
    )
    for r in rows:
        if r.target.kind != "serve_app":
            continue
        assert r.load is not None
        batch = "-"
        if r.model and r.model.get("batches"):
            batch = f"{r.model['unique_items'] / r.model['batches']:.1f} ({r.model['requests'] / r.model['batches']:.1f} calls)"
        hits = "n/a (>1 replica)"
        if r.fetcher is not None:
            looked = r.fetcher["cache_hits"] + r.fetcher["cache_misses"]
            hits = f"{100 * r.fetcher['cache_hits'] / looked:.0f}%" if looked else "0 look-ups"
        lines.append(
            md_row(
                [
                    r.load.name,
                    r.target.label,
                    str(r.round_no),
                    *[f"{r.cpu.get(g, 0.0):.2f}" for g in SERVE_CPU_GROUPS],
                    f"{r.cores:.2f}",
                    f"{r.cpu.get('wrk', 0.0):.2f}",
                    f"{r.cpu.get('machine', 0.0):.2f}",
                    batch,
                    hits,
                ]
            )
        )
    return lines


def raw_table(rows: Sequence[Result]) -> list[str]:
    lines = md_header(
        [
            "case",
            "server",
            "round",
            "load avg 1m at start",
            "req/s",
            "items/s",
            "p50 ms",
            "p99 ms",
            "non-2xx",
            "cores",
            "machine busy",
        ]
    )
    for r in rows:
        assert r.load is not None
        lat = r.wrk["latency_us"]
        lines.append(
            md_row(
                [
                    r.load.name,
                    r.target.label,
                    str(r.round_no),
                    f"{r.load_avg:.1f}",
                    fmt(r.req_s),
                    fmt(r.items_s),
                    fmt(lat["p50"] / 1000, 1),
                    fmt(lat["p99"] / 1000, 1),
                    str(r.non_2xx),
                    f"{r.cores:.2f}",
                    f"{r.cpu.get('machine', 0.0):.2f}",
                ]
            )
        )
    return lines


def versions() -> str:
    names = ("ray", "litserve", "fastapi", "uvicorn", "scikit-learn", "py-spy")
    found = []
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{name} {importlib.metadata.version(name)}")
    return ", ".join(found)


def git_state() -> str:
    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", *argv], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    dirty = [line[3:] for line in git("status", "--porcelain", "serve_app").splitlines()]
    return f"HEAD {head}" + (
        f", with uncommitted changes in {len(dirty)} serve_app file(s)" if dirty else ""
    )


OTHERS_LOADED = 0.25  # cores taken by others during a row from which a run is "loaded"


def others_cores(row: Result) -> float:
    """Cores the rest of the machine kept busy during a row (not the server, not wrk)."""
    return max(0.0, row.cpu.get("machine", 0.0) - row.cores - row.cpu.get("wrk", 0.0))


def _shown_path(path: Path) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(resolved)


def report(
    loads: Sequence[Load],
    rows: Sequence[Result],
    facts: Sequence[ServerFacts],
    profiles: dict[str, dict[str, list[Path]]],
    args: argparse.Namespace,
    notes: list[str],
) -> str:
    load_avgs = [r.load_avg for r in rows]
    # The load average counts the servers' own threads too; what others took is the
    # machine's busy time less ours and wrk's.
    others = max((others_cores(r) for r in rows), default=0.0)
    loaded = float(notes[0].split(",")[0]) >= args.quiet_load or others >= OTHERS_LOADED
    head = [
        f"## bench_peers: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"`{command_line()}`: wrk -t{args.threads}, {args.duration:g} s per row after "
        f"{args.warmup:g} s warm-up, {args.rounds} round(s) per row (the tables show their "
        f"mean), {os.cpu_count()} CPUs ({platform.machine()}); {versions()}; serve_app at "
        f"{git_state()}. Load average before: {notes[0]}; 1-minute load average at the start "
        f"of the rows (the servers' own threads included): {min(load_avgs, default=0):.1f} "
        f"to {max(load_avgs, default=0):.1f}; other processes' CPU during a row: at most "
        f"{others:.2f} cores.",
    ]
    if loaded:
        head += [
            "",
            "**Taken on a loaded machine** (see the load average and other processes' CPU "
            "above): the absolute figures are low and noisy; the ratios, taken minutes apart, "
            "less so.",
        ]
    head += [
        "",
        "Every server runs alone (started, measured, stopped, then the next), on the same "
        "artifact, SQLite file and API key, with serve_app's own validation and bearer check. "
        "Ids uniform over all 100,000 entities with a random context per item: the "
        "prediction cache cannot hit.",
        "",
    ]
    legend = [
        "",
        "- FastAPI: `loadtests/peers/fastapi_peer.py`, uvicorn, 2 worker processes, "
        "`OMP_NUM_THREADS=1`, one look-up + one `predict_proba` per request, no batching "
        "across requests.",
        "- LitServe: `loadtests/peers/litserve_peer.py`, `LitAPI(max_batch_size=64, "
        "batch_timeout=0.005)` per route, `LitServer(accelerator='cpu', workers_per_device=2, "
        "fast_queue=True)`, `num_api_servers` "
        + (
            str(args.litserve_api_servers)
            if args.litserve_api_servers
            else "LitServe's default (= inference workers, 4)"
        )
        + "; each LitServe batch: one look-up + one `predict_proba` for all its items.",
        f"- serve_app: `{_shown_path(args.config)}` on a local Ray (2 CPUs), HAProxy "
        "throughput mode; "
        "*feature cache off* = the same deployment reconfigured in place with the "
        "FeatureFetcher's `user_config: {cache_enabled: false}` (the peers have no cache).",
        "- cores used: user + system CPU time of all the server's processes / wall time "
        "(peers: their process group; serve_app: every Ray process it runs, HAProxy, "
        "controller, raylet and GCS included). wrk's own CPU is not in it.",
        "- items/s vs strongest peer: serve_app's items/s over those of the peer with the "
        "most items/s in that case; p99 vs that peer: below 1 is better.",
        *non_2xx_notes(rows),
    ]
    memory = [
        "",
        "## Start-up and memory",
        "",
        "Start-up: from starting the process (serve_app: `ray.init`, then `serve run` of the "
        "config) to the first 200 on `/readyz` (LitServe: its health check, mounted at "
        "`/readyz`), polled every 0.1 s. Memory: RSS and PSS from `/proc/PID/smaps_rollup`, "
        "summed over every process of the server, 5 s after it was ready (idle) and 5 s after "
        "its last row. RSS counts shared pages once per process; PSS splits them, so PSS is "
        "the fair sum. serve_app's processes are every Ray process of the cluster (GCS, "
        "raylet, agents, controller, proxy, HAProxy, all replicas incl. JobWorker), not the "
        "benchmark's own Ray driver.",
        "",
        *facts_table(facts),
        *check_lines(facts),
    ]
    cpu = [
        "",
        "## serve_app's CPU by process group, and its batches",
        "",
        *serve_cpu_table(rows),
    ]
    raw = ["", "## Every row", "", *raw_table(rows)]
    summary = summarise(rows)
    body = [*head, *main_table(loads, summary), *legend, *memory, *cpu]
    body += profile_section(profiles, args.profile_top) if profiles else []
    return "\n".join([*body, *raw]) + "\n"


# ---- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_load_arguments(parser, duration=20, wrk_timeout=10, timeout_help="seconds, as the app's")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--predict-connections", type=lambda s: [int(x) for x in s.split(",")], default=[32, 128]
    )
    parser.add_argument("--batch-connections", type=int, default=32)
    parser.add_argument("--litserve-api-servers", type=int, default=None)
    parser.add_argument("--profile-seconds", type=int, default=15, help="0: no profile")
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=Path("/tmp/bench_peers_pyspy"),
        help="the raw py-spy stacks are copied here (flamegraph.pl input)",
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["fastapi", "litserve", "serve_app"]
    )
    parser.add_argument(
        "--quiet-load", type=float, default=4.0, help="a 1-min load average from here is 'loaded'"
    )
    parser.add_argument(
        "--config", type=Path, default=CONFIG_YAML, help="serve_app's Serve config to measure"
    )
    parser.add_argument("--out", type=Path, default=REPORT)
    return parser.parse_args(argv)


def run_peers(
    args: argparse.Namespace,
    loads: list[Load],
    workdir: Path,
    api_key: str,
    n_ids: int,
    items: list[dict[str, Any]],
    seed: list[int],
) -> tuple[list[Result], list[ServerFacts]]:
    rows: list[Result] = []
    facts: list[ServerFacts] = []
    env = peer_env(workdir, api_key)
    litserve_extra = (
        ["--api-servers", str(args.litserve_api_servers)] if args.litserve_api_servers else []
    )
    peers = [
        ("fastapi", "FastAPI + uvicorn, 2 workers", "fastapi_peer.py", ["--workers", "2"]),
        ("litserve", "LitServe, dynamic batching", "litserve_peer.py", litserve_extra),
    ]
    for key, label, script, extra in peers:
        if key in args.skip:
            continue
        with peer(label, script, extra, env, workdir) as (target, fact):
            fact.scores = check_scores(target.base_url, api_key, items)
            rows += run_rows(target, loads, args, api_key, n_ids, seed, None)
        facts.append(fact)
    return rows, facts


def run_serve_app(
    args: argparse.Namespace,
    loads: list[Load],
    workdir: Path,
    config: dict[str, Any],
    api_key: str,
    n_ids: int,
    items: list[dict[str, Any]],
    seed: list[int],
) -> tuple[list[Result], list[ServerFacts], dict[str, dict[str, list[Path]]]]:
    rows: list[Result] = []
    profiles: dict[str, dict[str, list[Path]]] = {}
    url = f"http://127.0.0.1:{config['http_options']['port']}"
    set_fetcher_cache(config, True)
    started = time.perf_counter()
    with local_ray(serve_environment(workdir, api_key), namespace="bench_peers"):
        ray_s = time.perf_counter() - started
        deploy_config(config, timeout_s=300)
        wait_200(url + READY_PATH, 120)
        fact = ServerFacts("serve_app", time.perf_counter() - started)
        fact.startup_note = f"Ray {ray_s:.1f} s + deploy {fact.startup_s - ray_s:.1f} s"
        print(f"serve_app up on {url} in {fact.startup_s:.1f}s ({fact.startup_note})", flush=True)
        fact.idle = settle_and_measure(serve_pids)
        fact.scores = check_scores(url, api_key, items)
        headers = {"Authorization": f"Bearer {api_key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            target = serve_target("serve_app", url)
            rows += run_rows(target, loads, args, api_key, n_ids, seed, client)
            if args.profile_seconds > 0:
                for load in loads:
                    if load.connections == args.batch_connections:
                        print(f"profiling {load.name}", flush=True)
                        profiles[load.name] = profile(target, load, args, api_key, n_ids, workdir)
            set_fetcher_cache(config, False)
            deploy_config(config, timeout_s=300)
            wait_200(url + READY_PATH, 120)
            target = serve_target("serve_app, feature cache off", url)
            rows += run_rows(target, loads, args, api_key, n_ids, seed, client)
        fact.after = settle_and_measure(serve_pids)
    return rows, [fact], profiles


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loads = make_loads(args)
    notes = noise_notes()
    api_key = new_api_key()
    seed = [secrets.randbelow(1_000_000)]
    rows: list[Result] = []
    facts: list[ServerFacts] = []
    profiles: dict[str, dict[str, list[Path]]] = {}
    with tempfile.TemporaryDirectory(prefix="bq_", dir="/tmp") as tmp:  # short: socket paths
        workdir = Path(tmp)
        config = serve_config(workdir, args.config.resolve())
        n_ids = build_example_artifacts(config).artifacts.n_entities
        items = check_items(n_ids)
        peer_rows, peer_facts = run_peers(args, loads, workdir, api_key, n_ids, items, seed)
        rows += peer_rows
        facts += peer_facts
        if "serve_app" not in args.skip:
            serve_rows, serve_facts, profiles = run_serve_app(
                args, loads, workdir, config, api_key, n_ids, items, seed
            )
            rows = serve_rows + rows
            facts = serve_facts + facts
        write_report(report(loads, rows, facts, profiles, args, notes), args.out)
        if profiles:
            keep = args.profile_dir
            keep.mkdir(parents=True, exist_ok=True)
            for files in profiles.values():
                for paths in files.values():
                    for path in paths:
                        if path.exists():
                            (keep / path.name).write_text(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
