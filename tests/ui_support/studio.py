"""The local Studio as a user starts it (``python -m pipelines.run ui --port 0``), and headless Chromium."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 900}
#: Where :func:`screenshot` writes: ``$MLOPS_UI_SCREENSHOTS`` (``make screenshots`` sets it to docs/ui, the pictures
#: the README and docs/UI.md show), else a temporary folder, so that a test run leaves the checkout as it found it.
SCREENSHOTS_ENV = "MLOPS_UI_SCREENSHOTS"
_screenshots: Path | None = None


def screenshots_dir() -> Path:
    global _screenshots
    if _screenshots is None:
        chosen = os.environ.get(SCREENSHOTS_ENV)
        _screenshots = Path(chosen).resolve() if chosen else Path(tempfile.mkdtemp(prefix="mlops-ui-screenshots-"))
    return _screenshots


class Studio:
    """``python -m pipelines.run ui --port 0`` in a subprocess; ``url`` once it listens."""

    def __init__(self, env: dict[str, str] | None = None, timeout: float = 180.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.run", "ui", "--port", "0"], cwd=ROOT,
                                     env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0].startswith("http://127.0.0.1:"):
            self.close()
            raise RuntimeError(f"the UI did not start: {line!r}\n{''.join(self.stderr[-40:])}")
        self.url = line[0].strip()

    def _drain(self) -> None:
        for text in self.proc.stderr:
            self.stderr.append(text)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def offline_page(browser: Any, external: list[str]) -> Any:
    """A page whose requests may only go to 127.0.0.1 (anything else is aborted and recorded)."""
    page = browser.new_page(viewport=VIEWPORT)

    def guard(route: Any) -> None:
        target = route.request.url
        if target.startswith(("http://127.0.0.1:", "blob:", "data:")):
            route.continue_()
        else:
            external.append(target)
            route.abort()

    page.route("**/*", guard)
    return page


def screenshot(page: Any, name: str, settle_ms: int = 300) -> Path:
    """Full-page screenshot (1280 px wide) to ``<screenshots_dir()>/<name>.png``. The viewport is stretched to the
    page's height for it: Chromium's ``full_page`` capture leaves sandboxed iframes (the profiler report) blank."""
    folder = screenshots_dir()
    folder.mkdir(parents=True, exist_ok=True)
    height = min(12_000, int(page.evaluate("document.documentElement.scrollHeight")))
    page.set_viewport_size({"width": VIEWPORT["width"], "height": max(VIEWPORT["height"], height)})
    try:
        page.wait_for_timeout(settle_ms)
        path = folder / f"{name}.png"
        page.screenshot(path=str(path))
    finally:
        page.set_viewport_size(VIEWPORT)
    return path


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:.0f} s")
        time.sleep(interval)
