from types import SimpleNamespace

from serve_app.deployments.job_worker import queue_depth_policy


def ctx(points: dict[str, list[tuple[float, float]]], low: int = 1, high: int = 4) -> object:
    series = {
        replica: [SimpleNamespace(timestamp=t, value=v) for t, v in values]
        for replica, values in points.items()
    }
    return SimpleNamespace(
        raw_metrics={"queue_depth": series},
        config=SimpleNamespace(target_ongoing_requests=2),
        capacity_adjusted_min_replicas=low,
        capacity_adjusted_max_replicas=high,
        policy_state={"k": 1},
    )


def test_policy_follows_the_newest_depth_report() -> None:
    replicas, state = queue_depth_policy(ctx({"a": [(1.0, 1.0), (5.0, 5.0)], "b": [(3.0, 0.0)]}))
    assert replicas == 3 and state == {"k": 1}  # ceil(5 / 2)
    replicas, _ = queue_depth_policy(ctx({"a": [(1.0, 9.0)], "b": [(2.0, 2.0)]}))
    assert replicas == 1


def test_policy_respects_bounds_and_empty_reports() -> None:
    assert queue_depth_policy(ctx({"a": [(1.0, 100.0)]}, high=2))[0] == 2
    assert queue_depth_policy(ctx({}, low=1))[0] == 1
    assert queue_depth_policy(ctx({"a": [(1.0, 0.0)]}, low=0))[0] == 0
