"""The load-test runner's progress display, on locust's stats-history CSV (no locust, no Ray)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from loadtests.progress import LoadProgress, Snapshot, describe, latest_stats, stage_at

HEADER = (
    "Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,"
    "99.9%,99.99%,100%,Total Request Count,Total Failure Count,Total Median Response Time,"
    "Total Average Response Time,Total Min Response Time,Total Max Response Time,"
    "Total Average Content Size\n"
)
ROOT = Path(__file__).resolve().parents[2]
STAGES = [(10.0, 4), (20.0, 64), (10.0, 0)]


def _row(t: int, users: int, name: str, rps: str, total: int, failures: int) -> str:
    percentiles = ",".join(["12"] * 11)
    return f"{t},{users},,{name},{rps},0.0,{percentiles},{total},{failures},12,13.5,3,80,1024\n"


def _write(path: Path, *rows: str, partial: str = "") -> None:
    path.write_text(HEADER + "".join(rows) + partial)


def test_latest_stats_reads_the_newest_complete_aggregated_row(tmp_path: Path) -> None:
    csv_file = tmp_path / "locust_stats_history.csv"
    assert latest_stats(csv_file) is None  # locust has not written it yet
    _write(csv_file)
    assert latest_stats(csv_file) is None  # a header only
    _write(csv_file, _row(100, 4, "Aggregated", "N/A", 0, 0))
    assert latest_stats(csv_file) == Snapshot(users=4, rps=0.0, requests=0, failures=0)
    _write(
        csv_file,
        _row(100, 4, "Aggregated", "N/A", 0, 0),
        _row(101, 4, "/v1/predict", "9.0", 40, 0),  # per-endpoint rows are skipped
        _row(101, 4, "Aggregated", "9.0", 40, 0),
        _row(103, 64, "Aggregated", "33.0", 240, 2),
        partial="104,64,,Aggregated,50.0,0.0,12",  # being written: ignored
    )
    stats = latest_stats(csv_file)
    assert stats is not None
    assert (stats.users, stats.requests, stats.failures) == (64, 240, 2)
    assert stats.rps == 100.0  # (240 - 40) / 2 s, not locust's sliding window


def test_stage_at_follows_the_shape_and_stays_on_the_last_stage() -> None:
    assert [stage_at(STAGES, t) for t in (0, 9.9, 10, 29.9, 30, 39, 55)] == [0, 0, 1, 1, 2, 2, 2]


def test_describe_shows_elapsed_users_rps_failures_and_replicas() -> None:
    stats = Snapshot(users=64, rps=112.44, requests=4012, failures=3)
    line = describe(37.2, 115, stats, {"Model": 3, "Ingress": 2})
    assert line == (
        "37/115 s, users 64, 112.4 req/s, failures 3 (of 4012), replicas Ingress=2 Model=3"
    )
    assert describe(130, 115, None) == "115/115 s, no locust stats yet"


def test_a_line_per_stage_without_a_terminal(tmp_path: Path) -> None:
    csv_file = tmp_path / "locust_stats_history.csv"
    stream = io.StringIO()
    progress = LoadProgress(STAGES, csv_file, stream=stream, started=0.0)
    progress.tick(now=5.0)
    assert stream.getvalue() == ""  # nothing until a stage ends
    _write(csv_file, _row(100, 4, "Aggregated", "8.0", 80, 0))
    progress.tick(now=10.5, replicas={"Model": 1})
    _write(
        csv_file,
        _row(100, 4, "Aggregated", "8.0", 80, 0),
        _row(120, 64, "Aggregated", "50", 1080, 1),
    )
    progress.tick(now=31.0, replicas={"Model": 3})
    progress.close(now=40.5, replicas={"Model": 2})
    lines = stream.getvalue().splitlines()
    assert lines == [
        "stage 1/3 (10 s at 4 users) done: 10/40 s, users 4, 8.0 req/s, failures 0 (of 80),"
        " replicas Model=1",
        "stage 2/3 (20 s at 64 users) done: 31/40 s, users 64, 50.0 req/s, failures 1"
        " (of 1080), replicas Model=3",
        "stage 3/3 (10 s at 0 users) done: 40/40 s, users 64, 50.0 req/s, failures 1"
        " (of 1080), replicas Model=2",
    ]


def test_a_run_that_ends_early_says_so_and_skips_stages_it_never_ran(tmp_path: Path) -> None:
    stream = io.StringIO()
    progress = LoadProgress(STAGES, tmp_path / "missing.csv", stream=stream, started=0.0)
    progress.close(now=15.0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("stage 1/3 (10 s at 4 users) done: 15/40 s")
    assert lines[1].startswith("stage 2/3 (20 s at 64 users) stopped early: 15/40 s")


def test_a_tqdm_bar_when_asked(tmp_path: Path) -> None:
    csv_file = tmp_path / "locust_stats_history.csv"
    _write(csv_file, _row(100, 4, "Aggregated", "8.0", 80, 0))
    stream = io.StringIO()
    progress = LoadProgress(STAGES, csv_file, stream=stream, bar=True, started=0.0)
    progress.tick(now=12.0)
    progress.close(now=40.0)
    text = stream.getvalue()
    assert "load:" in text and "users 4, 8.0 req/s, failures 0 (of 80)" in text
    assert "stage 1/3 (10 s at 4 users) done" in text  # the stage lines above the bar


def test_no_bar_by_default_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    progress = LoadProgress(STAGES, tmp_path / "x.csv", stream=io.StringIO())
    assert progress._bar is None


def test_the_runner_imports_neither_locust_nor_ray_for_progress() -> None:
    """Locust's gevent patching hangs ray.init in the same process: keep them apart."""
    code = (
        "import sys; import loadtests.progress, loadtests.stages; "
        "bad = {'locust', 'gevent', 'ray'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
