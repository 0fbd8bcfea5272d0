"""Load shapes: step, spike and ramp-down, each ending with an idle tail.

Each shape is a list of stages ``(duration_s, users)`` (``loadtests/stages.py``); the idle tail (0 users) lets the
autoscaler be seen scaling back down before the run ends by itself. ``SHAPE_SCALE``
stretches or shrinks every duration (``0.5`` halves the run), so one shape serves a
3-minute CI run and a longer one on a workstation.
"""

from __future__ import annotations

import os

from locust import LoadTestShape

from loadtests.stages import SHAPES, scaled


class StagedShape(LoadTestShape):
    """Users per stage from :data:`SHAPES`; the run stops after the last stage."""

    name = os.environ.get("LOAD_SHAPE", "step")
    scale = float(os.environ.get("SHAPE_SCALE", "1"))
    spawn_rate = 32.0

    def tick(self) -> tuple[int, float] | None:
        elapsed = self.get_run_time()
        end = 0.0
        for duration, users in scaled(SHAPES[self.name], self.scale):
            end += duration
            if elapsed < end:
                return users, self.spawn_rate
        return None
