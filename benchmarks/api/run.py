"""HTTP API v1: a page of subscriptions, and subscribing a chain in one request vs one by one.

What runs, in one process on PostgreSQL: Django's test client calls the API (middleware,
token authentication, ninja's validation, the selectors and services, orjson) exactly as
daphne would hand it a request; each figure is the time around that call. The engine notice
is a real PUBLISH on Redis after commit (no engine listens: the benchmark measures the web
side).

- list: GET /api/v1/subscriptions?page_size=500 on 10,000 subscriptions of 100,000
  instruments, the first page and a page deep in the cursor; queries counted.
- bulk: POST /api/v1/subscriptions/chain for a 3-expiry x 41-strike chain (246 options),
  including the commit and the engine notice; reference: the same 246 through POST
  /api/v1/subscriptions one at a time (246 requests, 246 transactions, 246 notices).

Targets (issue 11): list <= 30 ms with a bounded query count; bulk <= 300 ms.

Run from the repository root (PostgreSQL on 127.0.0.1 with trust auth; it creates and
migrates its own database ``bench_api``; Redis on 127.0.0.1:6379 unless REDIS_URL says
otherwise):

    uv run python benchmarks/api/run.py [--repeat 20]
"""

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

BENCH_DB = "bench_api"
os.environ.setdefault("DATABASE_URL", f"postgres://postgres@127.0.0.1:5432/{BENCH_DB}")
os.environ.setdefault("SECRET_KEY", "benchmark-only-secret-key")
os.environ.setdefault("FIELD_ENCRYPTION_KEYS", "mm3JPTf9TRR7OBOOigZVYZMNBLNeIIxHivuB6kCvdHE=")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
os.environ.setdefault("CHANNEL_LAYER_PREFIX", "bench_api")  # its own engine control channel
os.environ.setdefault("LOG_LEVEL", "WARNING")
os.environ["API_RATE_LIMIT"] = "1000000/m"  # the benchmark measures work, not the limiter
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tickerproj.settings")

INSTRUMENTS = 100_000
SUBSCRIPTIONS = 10_000
PAGE = 500
CHAIN_EXPIRIES, CHAIN_STRIKES = 3, 41
TARGET_LIST_MS, TARGET_BULK_MS = 30.0, 300.0


def ensure_database() -> None:
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [BENCH_DB]).fetchone():
            conn.execute(f'CREATE DATABASE "{BENCH_DB}"')


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:.1f} ms, best {min(values) * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="timed runs of each figure")
    args = parser.parse_args()

    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)

    import orjson
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from accounts.models import ApiToken, KiteAccount
    from accounts.services import apitoken_create
    from subscriptions.models import Instrument, Subscription

    Subscription.objects.all().delete()
    Instrument.objects.all().delete()
    KiteAccount.objects.all().delete()
    ApiToken.objects.all().delete()
    get_user_model().objects.filter(username="bench").delete()

    expiries = [dt.date(2030, 1, 1) + dt.timedelta(days=7 * i) for i in range(CHAIN_EXPIRIES)]
    chain = [
        Instrument(
            instrument_token=1_000_000 + e * 1000 + s * 2 + k, exchange_token=e * 1000 + s,
            tradingsymbol=f"BENCH{expiries[e]:%y%m%d}{20000 + 50 * s}{kind}", name="BENCH",
            expiry=expiries[e], strike=20000.0 + 50 * s, instrument_type=kind,
            segment="NFO-OPT", exchange="NFO", lot_size=50,
        )
        for e in range(CHAIN_EXPIRIES) for s in range(CHAIN_STRIKES)
        for k, kind in enumerate(("CE", "PE"))
    ]  # fmt: skip
    filler = [
        Instrument(
            instrument_token=10_000_000 + i, exchange_token=i, tradingsymbol=f"FILL{i}",
            name=f"U{i % 50}", instrument_type="EQ", segment="NSE", exchange="NSE",
        )
        for i in range(INSTRUMENTS - len(chain))
    ]  # fmt: skip
    Instrument.objects.bulk_create(chain + filler, batch_size=5000)
    Subscription.objects.bulk_create(
        (Subscription(instrument_id=10_000_000 + i, source="api") for i in range(SUBSCRIPTIONS)),
        batch_size=5000,
    )
    for n in range(2):
        KiteAccount.objects.create(label=f"bench{n}", api_key=f"benchkey{n}", access_token="t")  # noqa: S106
    user = get_user_model().objects.create_user("bench")
    _, key = apitoken_create(user=user, name="bench", scopes=["read", "subscribe"])
    client = Client(HTTP_HOST="localhost", HTTP_AUTHORIZATION=f"Token {key}")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")

    # --- list ------------------------------------------------------------------------------
    first_url, deep_url = "/api/v1/subscriptions", None
    page = orjson.loads(client.get(first_url, {"page_size": PAGE}).content)  # warm-up
    for _ in range(10):
        page = orjson.loads(client.get(page["next"]).content)
    deep_url = page["next"]
    timings: dict[str, list[float]] = {"first": [], "deep": []}
    queries: dict[str, int] = {}
    for label, url, params in (("first", first_url, {"page_size": PAGE}), ("deep", deep_url, {})):
        for _ in range(args.repeat):
            with CaptureQueriesContext(connection) as captured:
                t0 = time.perf_counter()
                response = client.get(url, params)
                timings[label].append(time.perf_counter() - t0)
            assert response.status_code == 200, response.content[:300]
            assert len(orjson.loads(response.content)["results"]) == PAGE
            queries[label] = len(captured.captured_queries)

    # --- bulk: one chain request vs 246 single creates ---------------------------------------
    chain_body = orjson.dumps({
        "underlying": "BENCH", "expiries": [e.isoformat() for e in expiries], "mode": "full",
    })  # fmt: skip
    tokens = [i.instrument_token for i in chain]

    def clear_chain() -> None:
        Subscription.objects.filter(instrument_id__in=tokens).delete()

    bulk, singles = [], []
    for run in range(max(3, args.repeat // 4)):
        clear_chain()
        t0 = time.perf_counter()
        response = client.post("/api/v1/subscriptions/chain", chain_body, content_type="application/json")
        elapsed = time.perf_counter() - t0
        assert response.status_code == 201, response.content[:300]
        assert orjson.loads(response.content)["count"] == len(tokens)
        if run:  # the first is a warm-up
            bulk.append(elapsed)
    for run in range(3):
        clear_chain()
        t0 = time.perf_counter()
        for token in tokens:
            response = client.post(
                "/api/v1/subscriptions", orjson.dumps({"instrument_token": token}),
                content_type="application/json",
            )  # fmt: skip
            assert response.status_code == 201, response.content[:300]
        elapsed = time.perf_counter() - t0
        if run:
            singles.append(elapsed)
    clear_chain()

    list_ms = statistics.median(timings["first"]) * 1000
    bulk_ms = statistics.median(bulk) * 1000
    single_ms = statistics.median(singles) * 1000
    print(f"tickerproj HTTP API v1 benchmark  ({platform.python_version()}, "
          f"{os.cpu_count()} cores, PostgreSQL, Redis notices)")  # fmt: skip
    print(f"data: {INSTRUMENTS} instruments, {SUBSCRIPTIONS} subscriptions")
    print(f"list, page of {PAGE}, first page: {ms(timings['first'])}, {queries['first']} queries "
          f"(target <= {TARGET_LIST_MS:.0f} ms: {TARGET_LIST_MS / list_ms:.2f}x of budget)")  # fmt: skip
    print(f"list, page of {PAGE}, 11th page by cursor: {ms(timings['deep'])}, {queries['deep']} queries")
    print(f"bulk: chain of {len(tokens)} options in one request: {ms(bulk)} "
          f"(target <= {TARGET_BULK_MS:.0f} ms: {TARGET_BULK_MS / bulk_ms:.2f}x of budget)")  # fmt: skip
    print(f"reference: {len(tokens)} single creates: median {single_ms:.0f} ms, best "
          f"{min(singles) * 1000:.0f} ms; one request is {single_ms / bulk_ms:.1f}x faster")  # fmt: skip


if __name__ == "__main__":
    main()
