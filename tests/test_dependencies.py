"""The resolved dependency set works: kiteconnect 5 and daphne 4 on one autobahn.

kiteconnect 5 pins autobahn 19.11.2 while daphne 4 needs >= 22.4.2; pyproject.toml overrides
the pin. These tests prove that both sides run on the autobahn we resolved.
"""

import base64
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import requests
from kiteconnect import KiteConnect, KiteTicker

from tests.fixtures import KITE_MOCKS
from tests.helpers import free_port

MOCKS = KITE_MOCKS
ROOT = Path(__file__).resolve().parents[1]


def test_resolved_versions_are_the_current_majors():
    assert version("kiteconnect").startswith("5.")
    assert int(version("daphne").split(".")[0]) >= 4
    assert tuple(int(p) for p in version("autobahn").split(".")[:2]) >= (22, 4)


class _MockKite(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (MOCKS / "profile.json").read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_kiteconnect_rest_client_runs_on_the_resolved_autobahn():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MockKite)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        kite = KiteConnect("key", access_token="token", root=f"http://127.0.0.1:{server.server_port}")
        profile = kite.profile()
    finally:
        server.shutdown()
    assert profile["user_id"] == json.loads((MOCKS / "profile.json").read_text())["data"]["user_id"]


def test_kiteticker_parser_runs_on_the_resolved_autobahn():
    packet = base64.b64decode((MOCKS / "ticker_quote.packet").read_text().strip())
    frame = (1).to_bytes(2, "big") + len(packet).to_bytes(2, "big") + packet
    ticker = KiteTicker("key", "token")
    ticks = ticker._parse_binary(frame)
    assert ticks[0]["instrument_token"] == 408065


@pytest.mark.django_db(transaction=True)
def test_daphne_serves_the_project_on_the_resolved_autobahn(settings):
    port = free_port()
    env = dict(os.environ, DATABASE_URL=_test_database_url(settings))
    proc = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "tickerproj.asgi:application"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = requests.get(f"http://127.0.0.1:{port}/admin/login/", timeout=2)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        assert response.status_code == 200
        assert "Django administration" in response.text
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _test_database_url(settings) -> str:
    db = settings.DATABASES["default"]
    return f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


def test_make_install_gives_the_runtime_without_dev_only_packages(tmp_path):
    """L9 (docs/security.md): what `make run` installs holds no test tooling."""
    venv = tmp_path / "venv"
    # As on a fresh shell: the machine's python3, not this test run's virtualenv.
    path = [p for p in os.environ["PATH"].split(os.pathsep) if not p.startswith(sys.prefix)]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(PATH=os.pathsep.join(path), UV_PROJECT_ENVIRONMENT=str(venv))
    result = subprocess.run(["make", "install"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    site = next((venv / "lib").glob("python3*/site-packages"))
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"django", "daphne", "channels", "numpy"} <= installed
    for dev_only in ("vollib", "py_vollib", "pytest", "playwright", "hypothesis", "ruff"):
        assert dev_only not in installed, f"{dev_only} is in the runtime environment"
    # And the runtime works without them: Django loads the project.
    subprocess.run(
        [str(venv / "bin" / "python"), "manage.py", "check"], cwd=ROOT, check=True,
        capture_output=True, timeout=300,
        env={**os.environ, "TICKERPROJ_VAR_DIR": str(tmp_path / "var"), "DATABASE_URL": ""},
    )
