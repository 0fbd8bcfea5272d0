import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from serve_app.config import (
    TUNING_BY_DEPLOYMENT,
    AppConfig,
    IngressTuning,
    ModelTuning,
    load_app_config,
    read_env_file,
    sqlite_path,
)
from serve_app.deployments.model import MAX_CONCURRENT_BATCHES
from serve_app.offline.config_reference import render

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(ROOT.joinpath("configs").glob("*.yaml"))


def _deployments(path: Path) -> dict[str, dict[str, Any]]:
    application = yaml.safe_load(path.read_text())["applications"][0]
    return {d["name"]: d for d in application["deployments"]}


def _tuning(deployment: dict[str, Any]) -> Any:
    """The deployment's effective user_config: the model's defaults plus the YAML's."""
    return TUNING_BY_DEPLOYMENT[deployment["name"]].model_validate(
        deployment.get("user_config") or {}
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path: Path) -> None:
    load_app_config(path)
    deployments = _deployments(path)
    assert set(deployments) == set(TUNING_BY_DEPLOYMENT)
    for deployment in deployments.values():
        _tuning(deployment)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_max_ongoing_requests_does_not_cap_batches(path: Path) -> None:
    """Serve never holds more than max_ongoing_requests per replica: it caps batch size."""
    deployments = _deployments(path)
    model = deployments["Model"]
    tuning: ModelTuning = _tuning(model)
    assert model["max_ongoing_requests"] >= tuning.max_batch_size * MAX_CONCURRENT_BATCHES
    ingress = deployments["Ingress"]
    ingress_tuning: IngressTuning = _tuning(ingress)
    assert ingress["max_ongoing_requests"] >= ingress_tuning.coalesce_max_batch_size


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_app_fits_on_two_cpus(path: Path) -> None:
    total = sum(
        d["ray_actor_options"]["num_cpus"] * d["autoscaling_config"]["max_replicas"]
        for d in _deployments(path).values()
    )
    assert total <= 2.0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_yaml_states_only_what_differs_from_the_defaults(path: Path) -> None:
    """A setting repeated with its default value is a second place to keep in sync."""

    def repeated(given: dict[str, Any], defaults: dict[str, Any], prefix: str) -> list[str]:
        found = []
        for key, value in given.items():
            if isinstance(value, dict):
                found += repeated(value, defaults[key], f"{prefix}{key}.")
            elif defaults[key] == (tuple(value) if isinstance(value, list) else value):
                found.append(prefix + key)
        return found

    application = yaml.safe_load(path.read_text())["applications"][0]
    assert repeated(application.get("args") or {}, AppConfig().model_dump(), "") == []
    for deployment in application["deployments"]:
        model = TUNING_BY_DEPLOYMENT[deployment["name"]]
        assert repeated(deployment.get("user_config") or {}, model().model_dump(), "") == []


def test_docker_config_runs_the_same_deployments_as_the_default() -> None:
    assert _deployments(ROOT / "configs/docker.yaml") == _deployments(ROOT / "configs/config.yaml")


@pytest.mark.parametrize("name", ["docker.yaml", "cluster.yaml"])
def test_every_config_behind_haproxy_admits_as_the_default_does(name: str) -> None:
    """The image and the cluster run HAProxy's shedding too (serve.env): with the app's
    0.4 s default they refused inside the replicas as well, at a fraction of the goodput."""

    def limits(path: Path) -> object:
        return yaml.safe_load(path.read_text())["applications"][0]["args"].get("limits")

    assert limits(ROOT / "configs" / name) == limits(ROOT / "configs/config.yaml")


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md is generated: regenerate with `serve-app config-reference`."""
    assert (ROOT / "docs/configuration.md").read_text() == render()


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
    assert config.jobs.queue_url == f"sqlite:///{tmp_path / 'var/jobs.db'}"
    absolute = AppConfig.model_validate({"store": {"url": "sqlite:////data/f.db"}})
    assert absolute.resolved(tmp_path).store.url == "sqlite:////data/f.db"


def test_sqlite_path_is_parsed_in_one_place() -> None:
    assert sqlite_path("sqlite:///var/x.db") == Path("var/x.db")
    assert sqlite_path("sqlite:////abs/x.db") == Path("/abs/x.db")
    assert sqlite_path("http://store:8080") is None


def test_serve_env_reads_as_the_shell_reads_it() -> None:
    """configs/serve.env is read by read_env_file for `serve-app run` (the README's run
    command and the image's CMD), the tests, benchmarks and `serve-app k8s`, and an
    operator may source it with the shell: both must agree, multi-line values included."""
    path = ROOT / "configs" / "serve.env"
    script = (
        'set -a; . "$1"; set +a; python3 -c "import json, os; print(json.dumps(dict(os.environ)))"'
    )
    shell = json.loads(
        subprocess.run(
            ["bash", "-c", script, "bash", str(path)],
            env={"PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    parsed = read_env_file(path)
    assert parsed == {key: shell[key] for key in parsed}
    assert "\n    option http-buffer-request" in parsed["RAY_SERVE_HAPROXY_RETRY_ON"]


def test_a_missing_env_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_env_file(tmp_path / "serve.env")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_sanitises_the_request_id_at_the_edge(path: Path) -> None:
    """Without this variable Ray echoes any X-Request-ID (300 characters, spaces, markup)
    in the answer's header and its logs, unlike the id in the error body."""
    from serve_app.api import request_id

    for application in yaml.safe_load(path.read_text())["applications"]:
        env = (application.get("runtime_env") or {}).get("env_vars") or {}
        target = env.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH")
        assert target == "serve_app.api.request_id:edge_middlewares", path.name
        assert callable(getattr(request_id, target.split(":")[1]))


def test_a_settings_error_never_shows_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """A malformed URL with a literal password went into pydantic's message, and from
    there into Serve's status, the logs and `serve-app k8s`'s traceback."""
    with pytest.raises(ValidationError) as caught:
        AppConfig.model_validate({"jobs": {"queue_url": "mysql://u:hunter2@db/x"}})
    assert "hunter2" not in str(caught.value) and "jobs" in str(caught.value)


def test_backoff_must_not_start_above_its_cap() -> None:
    with pytest.raises(ValidationError, match="backoff_initial_s"):
        AppConfig.model_validate({"jobs": {"webhooks": {"backoff_initial_s": 600}}})


def test_a_sqlite_path_is_expanded_before_it_is_made_absolute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SERVE_APP_TEST_DATA", "/data")
    monkeypatch.setenv("SERVE_APP_TEST_RELATIVE", "sqlite:///var/y.db")
    monkeypatch.setenv("SERVE_APP_TEST_REDIS", "redis://:pw@redis:6379/0")
    config = AppConfig.model_validate(
        {
            "store": {"url": "sqlite:///${SERVE_APP_TEST_DATA}/features.db"},
            "jobs": {"queue_url": "${SERVE_APP_TEST_RELATIVE}"},
            "prediction_cache": {"url": "${SERVE_APP_TEST_REDIS}"},
        }
    ).resolved(tmp_path)
    assert config.store.url == "sqlite:////data/features.db"  # not BASE/${...}
    assert config.jobs.queue_url == f"sqlite:///{tmp_path / 'var/y.db'}"  # made absolute
    assert config.prediction_cache.url == "${SERVE_APP_TEST_REDIS}"  # a secret stays a name


def test_an_unset_variable_is_named_without_the_rest_of_the_url() -> None:
    from serve_app.config import expand_env

    with pytest.raises(ValueError, match="SERVE_APP_TEST_UNSET") as caught:
        expand_env("postgresql://u:hunter2@${SERVE_APP_TEST_UNSET}/db")
    assert "hunter2" not in str(caught.value)


def test_a_key_may_keep_at_least_one_whole_job() -> None:
    """Otherwise a job of max_items would get a 429 "retry in an hour" for ever."""
    from pydantic import ValidationError

    from serve_app.config import JobsConfig

    with pytest.raises(ValidationError, match="max_retained_items_per_key"):
        JobsConfig(max_items=100, max_retained_items_per_key=50)
    assert JobsConfig(max_items=100, max_retained_items_per_key=100)
