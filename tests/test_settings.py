"""One settings module: embedded defaults with no environment, real services with URLs."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, django
from django.conf import settings
django.setup()
db = settings.DATABASES["default"]
print(json.dumps({
    "engine": db["ENGINE"], "pool": "pool" in db.get("OPTIONS", {}),
    "layer": settings.CHANNEL_LAYERS["default"]["BACKEND"], "broker": settings.CELERY_BROKER_URL,
    "tz": settings.TIME_ZONE, "keys": len(settings.FIELD_ENCRYPTION_KEYS),
    "api_root": settings.KITE_API_ROOT, "ws": settings.KITE_WS_URL,
}))
"""
BASE_ENV = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}


def _settings(env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT, env={**BASE_ENV, "DJANGO_SETTINGS_MODULE": "tickerproj.settings", **env},
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_embedded_defaults_need_no_environment(tmp_path):
    found = _settings({"TICKERPROJ_VAR_DIR": str(tmp_path)})
    assert found["engine"] == "django.db.backends.sqlite3"
    assert found["layer"] == "channels.layers.InMemoryChannelLayer"
    assert found["tz"] == "Asia/Kolkata"
    assert found["keys"] == 1
    assert found["api_root"] == "https://api.kite.trade"
    assert found["ws"] == "wss://ws.kite.trade"
    # The generated secrets are kept private and stable across restarts.
    assert oct((tmp_path / "field_encryption_key").stat().st_mode & 0o777) == "0o600"
    assert _settings({"TICKERPROJ_VAR_DIR": str(tmp_path)}) == found


def test_urls_switch_to_postgres_pool_redis_and_the_simulator(tmp_path):
    found = _settings(
        {
            "TICKERPROJ_VAR_DIR": str(tmp_path),
            "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test",
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "SECRET_KEY": "x",
            "FIELD_ENCRYPTION_KEYS": "mm3JPTf9TRR7OBOOigZVYZMNBLNeIIxHivuB6kCvdHE=",
            "KITE_API_ROOT": "http://127.0.0.1:8600",
            "KITE_WS_URL": "ws://127.0.0.1:8600/ws",
        }
    )
    # Django's PostgreSQL backend, instrumented for /metrics.
    assert found["engine"] == "django_prometheus.db.backends.postgresql" and found["pool"]
    assert found["layer"] == "channels_redis.core.RedisChannelLayer"
    assert found["broker"] == "redis://127.0.0.1:6379/0"
    assert found["api_root"] == "http://127.0.0.1:8600"


def test_production_without_keys_refuses_to_start(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
        env={**BASE_ENV, "DJANGO_SETTINGS_MODULE": "tickerproj.settings",
             "TICKERPROJ_VAR_DIR": str(tmp_path),
             "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test", "SECRET_KEY": "x"},
    )
    assert result.returncode != 0
    assert "FIELD_ENCRYPTION_KEYS must be set" in result.stderr
