"""Settings for every process of tickerproj, read once from the environment.

With no environment set the project runs on embedded defaults: a SQLite file, the in-memory
channel layer and periodic jobs run in-process (``manage.py demo``). ``DATABASE_URL`` and
``REDIS_URL`` switch to PostgreSQL (psycopg 3 with a connection pool), channels-redis and
Celery on Redis. See README.md for the full table.
"""

import datetime as dt
from pathlib import Path

import environ
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured

from tickerproj.access import parse_networks, validate_ops_token
from tickerproj.logging import configure_logging
from tickerproj.private_files import private_file_create
from tickerproj.redis_connection import SentinelTarget, parse_sentinels, sentinel_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(environ.Env().str("TICKERPROJ_VAR_DIR", default=str(BASE_DIR / "var")))

env = environ.Env()
if (BASE_DIR / ".env").exists():  # else django-environ logs a non-JSON line before logging is set up
    environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DATABASE_URL = env.str("DATABASE_URL", default="")
REDIS_URL = env.str("REDIS_URL", default="")
REDIS_SENTINELS = env.list("REDIS_SENTINELS", default=[])
"""``host:port`` of the Redis Sentinels; when set they find the master, REDIS_URL is ignored."""
REDIS_SENTINEL_MASTER = env.str("REDIS_SENTINEL_MASTER", default="tickerproj")
REDIS_SENTINEL_DB = env.int("REDIS_SENTINEL_DB", default=0)
REDIS_SENTINEL_PASSWORD = env.str("REDIS_SENTINEL_PASSWORD", default="")
"""The master's (requirepass) password, if any."""
REDIS_SENTINEL = (
    SentinelTarget(
        sentinels=parse_sentinels(REDIS_SENTINELS),
        master_name=REDIS_SENTINEL_MASTER,
        db=REDIS_SENTINEL_DB,
        password=REDIS_SENTINEL_PASSWORD,
    )
    if REDIS_SENTINELS
    else None
)
if REDIS_SENTINEL is not None:
    # The project's own clients read this URL through tickerproj.redis_connection.
    REDIS_URL = sentinel_url(REDIS_SENTINEL)
EMBEDDED = not DATABASE_URL
"""True on embedded defaults (SQLite, no Redis): the single-process demo set-up."""

DEBUG = env.bool("DEBUG", default=False)
# Runtime files: the embedded SQLite database and secrets, collected static files.
(VAR_DIR / "static").mkdir(parents=True, exist_ok=True)


def _embedded_secret(name: str, make) -> str:
    """A secret for the embedded demo, generated once into var/ so it survives restarts."""
    path = VAR_DIR / name
    if not path.exists():
        try:
            private_file_create(path, make())
        except FileExistsError:
            # Another process created it first; a dangling symlink is refused below.
            pass
        except OSError as exc:
            raise ImproperlyConfigured(f"cannot create the private file {path}: {exc}") from exc
    if path.is_symlink() or not path.is_file():
        raise ImproperlyConfigured(f"{path} must be a regular file, not a link")
    return path.read_text().strip()


if EMBEDDED:
    SECRET_KEY = env.str("SECRET_KEY", default="") or _embedded_secret(
        "secret_key", lambda: Fernet.generate_key().decode()
    )
    _default_keys = _embedded_secret("field_encryption_key", lambda: Fernet.generate_key().decode())
else:
    SECRET_KEY = env.str("SECRET_KEY", default="")
    _default_keys = ""
    if not SECRET_KEY:
        raise ImproperlyConfigured("SECRET_KEY must be set when DATABASE_URL is set")

FIELD_ENCRYPTION_KEYS = env.list("FIELD_ENCRYPTION_KEYS", default=[_default_keys] if _default_keys else [])
"""Fernet keys for secrets at rest, newest first; independent of SECRET_KEY."""
if not FIELD_ENCRYPTION_KEYS:
    raise ImproperlyConfigured("FIELD_ENCRYPTION_KEYS must be set when DATABASE_URL is set")
for _position, _key in enumerate(FIELD_ENCRYPTION_KEYS):
    # Found here, at start-up, not at the first decrypt (where runticker would crash-loop).
    try:
        Fernet(_key.encode())
    except ValueError:
        raise ImproperlyConfigured(
            f"FIELD_ENCRYPTION_KEYS[{_position}] is not a Fernet key (32 url-safe base64 bytes, "
            "from `python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`)"
        ) from None

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_celery_beat",
    "django_structlog",
    "django_prometheus",
    "import_export",
    "ninja",
    "axes",
    "accounts",
    "subscriptions",
    "streaming",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "tickerproj.request_id.RequestIdMiddleware",
    "tickerproj.api_support.ApiEnvelopeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # After authentication, so its request_finished line names the user.
    "django_structlog.middlewares.RequestMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
    # Last, as django-axes requires: locks out repeated failed admin logins.
    "axes.middleware.AxesMiddleware",
]

AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env.int("LOGIN_FAILURE_LIMIT", default=5)
"""Failed logins of one username from one address before both are locked out."""
AXES_COOLOFF_TIME = dt.timedelta(minutes=env.int("LOGIN_LOCKOUT_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_VERBOSE = False
# Its admin's "clean up" action asks for no permission; unlock with `manage.py axes_reset_username`.
AXES_ENABLE_ADMIN = False

ROOT_URLCONF = "tickerproj.urls"
ASGI_APPLICATION = "tickerproj.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

if EMBEDDED:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "tickerproj.sqlite3",
            # WAL and a busy timeout let the demo's web, engine and job threads share the file.
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }
else:
    DATABASES = {"default": env.db_url_config(DATABASE_URL)}
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        # Django's PostgreSQL backend with query, error and connection counters for /metrics.
        DATABASES["default"]["ENGINE"] = "django_prometheus.db.backends.postgresql"
    DATABASES["default"].setdefault("OPTIONS", {})
    DATABASES["default"]["OPTIONS"].update(
        {
            "pool": {
                "min_size": env.int("DATABASE_POOL_MIN", default=1),
                "max_size": env.int("DATABASE_POOL_MAX", default=10),
                "timeout": 10,
            },
            "application_name": env.str("DATABASE_APPLICATION_NAME", default="tickerproj"),
            # Every wait on PostgreSQL is bounded: connecting, a statement, a dead peer.
            "connect_timeout": env.int("DATABASE_CONNECT_TIMEOUT_S", default=5),
            "options": f"-c statement_timeout={env.int('DATABASE_STATEMENT_TIMEOUT_S', default=60) * 1000}",
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
            "tcp_user_timeout": 30_000,
        }
    )
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # The pool checks a connection before lending it: one the server dropped is replaced.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    if test_name := env.str("TEST_DATABASE_NAME", default=""):
        DATABASES["default"]["TEST"] = {"NAME": test_name}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

WS_GROUP_EXPIRY_S = env.int("WS_GROUP_EXPIRY_S", default=900)
"""channels-redis forgets a WebSocket's group membership after this; consumers re-join at a third."""
# Names this installation's channel-layer keys and engine control channel on a shared Redis.
CHANNEL_LAYER_PREFIX = env.str("CHANNEL_LAYER_PREFIX", default="tickerproj")
CHANNEL_LAYER_BACKEND = env.str("CHANNEL_LAYER_BACKEND", default="redis")
"""``pubsub``: channels-redis's RedisPubSubChannelLayer, one Redis PUBLISH per group
message, read once by each web process and handed to its members in memory; ``redis``: its
RedisChannelLayer (default), one copy of each group message per member in Redis (what a web
process then reads one round trip per message). benchmarks/engine/README.md measures both:
pub/sub costs daphne about two thirds per delivered snapshot. ``redis`` stays the default
because the fault suite (``make faults``, docs/reliability.md) has proven its promises on it
only, and pub/sub loses what is published while a web process reconnects (order events
included); switch when a full fault run holds on ``pubsub``."""
if CHANNEL_LAYER_BACKEND not in ("redis", "pubsub"):
    raise ImproperlyConfigured(
        f"CHANNEL_LAYER_BACKEND must be 'redis' or 'pubsub', got {CHANNEL_LAYER_BACKEND!r}"
    )
if REDIS_SENTINEL is not None:
    # channels-redis asks the sentinels for the master on every new connection.
    _LAYER_HOST: dict | None = {
        "sentinels": list(REDIS_SENTINEL.sentinels),
        "master_name": REDIS_SENTINEL.master_name,
        "db": REDIS_SENTINEL.db,
        "password": REDIS_SENTINEL.password or None,
        "socket_timeout": 15,
        "socket_connect_timeout": 5,
    }
elif REDIS_URL:
    # redis-py >= 6 reads with a 5 s socket timeout by default, the same as channels-redis's
    # 5 s BZPOPMIN in receive(): an idle receive then fails with TimeoutError instead of
    # returning. The read timeout must exceed it.
    _LAYER_HOST = {"address": REDIS_URL, "socket_timeout": 15, "socket_connect_timeout": 5}
else:
    _LAYER_HOST = None
if _LAYER_HOST is not None and CHANNEL_LAYER_BACKEND == "pubsub":
    # No capacity, expiry or group expiry: a group is a Redis pub/sub channel that each web
    # process subscribes to while one of its connections is a member, and leaves on the last
    # one's disconnect or with the process.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [_LAYER_HOST], "prefix": CHANNEL_LAYER_PREFIX},
        }
    }
elif _LAYER_HOST is not None:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [_LAYER_HOST],
                "prefix": CHANNEL_LAYER_PREFIX,
                "capacity": env.int("CHANNEL_LAYER_CAPACITY", default=1000),
                "expiry": 10,
                # Consumers re-join every WS_GROUP_EXPIRY_S / 3; a member a failed disconnect
                # left behind is forgotten after this, not after channels-redis's 24 h.
                "group_expiry": WS_GROUP_EXPIRY_S,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Celery: broker and results on Redis when configured; on embedded defaults the demo runs
# the periodic jobs in-process, so no broker is needed.
CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_RESULT_BACKEND = REDIS_URL or "cache+memory://"
if REDIS_SENTINEL is not None:
    _auth = f":{REDIS_SENTINEL.password}@" if REDIS_SENTINEL.password else ""
    CELERY_BROKER_URL = CELERY_RESULT_BACKEND = ";".join(
        f"sentinel://{_auth}{host}:{port}/{REDIS_SENTINEL.db}" for host, port in REDIS_SENTINEL.sentinels
    )
    CELERY_BROKER_TRANSPORT_OPTIONS = {"master_name": REDIS_SENTINEL.master_name}
    CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {"master_name": REDIS_SENTINEL.master_name}
CELERY_TASK_ALWAYS_EAGER = False
CELERY_TIMEZONE = "Asia/Kolkata"
CELERY_TASK_ACKS_LATE = True
# acks_late alone still acks a task whose worker process died under it (kill -9, the OOM
# killer), which loses a daily job for the day: requeue it instead. Tasks are idempotent and
# their JobLock is taken over by the redelivery (streaming/locks.py).
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT_S", default=600)
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT_S", default=540)
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_METRICS_PORT = env.int("CELERY_METRICS_PORT", default=0)
"""The worker serves its task metrics here (0: off), behind OPS_TOKEN / OPS_ALLOWED_NETWORKS."""
CELERY_METRICS_ADDR = env.str("CELERY_METRICS_ADDR", default="127.0.0.1")
# Task lines carry task_id, and the request_id of the request that queued the task.
DJANGO_STRUCTLOG_CELERY_ENABLED = True
# ipware would pick a client address from X-Forwarded-For, which any client can set.
DJANGO_STRUCTLOG_IP_LOGGING_ENABLED = False
# Its request_id is the X-Request-ID that tickerproj.request_id has checked (or made).
DJANGO_STRUCTLOG_TRUST_UPSTREAM_REQUEST_ID = True

# The admin's CSV import (subscriptions/imports.py) needs the add permission, not just view.
IMPORT_EXPORT_IMPORT_PERMISSION_CODE = "add"

# Kite Connect. Defaults are Kite's production endpoints; point them at `manage.py kitesim`
# to run everything against the loopback simulator.
KITE_API_ROOT = env.str("KITE_API_ROOT", default="https://api.kite.trade")
KITE_WS_URL = env.str("KITE_WS_URL", default="wss://ws.kite.trade")
KITE_LOGIN_URL = env.str("KITE_LOGIN_URL", default="https://kite.zerodha.com/connect/login")
# Kite's order postbacks (POST /api/v1/kite/postback) per calling address, ninja's rate syntax.
KITE_POSTBACK_RATE_LIMIT = env.str("KITE_POSTBACK_RATE_LIMIT", default="3000/m")

# Orders (docs/orders.md). Kite's published order limits per account; over them is a 429.
ORDERS_KITE_TIMEOUT_S = env.float("ORDERS_KITE_TIMEOUT_S", default=7.0)
"""How long one order call to Kite may take; after it the order is UNKNOWN, never re-sent blindly."""
ORDERS_UNKNOWN_GRACE_S = env.float("ORDERS_UNKNOWN_GRACE_S", default=60.0)
"""How long after sending an order whose answer was lost we keep looking for it in Kite's
order book before concluding Kite has no order with its tag (only then is it re-sent)."""
ORDERS_UNKNOWN_CHECK_INTERVAL_S = env.float("ORDERS_UNKNOWN_CHECK_INTERVAL_S", default=5.0)
"""How often the resolution task reads Kite's order book for an UNKNOWN order."""
ORDERS_MAX_SEND_ATTEMPTS = env.int("ORDERS_MAX_SEND_ATTEMPTS", default=3)
"""Sends of one order at most (each after Kite was shown to have none); then it is given up."""
ORDERS_PER_S = env.int("ORDERS_PER_S", default=10)
ORDERS_PER_MINUTE = env.int("ORDERS_PER_MINUTE", default=400)
ORDERS_PER_DAY = env.int("ORDERS_PER_DAY", default=5000)
ORDERS_MAX_MODIFICATIONS = env.int("ORDERS_MAX_MODIFICATIONS", default=25)
ORDERS_MAX_SLICES = env.int("ORDERS_MAX_SLICES", default=10)
"""Most orders one large order is sliced into (each within its underlying's freeze quantity)."""
ORDERS_FREEZE_QUANTITIES = {
    name: int(qty)
    for name, qty in env.dict(
        "ORDERS_FREEZE_QUANTITIES",
        default={"NIFTY": "1800", "BANKNIFTY": "900", "FINNIFTY": "1800", "MIDCPNIFTY": "2800",
                 "NIFTYNXT50": "600", "SENSEX": "1000", "BANKEX": "900"},
    ).items()
}
"""Largest quantity (units, not lots) one order may carry, per underlying (the instrument's
``name``), from the exchanges' freeze-limit circulars; larger orders are sliced."""

# Greeks and the engine.
RISK_FREE_RATE = env.float("RISK_FREE_RATE", default=0.065)
"""Annual rate that discounts option premia (a T-bill-like 6.5%, not NSE's fixed 10%)."""
DIVIDEND_YIELD = env.float("DIVIDEND_YIELD", default=0.0)
TICKER_FLUSH_INTERVAL_MS = env.int("TICKER_FLUSH_INTERVAL_MS", default=100)
"""The engine's flush window under load grows up to this (the longest a change waits)."""
TICKER_FLUSH_WINDOW_MS = env.int("TICKER_FLUSH_WINDOW_MS", default=15)
"""The engine flushes this long after the first unflushed change when it is not loaded."""
TICKER_WATCHDOG_S = env.float("TICKER_WATCHDOG_S", default=10.0)
TICKER_HEARTBEAT_INTERVAL_S = env.float("TICKER_HEARTBEAT_INTERVAL_S", default=2.0)
TICKER_LEASE_TTL_S = env.float("TICKER_LEASE_TTL_S", default=15.0)
TICKER_SHUTDOWN_BOUND_S = env.float("TICKER_SHUTDOWN_BOUND_S", default=30.0)
TICKER_STALE_UNDERLYING_S = env.float("TICKER_STALE_UNDERLYING_S", default=30.0)
TICKER_REST_FALLBACK_AFTER_S = env.float("TICKER_REST_FALLBACK_AFTER_S", default=5.0)
"""A connection silent or reconnecting this long has its instruments polled over REST (0: off)."""
BACKFILL_MIN_AGE_S = env.int("BACKFILL_MIN_AGE_S", default=60)
"""Gap minutes ended less than this long ago wait for a later backfill run (Kite's candle settles)."""
BACKFILL_LOOKBACK_H = env.int("BACKFILL_LOOKBACK_H", default=24)
"""How far back the periodic backfill looks for gap minutes."""
MOCK_MARKET_ENABLED = env.bool("MOCK_MARKET_ENABLED", default=True)
"""Drive the pipeline from the synthetic market outside market hours."""
MARKET_HOLIDAYS = env.list("MARKET_HOLIDAYS", default=[])
"""NSE trading holidays as ISO dates; the market is closed on them."""
MARKET_HOURS_ALWAYS_OPEN = env.bool("MARKET_HOURS_ALWAYS_OPEN", default=False)
"""Treat the market as open at every hour of every day (the fault suite and demos against the
simulator): the engine streams live, reports ``market_open`` and /health checks for stalls.
Never set it against real Kite: outside the session Kite sends no ticks."""
MOCK_TICK_INTERVAL_MS = env.int("MOCK_TICK_INTERVAL_MS", default=250)
"""How often the mock market steps and emits ticks for every mocked instrument."""
MOCK_MARKET_SEED = env.int("MOCK_MARKET_SEED", default=0)
"""Seed of the engine's synthetic market (the same seed gives the same instruments)."""
TICKER_RELOAD_DEBOUNCE_MS = env.int("TICKER_RELOAD_DEBOUNCE_MS", default=200)
"""A burst of change notices settles this long before the engine reloads once."""
TICKER_SAFETY_RELOAD_S = env.float("TICKER_SAFETY_RELOAD_S", default=60.0)
"""The engine reloads this often even without a notice, in case one was lost."""
TICKER_RECORDING_DIR = BASE_DIR / env.str("TICKER_RECORDING_DIR", default=str(VAR_DIR / "recordings"))
"""Where runticker records the raw Kite frames of accounts with record_frames on (a relative
path is taken from the project's folder)."""
TICKER_RECORDING_MAX_FILE_MB = env.int("TICKER_RECORDING_MAX_FILE_MB", default=256)
"""A recording file is closed and a new one started at this compressed size."""
TICKER_RECORDING_MAX_TOTAL_MB = env.int("TICKER_RECORDING_MAX_TOTAL_MB", default=4096)
"""The recording directory's cap: the oldest recordings are deleted to stay under it."""
TICKER_RECORDING_ZSTD_LEVEL = env.int("TICKER_RECORDING_ZSTD_LEVEL", default=-5)
"""zstd level of recordings: negative is faster and larger (CPU is shared with the tick path)."""
ANALYTICS_INTERVAL_S = env.float("ANALYTICS_INTERVAL_S", default=1.0)
"""A chain's analytics are sent at most this often (docs/websocket-protocol.md)."""
ANALYTICS_IV_WINDOW_DAYS = env.int("ANALYTICS_IV_WINDOW_DAYS", default=365)
"""Days of daily ATM IV that IV rank and IV percentile look back over."""

# Browser WebSockets.
WS_MAX_SUBSCRIPTIONS = env.int("WS_MAX_SUBSCRIPTIONS", default=2000)
WS_MAX_MESSAGES_PER_S = env.int("WS_MAX_MESSAGES_PER_S", default=20)
WS_SEND_WINDOW = env.int("WS_SEND_WINDOW", default=4)
WS_MAX_CONNECTS_PER_IP_PER_MINUTE = env.int("WS_MAX_CONNECTS_PER_IP_PER_MINUTE", default=120)
"""WebSocket connects one client IP may open per minute on one web process."""

# HTTP API v1 (tickerproj/api.py, docs/http-api.md).
API_RATE_LIMIT = env.str("API_RATE_LIMIT", default="600/m")
"""Requests per token (or session user), in django-ninja's rate syntax."""
API_HISTORY_RATE_LIMIT = env.str("API_HISTORY_RATE_LIMIT", default="30/m")
"""History requests per token: each may call Kite."""
API_HISTORY_CONCURRENCY_PER_CALLER = env.int("API_HISTORY_CONCURRENCY_PER_CALLER", default=2)
"""History requests one token (or user) may have in flight on one web process."""
API_HISTORY_CONCURRENCY_TOTAL = env.int(
    "API_HISTORY_CONCURRENCY_TOTAL", default=max(1, env.int("DATABASE_POOL_MAX", default=10) // 2)
)
"""History requests of all callers together in flight on one web process: each holds a
database connection for its whole fetch, so half the pool, leaving the rest to everyone else."""
API_BULK_MAX_ITEMS = 5000
WS_ALLOWED_ORIGINS = env.list("WS_ALLOWED_ORIGINS", default=CSRF_TRUSTED_ORIGINS)
"""Exact ``scheme://host[:port]`` origins whose pages may open WebSockets (empty: hosts only)."""
WS_MAX_CONNECTIONS_PER_USER = env.int("WS_MAX_CONNECTIONS_PER_USER", default=20)
WS_MAX_CONNECTIONS_PER_IP = env.int("WS_MAX_CONNECTIONS_PER_IP", default=100)
"""Per web process; behind a reverse proxy run daphne with --proxy-headers, or every client
shares the proxy's address."""
HEALTH_HEARTBEAT_MAX_AGE_S = env.float("HEALTH_HEARTBEAT_MAX_AGE_S", default=15.0)
HEALTH_STREAM_STALL_S = env.float("HEALTH_STREAM_STALL_S", default=30.0)
"""A live account streaming instruments with no tick for this long makes /health 503."""
HEALTH_STALL_WHEN_MARKET_CLOSED = env.bool("HEALTH_STALL_WHEN_MARKET_CLOSED", default=False)
"""Report ``stream_stalled`` even while the market is closed (to test alerting end to end)."""
HEALTH_CACHE_S = env.float("HEALTH_CACHE_S", default=2.0)
"""How long a process reuses its /health and /health/ready reports (0: compute every call)."""

# Explicit access to /metrics and the detailed /health (besides staff sessions): never loopback.
OPS_TOKEN = validate_ops_token(env.str("OPS_TOKEN", default=""))
"""Bearer token for Prometheus and monitoring: ``Authorization: Bearer <OPS_TOKEN>``."""
OPS_ALLOWED_NETWORKS = parse_networks(env.list("OPS_ALLOWED_NETWORKS", default=[]))
"""Peer addresses/CIDRs let in without a token (the TCP peer, never X-Forwarded-For)."""

RECONCILE_GRACE_S = env.float("RECONCILE_GRACE_S", default=20.0)
"""The reconciler ignores subscriptions changed this recently: engines reload within seconds."""

# Paper trading and positions (docs/orders.md).
PAPER_SNAPSHOT_TIMEOUT_S = env.float("PAPER_SNAPSHOT_TIMEOUT_S", default=1.0)
"""How long placing a paper order waits for the engines' live snapshot before rejecting it."""
PAPER_DESK_REFRESH_S = env.float("PAPER_DESK_REFRESH_S", default=0.5)
"""How often ``runpaper`` re-reads the open paper orders and joins their instruments' groups."""
POSITIONS_SNAPSHOT_TIMEOUT_S = env.float("POSITIONS_SNAPSHOT_TIMEOUT_S", default=1.0)
"""How long a positions read waits for the live snapshots of the positions' instruments."""
POSITIONS_PUSH_INTERVAL_S = env.float("POSITIONS_PUSH_INTERVAL_S", default=2.0)
"""The WebSocket ``positions`` subscription's cadence; also how long a web process shares
Kite's positions of a live account between its readers (one Kite call per account per this
interval, whatever the number of pushes and API calls)."""

LANGUAGE_CODE = "en-us"
TIME_ZONE = "Asia/Kolkata"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
WHITENOISE_USE_FINDERS = True
STATICFILES_FINDERS = [
    "django.contrib.staticfiles.finders.FileSystemFinder",
    "django.contrib.staticfiles.finders.AppDirectoriesFinder",
    "tickerproj.static_vendor.VendorFinder",
]
STATIC_VENDOR_FILES = {
    # Apache ECharts (npm, package-lock.json): every chart of the chain page, candles included.
    "vendor/echarts/echarts.min.js": BASE_DIR / "node_modules" / "echarts" / "dist" / "echarts.min.js",
}
LOGIN_URL = "accounts:login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "accounts:login"

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=not EMBEDDED)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
# Behind a TLS-terminating proxy that sets X-Forwarded-Proto (and strips it from clients).
if env.bool("TRUST_X_FORWARDED_PROTO", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
"""Set it (e.g. 31536000) once the site is served over HTTPS only; browsers remember it."""
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOG_JSON = env.bool("LOG_JSON", default=not DEBUG)
LOGGING_CONFIG = None
configure_logging(json=LOG_JSON, level=LOG_LEVEL)
