"""Build the example model as the fingerprint test does and print (or --write) its fingerprint.

Re-record after a deliberate change of the lock file or of the training code:

    .venv/bin/python tests/image/record_expected_model.py --write

It runs ``serve-app build`` with the default example settings (100,000 entities, seed 7)
in a temp dir, single-threaded (``OMP_NUM_THREADS=1``: the boosted trees' float sums
depend on the number of OpenMP threads, so only a fixed count gives one model everywhere),
and records the model version, its sha256 and the score of entity E0000042 for the
context below, which ``tests/image/build_and_run.sh`` compares with the image's answer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "expected_model.json"
ENTITY = "E0000042"
CONTEXT = {"amount": 59.9, "channel": "web", "hour": 14}
# The example settings (the defaults of ArtifactConfig and StoreConfig), spelled out so that
# a change of defaults is a visible change here.
CONFIG_YAML = """\
applications:
  - name: serve_app
    import_path: serve_app.app:build_app
    args:
      artifacts: {model_dir: var/model, n_entities: 100000, seed: 7}
      store: {url: "sqlite:///var/features.db"}
"""


def serve_app_command() -> list[str]:
    """The ``serve-app`` entry point of the running interpreter's environment."""
    beside = Path(sys.executable).parent / "serve-app"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("serve-app")
    if found:
        return [found]
    raise FileNotFoundError("the serve-app entry point is not installed (pip install -e .)")


def build_example(workdir: Path) -> dict:
    """``serve-app build CONFIG --force`` in ``workdir``; returns the model's metadata."""
    config = workdir / "example.yaml"
    config.write_text(CONFIG_YAML)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*serve_app_command(), "build", str(config), "--force"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"serve-app build failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads((workdir / "var" / "model" / "metadata.json").read_text())


def score(workdir: Path) -> float:
    """predict_proba[:, 1] of ENTITY with CONTEXT, as the Model deployment computes it."""
    import joblib

    # --- package-internal import: fix this when serve_app's layout moves -----------------
    try:
        from serve_app.scoring.features import build_frame
    except ImportError:  # the layout before the package refactor
        from serve_app.features import build_frame
    # ---------------------------------------------------------------------------------------
    db = sqlite3.connect(f"file:{workdir / 'var' / 'features.db'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    row = db.execute("SELECT * FROM entities WHERE entity_id = ?", (ENTITY,)).fetchone()
    db.close()
    entity = {key: row[key] for key in row if key != "entity_id"}
    pipeline = joblib.load(workdir / "var" / "model" / "model.joblib")
    return round(float(pipeline.predict_proba(build_frame([entity], [CONTEXT]))[0, 1]), 6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {EXPECTED.name}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-app-fp-") as tmp:
        metadata = build_example(Path(tmp))
        expected = {
            "version": metadata["version"],
            "sha256": metadata["sha256"],
            f"score_{ENTITY}": score(Path(tmp)),
        }
    text = json.dumps(expected, indent=2) + "\n"
    print(text, end="")
    if args.write:
        EXPECTED.write_text(text)
        print(f"wrote {EXPECTED}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
