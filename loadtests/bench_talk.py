"""serve_app against the talk's "normal" and "fast" FastAPI services, one run, same load.

    python loadtests/bench_talk.py [--duration 15] [--latency-ms 5] [--connections 32]

What it measures (issue #4 item 7), all on loopback and in a temp dir:

1. builds the example store and model (``serve_app.offline.artifacts.build_artifacts``) and starts
   ``loadtests/feature_api.py`` over that store, with ``--latency-ms`` injected per call:
   the remote feature API that all three services fetch from;
2. starts ``loadtests/talk_baselines.py`` twice: ``normal`` (blocking fetch per item, on
   the event loop) and ``fast`` (thread pool of 5, ``lru_cache``, dedupe, one predict per
   batch request), each one uvicorn process with one sklearn thread;
3. starts a local Ray (2 CPUs, throughput-optimised + HAProxy mode) and deploys
   ``configs/config.yaml`` with the feature API as its store (``args.store.url``);
4. drives all three with the same wrk load (``loadtests/wrk_post.lua``, same seeds, same
   concurrency, ``--timeout 30s``): ``/v1/predict`` with 1 entity and
   ``/v1/predict/batch`` with 32, ids uniform over all 100,000 entities with a random
   context per item, so serve_app's prediction cache cannot hit. After each wrk run it
   waits until the target answers a probe quickly (the "normal" service keeps working
   off its backlog after wrk has gone);
5. adds two ceilings: the model's own in-process throughput (``predict_proba`` on a
   512-row frame, one thread) and serve_app's no-op route (GET ``/healthz`` through
   HAProxy) under the same wrk concurrency;
6. prints a markdown table (req/s, items/s, p50, p99, non-2xx, timeouts, serve_app's
   ratios to both baselines, cores busy) and writes it to
   ``loadtests/results/bench_talk.md``, with a bar chart in ``bench_talk.png``.

Everything it starts is stopped in ``finally`` blocks; a Ray process it started and that
outlives ``ray.shutdown()`` is reported and killed by PID (``harness.local_ray``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
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
    RESULTS,
    Case,
    Row,
    add_load_arguments,
    build_example_artifacts,
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
    process_ticks,
    progress_line,
    serve_app_up,
    serve_config,
    serve_environment,
    server,
    set_nested,
    stats_delta,
    stats_snapshot,
    write_report,
    wrk_json,
    wrk_post,
)

CONTEXT_CHANNELS = ("web", "app", "store")

# wrk script for GET /healthz: no response() callback (wrk then skips body parsing);
# done() prints the same JSON line as wrk_post.lua, minus the per-item counters.
LUA_GET = """
wrk.method = "GET"
function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"mean":%.1f,"max":%d}}\\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.mean, latency.max))
end
"""


# ---- what is measured ------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    key: str  # "normal", "fast" or "serve_app"
    label: str
    base_url: str
    pid: int | None  # the baseline's uvicorn process; None for serve_app (Ray)


@dataclass
class TalkRow(Row):
    cache: str = "-"  # prediction / feature cache hits
    batch: str = "-"  # items per predict_proba in serve_app's Model


@dataclass(frozen=True)
class Ceilings:
    model_items_s: float  # predict_proba only
    model_ms: float  # per predict_proba call
    frame_items_s: float  # build_frame + predict_proba
    batch: int
    healthz: dict[str, Any]  # wrk JSON of GET /healthz


def post_load(
    case: Case, target: Target, args: argparse.Namespace, seed: int, seconds: float, token: str
) -> dict[str, Any]:
    return wrk_post(target.base_url, case, args.n_ids, "uniform", seed, token, seconds, args)


def settle(target: Target, token: str, timeout_s: float = 120) -> float:
    """Wait until the target has worked off what wrk left in flight; returns seconds waited.

    A baseline keeps processing requests whose client has gone (the "normal" one does not
    even notice, its event loop is blocked; the "fast" one's threads run on). Measuring
    the next row meanwhile would steal CPU from it. Settled = a 1-item probe answers in
    < 0.25 s and, for a baseline, its process used < 0.1 core over half a second; twice
    in a row.
    """
    body = {"entity_id": "E0000001", "context": {"amount": 10.0, "hour": 12, "channel": "web"}}
    headers = {"Authorization": f"Bearer {token}"}
    hz = os.sysconf("SC_CLK_TCK")
    started = time.monotonic()
    quiet_in_a_row = 0
    while time.monotonic() - started < timeout_s:
        sent = time.monotonic()
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{target.base_url}/v1/predict", json=body, headers=headers, timeout=60)
        quiet = time.monotonic() - sent < 0.25
        if target.pid is not None:
            ticks = process_ticks(target.pid)
            time.sleep(0.5)
            quiet = quiet and (process_ticks(target.pid) - ticks) / hz / 0.5 < 0.1
        else:
            time.sleep(0.2)
        quiet_in_a_row = quiet_in_a_row + 1 if quiet else 0
        if quiet_in_a_row >= 2:
            return time.monotonic() - started
    print(f"WARNING: {target.label} still busy {timeout_s:.0f}s after wrk ended", flush=True)
    return time.monotonic() - started


def expected_lru_hits(n_ids: int, before: int, drawn: int) -> float:
    """Expected share of feature-cache hits among ``drawn`` uniform draws after ``before``.

    Draw j (j draws before it) hits an unbounded cache with probability 1 - q**j, q = 1 -
    1/n; summed over j in [before, before + drawn) that is 1 - n q**before (1 - q**drawn) /
    drawn. The "fast" baseline's ``lru_cache(maxsize=100_000)`` never evicts here.
    """
    if drawn <= 0:
        return 0.0
    q = 1 - 1 / n_ids
    return 1 - n_ids * q**before * (1 - q**drawn) / drawn


def model_ceiling(
    model_dir: Path, sqlite: Path, n_ids: int, batch: int, seconds: float
) -> tuple[float, float, float]:
    """In-process model throughput at ``batch`` rows, one thread: (items/s of predict_proba,
    ms per call, items/s of build_frame + predict_proba)."""
    from threadpoolctl import threadpool_limits

    from serve_app.scoring.artifact import load_artifact
    from serve_app.scoring.features import build_frame
    from serve_app.stores.sqlite import SQLiteFeatureStore

    model = load_artifact(model_dir)
    rng = random.Random(0)
    ids = [f"E{rng.randrange(n_ids):07d}" for _ in range(batch)]
    contexts = [
        {
            "amount": rng.randrange(100, 100_000) / 100,
            "hour": rng.randrange(24),
            "channel": rng.choice(CONTEXT_CHANNELS),
        }
        for _ in ids
    ]
    found = asyncio.run(SQLiteFeatureStore(sqlite).get_many(ids))
    rows = [found.get(entity) for entity in ids]
    predict = model.pipeline.predict_proba

    def rate(step: Any) -> float:
        step()  # warm
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            step()
            calls += 1
        return calls / elapsed

    with threadpool_limits(1):
        frame = build_frame(rows, contexts)
        calls_s = rate(lambda: predict(frame))
        with_frame_s = rate(lambda: predict(build_frame(rows, contexts)))
    return calls_s * batch, 1000 / calls_s, with_frame_s * batch


# ---- the report ------------------------------------------------------------------------


def table(rows: list[TalkRow], ceilings: Ceilings) -> str:
    lines = md_header(
        [
            "case",
            "target",
            "req/s",
            "items/s",
            "p50 ms",
            "p99 ms",
            "non-2xx",
            "timeouts",
            "other sock err",
            "degraded / failed items",
            "cache hits: prediction / feature",
            "Model items per batch",
            "serve_app / normal",
            "serve_app / fast",
            "cores busy: target / feature API / wrk / machine",
        ]
    )
    by_key = {(row.case.name, row.target.key): row for row in rows}
    for row in rows:
        latency, errors = row.wrk["latency_us"], row.wrk["errors"]
        ratios = ["-", "-"]
        if row.target.key == "serve_app":
            for i, other in enumerate(("normal", "fast")):
                base = by_key.get((row.case.name, other))
                ratios[i] = f"{row.items_s / base.items_s:.1f}x" if base and base.items_s else "-"
        cpu = row.cpu
        lines.append(
            md_row(
                [
                    row.case.name,
                    row.target.label,
                    fmt(row.req_s),
                    fmt(row.items_s),
                    fmt(latency["p50"] / 1000, 1),
                    fmt(latency["p99"] / 1000, 1),
                    str(row.non_2xx),
                    str(errors["timeout"]),
                    str(errors["connect"] + errors["read"] + errors["write"]),
                    f"{row.wrk['degraded']} / {row.wrk['failed_items']}",
                    row.cache,
                    row.batch,
                    *ratios,
                    f"{cpu.get(row.target.key, cpu.get('Ray', 0)):.2f} / "
                    f"{cpu.get('feature API', 0):.2f} / {cpu.get('wrk', 0):.2f} / "
                    f"{cpu.get('machine', 0):.2f}",
                ]
            )
        )
    health = ceilings.healthz
    errors = health["errors"]
    health_s = health["requests"] / (health["duration_us"] / 1e6)
    dash = ["-"] * 6
    lines += [
        f"| CEILING: model in-process, batch {ceilings.batch} | predict_proba only, 1 thread "
        f"| {fmt(ceilings.model_items_s / ceilings.batch)} | {fmt(ceilings.model_items_s)} "
        f"| {ceilings.model_ms:.1f} | - | - | - | - | {' | '.join(dash)} |",
        f"| CEILING: model in-process, batch {ceilings.batch} | build_frame + predict_proba "
        f"| {fmt(ceilings.frame_items_s / ceilings.batch)} | {fmt(ceilings.frame_items_s)} "
        f"| - | - | - | - | - | {' | '.join(dash)} |",
        "| CEILING: no-op route | serve_app GET /healthz (HAProxy) "
        f"| {fmt(health_s)} | - | {fmt(health['latency_us']['p50'] / 1000, 1)} "
        f"| {fmt(health['latency_us']['p99'] / 1000, 1)} | {errors['status']} "
        f"| {errors['timeout']} | {errors['connect'] + errors['read'] + errors['write']} "
        f"| {' | '.join(dash)} |",
    ]
    return "\n".join(lines)


def report(
    rows: list[TalkRow], ceilings: Ceilings, args: argparse.Namespace, notes: list[str]
) -> str:
    head = [
        f"## bench_talk: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"`{command_line()}`",
        "",
        f"{os.cpu_count()} CPUs ({platform.machine()}); wrk -t{args.threads} "
        f"-c{args.connections} --timeout {args.wrk_timeout}s, {args.duration:g} s per row "
        f"after {args.warmup:g} s warm-up; feature API latency {args.latency_ms:g} ms per "
        f"call; load average before: {notes[0]}.",
        "",
    ]
    legend = [
        "",
        f"- Load: ids uniform over all {args.n_ids:,} entities, a random context per item "
        "(wrk_post.lua `uniform`), the same seeds for every target.",
        "- normal / fast: the talk's FastAPI services (loadtests/talk_baselines.py), one "
        "uvicorn process each, one sklearn thread; they fetch features one id per call "
        "(GET /features/{id}); serve_app fetches one bulk POST per Model batch.",
        "- cache hits: serve_app's prediction cache (from responses) / its FeatureFetcher "
        "TTL cache (from /v1/stats). The fast baseline's `lru_cache` is not observable: "
        "the figure is the expected share for the ids it had been sent so far (~).",
        "- Model items per batch: distinct items per predict_proba in serve_app's Model "
        "(calls = Ingress->Model calls per batch).",
        "- cores busy: CPU time / wall time during the row. target: the baseline process, "
        "or for serve_app all our Ray processes (replicas, proxies, HAProxy, GCS, raylet). "
        "machine: all processes on the machine, including other people's.",
        "- timeouts: wrk --timeout; requests still in flight when a row ends are not "
        "counted at all (nor in the latencies).",
        "- CEILING rows: the model row's p50 column is the time of one predict_proba call "
        f"on {ceilings.batch} rows (measured in this process before Ray started); the "
        "no-op row is wrk on GET /healthz through HAProxy, same -t/-c, no auth.",
        *[f"- {note}" for note in notes[1:]],
        *non_2xx_notes(rows),
    ]
    return "\n".join([*head, table(rows, ceilings), *legend]) + "\n"


def chart(rows: list[TalkRow], ceilings: Ceilings, path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(row.case.name for row in rows))
    targets = list(dict.fromkeys(row.target.label for row in rows))
    values = {(row.case.name, row.target.label): row.items_s for row in rows}
    width = 0.8 / len(targets)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for t, label in enumerate(targets):
        xs = [c + (t - (len(targets) - 1) / 2) * width for c in range(len(cases))]
        ys = [max(values.get((case, label), 0.0), 0.1) for case in cases]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, labels=[fmt(y) for y in ys], fontsize=8, padding=2)
    health = ceilings.healthz
    health_s = health["requests"] / (health["duration_us"] / 1e6)
    ax.axhline(
        ceilings.model_items_s,
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"ceiling: model in-process, batch {ceilings.batch} ({fmt(ceilings.model_items_s)})",
    )
    ax.axhline(
        health_s,
        color="grey",
        linestyle=":",
        linewidth=1.5,
        label=f"ceiling: serve_app GET /healthz, req/s ({fmt(health_s)})",
    )
    ax.set_yscale("log")
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel("items scored per second (log)")
    ax.set_title(
        f"serve_app vs the talk's services: wrk -c{args.connections}, feature API "
        f"+{args.latency_ms:g} ms/call, {os.cpu_count()} CPUs"
    )
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylim(top=max(ceilings.model_items_s, health_s, *values.values()) * 8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_load_arguments(parser, duration=15, wrk_timeout=30, timeout_help="seconds")
    parser.add_argument("--latency-ms", type=float, default=5, help="feature API delay/call")
    parser.add_argument("--ceiling-batch", type=int, default=512)
    parser.add_argument("--ceiling-seconds", type=float, default=3)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def cache_and_batch(row: TalkRow, before: dict[str, Any], after: dict[str, Any]) -> None:
    """serve_app's cells: cache hits from the answers and /v1/stats, Model batch sizes."""
    fetcher = fetcher_delta(before, after)
    prediction = 100 * row.wrk["cached"] / max(1, row.wrk["scored"])
    feature = "n/a (>1 replica)"
    if fetcher is not None:
        looked_up = fetcher["cache_hits"] + fetcher["cache_misses"]
        feature = f"{100 * fetcher['cache_hits'] / max(1, looked_up):.0f}%"
    row.cache = f"{prediction:.0f}% / {feature}"
    row.batch = items_per_batch(stats_delta(before, after), f"{after['replicas']} replicas I/M/F")


def measure(
    targets: list[Target],
    cases: list[Case],
    args: argparse.Namespace,
    api_key: str,
    pids: dict[str, int],
) -> list[TalkRow]:
    """Every case against every target, the same seeds for each target."""
    serve_url = next(t.base_url for t in targets if t.key == "serve_app")
    drawn = dict.fromkeys([t.key for t in targets], 0)  # items sent so far, per target
    named = {pid: group for group, pid in pids.items()}
    seed = secrets.randbelow(1_000_000)
    rows: list[TalkRow] = []
    with httpx.Client(
        base_url=serve_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    ) as client:
        for case in cases:
            seed += 2
            for target in targets:
                warm = post_load(case, target, args, seed, args.warmup, api_key)
                drawn[target.key] += warm["requests"] * case.items_per_request
                settle(target, api_key)
                before = stats_snapshot(client) if target.key == "serve_app" else None
                cpu: dict[str, float] = {}
                with cpu_meter(cpu, lambda pid, _: named.get(pid, "Ray"), [*pids, "Ray"]):
                    measured = post_load(case, target, args, seed + 1, args.duration, api_key)
                waited = settle(target, api_key)
                row = TalkRow(case, target, measured, cpu=cpu)
                sent = measured["requests"] * case.items_per_request
                if before is not None:
                    cache_and_batch(row, before, stats_snapshot(client))
                elif target.key == "fast":
                    hits = expected_lru_hits(args.n_ids, drawn["fast"], sent)
                    row.cache = f"- / ~{100 * hits:.0f}%"
                else:
                    row.cache = "- / none"
                drawn[target.key] += sent
                rows.append(row)
                extra = (
                    f" p99 {measured['latency_us']['p99'] / 1000:.1f} ms timeouts "
                    f"{measured['errors']['timeout']} (settled in {waited:.1f}s)"
                )
                print(progress_line(row, extra), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = make_cases(args.batch_size)
    notes = noise_notes()
    api_key = new_api_key()
    began = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bt_", dir="/tmp") as tmp:  # short: socket paths
        workdir = Path(tmp)
        model_dir, sqlite = workdir / "model", workdir / "features.db"
        config = serve_config(workdir)
        # the SQLite store (served by the feature API) and the model
        args.n_ids = build_example_artifacts(config).artifacts.n_entities

        model_items_s, model_ms, frame_items_s = model_ceiling(
            model_dir, sqlite, args.n_ids, args.ceiling_batch, args.ceiling_seconds
        )
        print(f"model ceiling: {model_items_s:,.0f} items/s at batch {args.ceiling_batch}")

        feature_argv = ["-m", "loadtests.feature_api", "--db", str(sqlite)]
        feature_argv += ["--latency-ms", str(args.latency_ms)]

        def talk_argv(mode: str, feature_url: str) -> list[str]:
            module = ["-m", "loadtests.talk_baselines", "--mode", mode]
            return [*module, "--model-dir", str(model_dir), "--feature-api", feature_url]

        with (
            local_ray(serve_environment(workdir, api_key)),
            server("feature API", feature_argv, "/healthz", workdir) as (feature_url, feature_pid),
            server("normal", talk_argv("normal", feature_url), "/openapi.json", workdir) as (
                normal_url,
                normal_pid,
            ),
            server("fast", talk_argv("fast", feature_url), "/openapi.json", workdir) as (
                fast_url,
                fast_pid,
            ),
        ):
            set_nested(config["applications"][0]["args"], "store.url", feature_url)
            serve_url = serve_app_up(config, ready_s=90)
            targets = [
                Target("normal", "talk: normal", normal_url, normal_pid),
                Target("fast", "talk: fast", fast_url, fast_pid),
                Target("serve_app", "serve_app (Ray Serve)", serve_url, None),
            ]
            pids = {"feature API": feature_pid, "normal": normal_pid, "fast": fast_pid}
            rows = measure(targets, cases, args, api_key, pids)

            lua_get = workdir / "get.lua"
            lua_get.write_text(LUA_GET)
            wrk_json(f"{serve_url}/healthz", lua_get, [], args.warmup, args)
            healthz = wrk_json(f"{serve_url}/healthz", lua_get, [], args.duration, args)
            print(f"no-op ceiling: {healthz['requests'] / (healthz['duration_us'] / 1e6):,.0f}")

    ceilings = Ceilings(model_items_s, model_ms, frame_items_s, args.ceiling_batch, healthz)
    notes.append(f"whole run took {time.perf_counter() - began:.0f} s")
    write_report(report(rows, ceilings, args, notes), args.out_dir / "bench_talk.md")
    chart(rows, ceilings, args.out_dir / "bench_talk.png", args)
    print(f"chart written to {args.out_dir / 'bench_talk.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
