"""Takes the chain page's screenshots in docs/ (``make screenshots``).

Runs ``manage.py demo`` (embedded defaults, mock market) in a scratch folder on a free port,
logs in through the login form in Debian's headless Chromium (the browser tests' launch) and
waits until the analytics header, every chart and at least ``--bars`` closed 1-minute bars are
there, then saves:

- ``docs/chain-page.png``: the page as a trader opens it (analytics, charts, the chain's top);
- ``docs/chain-charts.png``: the six charts alone, larger.

The bars close once a minute of the demo's clock, so the default of 4 bars takes 4-5 minutes.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PLOTS = ("chart-smile", "chart-oi", "chart-oi-change", "chart-term", "chart-series", "chart-candles")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen, deadline_s: float) -> None:
    import urllib.request

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"manage.py demo exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "health/live", timeout=2)  # noqa: S310 (loopback)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"manage.py demo did not answer at {url} within {deadline_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=4, help="closed 1-minute bars to wait for")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for everything")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tickerproj-screens-") as var_dir:
        port = free_port()
        env = {
            **os.environ,
            "TICKERPROJ_VAR_DIR": var_dir,
            "DATABASE_URL": "",
            "REDIS_URL": "",
            "LOG_LEVEL": "WARNING",
        }
        log = open(Path(var_dir) / "demo.log", "wb")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(  # noqa: S603 (this checkout's manage.py)
            [sys.executable, "manage.py", "demo", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}/"
        try:
            wait_for_server(base, proc, 180)
            password = (Path(var_dir) / "demo_password").read_text().strip()
            shoot(base, password, bars=args.bars, timeout_ms=args.timeout * 1000)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            log.close()


def shoot(base: str, password: str, *, bars: int, timeout_ms: float) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1250})
            page.goto(base)
            page.fill("#id_username", "demo")
            page.fill("#id_password", password)
            page.click("input[type=submit]")
            page.wait_for_selector("#chain-body tr[data-strike]", timeout=timeout_ms)
            page.wait_for_function(
                """([plots, bars]) => plots.every(id => +document.getElementById(id).dataset.points > 0)
                     && +document.getElementById("chart-candles").dataset.points >= bars
                     && document.querySelector('#analytics dd[data-summary=max_pain]').textContent !== "—"
                """,
                arg=[list(PLOTS), bars],
                timeout=timeout_ms,
                polling=1000,
            )
            # The page scrolls the ATM row into view; the pictures start at the top.
            page.evaluate("window.scrollTo(0, 0)")
            draws = page.get_attribute("#chart-smile", "data-draws")
            page.wait_for_function(
                "d => document.getElementById('chart-smile').dataset.draws !== d",
                arg=draws, timeout=timeout_ms,
            )
            page.screenshot(path=DOCS / "chain-page.png")
            # A clip of the viewport, not an element shot: that would scroll the charts under
            # the sticky header.
            page.screenshot(path=DOCS / "chain-charts.png", clip=page.locator("section.charts").bounding_box())
        finally:
            browser.close()
    sys.stdout.write(f"wrote {DOCS / 'chain-page.png'} and {DOCS / 'chain-charts.png'}\n")


if __name__ == "__main__":
    main()
