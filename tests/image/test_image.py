"""The Docker image, built and run end to end on this machine (tests/image/build_and_run.sh).

Slow (a cold build about 2-4 minutes, then start, calls, stop; about 1 minute with the build
cached) and needs root, podman and mmdebstrap (the script installs them with apt-get). The
build starts early, in the background, when the run collects this test (conftest.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.image.conftest import EarlyBuild, as_root

SCRIPT = Path(__file__).resolve().parent / "build_and_run.sh"
CHECKS = (
    "size",
    "no_build_config_in_image",
    "healthz",
    "predict",
    "model_version",
    "score",
    "job",
    "dashboard",
    "haproxy",
    "haproxy_private",
    "model_dir_readonly",
    "data_writable",
    "stop",
    "no_processes_left",
    "unmounted",
)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_image_builds_runs_and_stops(early_build: EarlyBuild | None) -> None:
    command = as_root(["bash", str(SCRIPT)])
    if command is None:  # never a skip: CI would stay green without the image ever built
        pytest.fail("needs root or passwordless sudo (podman build, chroot, mount)")
    if shutil.which("podman") is None:
        pytest.fail("podman not found: install the Debian package 'podman' (tests/run.sh does)")
    if early_build is not None:  # whatever it did, the run below builds (cached or not)
        print(early_build.wait(timeout_s=1200))
    done = subprocess.run(command, capture_output=True, text=True, timeout=1700, check=False)
    out = done.stdout
    report = f"exit {done.returncode}\n--- stdout\n{out}\n--- stderr (tail)\n{done.stderr[-6000:]}"
    print(report)
    assert done.returncode == 0, report
    verdicts = dict(re.findall(r"^CHECK (\S+) (ok|FAIL)", out, re.M))
    for name in CHECKS:
        assert verdicts.get(name) == "ok", f"check {name}: {verdicts.get(name)}\n{report}"
    assert re.search(r"^RESULT ok$", out, re.M), report
    size = re.search(r"^SIZE own_layers_mb=(\d+) total_mb=(\d+)", out, re.M)
    assert size and int(size.group(1)) <= 450, report
    assert re.search(r"^TIME build_s=[\d.]+ start_s=[\d.]+ stop_s=[\d.]+$", out, re.M), report
