"""What every benchmark here needs besides what it measures.

* processes: a helper server started, awaited and stopped (:func:`server`); a local Ray
  with the benchmark's environment, after which anything it left running is killed by
  PID (:func:`local_ray`); serve_app deployed from a Serve YAML (:func:`serve_app_up`);
* CPU accounting: the cores each group of the processes we started kept busy, plus wrk
  and the whole machine (:func:`cpu_meter`);
* wrk: one run, its ``BENCH_JSON`` line parsed (:func:`wrk_json`, :func:`wrk_post`);
* serve_app's own counters from ``/v1/stats`` (:func:`stats_snapshot` and the deltas);
* result rows (:class:`Row`), markdown cells and tables, noise notes, report writing.

The benchmarks import it as ``from loadtests.harness import ...``; run as scripts from
the repository root (``python loadtests/bench_x.py``) they put the root on ``sys.path``
first.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtests.launch import (
    THROUGHPUT_ENV,
    deploy_config,
    free_port,
    local_config,
    replica_counts,
    wait_ready,
)
from loadtests.launch import set_nested as set_nested  # re-exported for the benchmarks
from serve_app.config import read_env_file

ROOT = Path(__file__).resolve().parents[1]
LOADTESTS = ROOT / "loadtests"
RESULTS = LOADTESTS / "results"
CONFIG_YAML = ROOT / "configs" / "config.yaml"
LUA_POST = LOADTESTS / "wrk_post.lua"
APP_NAME = "serve_app"
DEPLOYMENTS = ("Ingress", "Model", "FeatureFetcher")  # the request path, as in "1/2/1"
MODEL_COUNTERS = ("batches", "requests", "items", "unique_items")
FETCHER_COUNTERS = ("cache_hits", "cache_misses", "store_failures")


# ---- what is driven --------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    batch: int  # 0: a /v1/predict body; k: a /v1/predict/batch body of k items

    @property
    def items_per_request(self) -> int:
        return max(1, self.batch)


def make_cases(batch_size: int) -> list[Case]:
    """The two request shapes every benchmark drives: one entity, and a batch."""
    return [
        Case("predict (1 entity)", "/v1/predict", 0),
        Case(f"predict/batch ({batch_size} entities)", "/v1/predict/batch", batch_size),
    ]


@dataclass
class Row:
    """One measured wrk run; a benchmark subclasses it with what else it records."""

    case: Case
    target: Any
    wrk: dict[str, Any]
    cpu: dict[str, float] = field(default_factory=dict)  # cores busy per process group

    @property
    def seconds(self) -> float:
        return float(self.wrk["duration_us"]) / 1e6

    @property
    def req_s(self) -> float:
        return float(self.wrk["requests"]) / self.seconds

    @property
    def items_s(self) -> float:
        return float(self.wrk["scored"]) / self.seconds

    @property
    def non_2xx(self) -> int:
        return sum(n for code, n in self.wrk["codes"].items() if not 200 <= int(code) < 300)

    @property
    def socket_errors(self) -> int:
        errors = self.wrk["errors"]
        return int(errors["connect"] + errors["read"] + errors["write"] + errors["timeout"])


# ---- wrk -------------------------------------------------------------------------------


def wrk_json(
    url: str, script: Path, script_args: list[str], seconds: float, args: argparse.Namespace
) -> dict[str, Any]:
    """One wrk run (``args``: threads, connections, wrk_timeout); returns the
    ``BENCH_JSON`` line printed by the Lua script's done()."""
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


def wrk_post(
    base_url: str,
    case: Case,
    n_ids: int,
    mode: str,
    seed: int,
    token: str,
    seconds: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """wrk_post.lua: ``case``'s bodies, ids ``mode`` ("uniform" or "hot") of ``n_ids``."""
    script_args = [str(n_ids), str(case.batch), mode, str(seed), token or "-"]
    return wrk_json(base_url + case.path, LUA_POST, script_args, seconds, args)


def add_load_arguments(
    parser: argparse.ArgumentParser, duration: float, wrk_timeout: int, timeout_help: str
) -> None:
    """The load flags every wrk benchmark here has; each keeps its own defaults."""
    parser.add_argument("--duration", type=float, default=duration, help="seconds per row")
    parser.add_argument("--warmup", type=float, default=3, help="seconds before each row")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--wrk-timeout", type=int, default=wrk_timeout, help=timeout_help)


# ---- processes -------------------------------------------------------------------------


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


def alive(started: dict[int, tuple[str, str]]) -> dict[int, str]:
    """Those of ``started`` still running (same pid AND same start time: no pid reuse)."""
    left: dict[int, str] = {}
    for pid, (name, start) in started.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == start:
            left[pid] = name
    return left


def reap_leftovers(started: dict[int, tuple[str, str]], grace_s: float = 15) -> None:
    """Kill, by PID, what of ``started`` outlives ``grace_s``; say what was left."""
    deadline = time.monotonic() + grace_s
    left = alive(started)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = alive(started)
    for pid, name in left.items():
        print(f"WARNING: {name} (pid {pid}) outlived ray.shutdown(); killing it", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    ours = sorted(pid for pid, name in alive(started).items() if name == "raylet")
    print(
        f"after shutdown: {len(started)} processes we started, {len(left)} outlived it; "
        f"our raylets still running: {ours or 'none'}",
        flush=True,
    )


@contextlib.contextmanager
def server(name: str, argv: list[str], ready_path: str, workdir: Path) -> Iterator[tuple[str, int]]:
    """``python argv --port P`` on a free loopback port, up once ``ready_path`` answers
    200; yields (base URL, pid) and stops it afterwards. Its log: ``workdir/name.log``."""
    port = free_port()
    log_path = workdir / f"{name}.log"
    command = [sys.executable, *argv, "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SERVE_APP_"))}
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited: {log_path.read_text()}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base_url + ready_path, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not start within 60 s")
                time.sleep(0.3)
            print(f"{name} up on {base_url} (pid {proc.pid})", flush=True)
            yield base_url, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# ---- serve_app on a local Ray ----------------------------------------------------------


def new_api_key(prefix: str = "bench") -> str:
    return f"{prefix}-{secrets.token_urlsafe(24)}"


def serve_environment(workdir: Path, api_key: str) -> dict[str, str]:
    """Set before ray.init(): Ray's processes inherit it. ``configs/serve.env`` as the
    README's run command gives it (throughput-optimised HAProxy mode and its settings),
    shorter ingress draining, the app's key and webhook secret, and HAProxy's files and
    ports moved into ``workdir`` (keep it short: ``/tmp/xx_...``)."""
    haproxy = workdir / "h"  # Serve adds a 56-char node id; HAProxy's socket path max is 97
    haproxy.mkdir(exist_ok=True)
    return {
        **THROUGHPUT_ENV,
        **read_env_file(ROOT / "configs" / "serve.env"),
        # Ingress replicas otherwise drain for 30 s on shutdown.
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


@contextlib.contextmanager
def local_ray(env: dict[str, str], namespace: str | None = None) -> Iterator[None]:
    """A fresh local Ray (2 CPUs, no dashboard) with ``env`` in the environment; Serve and
    Ray shut down afterwards, and any process it left behind is killed by PID."""
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
            namespace=namespace,
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


def serve_config(workdir: Path, config_path: Path = CONFIG_YAML) -> dict[str, Any]:
    """``config_path`` with its files in ``workdir`` and HTTP on a free port."""
    return local_config(config_path, workdir, free_port())


def build_example_artifacts(config: dict[str, Any]) -> Any:
    """Build the example store and model the config's app will load; its AppConfig."""
    from serve_app.config import AppConfig
    from serve_app.offline.artifacts import build_artifacts

    app_config = AppConfig.model_validate(config["applications"][0].get("args") or {})
    started = time.perf_counter()
    build_artifacts(app_config)
    print(f"artifacts built in {time.perf_counter() - started:.1f}s", flush=True)
    return app_config


def serve_app_up(config: dict[str, Any], timeout_s: float = 240, ready_s: float = 90) -> str:
    """Deploy ``config`` on the Ray this process is on; its base URL once /readyz is 200."""
    deploy_config(config, timeout_s=timeout_s)
    url = f"http://127.0.0.1:{config['http_options']['port']}"
    wait_ready(url, timeout_s=ready_s)
    print(f"serve_app up on {url}", flush=True)
    return url


def replicas_imf() -> str:
    """RUNNING replicas of Ingress/Model/FeatureFetcher, e.g. ``1/2/1``."""
    counts = replica_counts(APP_NAME)
    return "/".join(str(counts.get(name, 0)) for name in DEPLOYMENTS)


def stats_snapshot(client: httpx.Client, max_polls: int = 60) -> dict[str, Any]:
    """Model counters per replica, polled until every running Model replica answered."""
    replicas = replicas_imf()
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
    """Model counters summed over replicas: what happened between the two snapshots."""
    delta = dict.fromkeys(MODEL_COUNTERS, 0.0)
    for replica, counters in after["models"].items():
        earlier = before["models"].get(replica, {})
        for key in MODEL_COUNTERS:
            delta[key] += counters[key] - earlier.get(key, 0)
    return delta


def fetcher_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float] | None:
    """Feature-cache counters; None when >1 fetcher replica (the poll saw only one)."""
    if before["replicas"].split("/")[2] != "1" or after["replicas"].split("/")[2] != "1":
        return None
    return {key: after["fetcher"][key] - before["fetcher"][key] for key in FETCHER_COUNTERS}


def items_per_batch(model: dict[str, float], detail: str) -> str:
    """``unique/batch (calls/batch calls, detail)``, or ``0 batches``."""
    batches = model.get("batches", 0)
    if not batches:
        return "0 batches"
    return (
        f"{model['unique_items'] / batches:.1f} ({model['requests'] / batches:.1f} calls, {detail})"
    )


# ---- CPU accounting --------------------------------------------------------------------


def process_ticks(pid: int) -> int:
    """User + system clock ticks of one process (0 if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def machine_busy_ticks() -> int:
    """Busy clock ticks of the whole machine (all CPUs, everyone's processes)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields[:8]) - fields[3] - fields[4]  # minus idle and iowait


GroupOf = Callable[[int, str], str]  # (pid, process name) -> group

SERVE_CPU_GROUPS = (*DEPLOYMENTS, "other replicas", "HAProxy", "Ray other")


def serve_cpu_group(pid: int, name: str) -> str:
    """The SERVE_CPU_GROUPS column of one of our Ray processes: its deployment's replica,
    another replica, HAProxy, or the rest of Ray (controller, raylet, GCS, proxies)."""
    command = cmdline(pid)
    if f"ServeReplica:{APP_NAME}:" in command:
        deployment = command.split(f"ServeReplica:{APP_NAME}:")[1].split()[0].strip("\0")
        return deployment if deployment in DEPLOYMENTS else "other replicas"
    return "HAProxy" if name.startswith("haproxy") else "Ray other"


def _ticks_by_pid(group_of: GroupOf) -> dict[int, tuple[str, int]]:
    return {
        pid: (group_of(pid, name), process_ticks(pid)) for pid, (name, _) in descendants().items()
    }


@contextlib.contextmanager
def cpu_meter(into: dict[str, float], group_of: GroupOf, groups: Sequence[str]) -> Iterator[None]:
    """Fill ``into`` with the cores each group of our processes kept busy (every group
    in ``groups`` present, 0 if idle), "wrk" (finished children) and "machine"."""
    before, children = _ticks_by_pid(group_of), resource.getrusage(resource.RUSAGE_CHILDREN)
    machine_before, started = machine_busy_ticks(), time.perf_counter()
    yield
    after, done = _ticks_by_pid(group_of), resource.getrusage(resource.RUSAGE_CHILDREN)
    machine_after, wall = machine_busy_ticks(), time.perf_counter() - started
    hz = os.sysconf("SC_CLK_TCK")
    into.update(dict.fromkeys(groups, 0.0))
    for pid, (group, ticks) in after.items():
        spent = max(0, ticks - before.get(pid, (group, 0))[1])
        into[group] = into.get(group, 0.0) + spent / hz / wall
    into["wrk"] = (done.ru_utime + done.ru_stime - children.ru_utime - children.ru_stime) / wall
    into["machine"] = (machine_after - machine_before) / hz / wall


# ---- the report ------------------------------------------------------------------------


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def md_header(columns: Sequence[str]) -> list[str]:
    return [md_row(columns), "|" + "---|" * len(columns)]


def noise_notes() -> list[str]:
    """What else loads the machine at the start: the load average and other raylets."""
    notes = [", ".join(f"{x:.2f}" for x in os.getloadavg())]
    others = subprocess.run(["pgrep", "-x", "raylet"], capture_output=True, text=True).stdout
    if others.split():
        notes.append(f"other raylets were running at start (pids {others.split()}): noisy run")
    return notes


def non_2xx_notes(rows: Sequence[Row]) -> list[str]:
    """A legend line per row that got non-2xx answers: the codes and the first body."""
    return [
        f"- non-2xx in {r.case.name} / {r.target.label}: {r.wrk['codes']}; first: "
        f"`{r.wrk['sample'][:200]}`"
        for r in rows
        if r.non_2xx
    ]


def progress_line(row: Row, extra: str = "") -> str:
    """The line printed after each measured row."""
    sample = row.wrk.get("sample")
    return (
        f"{row.case.name:28} {row.target.label:30} {row.req_s:8.1f} req/s "
        f"{row.items_s:9.1f} items/s  non-2xx {row.non_2xx}{extra}"
        + (f"  sample: {sample}" if sample else "")
    )


def command_line() -> str:
    return " ".join(["python", *sys.argv])


def write_report(text: str, path: Path) -> None:
    print("\n" + text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"written to {path}")
