"""The image test's build starts as soon as the test run knows it will run it.

A cold build (a Debian base with mmdebstrap, then ``podman build``: packages downloaded
from the registries, unpacked, stripped) takes three to four minutes, mostly waiting on the
network and the disk. Started at collection at the lowest CPU priority (``nice 19``), it
fills the idle time of the other tests instead of adding to the run: the Ray tests keep
their CPU (a ``nice 19`` process gets about 1.5 % of a core another process wants), and
the image test, which runs last (tests/conftest.py), finds its layers cached.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "build_and_run.sh"
IMAGE_TEST = "test_image.py::test_image_builds_runs_and_stops"


@dataclass
class EarlyBuild:
    """The background ``BUILD_ONLY=1`` run of the script, its log and when it started."""

    process: subprocess.Popen[bytes]
    log: Path
    started: float

    def wait(self, timeout_s: float) -> str:
        """Wait for it; a one-line report (the image test then builds with the cache)."""
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            return f"early build still running after {timeout_s:.0f} s: stopped"
        elapsed = time.monotonic() - self.started
        return f"early build exited {code} after {elapsed:.0f} s (log {self.log})"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the whole build
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


_early: EarlyBuild | None = None


def as_root(command: list[str], **env: str) -> list[str] | None:
    """``command`` as root (podman build, chroot and mount need it): itself when we are
    root, through passwordless sudo otherwise (tests/run.sh supports a sudo user); None
    when neither is possible."""
    with_env = ["env", *(f"{k}={v}" for k, v in env.items()), *command]
    if os.geteuid() == 0:
        return with_env
    if shutil.which("sudo") is None:
        return None
    probe = subprocess.run(["sudo", "-n", "true"], capture_output=True, check=False)
    return ["sudo", "-n", *with_env] if probe.returncode == 0 else None


def can_build() -> bool:
    return shutil.which("podman") is not None and as_root(["true"]) is not None


def pytest_collection_finish(session: pytest.Session) -> None:
    global _early
    if _early is not None or session.config.option.collectonly or not can_build():
        return
    if not any(item.nodeid.endswith(IMAGE_TEST) for item in session.items):
        return
    log = Path(tempfile.mkdtemp(prefix="serve-app-early-build.")) / "build.log"
    command = as_root(["nice", "-n", "19", "bash", str(SCRIPT)], BUILD_ONLY="1")
    assert command is not None  # can_build() said so
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _early = EarlyBuild(process, log, time.monotonic())


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Nothing outlives the run: a build the image test never waited for is stopped."""
    if _early is not None:
        _early.stop()


@pytest.fixture
def early_build() -> EarlyBuild | None:
    """The build started at collection, if this run started one."""
    return _early
