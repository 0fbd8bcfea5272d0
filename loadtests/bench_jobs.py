"""Queued jobs against the batch endpoint, measured in one run.

    python loadtests/bench_jobs.py [--items 10000] [--chunk 1000]

Starts the app from configs/config.yaml on a local Ray (throughput mode, files in a temp
dir) and a webhook receiver on loopback, then scores the same number of fresh items
(different ids in each case, random context, so no cache helps either side):

* as one job through ``POST /v1/jobs`` with a callback: items/s from the POST to the
  signed webhook's arrival, and the time from POST to webhook;
* through ``POST /v1/predict/batch`` in sequential chunks of ``--chunk`` items.

Prints a markdown table and writes it to loadtests/results/bench_jobs.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python loadtests/<this>.py

from loadtests.harness import (
    RESULTS,
    free_port,
    local_ray,
    new_api_key,
    serve_app_up,
    serve_config,
    serve_environment,
    set_nested,
    write_report,
)


def fresh_items(start: int, n: int, rng: random.Random) -> list[dict[str, Any]]:
    channels = ["web", "app", "store"]
    return [
        {
            "entity_id": f"E{(start + i) % 100_000:07d}",
            "context": {
                "amount": round(rng.uniform(1, 500), 2),
                "hour": rng.randrange(24),
                "channel": rng.choice(channels),
            },
        }
        for i in range(n)
    ]


class WebhookClock(BaseHTTPRequestHandler):
    arrivals: dict[str, float] = {}

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        job_id = json.loads(body)["data"]["id"]
        WebhookClock.arrivals[job_id] = time.perf_counter()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


def start_app(workdir: Path, receiver_port: int) -> str:
    """configs/config.yaml with the loopback webhook receiver (host and port) allowed."""
    config = serve_config(workdir)
    allowed = [f"127.0.0.1:{receiver_port}"]
    set_nested(config["applications"][0]["args"], "jobs.webhooks.allowed_hosts", allowed)
    return serve_app_up(config, timeout_s=180, ready_s=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--chunk", type=int, default=1_000)
    args = parser.parse_args()
    rng = random.Random(7)
    api_key = new_api_key()
    receiver = ThreadingHTTPServer(("127.0.0.1", free_port()), WebhookClock)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"

    try:
        with (
            tempfile.TemporaryDirectory(prefix="bj_", dir="/tmp") as tmp,  # short: socket paths
            local_ray(serve_environment(Path(tmp), api_key)),
        ):
            url = start_app(Path(tmp), receiver.server_address[1])
            client = httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120
            )
            client.post("/v1/predict/batch", json={"items": fresh_items(90_000, 200, rng)})  # warm

            items = fresh_items(0, args.items, rng)
            started = time.perf_counter()
            job = client.post("/v1/jobs", json={"items": items, "callback_url": hook}).json()
            accepted = time.perf_counter() - started
            while job["id"] not in WebhookClock.arrivals:
                if time.perf_counter() - started > 600:
                    raise TimeoutError("no webhook after 600 s")
                time.sleep(0.05)
            to_webhook = WebhookClock.arrivals[job["id"]] - started
            status = client.get(f"/v1/jobs/{job['id']}").json()

            items = fresh_items(args.items, args.items, rng)
            started = time.perf_counter()
            failed = 0
            for start in range(0, len(items), args.chunk):
                body = client.post(
                    "/v1/predict/batch", json={"items": items[start : start + args.chunk]}
                ).json()
                failed += body["summary"]["failed"]
            batch_s = time.perf_counter() - started
    finally:
        receiver.shutdown()

    rows = [
        (
            "job via /v1/jobs (POST -> webhook)",
            args.items / to_webhook,
            to_webhook,
            f"202 in {accepted * 1000:.0f} ms; state {status['state']}, "
            f"{status['progress']['failed']} failed",
        ),
        (
            f"/v1/predict/batch, {args.items // args.chunk} sequential chunks of {args.chunk}",
            args.items / batch_s,
            batch_s,
            f"{failed} failed",
        ),
    ]
    lines = [
        f"## bench_jobs: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, {args.items} fresh items each",
        "",
        "| path | items/s | seconds | notes |",
        "|---|---|---|---|",
        *[f"| {name} | {rate:,.0f} | {secs:.2f} | {note} |" for name, rate, secs, note in rows],
        "",
        f"Jobs / batch endpoint: {rows[0][1] / rows[1][1]:.2f}x items/s.",
    ]
    write_report("\n".join(lines) + "\n", RESULTS / "bench_jobs.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
