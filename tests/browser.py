"""Open a page in headless Chromium (Debian's package) and report what a reader's browser saw.

Driven over the Chrome DevTools Protocol with the ``websockets`` client, so the checks are the
browser's own: console messages and uncaught exceptions as DevTools reports them, each image's
``naturalWidth`` after load, every link's target, and a full-page screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


def find_browser() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageCheck:
    console_errors: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    title: str = ""


class DevToolsPage:
    """One page target; ``call`` sends a command and returns its result, keeping events."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        ident = self.next_id
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, event: str, timeout: float = 60.0) -> None:
        if any(e.get("method") == event for e in self.events):
            return
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            self.events.append(message)
            if message.get("method") == event:
                return


@contextlib.contextmanager
def headless_browser(binary: str):
    profile = tempfile.mkdtemp(prefix="fedmsk-chromium-")
    args = [
        binary,
        "--headless=new",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--allow-file-access-from-files",
        "about:blank",
    ]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium refuses root without it (CI runs as root)
    process = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        endpoint = None
        deadline = time.monotonic() + 60
        assert process.stderr is not None
        while endpoint is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line and process.poll() is not None:
                break
            found = LISTENING.search(line)
            endpoint = found.group(1) if found else None
        if endpoint is None:
            raise RuntimeError(f"{binary} did not open its DevTools port")
        yield endpoint.split("/devtools/")[0].replace("ws://", "http://")
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)


def _page_socket(http_base: str) -> str:
    with urllib.request.urlopen(f"{http_base}/json/list", timeout=30) as reply:
        targets = json.loads(reply.read())
    pages = [t for t in targets if t.get("type") == "page"]
    if not pages:
        raise RuntimeError("the browser has no page target")
    return str(pages[0]["webSocketDebuggerUrl"])


INSPECT = """
JSON.stringify({
  title: document.title,
  images: Array.from(document.images).map(i => ({
    alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
    src: i.currentSrc.slice(0, 40)})),
  links: Array.from(document.querySelectorAll('a[href], link[href], script[src]'))
    .map(e => e.href || e.src)
})
"""


def check_page(binary: str, page: Path, screenshot: Path) -> PageCheck:
    """Load ``page`` from disk; return console errors, images and links; save a screenshot."""
    from websockets.sync.client import connect

    with (
        headless_browser(binary) as base,
        connect(_page_socket(base), max_size=64 * 1024 * 1024, open_timeout=30) as socket,
    ):
        tab = DevToolsPage(socket)
        for domain in ("Page", "Runtime", "Log"):
            tab.call(f"{domain}.enable")
        tab.call(  # a desktop browser window, not headless Chromium's 800 px default
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        tab.call("Page.navigate", url=page.resolve().as_uri())
        tab.wait_for("Page.loadEventFired")
        found = json.loads(
            tab.call("Runtime.evaluate", expression=INSPECT, returnByValue=True)["result"]["value"]
        )
        metrics = tab.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = tab.call(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={
                "x": 0,
                "y": 0,
                "width": min(float(size["width"]), 1600.0),
                "height": min(float(size["height"]), 12000.0),
                "scale": 1,
            },
        )
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        errors = _console_errors(tab.events)
    return PageCheck(
        console_errors=errors,
        images=list(found["images"]),
        links=list(found["links"]),
        title=str(found["title"]),
    )


def _console_errors(events: list[dict[str, Any]]) -> list[str]:
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(
                " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append(str(details.get("exception", {}).get("description") or details))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            errors.append(str(params["entry"].get("text")))
    return errors
