"""Under the lock file, the example model is one known model (no Ray; about 10 s).

The example model is trained deterministically, but its bytes depend on the library versions
(NumPy, SciPy, scikit-learn, joblib, pandas) and on the number of OpenMP threads. This test
builds it as a user would (``serve-app build``, default example settings, one thread) and
compares it with ``tests/image/expected_model.json``, which the image test also checks the
served score against.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from record_expected_model import EXPECTED, build_example  # noqa: E402

HOW_TO_RERECORD = (
    "The example model changed: the lock file (requirements.lock), the installed versions "
    "(install with `pip install -c requirements.lock -e '.[test]'`) or the training code "
    "(datagen, features, artifact) differ from when it was recorded. If the change is "
    "deliberate, re-record with `.venv/bin/python tests/image/record_expected_model.py --write` "
    "and commit tests/image/expected_model.json with it."
)


@pytest.mark.timeout(600)
def test_example_model_fingerprint(tmp_path: Path) -> None:
    expected = json.loads(EXPECTED.read_text())
    metadata = build_example(tmp_path)
    got = {"version": metadata["version"], "sha256": metadata["sha256"]}
    want = {"version": expected["version"], "sha256": expected["sha256"]}
    assert got == want, f"{HOW_TO_RERECORD}\nexpected {want}\ngot      {got}"


@pytest.mark.parametrize("config", ["docker.yaml", "cluster.yaml"])
def test_image_configs_pin_the_recorded_model(config: str) -> None:
    """The image's configs refuse an unpinned model, so their pin must be the built one."""
    import yaml

    expected = json.loads(EXPECTED.read_text())["sha256"]
    document = yaml.safe_load((HERE.parents[1] / "configs" / config).read_text())
    pinned = document["applications"][0]["args"]["artifacts"].get("sha256")
    assert pinned == expected, (
        f"configs/{config} pins {pinned}, the recorded example model is {expected}: "
        "re-pin after re-recording"
    )
