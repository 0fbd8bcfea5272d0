"""Progress of a load-test run while locust works in its subprocess, on stderr.

Locust runs headless with ``--only-summary`` (no console table), but it appends a row to
``locust_stats_history.csv`` every second; this reads the newest aggregated row and shows
elapsed/total seconds, users, requests/s, failures so far and the replica counts.

On a terminal it is a tqdm bar; always, when a stage of the load shape ends, one line
with the same numbers is written (so a log or a CI job shows progress too).

Kept free of locust and Ray imports (locust's gevent patching breaks ``ray.init`` in the
same process), so it is unit-tested on its own.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from loadtests.stages import Stage


@dataclass(frozen=True)
class Snapshot:
    """The newest aggregated stats locust wrote (cumulative totals, current users)."""

    users: float
    rps: float
    requests: float
    failures: float


def _number(row: dict[str, str], key: str) -> float | None:
    value = (row.get(key) or "").strip()
    if value in ("", "N/A"):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def latest_stats(history_csv: Path) -> Snapshot | None:
    """The newest complete ``Aggregated`` row, requests/s from the last two totals.

    The file is being written while it is read: a missing file, a header only or a
    half-written last line give the newest complete row, or None.
    """
    try:
        text = history_csv.read_text()
    except OSError:
        return None
    if not text.endswith("\n"):  # the last line is still being written
        text = text[: text.rfind("\n") + 1]
    rows: list[tuple[float, float, float, float, float]] = []
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("Name") != "Aggregated":
            continue
        values = [
            _number(row, key)
            for key in (
                "Timestamp",
                "User Count",
                "Requests/s",
                "Total Request Count",
                "Total Failure Count",
            )
        ]
        timestamp, users, rps, requests, failures = values
        if timestamp is None or users is None or requests is None or failures is None:
            continue
        rows.append((timestamp, users, rps or 0.0, requests, failures))
    if not rows:
        return None
    timestamp, users, rps, requests, failures = rows[-1]
    if len(rows) > 1:  # locust's Requests/s is a sliding window; the totals are exact
        previous = rows[-2]
        if timestamp > previous[0]:
            rps = (requests - previous[3]) / (timestamp - previous[0])
    return Snapshot(users, rps, requests, failures)


def stage_at(stages: Sequence[Stage], elapsed_s: float) -> int:
    """Index of the stage running ``elapsed_s`` into the shape (the last one past its end)."""
    end = 0.0
    for index, (duration, _users) in enumerate(stages):
        end += duration
        if elapsed_s < end:
            return index
    return len(stages) - 1


def describe(
    elapsed_s: float,
    total_s: float,
    stats: Snapshot | None,
    replicas: dict[str, int] | None = None,
) -> str:
    """``37/115 s, users 64, 112.4 req/s, failures 0 (of 4012), replicas Ingress=2 ...``."""
    parts = [f"{min(elapsed_s, total_s):.0f}/{total_s:.0f} s"]
    if stats is None:
        parts.append("no locust stats yet")
    else:
        parts += [
            f"users {stats.users:.0f}",
            f"{stats.rps:.1f} req/s",
            f"failures {stats.failures:.0f} (of {stats.requests:.0f})",
        ]
    if replicas:
        parts.append("replicas " + " ".join(f"{k}={v}" for k, v in sorted(replicas.items())))
    return ", ".join(parts)


@dataclass
class LoadProgress:
    """Call :meth:`tick` while locust runs (about once a second), then :meth:`close`.

    ``bar=None`` shows a tqdm bar only when ``stream`` is a terminal; the stage lines are
    written either way.
    """

    stages: Sequence[Stage]
    history_csv: Path
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    bar: bool | None = None
    started: float = field(default_factory=time.monotonic)
    _stage: int = 0
    _last: Snapshot | None = None
    _bar: Any = None

    def __post_init__(self) -> None:
        self.total_s = sum(duration for duration, _ in self.stages)
        show_bar = self.bar if self.bar is not None else self.stream.isatty()
        if show_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=round(self.total_s),
                desc="load",
                unit="s",
                file=self.stream,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}",
            )

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _stage_line(
        self,
        index: int,
        elapsed_s: float,
        replicas: dict[str, int] | None,
        verb: str = "done",
    ) -> str:
        duration, users = self.stages[index]
        head = f"stage {index + 1}/{len(self.stages)} ({duration:.0f} s at {users} users) {verb}"
        return f"{head}: {describe(elapsed_s, self.total_s, self._last, replicas)}"

    def tick(self, now: float | None = None, replicas: dict[str, int] | None = None) -> None:
        elapsed = (time.monotonic() if now is None else now) - self.started
        self._last = latest_stats(self.history_csv) or self._last
        if elapsed < self.total_s:
            stage = stage_at(self.stages, elapsed)
            while self._stage < stage:  # a line for each stage that ended (even if skipped)
                self._line(self._stage_line(self._stage, elapsed, replicas))
                self._stage += 1
        if self._bar is not None:
            self._bar.n = min(round(elapsed), self._bar.total)
            self._bar.set_postfix_str(
                describe(elapsed, self.total_s, self._last, replicas), refresh=False
            )
            self._bar.refresh()

    def close(self, now: float | None = None, replicas: dict[str, int] | None = None) -> None:
        """Locust ended: a line for each stage not shown yet that ran, then close the bar.

        A run that ended before the shape did (locust failed or was killed) says so.
        """
        elapsed = (time.monotonic() if now is None else now) - self.started
        self._last = latest_stats(self.history_csv) or self._last
        early = elapsed < self.total_s - 1.0  # locust's own start-up takes about a second
        last = stage_at(self.stages, elapsed)
        while self._stage <= last and self._stage < len(self.stages):
            verb = "stopped early" if early and self._stage == last else "done"
            self._line(self._stage_line(self._stage, elapsed, replicas, verb))
            self._stage += 1
        if self._bar is not None:
            self._bar.close()
            self._bar = None
