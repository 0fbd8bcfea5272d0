from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve_app.app import load_app_config
from serve_app.config import (
    AppConfig,
    FetcherTuning,
    IngressTuning,
    JobWorkerTuning,
    ModelTuning,
)

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
TUNING = {
    "Model": ModelTuning,
    "Ingress": IngressTuning,
    "FeatureFetcher": FetcherTuning,
    "JobWorker": JobWorkerTuning,
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path: Path) -> None:
    load_app_config(path)
    for application in yaml.safe_load(path.read_text())["applications"]:
        for deployment in application.get("deployments", []):
            TUNING[deployment["name"]].model_validate(deployment.get("user_config", {}))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_max_ongoing_requests_does_not_cap_batches(path: Path) -> None:
    """Serve never holds more than max_ongoing_requests per replica: it caps batch size."""
    for application in yaml.safe_load(path.read_text())["applications"]:
        deployments = {d["name"]: d for d in application["deployments"]}
        model = deployments["Model"]
        concurrent_batches = 2  # serve_app.model: @serve.batch(max_concurrent_batches=2)
        assert (
            model["max_ongoing_requests"]
            >= model["user_config"]["max_batch_size"] * concurrent_batches
        )
        ingress = deployments["Ingress"]
        assert ingress["max_ongoing_requests"] >= ingress["user_config"]["coalesce_max_batch_size"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_app_fits_on_two_cpus(path: Path) -> None:
    for application in yaml.safe_load(path.read_text())["applications"]:
        total = sum(
            d["ray_actor_options"]["num_cpus"] * d["autoscaling_config"]["max_replicas"]
            for d in application["deployments"]
        )
        assert total <= 2.0


def test_unknown_keys_and_bad_values_fail_start_up() -> None:
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"store": {"urll": "sqlite:///x"}})
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"store": {"url": "mysql://x"}})
    with pytest.raises(ValidationError):
        ModelTuning.model_validate({"max_batch_size": 0})


def test_relative_paths_resolve_against_base(tmp_path: Path) -> None:
    config = AppConfig().resolved(tmp_path)
    assert config.artifacts.model_dir == str(tmp_path / "var/model")
    assert config.store.url == f"sqlite:///{tmp_path / 'var/features.db'}"
    assert config.auth.keys_file == str(tmp_path / ".secrets/api_keys")
