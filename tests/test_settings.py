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
    "always_open": settings.MARKET_HOURS_ALWAYS_OPEN,
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
    assert found["always_open"] is False  # the real calendar unless asked otherwise
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
            "MARKET_HOURS_ALWAYS_OPEN": "true",
        }
    )
    assert found["always_open"] is True
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


SECURITY_PROBE = """
import json, django
from django.conf import settings
django.setup()
print(json.dumps({
    "proxy_ssl": getattr(settings, "SECURE_PROXY_SSL_HEADER", None),
    "hsts": settings.SECURE_HSTS_SECONDS, "ssl_redirect": settings.SECURE_SSL_REDIRECT,
    "backends": settings.AUTHENTICATION_BACKENDS, "middleware": settings.MIDDLEWARE[-1],
}))
"""

PRODUCTION_ENV = {
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test",
    "SECRET_KEY": "x",
    "FIELD_ENCRYPTION_KEYS": "mm3JPTf9TRR7OBOOigZVYZMNBLNeIIxHivuB6kCvdHE=",
}


def _run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
        env={**BASE_ENV, "DJANGO_SETTINGS_MODULE": "tickerproj.settings", **env},
    )


def test_an_invalid_encryption_key_refuses_to_start_naming_its_position(tmp_path):
    result = _run(PROBE, {**PRODUCTION_ENV, "TICKERPROJ_VAR_DIR": str(tmp_path),
                          "FIELD_ENCRYPTION_KEYS": PRODUCTION_ENV["FIELD_ENCRYPTION_KEYS"] + ",not-a-key"})
    assert result.returncode != 0
    assert "FIELD_ENCRYPTION_KEYS[1] is not a Fernet key" in result.stderr
    assert "not-a-key" not in result.stderr


def test_a_secret_file_is_never_written_through_a_planted_link(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    var = tmp_path / "var"
    var.mkdir()
    (var / "secret_key").symlink_to(elsewhere / "stolen")
    result = _run(PROBE, {"TICKERPROJ_VAR_DIR": str(var)})
    assert result.returncode != 0 and "must be a regular file" in result.stderr
    assert not (elsewhere / "stolen").exists()


def test_https_settings_come_from_the_environment(tmp_path):
    found = json.loads(_run(SECURITY_PROBE, {
        **PRODUCTION_ENV, "TICKERPROJ_VAR_DIR": str(tmp_path), "TRUST_X_FORWARDED_PROTO": "true",
        "SECURE_HSTS_SECONDS": "31536000", "SECURE_SSL_REDIRECT": "true",
    }).stdout.strip().splitlines()[-1])
    assert found["proxy_ssl"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert found["hsts"] == 31536000 and found["ssl_redirect"] is True
    assert found["backends"][0] == "axes.backends.AxesStandaloneBackend"
    assert found["middleware"] == "axes.middleware.AxesMiddleware"
    default = json.loads(_run(SECURITY_PROBE, {**PRODUCTION_ENV, "TICKERPROJ_VAR_DIR": str(tmp_path)})
                         .stdout.strip().splitlines()[-1])
    assert default["proxy_ssl"] is None, "a forwarded header is trusted only when told"


REDIS_TLS_PROBE = """
import json, django
from django.conf import settings
django.setup()
import redis
from tickerproj.celery import app
pool = redis.Redis.from_url(settings.REDIS_URL).connection_pool
print(json.dumps({
    "layer": settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"][0]["address"],
    "redis": [pool.connection_class.__name__, pool.connection_kwargs["password"]],
    "backend": type(app.backend).__name__, "broker_ssl": bool(app.connection_for_write().ssl),
}))
"""


def test_redis_auth_and_tls_come_through_redis_url(tmp_path):
    """L12: a password and TLS (rediss://) reach the channel layer, Celery and our clients."""
    url = "rediss://:s3cret@redis.example:6380/3?ssl_cert_reqs=required"
    result = _run(REDIS_TLS_PROBE, {**PRODUCTION_ENV, "TICKERPROJ_VAR_DIR": str(tmp_path), "REDIS_URL": url})
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found == {"layer": url, "redis": ["SSLConnection", "s3cret"], "backend": "RedisBackend",
                     "broker_ssl": True}


LAYER_PROBE = """
import json, django
from django.conf import settings
django.setup()
print(json.dumps(settings.CHANNEL_LAYERS["default"]))
"""


def test_the_pubsub_channel_layer_is_chosen_by_setting(tmp_path):
    """The same host entry as RedisChannelLayer's (the Sentinel one too: both come from one
    dict in settings), without capacity or expiries, which pub/sub does not have."""
    base = {**PRODUCTION_ENV, "TICKERPROJ_VAR_DIR": str(tmp_path), "CHANNEL_LAYER_BACKEND": "pubsub",
            "CHANNEL_LAYER_PREFIX": "desk"}
    on_url = _run(LAYER_PROBE, {**base, "REDIS_URL": "redis://127.0.0.1:6379/4"})
    assert on_url.returncode == 0, on_url.stderr[-2000:]
    assert json.loads(on_url.stdout.strip().splitlines()[-1]) == {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {
            "hosts": [{"address": "redis://127.0.0.1:6379/4", "socket_timeout": 15, "socket_connect_timeout": 5}],
            "prefix": "desk",
        },
    }


def test_an_unknown_channel_layer_backend_refuses_to_start_naming_the_choices(tmp_path):
    result = _run(LAYER_PROBE, {**PRODUCTION_ENV, "TICKERPROJ_VAR_DIR": str(tmp_path),
                                "REDIS_URL": "redis://127.0.0.1:6379/4", "CHANNEL_LAYER_BACKEND": "kafka"})
    assert result.returncode != 0
    assert "CHANNEL_LAYER_BACKEND must be 'redis' or 'pubsub', got 'kafka'" in result.stderr


def test_on_redis_layer_group_membership_expires_soon_after_consumers_stop_refreshing_it(tmp_path):
    """RedisChannelLayer keeps members in Redis until group_expiry: consumers re-join in time."""
    probe = LAYER_PROBE.replace(
        'print(json.dumps(settings.CHANNEL_LAYERS["default"]))',
        "from streaming.consumers import ConsumerSettings\n"
        'print(json.dumps([settings.CHANNEL_LAYERS["default"]["CONFIG"]["group_expiry"], '
        "settings.WS_GROUP_EXPIRY_S, ConsumerSettings.from_settings(settings).group_refresh_s]))",
    )
    result = _run(probe, {**PRODUCTION_ENV, "TICKERPROJ_VAR_DIR": str(tmp_path),
                          "REDIS_URL": "redis://127.0.0.1:6379/4", "CHANNEL_LAYER_BACKEND": "redis"})
    assert result.returncode == 0, result.stderr[-2000:]
    group_expiry, ws_group_expiry, refresh = json.loads(result.stdout.strip().splitlines()[-1])
    assert group_expiry == ws_group_expiry <= 3600
    assert refresh * 3 <= group_expiry
