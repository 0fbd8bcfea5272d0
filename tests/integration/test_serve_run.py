"""The README's way to start the service: `serve-app run` (serve.env, HAProxy's files
kept private, then `serve run`) in throughput mode, then Ctrl-C.

design.md records that `serve run` under HAProxy mode once hung on Ctrl-C and left its
raylet behind. This starts the real command in its own session, calls it, sends SIGINT
and checks that it exits and that nothing it started is left running.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serve_app.offline.run import HAPROXY_FILES
from tests.integration.conftest import (
    API_KEY,
    SERVE_ENV,
    free_port,
    load_test_config,
    pin_replicas,
    wait_ready,
)

# `serve run` must stop within 10 s (README); this bound only catches a regression to the
# 30 s default drain of Ray's direct ingress, not a slow machine.
STOP_BOUND_S = 25.0

pytestmark = [pytest.mark.integration, pytest.mark.own_ray]


def session_processes(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(pid) for pid, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def test_serve_run_starts_serves_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    config = load_test_config(tmp_path, free_port())
    for deployment in config["applications"][0]["deployments"]:
        # One replica each: starting and stopping is what is tested here, and on 2 cores
        # each replica more costs seconds of CPU at start (the chaos test keeps two).
        pin_replicas(config, deployment["name"], 1)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(SERVE_ENV)
    for name in HAPROXY_FILES:  # where `serve-app run` puts them is part of the test
        env.pop(name, None)
    log_path = tmp_path / "serve_run.log"
    serve_app_bin = Path(sys.executable).with_name("serve-app")
    # The README's command, as a shell's background job would start it: SIGINT ignored,
    # which `serve-app run` restores before it becomes `serve run`
    process = subprocess.Popen(
        [str(serve_app_bin), "run", str(config_path)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own session: everything it starts can be found
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    sid = process.pid
    started = time.time() - 1  # a socket made by this run is newer than this
    try:
        base_url = f"http://127.0.0.1:{config['http_options']['port']}"
        try:
            wait_ready(base_url, timeout_s=240)
        except TimeoutError as exc:
            raise AssertionError(log_path.read_text(errors="replace")[-4000:]) from exc
        answer = httpx.post(
            f"{base_url}/v1/predict",
            json={"entity_id": "E0000007"},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=30,
        )
        assert answer.status_code == 200 and 0 <= answer.json()["score"] <= 1
        # HAProxy's admin socket (mode 0666, level admin) sits where only we can go
        private = Path("/tmp") / f"serve-app-{os.getuid()}"
        # Ray adds a directory per node; earlier runs' are there too: this run's is new
        sockets = [p for p in private.glob("*/admin.sock") if p.stat().st_mtime >= started]
        assert sockets and all(stat.S_ISSOCK(path.stat().st_mode) for path in sockets)
        assert stat.S_IMODE(private.lstat().st_mode) == 0o700
        assert private.lstat().st_uid == os.getuid()
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=90)
        stop_s = time.monotonic() - interrupted
        print(f"\nserve run stopped {stop_s:.1f} s after Ctrl-C")
        log = log_path.read_text(errors="replace")
        assert "failed to shut down" not in log, log[-3000:]
        assert stop_s < STOP_BOUND_S, log[-3000:]
        deadline = time.monotonic() + 30
        while session_processes(sid) and time.monotonic() < deadline:
            time.sleep(1)
        assert session_processes(sid) == [], "serve run left processes behind"
    finally:
        for pid in session_processes(sid):
            os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
