"""A CI-sized run of the autoscaling load test (the README's command, the spike shape).

The spike's burst runs at full length (35 s at 64 users). Halved (18 s), it was too short in CI
on 2026-12-01: Serve decided to scale the Ingress 1 -> 4 and the Model 1 -> 2 about 10 s
into the spike, but on that loaded machine the new replicas needed more than 25 s to start
and were cancelled by the scale-down before they ran (the controller's log), so the
sampled RUNNING replicas never rose.

It starts its own Ray (in a subprocess), so it runs before the integration tests start
theirs (see the ordering hook in tests/conftest.py): two clusters would share 2 cores.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.own_ray]

ROOT = Path(__file__).resolve().parents[2]


def test_spike_scales_up_and_down_without_failures(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "loadtests" / "run_autoscaling.py"),
        "--shape",
        "spike",
        "--scale",
        "1.0",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    assert result.returncode == 0, f"{summary}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Verdict: PASS" in summary
    assert (out / "autoscaling.png").stat().st_size > 10_000
    with (out / "timeline.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    serve_rows = [row for row in rows if row["source"] == "serve"]
    assert (
        max(int(row["Model"]) for row in serve_rows) > 1
        or max(int(row["Ingress"]) for row in serve_rows) > 1
    )
    assert any(row["source"] == "locust" and float(row["rps"] or 0) > 0 for row in rows)
