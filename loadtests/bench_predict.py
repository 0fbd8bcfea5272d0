"""serve_app against a plain FastAPI + uvicorn baseline, measured in one run with wrk.

    python loadtests/bench_predict.py [--duration 20] [--connections 32]

What it does, all on loopback and in a temp dir:

1. builds the example feature store and model (``serve_app.build.build_artifacts``);
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
outlives ``ray.shutdown()`` is reported and killed by PID.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.launch import deploy_config, free_port, local_config, wait_ready  # noqa: E402

LOADTESTS = ROOT / "loadtests"
LUA_SCRIPT = LOADTESTS / "wrk_post.lua"
CONFIG_YAML = ROOT / "configs" / "config.yaml"
RESULTS = LOADTESTS / "results" / "bench_predict.md"
APP_NAME = "serve_app"
DEPLOYMENTS = ("Ingress", "Model", "FeatureFetcher")
COUNTERS = ("batches", "requests", "items", "unique_items")


# ---- what is measured ------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    batch: int  # 0: a /v1/predict body; k: a /v1/predict/batch body of k items

    @property
    def items_per_request(self) -> int:
        return max(1, self.batch)


@dataclass(frozen=True)
class Target:
    label: str
    base_url: str
    n_ids: int
    mode: str  # "uniform" or "hot", see wrk_post.lua
    serve: bool


@dataclass
class Result:
    case: Case
    target: Target
    wrk: dict[str, Any]
    model: dict[str, float] = field(default_factory=dict)
    fetcher: dict[str, float] | None = None
    replicas: str = ""
    cpu: dict[str, float] = field(default_factory=dict)  # cores busy per process group

    @property
    def seconds(self) -> float:
        return self.wrk["duration_us"] / 1e6

    @property
    def req_s(self) -> float:
        return self.wrk["requests"] / self.seconds

    @property
    def items_s(self) -> float:
        return self.wrk["scored"] / self.seconds

    @property
    def non_2xx(self) -> int:
        return sum(n for code, n in self.wrk["codes"].items() if not 200 <= int(code) < 300)

    @property
    def socket_errors(self) -> int:
        errors = self.wrk["errors"]
        return errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]


def wrk_json(
    url: str, script: Path, script_args: list[str], seconds: float, args: argparse.Namespace
) -> dict[str, Any]:
    """One wrk run; returns the ``BENCH_JSON`` line printed by the Lua script's done()."""
    command = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        f"{args.wrk_timeout}s",
        "-s",
        str(script),
        url,
        *(["--", *script_args] if script_args else []),
    ]
    timeout = seconds + args.wrk_timeout + 60
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            return result
    raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")


def run_wrk(
    case: Case, target: Target, args: argparse.Namespace, seed: int, seconds: float, token: str
) -> dict[str, Any]:
    """One wrk run of ``case`` against ``target`` with wrk_post.lua."""
    script_args = [str(target.n_ids), str(case.batch), target.mode, str(seed), token or "-"]
    return wrk_json(target.base_url + case.path, LUA_SCRIPT, script_args, seconds, args)


# ---- the baseline ----------------------------------------------------------------------


@contextlib.contextmanager
def baseline_server(model_dir: Path, sqlite: Path, workdir: Path) -> Iterator[str]:
    port = free_port()
    log = (workdir / "baseline.log").open("w")
    command = [
        sys.executable,
        str(LOADTESTS / "baseline_app.py"),
        "--model-dir",
        str(model_dir),
        "--sqlite",
        str(sqlite),
        "--port",
        str(port),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SERVE_APP_"))}
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"baseline exited: {(workdir / 'baseline.log').read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                health = httpx.get(f"{base_url}/healthz", timeout=2)
                if health.status_code == 200:
                    print(f"baseline up on {base_url}: {health.json()}", flush=True)
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("baseline did not start within 60 s")
            time.sleep(0.3)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


# ---- serve_app on a local Ray ----------------------------------------------------------


def serve_environment(workdir: Path, api_key: str) -> dict[str, str]:
    """Set before ray.init(): Ray's processes inherit it."""
    haproxy = workdir / "h"  # Serve adds a 56-char node id; HAProxy's socket path max is 97
    haproxy.mkdir()
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        "SERVE_APP_API_KEYS": api_key,
        "SERVE_APP_WEBHOOK_SECRET": "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
        # Keep clear of another local Serve (e.g. the integration tests) on this machine.
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
    }


def serve_config(model_dir: Path, sqlite: Path, port: int) -> dict[str, Any]:
    """configs/config.yaml with its files in the temp dir and HTTP on a free port."""
    assert model_dir.parent == sqlite.parent, "model and store share the temp dir"
    return local_config(CONFIG_YAML, model_dir.parent, port)


def replica_counts() -> str:
    """RUNNING replicas of Ingress/Model/FeatureFetcher, e.g. ``1/2/1``."""
    from ray import serve

    deployments = serve.status().applications[APP_NAME].deployments
    return "/".join(
        str(sum(n for state, n in deployments[name].replica_states.items() if state == "RUNNING"))
        for name in DEPLOYMENTS
    )


def stats_snapshot(client: httpx.Client, max_polls: int = 60) -> dict[str, Any]:
    """Model counters per replica, polled until every running Model replica answered."""
    replicas = replica_counts()
    running = int(replicas.split("/")[1])
    models: dict[str, dict[str, Any]] = {}
    fetcher: dict[str, Any] = {}
    for _ in range(max_polls):
        response = client.get("/v1/stats")
        response.raise_for_status()
        body = response.json()
        models[body["model"]["replica"]] = body["model"]
        fetcher = body["fetcher"]
        if len(models) >= running:
            break
    return {"models": models, "fetcher": fetcher, "replicas": replicas}


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    delta = dict.fromkeys(COUNTERS, 0.0)
    for replica, counters in after["models"].items():
        earlier = before["models"].get(replica, {})
        for key in COUNTERS:
            delta[key] += counters[key] - earlier.get(key, 0)
    return delta


def fetcher_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float] | None:
    """Feature-cache counters; None when >1 fetcher replica (the poll saw only one)."""
    if before["replicas"].split("/")[2] != "1" or after["replicas"].split("/")[2] != "1":
        return None
    keys = ("cache_hits", "cache_misses", "store_failures")
    return {key: after["fetcher"][key] - before["fetcher"][key] for key in keys}


@contextlib.contextmanager
def local_ray(env: dict[str, str]) -> Iterator[None]:
    """A fresh local Ray; afterwards, any process it left behind is killed by PID."""
    import ray
    from ray import serve

    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    started: dict[int, tuple[str, str]] = {}
    try:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            namespace="bench_predict",
            log_to_driver=False,
        )
        try:
            yield
        finally:
            started = descendants()
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reap_leftovers(started)


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(name, parent pid, start time) of a process, or None if it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, rest = raw[raw.index("(") + 1 : raw.rindex(")")], raw[raw.rindex(")") + 2 :].split()
    return None if rest[0] == "Z" else (name, int(rest[1]), rest[19])


def descendants() -> dict[int, tuple[str, str]]:
    """pid -> (name, start time) of every process below this one: what we started."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[str, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
            info[int(entry.name)] = (stat[0], stat[2])
    found: dict[int, tuple[str, str]] = {}
    todo = list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        if pid in info:
            found[pid] = info[pid]
            todo.extend(children.get(pid, []))
    return found


CPU_GROUPS = (*DEPLOYMENTS, "other replicas", "HAProxy", "Ray other", "baseline", "wrk")


def cpu_group(pid: int, name: str) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        cmdline = ""
    if f"ServeReplica:{APP_NAME}:" in cmdline:
        deployment = cmdline.split(f"ServeReplica:{APP_NAME}:")[1].split()[0].strip("\0")
        return deployment if deployment in DEPLOYMENTS else "other replicas"
    if name.startswith("haproxy"):
        return "HAProxy"
    return "baseline" if "baseline_app.py" in cmdline else "Ray other"


def cpu_ticks() -> dict[int, tuple[str, int]]:
    """pid -> (group, user+system clock ticks) of the processes we started."""
    ticks: dict[int, tuple[str, int]] = {}
    for pid, (name, _) in descendants().items():
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        ticks[pid] = (cpu_group(pid, name), int(fields[11]) + int(fields[12]))
    return ticks


@contextlib.contextmanager
def cpu_meter(into: dict[str, float]) -> Iterator[None]:
    """Fill ``into`` with the cores each process group kept busy (wrk: finished children)."""
    before, children = cpu_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN)
    machine_before, started = machine_busy_ticks(), time.perf_counter()
    yield
    after, done = cpu_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN)
    machine_after, wall = machine_busy_ticks(), time.perf_counter() - started
    hz = os.sysconf("SC_CLK_TCK")
    into.update(dict.fromkeys(CPU_GROUPS, 0.0))
    for pid, (group, ticks) in after.items():
        into[group] += (ticks - before.get(pid, (group, 0))[1]) / hz / wall
    into["wrk"] = (done.ru_utime + done.ru_stime - children.ru_utime - children.ru_stime) / wall
    into["machine"] = (machine_after - machine_before) / hz / wall


def machine_busy_ticks() -> int:
    """Busy clock ticks of the whole machine (all CPUs, everyone's processes)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields[:8]) - fields[3] - fields[4]  # minus idle and iowait


def alive(started: dict[int, tuple[str, str]]) -> dict[int, str]:
    """Those of ``started`` still running (same pid AND same start time: no pid reuse)."""
    left: dict[int, str] = {}
    for pid, (name, start) in started.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == start:
            left[pid] = name
    return left


def reap_leftovers(started: dict[int, tuple[str, str]], grace_s: float = 15) -> None:
    deadline = time.monotonic() + grace_s
    left = alive(started)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = alive(started)
    for pid, name in left.items():
        print(f"WARNING: {name} (pid {pid}) outlived ray.shutdown(); killing it", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    raylets = subprocess.run(["pgrep", "-x", "raylet"], capture_output=True, text=True).stdout
    ours = [pid for pid in map(int, raylets.split()) if pid in alive(started)]
    print(
        f"after shutdown: {len(started)} processes we started, {len(left)} outlived it; "
        f"our raylets still running: {ours or 'none'}",
        flush=True,
    )


# ---- the report ------------------------------------------------------------------------


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def batch_cell(result: Result) -> str:
    if not result.target.serve:
        return "-"
    batches = result.model.get("batches", 0)
    if not batches:
        return "0 batches"
    return (
        f"{result.model['unique_items'] / batches:.1f} "
        f"({result.model['requests'] / batches:.1f} calls, {int(batches)} batches)"
    )


def cache_cell(result: Result) -> str:
    scored = max(1, result.wrk["scored"])
    prediction = f"{100 * result.wrk['cached'] / scored:.0f}%"
    if result.fetcher is None:
        return f"{prediction} / n/a" if result.target.serve else "-"
    looked_up = result.fetcher["cache_hits"] + result.fetcher["cache_misses"]
    feature = f"{100 * result.fetcher['cache_hits'] / looked_up:.0f}%" if looked_up else "-"
    return f"{prediction} / {feature}"


def table(results: list[Result]) -> str:
    header = (
        "| case | target | req/s | items/s | p50 ms | p99 ms | non-2xx | sock err / timeout "
        "| failed / degraded items | cache hits: prediction / feature | Model items per batch "
        "(calls per batch) | replicas I/M/F | items/s vs baseline |"
    )
    lines = [header, "|" + "---|" * 13]
    baseline: dict[str, float] = {}
    for result in results:
        if not result.target.serve:
            baseline[result.case.name] = result.items_s
        base = baseline.get(result.case.name)
        latency = result.wrk["latency_us"]
        errors = result.wrk["errors"]
        ratio = f"{result.items_s / base:.2f}x" if result.target.serve and base else "1.00x"
        lines.append(
            "| "
            + " | ".join(
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
            + " |"
        )
    return "\n".join(lines)


def cpu_table(results: list[Result]) -> str:
    lines = [
        "| case | target | " + " | ".join(CPU_GROUPS) + " | all ours | whole machine |",
        "|" + "---|" * (len(CPU_GROUPS) + 4),
    ]
    for result in results:
        cells = [f"{result.cpu.get(group, 0.0):.2f}" for group in CPU_GROUPS]
        ours = f"{sum(result.cpu.get(group, 0.0) for group in CPU_GROUPS):.2f}"
        machine = f"{result.cpu.get('machine', 0.0):.2f}"
        lines.append(
            f"| {result.case.name} | {result.target.label} | {' | '.join(cells)} "
            f"| {ours} | {machine} |"
        )
    return "\n".join(lines)


def report(results: list[Result], args: argparse.Namespace, notes: list[str]) -> str:
    head = [
        f"## bench_predict: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"`{' '.join(['python', *sys.argv])}`: wrk -t{args.threads} -c{args.connections}, "
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
        *[
            f"- non-2xx in {r.case.name} / {r.target.label}: {r.wrk['codes']}; first: "
            f"`{r.wrk['sample'][:200]}`"
            for r in results
            if r.non_2xx
        ],
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20, help="seconds per row")
    parser.add_argument("--warmup", type=float, default=3, help="seconds before each row")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hot-ids", type=int, default=1_000)
    parser.add_argument("--wrk-timeout", type=int, default=10, help="seconds, as the app's")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def make_cases(batch_size: int) -> list[Case]:
    """The two request shapes every benchmark drives: one entity, and a batch."""
    return [
        Case("predict (1 entity)", "/v1/predict", 0),
        Case(f"predict/batch ({batch_size} entities)", "/v1/predict/batch", batch_size),
    ]


def noise_notes() -> list[str]:
    """What else loads the machine at the start: the load average and other raylets."""
    notes = [", ".join(f"{x:.2f}" for x in os.getloadavg())]
    others = subprocess.run(["pgrep", "-x", "raylet"], capture_output=True, text=True).stdout
    if others.split():
        notes.append(f"other raylets were running at start (pids {others.split()}): noisy run")
    return notes


def main(argv: list[str] | None = None) -> int:
    from serve_app.build import build_artifacts
    from serve_app.config import AppConfig

    args = parse_args(argv)
    cases = make_cases(args.batch_size)
    notes = noise_notes()
    api_key = "bench-" + secrets.token_urlsafe(24)
    seed = secrets.randbelow(1_000_000)
    results: list[Result] = []

    with tempfile.TemporaryDirectory(prefix="bp_", dir="/tmp") as tmp:  # short: socket paths
        workdir = Path(tmp)
        config = serve_config(workdir / "model", workdir / "features.db", free_port())
        app_args = AppConfig.model_validate(config["applications"][0]["args"])
        n_ids = app_args.artifacts.n_entities
        started = time.perf_counter()
        build_artifacts(app_args)
        print(f"artifacts built in {time.perf_counter() - started:.1f}s in {workdir}", flush=True)

        with (
            local_ray(serve_environment(workdir, api_key)),
            baseline_server(workdir / "model", workdir / "features.db", workdir) as baseline_url,
        ):
            deploy_config(config, timeout_s=240)
            serve_url = f"http://127.0.0.1:{config['http_options']['port']}"
            wait_ready(serve_url)
            print(f"serve_app up on {serve_url}", flush=True)
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
                        with cpu_meter(cpu):
                            measured = run_wrk(case, target, args, seed, args.duration, token)
                        result = Result(case, target, measured, cpu=cpu)
                        if before is not None:
                            after = stats_snapshot(client)
                            result.model = stats_delta(before, after)
                            result.fetcher = fetcher_delta(before, after)
                            result.replicas = after["replicas"]
                        results.append(result)
                        print(
                            f"{case.name:28} {target.label:30} {result.req_s:8.1f} req/s "
                            f"{result.items_s:9.1f} items/s  non-2xx {result.non_2xx}"
                            + (f"  sample: {measured['sample']}" if measured["sample"] else ""),
                            flush=True,
                        )

    text = report(results, args, notes)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
