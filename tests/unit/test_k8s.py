"""The KubeRay manifest: no drift from configs/cluster.yaml, and valid pod templates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from serve_app.config import read_env_file
from serve_app.offline.cli import main
from serve_app.offline.k8s import THROUGHPUT_ENV, ManifestOptions, peak_cpus, render_manifest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "configs" / "cluster.yaml"
K8S_VERSION = "1.30.0"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("k8s") / "rayservice.yaml"
    env_file = ROOT / "configs" / "serve.env"
    argv = ["k8s", "--config", str(CLUSTER), "--env-file", str(env_file), "--workers", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    return yaml.safe_load(out.read_text())


def _containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = manifest["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster["workerGroupSpecs"]]
    return [c for template in templates for c in template["spec"]["containers"]]


def test_serve_config_is_exactly_cluster_yaml(manifest: dict[str, Any]) -> None:
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    cluster = yaml.safe_load(CLUSTER.read_text())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_config["applications"] == cluster["applications"]
    assert serve_config == cluster


def test_cpu_requests_match_the_deployments(manifest: dict[str, Any]) -> None:
    cluster = yaml.safe_load(CLUSTER.read_text())
    deployments = cluster["applications"][0]["deployments"]
    peak = sum(
        d["ray_actor_options"]["num_cpus"] * d["autoscaling_config"]["max_replicas"]
        for d in deployments
    )
    assert peak_cpus(cluster) == peak
    spec = manifest["spec"]["rayClusterConfig"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replicas there
    (group,) = spec["workerGroupSpecs"]
    cpus = float(group["rayStartParams"]["num-cpus"])
    (worker,) = group["template"]["spec"]["containers"]
    assert float(worker["resources"]["requests"]["cpu"]) == cpus  # Ray sees what k8s gives
    # the peak still fits after losing one of the worker pods
    assert cpus * (group["replicas"] - 1) >= peak
    assert cpus * (group["replicas"] - 2) < peak  # and not grossly more


def test_every_ray_container_has_throughput_mode_and_secrets(manifest: dict[str, Any]) -> None:
    raw = CLUSTER.read_text()
    serve_env = read_env_file(ROOT / "configs" / "serve.env")
    assert "RAY_SERVE_HAPROXY_RETRY_ON" in serve_env  # what `serve run` gets, the pods get
    for container in _containers(manifest):
        env = {e["name"]: e for e in container["env"]}
        for name, value in {**THROUGHPUT_ENV, **serve_env}.items():
            assert env[name]["value"] == value
        for name in ("SERVE_APP_REDIS_URL", "SERVE_APP_POSTGRES_URL", "SERVE_APP_API_KEYS"):
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "serve-app", "key": name}
            assert "${" + name + "}" in raw or name == "SERVE_APP_API_KEYS"


def test_pod_templates_are_valid_kubernetes(manifest: dict[str, Any]) -> None:
    cluster = manifest["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    for name, template in templates.items():
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"serve-app-{name}"},
            "template": template,
        }
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)


def test_an_invalid_template_is_caught() -> None:
    """The validation above can fail: a misspelt field is refused."""
    broken = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "x"},
        "template": {"spec": {"containers": [{"name": "c", "image": "i", "resourcez": {}}]}},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_no_secret_value_is_written() -> None:
    text = render_manifest(CLUSTER, ManifestOptions())
    assert "password" not in text.lower() and "whsec_" not in text


def test_a_literal_password_in_a_url_is_refused_not_copied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """serveConfigV2 is the config itself: a password written into a URL would sit in the
    manifest in plain text. A ${VAR} reference (the value in the Secret) is fine."""
    cluster = yaml.safe_load(CLUSTER.read_text())
    args = cluster["applications"][0]["args"]
    args["store"] = {**(args.get("store") or {}), "url": "redis://:hunter2@redis:6379/0"}
    literal = tmp_path / "literal.yaml"
    literal.write_text(yaml.safe_dump(cluster))
    out = tmp_path / "out.yaml"
    assert main(["k8s", "--config", str(literal), "--out", str(out)]) == 2
    assert "store.url carries a password" in capsys.readouterr().err
    assert not out.exists()
    args["store"]["url"] = "redis://redis:6379/0"
    args["jobs"] = {**(args.get("jobs") or {}), "queue_url": "postgresql://app@pg/j?password=x1"}
    literal.write_text(yaml.safe_dump(cluster))
    assert main(["k8s", "--config", str(literal), "--out", str(out)]) == 2  # libpq's too
    assert "jobs.queue_url carries a password" in capsys.readouterr().err
    args["jobs"]["queue_url"] = "postgresql://app@pg/j?password=${PG_PASSWORD}"
    args["store"]["url"] = "redis://:${REDIS_PASSWORD}@redis:6379/0"
    referenced = tmp_path / "referenced.yaml"
    referenced.write_text(yaml.safe_dump(cluster))
    text = render_manifest(referenced, ManifestOptions())
    assert "hunter2" not in text and "REDIS_PASSWORD" in text.splitlines()[1]


@pytest.mark.parametrize("workers", [2, 3, 4, 5, 6, 9])
def test_num_cpus_is_a_whole_number_for_any_worker_count(workers: int) -> None:
    """``ray start --num-cpus 0.5`` is refused, so a half CPU kept every worker pod down."""
    text = render_manifest(CLUSTER, ManifestOptions(worker_replicas=workers))
    (group,) = yaml.safe_load(text)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    num_cpus = group["rayStartParams"]["num-cpus"]
    assert num_cpus.isdigit() and int(num_cpus) >= 1
    peak = peak_cpus(yaml.safe_load(CLUSTER.read_text()))
    assert int(num_cpus) * (workers - 1) >= peak


def test_ray_token_auth_is_on(manifest: dict[str, Any]) -> None:
    assert manifest["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--workers", "1"], "at least 2"),
        (["--config", str(ROOT / "configs" / "config.yaml")], "SQLite"),
    ],
)
def test_manifests_that_cannot_work_on_a_cluster_are_refused(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rayservice.yaml"
    assert main(["k8s", "--config", str(CLUSTER), *argv, "--out", str(out)]) == 2
    assert says in capsys.readouterr().err and not out.exists()


def test_a_loopback_host_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load(CLUSTER.read_text())
    config["http_options"]["host"] = "127.0.0.1"
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["k8s", "--config", str(path), "--out", str(tmp_path / "out.yaml")]) == 2
    assert "0.0.0.0" in capsys.readouterr().err


def test_sqlite_is_allowed_when_the_config_says_every_pod_shares_it(tmp_path: Path) -> None:
    config = yaml.safe_load(CLUSTER.read_text())
    args = config["applications"][0]["args"]
    args["store"] = {"url": "sqlite:////app/var/features.db"}  # baked into the image
    args["allow_sqlite_on_cluster"] = True
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["k8s", "--config", str(path), "--out", str(tmp_path / "out.yaml")]) == 0
