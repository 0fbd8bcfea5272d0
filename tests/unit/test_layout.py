"""The layout's promises, checked: a Ray-free core, offline code apart, no import cycles."""

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "serve_app"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """serve_app module -> the serve_app modules it imports (at any depth in the file)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[_module_name(path)] = {m for m in found if m.startswith("serve_app")}
    return graph


def test_no_import_cycles() -> None:
    graph = _imports()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join([*trail, module])
        state[module] = "open"
        for target in graph.get(module, ()):
            if target in graph:
                visit(target, [*trail, module])
        state[module] = "done"

    for module in graph:
        visit(module, [])


def _imported_by(code: str, cwd: Path | None = None) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
        check=True,
        capture_output=True,
        text=True,
        cwd=cwd,
    ).stdout
    return set(out.split())


def _runs_at_import(tree: ast.Module) -> Iterator[ast.AST]:
    """The statements Python runs when it imports a module: module level, class bodies,
    ``if``/``try`` blocks; not function bodies, nor ``if TYPE_CHECKING:`` blocks."""
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
            continue
        todo += ast.iter_child_nodes(node)


def _loaded_at_import(module: str) -> set[str]:
    """The modules importing ``module`` loads, read from the import statements of
    serve_app's own files (a third-party package is named, not followed into). Reading
    beats importing here: an interpreter per question cost this file 25 s of CI."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for prefix in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if prefix in seen:
                continue
            seen.add(prefix)
            path = PACKAGE.parent.joinpath(*prefix.split("."))
            source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
            if not prefix.startswith("serve_app") or not source.exists():
                continue
            for node in _runs_at_import(ast.parse(source.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    todo.append(node.module)
                    todo += [f"{node.module}.{alias.name}" for alias in node.names]
                elif isinstance(node, ast.Import):
                    todo += [alias.name for alias in node.names]
    return seen


def test_the_reading_of_imports_agrees_with_a_real_import() -> None:
    """One real interpreter keeps the reading honest: every serve_app module a real import
    of the Ingress loads, the reading finds too."""
    real = {
        m for m in _imported_by("import serve_app.deployments.ingress") if m.startswith("serve_app")
    }
    assert len(real) > 20
    assert real <= _loaded_at_import("serve_app.deployments.ingress")


@pytest.mark.parametrize(
    "module",
    [
        "serve_app.scoring.answers",
        "serve_app.scoring.scorer",
        "serve_app.api.validation",
        "serve_app.api.deps",
        "serve_app.stores",
        "serve_app.jobs",
        "serve_app.feature_lookup",
    ],
)
def test_the_core_runs_without_ray(module: str) -> None:
    assert "ray" not in _loaded_at_import(module)
    assert "ray" in _loaded_at_import("serve_app.deployments.model")  # the reading sees it


def test_replicas_never_import_offline_code() -> None:
    deployments = [p.stem for p in (PACKAGE / "deployments").glob("[!_]*.py")]
    assert len(deployments) == 4
    for name in deployments:
        loaded = _loaded_at_import(f"serve_app.deployments.{name}")
        assert not {m for m in loaded if m.startswith("serve_app.offline")}, name
    assert "serve_app.offline.artifacts" in _loaded_at_import("serve_app.app")  # it sees it


@pytest.mark.parametrize("deployment", ["ingress", "feature_fetcher", "job_worker"])
def test_only_the_model_replica_imports_scikit_learn(deployment: str) -> None:
    """scikit-learn costs about 3 s of CPU per import: every replica start (autoscaling, a
    crashed replica's replacement) of a deployment that never scores would pay it."""
    assert "sklearn" not in _loaded_at_import(f"serve_app.deployments.{deployment}")
    assert "sklearn" in _loaded_at_import("serve_app.deployments.model")  # the probe sees it


def test_keygen_does_not_import_ray_fastapi_or_sklearn(tmp_path: Path) -> None:
    config = PACKAGE.parent / "configs" / "config.yaml"
    code = f"from serve_app.offline import cli\ncli.main(['keygen', '--config', {str(config)!r}])"
    heavy = _imported_by(code, cwd=tmp_path) & {"ray", "fastapi", "sklearn", "pandas", "httpx"}
    assert heavy == set()
    for secret in (".secrets/api_keys", ".secrets/webhook_secret"):
        assert (tmp_path / secret).stat().st_mode & 0o777 == 0o600
