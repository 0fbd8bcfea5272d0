"""The stages of each load shape, kept free of locust imports.

Importing locust monkey-patches the standard library with gevent, which breaks Ray in
the same process; the load-test runner needs the durations without that.
"""

from __future__ import annotations

Stage = tuple[float, int]

SHAPES: dict[str, list[Stage]] = {
    # climb in steps, hold, then stop
    "step": [(20, 4), (20, 16), (30, 48), (20, 16), (40, 0)],
    # quiet, a sudden burst, quiet again. The burst is long enough for replicas to start on
    # a loaded 2-core machine (they took up to 36 s in CI); the quiet tail long enough for
    # the scale-down (seen up to 34 s after the burst, when a replica started late).
    "spike": [(10, 4), (35, 64), (15, 4), (25, 0)],
    # start high and ramp down to nothing
    "rampdown": [(35, 64), (20, 32), (20, 8), (40, 0)],
}


def scaled(stages: list[Stage], scale: float) -> list[Stage]:
    return [(duration * scale, users) for duration, users in stages]


def total_duration(name: str, scale: float = 1.0) -> float:
    return sum(duration for duration, _ in scaled(SHAPES[name], scale))
