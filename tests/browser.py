"""Open a local HTML file in headless Chromium (Debian's ``chromium``) and report what a user's browser would show:
console messages and errors, every image's decoded size, element ids, and a screenshot.

Driven over the DevTools protocol with the ``websockets`` package (no browser download, no node): Chromium is
started with ``--remote-debugging-port=0`` in a fresh profile, writes the port it picked to
``DevToolsActivePort``, and we talk to one page target.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--window-size=1280,900"]

CHECK_JS = """(() => ({
  images: Array.from(document.images).map(i => ({id: i.id, alt: i.alt, complete: i.complete,
                                                   w: i.naturalWidth, h: i.naturalHeight})),
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
  title: document.title,
  external: Array.from(document.querySelectorAll('[src],[href]')).map(e => e.getAttribute('src') ||
            e.getAttribute('href')).filter(u => !u.startsWith('data:') && !u.startsWith('#')),
  height: document.documentElement.scrollHeight,
}))()"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Page:
    def __init__(self, ws):
        self.ws, self.next_id, self.events = ws, 0, []

    def call(self, method: str, **params):
        self.next_id += 1
        my = self.next_id
        self.ws.send(json.dumps({"id": my, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == my:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60):
        end = time.monotonic() + timeout
        for e in self.events:
            if e.get("method") == method:
                return e
        while time.monotonic() < end:
            msg = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            self.events.append(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(method)


def open_page(html_path: Path, screenshot: Path) -> dict:
    """Load ``html_path`` from disk; return ``{"console", "errors", "images", "ids", "external", ...}`` and write
    a full-page PNG to ``screenshot``."""
    from websockets.sync.client import connect

    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found (apt-get install chromium)")
    profile = Path(tempfile.mkdtemp(prefix="finetune-chromium-"))
    proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("chromium did not start (no DevToolsActivePort)")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        with connect(page_ws, max_size=2**28, open_timeout=30) as ws:
            page = _Page(ws)
            for domain in ("Page", "Runtime", "Log"):
                page.call(f"{domain}.enable")
            page.events.clear()
            page.call("Page.navigate", url=html_path.resolve().as_uri())
            page.wait_for("Page.loadEventFired")
            found = page.call("Runtime.evaluate", expression=CHECK_JS, returnByValue=True)["result"]["value"]
            shot = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            console = [e["params"] for e in page.events if e.get("method") == "Runtime.consoleAPICalled"]
            errors = ([e["params"]["exceptionDetails"] for e in page.events
                       if e.get("method") == "Runtime.exceptionThrown"]
                      + [e["params"]["entry"] for e in page.events if e.get("method") == "Log.entryAdded"
                         and e["params"]["entry"]["level"] in ("error", "warning")]
                      + [c for c in console if c["type"] in ("error", "warning", "assert")])
            return {**found, "console": console, "errors": errors}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def required() -> bool:
    """In CI (``CI=true``) a missing Chromium is a failure, not a skip: .ci/run installs it."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
