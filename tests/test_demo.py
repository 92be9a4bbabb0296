"""The README's run command as a new user meets it: ``manage.py demo`` on a fresh var dir, with
no PostgreSQL or Redis in its environment, serves a login and a live option chain.

Drives the demo as a subprocess: waits for its banner, logs in through the admin form, opens
the chain page, then follows the page's own WebSocket with the session cookie and sees the
mock market's Greeks change. Stops it with SIGINT (clean exit), starts it again on the same
var dir and gets the same password.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
import websockets

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
BANNER = re.compile(r"Open (http://127\.0\.0\.1:(\d+)/) and log in as (\S+) / (\S+)")
STARTUP_S = 180  # a fresh SQLite schema plus numba's first compile on a busy 2-core machine
# What a fresh machine has: none of the test suite's service URLs or keys.
SCRUBBED = ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "FIELD_ENCRYPTION_KEYS",
            "TEST_DATABASE_NAME", "CHANNEL_LAYER_PREFIX", "DJANGO_SETTINGS_MODULE")


class Demo:
    """One ``manage.py demo`` subprocess and what it printed."""

    def __init__(self, var_dir: Path, port: int, log_path: Path) -> None:
        self.var_dir = var_dir
        self.port = port
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.stdout: list[str] = []

    async def start(self) -> tuple[str, str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        env.update(TICKERPROJ_VAR_DIR=str(self.var_dir), LOG_JSON="false")
        self._log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "manage.py", "demo", "--port", str(self.port),
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=self._log,
        )  # fmt: skip
        assert self.proc.stdout is not None
        async with asyncio.timeout(STARTUP_S):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                assert line, f"demo exited before its banner: {self.stdout} (log {self.log_path})"
                self.stdout.append(line)
                if m := BANNER.search(line):
                    return m.group(1), m.group(3), m.group(4)

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            rest = await self.proc.stdout.read()
        self.stdout.append(rest.decode())
        code = await self.proc.wait()
        self._log.close()
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def demo(tmp_path):
    d = Demo(tmp_path / "var", free_port(), tmp_path / "demo.log")
    yield d
    await d.kill()


async def login(http: aiohttp.ClientSession, base: str, username: str, password: str) -> str:
    """Log in through the login form as a browser would; returns the chain page's HTML."""
    async with http.get(base) as resp:
        assert resp.status == 200
        assert "/accounts/login/" in str(resp.url), "the chain page requires a login"
        html = await resp.text()
        login_url = str(resp.url)
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)
    form = {"csrfmiddlewaretoken": csrf, "username": username, "password": password, "next": "/"}
    async with http.post(login_url, data=form, headers={"Referer": login_url}) as resp:
        assert resp.status == 200
        assert str(resp.url) == base, f"login did not land on the chain page: {resp.url}"
        return await resp.text()


@pytest.mark.heavy
async def test_demo_serves_a_live_chain_page_on_embedded_defaults(demo):
    base, username, password = await demo.start()
    assert base == f"http://127.0.0.1:{demo.port}/" and username == "demo"
    assert (demo.var_dir / "tickerproj.sqlite3").exists(), "SQLite in the fresh var dir"

    jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address host
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        html = await login(http, base, username, password)
        assert 'id="chain-body"' in html
        config = json.loads(
            re.search(r'<script id="chain-config" type="application/json">(.*?)</script>', html, re.S).group(1)
        )
        assert config["underlying"] == "NIFTY" and config["expiry"]
        session = {c.key: c.value for c in jar}["sessionid"]
        async with http.get(base + "health") as resp:
            assert resp.status in (200, 503)
            assert "status" in await resp.json()

    ws_url = f"ws://127.0.0.1:{demo.port}/ws/v1/"
    async with websockets.connect(
        ws_url,
        additional_headers={"Cookie": f"sessionid={session}", "Origin": base.rstrip("/")},
        subprotocols=["tickerproj.v1"],
    ) as ws:
        hello = orjson.loads(await ws.recv())
        assert hello["type"] == "hello" and hello["user"] == "demo" and hello["auth"] == "session"
        await ws.send(orjson.dumps({
            "action": "subscribe", "id": "page",
            "chain": {"underlying": config["underlying"], "expiry": config["expiry"],
                      "strikes_around_atm": config["strikesAroundAtm"]},
        }).decode())  # fmt: skip
        seen: dict[int, set[tuple]] = {}
        changed = None
        async with asyncio.timeout(60):
            while changed is None:
                msg = orjson.loads(await ws.recv())
                if msg["type"] == "subscribed":
                    assert len(msg["instruments"]) == 2 * (2 * config["strikesAroundAtm"] + 1)
                    assert all(i["streamed"] for i in msg["instruments"])
                    continue
                if msg["type"] == "analytics":  # the chain's analytics, from the same market
                    assert msg["summary"]["is_mock"] is True
                    continue
                if msg["type"] == "analytics_series":
                    continue
                assert msg["type"] == "snapshots", msg
                for item in msg["data"]:
                    assert item["is_mock"] is True
                    if item["delta"] is None:
                        continue
                    greeks = (item["ltp"], item["iv"], item["delta"], item["gamma"], item["theta"])
                    seen.setdefault(item["token"], set()).add(greeks)
                    if len(seen[item["token"]]) > 1:
                        changed = item["token"]
                await ws.send(orjson.dumps({"action": "ack", "seq": msg["seq"]}).decode())
    assert changed is not None

    assert await demo.stop() == 0
    assert "Demo stopped." in "".join(demo.stdout)

    # A restart on the same var dir: same login, no second universe.
    again = Demo(demo.var_dir, free_port(), demo.log_path)
    try:
        _, username2, password2 = await again.start()
        assert (username2, password2) == (username, password)
        assert await again.stop() == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            await again.kill()


async def test_demo_refuses_to_run_against_a_configured_database(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env.update(
        TICKERPROJ_VAR_DIR=str(tmp_path),
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/nonexistent_demo_db",
        SECRET_KEY="x" * 50,
        FIELD_ENCRYPTION_KEYS="mm3JPTf9TRR7OBOOigZVYZMNBLNeIIxHivuB6kCvdHE=",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "manage.py", "demo", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode != 0
    assert b"embedded defaults only" in err


async def test_in_process_jobs_run_on_their_schedules_and_survive_a_failing_job():
    import datetime as dt

    from streaming.management.commands.demo import InProcessJobs
    from subscriptions.schedules import Cron, JobSchedule

    every = dt.timedelta(seconds=1)
    ok = JobSchedule(name="ok", task="t.ok", every=every, description="")
    bad = JobSchedule(name="bad", task="t.bad", every=every, description="")
    yearly = Cron(minute="0", hour="0", day_of_month="1", month_of_year="1")
    never = JobSchedule(name="never", task="t.never", every=yearly, description="")
    calls: list[str] = []
    enough = asyncio.Event()
    loop = asyncio.get_running_loop()

    def run_job(spec):  # in a worker thread, as the real jobs are
        calls.append(spec.name)
        if calls.count("bad") >= 3 and calls.count("ok") >= 3:
            loop.call_soon_threadsafe(enough.set)
        if spec.name == "bad":
            raise RuntimeError("boom")
        return {"ok": True}

    jobs = InProcessJobs([ok, bad, never], run_job=run_job, poll_s=0.05)
    stop = asyncio.Event()
    runner = asyncio.create_task(jobs.run(stop))
    async with asyncio.timeout(20):
        await enough.wait()
    stop.set()
    async with asyncio.timeout(5):
        await runner
    assert "never" not in calls  # not due until 1 January
    assert jobs.runs["bad"] >= 3  # a failure is logged, the job runs again when next due
