"""Screenshot the Ray dashboard's Serve page with headless Chromium (Debian's package).

    .venv/bin/python -m tests.screenshots.serve_page --out docs/ray-dashboard-serve.png

The dashboard asks for Ray's token (``ray get-auth-token``); it reads it from the
``ray-authentication-token`` cookie, which this sets through the Chrome DevTools Protocol
before opening ``/#/serve``. Prints the page's visible text, so a caller can check what
it showed. Needs a running app (``serve run configs/config.yaml``).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

COOKIE = "ray-authentication-token"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1440,1000",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _token() -> str:
    ray = Path(sys.executable).with_name("ray")
    out = subprocess.run([str(ray), "get-auth-token"], capture_output=True, text=True)
    return out.stdout.strip()


class _Cdp:
    """The smallest DevTools client: send a command, wait for its answer."""

    def __init__(self, websocket_url: str) -> None:
        self._ws = connect(websocket_url, max_size=64 * 2**20, open_timeout=30)
        self._ids = itertools.count(1)

    def __call__(self, method: str, **params: Any) -> dict[str, Any]:
        command_id = next(self._ids)
        self._ws.send(json.dumps({"id": command_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=60))
            if message.get("id") == command_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def close(self) -> None:
        self._ws.close()


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, which write nothing, do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _stop_group(browser: subprocess.Popen[bytes]) -> None:
    """SIGTERM Chromium's whole process group, SIGKILL what is left after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(browser.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            browser.poll()  # reap the leader
            if not _group_alive(browser.pid):
                break
            time.sleep(0.1)
        else:
            continue
        break
    browser.poll()


def _capture(port: int, dashboard: str, token: str, settle_s: float) -> tuple[Any, Any]:
    """Open the Serve page over DevTools; return its visible text and a PNG screenshot."""
    deadline = time.monotonic() + 30
    pages: list[dict[str, Any]] = []
    while not pages and time.monotonic() < deadline:
        try:
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
            pages = [t for t in targets if t["type"] == "page"]
        except httpx.HTTPError:
            time.sleep(0.3)
    if not pages:
        raise RuntimeError("Chromium's DevTools endpoint did not come up")
    cdp = _Cdp(pages[0]["webSocketDebuggerUrl"])
    try:
        cdp("Network.enable")
        cdp("Network.setCookie", name=COOKIE, value=token, url=dashboard, path="/")
        cdp("Page.enable")
        cdp("Page.navigate", url=f"{dashboard}/#/serve")
        time.sleep(settle_s)  # the page polls the Serve API and renders
        text = cdp("Runtime.evaluate", expression="document.body.innerText")["result"]
        shot = cdp("Page.captureScreenshot", format="png")
    finally:
        cdp.close()
    return text, shot


def screenshot(dashboard: str, token: str, out: Path, settle_s: float = 8.0) -> str:
    """Save the Serve page as PNG at ``out``; return the page's visible text."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("headless Chromium is needed: apt-get install chromium")
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="serve-page-chromium-")
    # Its own session, so that stopping it stops its renderer, GPU and crashpad helpers
    # too: a helper left writing to the profile made removing the profile fail (CI).
    browser = subprocess.Popen(
        [chromium, *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        text, shot = _capture(port, dashboard, token, settle_s)
    finally:
        _stop_group(browser)
        shutil.rmtree(profile, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(shot["data"]))
    return str(text.get("value", ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dashboard", default="http://127.0.0.1:8265")
    parser.add_argument("--token", default=None, help="default: `ray get-auth-token`")
    parser.add_argument("--out", type=Path, default=Path("docs/ray-dashboard-serve.png"))
    args = parser.parse_args(argv)
    print(screenshot(args.dashboard, args.token or _token(), args.out))


if __name__ == "__main__":
    main()
