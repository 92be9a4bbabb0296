"""Logs and metrics ops can read: request ids, Celery worker and beat as JSON lines with task
ids, HTTP/database metrics of the web tier and task metrics served by the worker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings
from prometheus_client import REGISTRY, generate_latest

from tests.helpers import free_port, wait_until
from tests.streaming.engine.runtime_helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


# --- request ids ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_request_id_is_taken_when_well_formed_made_otherwise_and_logged(client, caplog):
    response = client.get("/health/live", HTTP_X_REQUEST_ID="lb-7f3a9c21")
    assert response["X-Request-ID"] == "lb-7f3a9c21"

    for forged in ("", "x" * 65, 'abc12345" "event": "fake', "abc12345\nlevel=error"):
        made = client.get("/health/live", HTTP_X_REQUEST_ID=forged)["X-Request-ID"]
        assert made != forged and len(made) == 32
    caplog.clear()
    made = client.get("/health/live")["X-Request-ID"]
    finished = [
        r.msg for r in caplog.records
        if isinstance(r.msg, dict) and r.msg.get("event") == "request_finished"
    ]
    assert finished and finished[-1]["request_id"] == made
    assert finished[-1]["request"] == "GET /health/live"


# --- web tier metrics ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_http_and_database_metrics_of_the_web_tier(client):
    client.get("/health/ready")
    client.get("/health/ready")
    text = generate_latest(REGISTRY).decode()
    ready = [
        line for line in text.splitlines()
        if line.startswith("django_http_responses_total_by_status_view_method_total{")
        and 'view="streaming:health-ready"' in line
    ]
    assert ready and float(ready[0].rsplit(" ", 1)[1]) >= 2
    assert 'django_db_execute_total{alias="default",vendor="postgresql"}' in text
    assert "django_http_requests_latency_seconds_by_view_method_bucket" in text


# --- Celery worker and beat ----------------------------------------------------------------------


def _json_lines(path: Path) -> list[dict]:
    """Every line of a process's stderr, each of which must be one JSON object."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    bad = []
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            bad.append(line)
    assert not bad, f"non-JSON log lines: {bad[:5]}"
    return parsed


def _scrape(port: int, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except urllib.error.URLError:  # not listening yet
        return 0, ""


def _celery(args: list[str], *, env: dict[str, str], tmp_path: Path, name: str):
    stderr = (tmp_path / f"{name}.err").open("wb")
    stdout = (tmp_path / f"{name}.out").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tickerproj", *args],
        cwd=ROOT, env=env, stdout=stdout, stderr=stderr,
    )
    stderr.close()
    stdout.close()
    return proc, tmp_path / f"{name}.err"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.django_db(transaction=True)
def test_the_worker_logs_json_with_task_ids_and_serves_task_metrics(redis_client, tmp_path):
    from accounts.tasks import expire_sessions

    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    port = free_port()
    env = subprocess_env(
        LOG_JSON="true", LOG_LEVEL="INFO", CELERY_METRICS_PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    worker, stderr = _celery(
        ["worker", "--pool", "prefork", "--concurrency", "1", "-n", f"obs-{port}@%h"],
        env=env, tmp_path=tmp_path, name="worker",
    )
    try:
        wait_until(lambda: _scrape(port, settings.OPS_TOKEN)[0] == 200 or worker.poll() is not None,
                   timeout_s=90, what="the worker's metrics endpoint")
        assert worker.poll() is None, stderr.read_text()[-3000:]
        result = expire_sessions.apply_async()
        assert result.get(timeout=90) == {"expired": []}

        def counted():
            status, text = _scrape(port, settings.OPS_TOKEN)
            lines = (
                'tickerproj_celery_tasks_total{outcome="succeeded",task="accounts.expire_sessions"} 1.0',
                'tickerproj_celery_task_duration_seconds_count{task="accounts.expire_sessions"} 1.0',
            )
            return status == 200 and all(line in text for line in lines)

        wait_until(counted, timeout_s=30, what="the task counted and timed in the worker's metrics")
        assert _scrape(port, None)[0] == 403
        assert _scrape(port, "wrong-token")[0] == 403
    finally:
        _stop(worker)
    lines = _json_lines(stderr)
    task_lines = [line for line in lines if line.get("task_id") == result.id]
    assert task_lines, "no log line carries the task id"
    assert any(line["event"] == "task_succeeded" for line in task_lines)
    assert any("ready" in line["event"] for line in lines)  # Celery's own lines, as JSON


@pytest.mark.django_db(transaction=True)
def test_beat_logs_json(redis_client, tmp_path):
    env = subprocess_env(LOG_JSON="true", LOG_LEVEL="INFO")
    beat, stderr = _celery(
        ["beat", "--schedule", str(tmp_path / "beat-schedule")], env=env, tmp_path=tmp_path, name="beat"
    )
    try:
        wait_until(lambda: "Starting" in stderr.read_text() or beat.poll() is not None,
                   timeout_s=90, what="beat started")
        assert beat.poll() is None, stderr.read_text()[-3000:]
        time.sleep(0.5)  # let the start-up lines after "Starting" land too; all are checked
    finally:
        _stop(beat)
    lines = _json_lines(stderr)
    assert any("Starting" in line["event"] and line["logger"] == "celery.beat" for line in lines)
