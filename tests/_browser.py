"""A real headless Chromium, driven over the DevTools protocol, to look at pages as a user would.

Debian's ``chromium-headless-shell`` (or ``chromium``) is installed by the test setup; tests that
need it skip with the install command when neither is present (never silently pass). The driver
is the DevTools websocket itself (``websockets``, in the dev extra): open a
page, wait until it has loaded, evaluate JavaScript in it, take a screenshot.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

BINARIES = ("chromium-headless-shell", "chromium", "chromium-browser")


def chromium_binary() -> str:
    for name in BINARIES:
        path = shutil.which(name) or (
            f"/usr/lib/chromium/{name}" if Path(f"/usr/lib/chromium/{name}").exists() else None
        )
        if path:
            return path
    pytest.skip("no Chromium found; install it with: apt-get install chromium-headless-shell (make setup does)")


class Browser:
    """One headless Chromium process with one page; use as a context manager."""

    def __init__(self) -> None:
        self._profile = Path(tempfile.mkdtemp(prefix="mergeopt-chromium-"))
        self._proc = subprocess.Popen(
            [
                chromium_binary(),
                "--headless",
                "--no-sandbox",  # tests run as root in containers
                "--disable-gpu",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={self._profile}",
                "--window-size=1280,2000",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own process group: Debian's launcher is a wrapper script, and the browser's
            # zygote/renderer processes must all go when the test ends.
            start_new_session=True,
        )
        port_file = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.is_file() or len(port_file.read_text().splitlines()) < 2:
            if time.monotonic() > deadline or self._proc.poll() is not None:
                self.close()
                raise RuntimeError("Chromium did not open its DevTools port within 30 s")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        from websockets.sync.client import connect

        self._ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=10).__enter__()
        self._ids = itertools.count(1)
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def _call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self._ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str, timeout: float = 30) -> None:
        """Navigate and wait until the document and its images have loaded."""
        self._call("Page.enable", session=self._session)
        self._call("Page.navigate", {"url": url}, session=self._session)
        deadline = time.monotonic() + timeout
        while self.eval("document.readyState") != "complete":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading in {timeout} s")
            time.sleep(0.1)

    def eval(self, expression: str) -> Any:
        result = self._call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=self._session
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        data = self._call(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=self._session
        )
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def close(self) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            ws.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self._proc.wait(timeout=10)
                time.sleep(0.2)  # let the rest of the group exit after the launcher
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
