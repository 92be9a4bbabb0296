"""Orders: place -> accepted through our API and service vs a bare kiteconnect place_order.

Both against the same Kite simulator (``manage.py kitesim``, its own process, pinned to the
last CPU with ``taskset`` when there are two or more; this process is pinned to the others),
in one run, interleaved order by order so that both see the same machine:

- ours: ``POST /api/v1/orders`` with a fresh ``Idempotency-Key`` through Django's test client
  (middleware, token authentication and the ``trade`` scope, validation, the account grant,
  kill switches, pre-trade checks, Kite's order limits on Redis, the placement stored before
  anything is sent, the Kite REST client, the answer applied through ``order_apply_update``,
  the audit row, the idempotent answer stored), until the 201 with Kite's ``order_id``;
- bare: ``kiteconnect.KiteConnect.place_order`` with the same order, until its order_id.

Printed: p50/p99 of each, the ratio, our overhead at p99 in ms (target: <= 5 ms added), and
CPU per order (this process: ours includes kiteconnect-equivalent client work plus
everything above; bare is the client alone) and the simulator's CPU per order.

One pair every ``--interval-ms`` (150 ms): our REST client books every call on the shared
limiter of Kite's 10 requests/s per api_key and waits when over it; unpaced, the run times that
wait, not our work.

Run from the repository root (PostgreSQL on 127.0.0.1 with trust auth; it creates and
migrates its own database ``bench_orders``; Redis on 127.0.0.1:6379 unless REDIS_URL says
otherwise):

    uv run python benchmarks/orders/run.py [--orders 300]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

BENCH_DB = "bench_orders"
API_KEY, API_SECRET, ACCESS_TOKEN = "benchkey", "bench-secret", "benchtoken0123456789"
TARGET_OVERHEAD_P99_MS = 5.0

os.environ.setdefault("DATABASE_URL", f"postgres://postgres@127.0.0.1:5432/{BENCH_DB}")
os.environ.setdefault("SECRET_KEY", "benchmark-only-secret-key")
os.environ.setdefault("FIELD_ENCRYPTION_KEYS", "mm3JPTf9TRR7OBOOigZVYZMNBLNeIIxHivuB6kCvdHE=")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
os.environ.setdefault("CHANNEL_LAYER_PREFIX", "bench_orders")
os.environ.setdefault("LOG_LEVEL", "WARNING")
os.environ["API_RATE_LIMIT"] = "1000000/m"  # the benchmark measures work, not the limiters
for name in ("ORDERS_PER_S", "ORDERS_PER_MINUTE", "ORDERS_PER_DAY"):
    os.environ[name] = "1000000"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tickerproj.settings")


def ensure_database() -> None:
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [BENCH_DB]).fetchone():
            conn.execute(f'CREATE DATABASE "{BENCH_DB}"')


def pin() -> tuple[list[str], str]:
    """(the simulator's command prefix, a description): the simulator on the last CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return [], "1 CPU: not pinned"
    os.sched_setaffinity(0, set(cpus[:-1]))
    return ["taskset", "-c", str(cpus[-1])], f"simulator on CPU {cpus[-1]}, benchmark on {cpus[:-1]}"


def start_simulator(prefix: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [*prefix, sys.executable, str(ROOT / "manage.py"), "kitesim", "--port", "0",
         "--api-key", API_KEY, "--api-secret", API_SECRET, "--access-token", ACCESS_TOKEN,
         "--tick-interval-ms", "1000"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("KITE_API_ROOT="):
            return proc, line.strip().partition("=")[2]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("kitesim did not start (no KITE_API_ROOT line within 60 s)")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=300, help="timed orders of each kind")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--interval-ms", type=float, default=150.0,
        help="one pair (ours, bare) per interval: below Kite's 10 requests/s per api_key, which "
        "the REST client's shared limiter enforces (0: as fast as possible, timing the limiter)",
    )
    parser.add_argument(
        "--profile", metavar="FILE",
        help="cProfile our orders in the timed loop and write the stats to FILE (timings then "
        "include the profiler's cost: read the profile, not the figures)",
    )
    args = parser.parse_args()

    prefix, pinning = pin()
    sim, api_root = start_simulator(prefix)
    os.environ["KITE_API_ROOT"] = api_root
    try:
        run(args, sim=sim, api_root=api_root, pinning=pinning)
    finally:
        sim.terminate()
        sim.wait(timeout=20)


def run(args, *, sim: subprocess.Popen, api_root: str, pinning: str) -> None:
    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)

    import orjson
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission
    from django.db import connection
    from django.test import Client
    from kiteconnect import KiteConnect

    from accounts.models import ApiToken, KiteAccount
    from accounts.services import account_set_session, apitoken_create
    from streaming.market import SyntheticMarket
    from subscriptions.models import Instrument
    from tests.conftest import instrument_rows_from_market

    for model in ("Trade", "OrderAudit", "Order", "OrderPlacement"):
        django.apps.apps.get_model("accounts", model).objects.all().delete()
    ApiToken.objects.all().delete()
    KiteAccount.objects.all().delete()
    Instrument.objects.all().delete()
    get_user_model().objects.filter(username="bench").delete()
    market = SyntheticMarket(seed=0)  # the simulator's market: the same instruments
    Instrument.objects.bulk_create(instrument_rows_from_market(market), batch_size=2000)
    option = next(r for r in market.instruments if r["name"] == "NIFTY" and r["instrument_type"] == "CE")
    account = KiteAccount.objects.create(label="bench", api_key=API_KEY, api_secret=API_SECRET)
    account = account_set_session(account=account, access_token=ACCESS_TOKEN)
    user = get_user_model().objects.create_user("bench")
    user.user_permissions.add(Permission.objects.get(codename="trade"))
    account.traders.add(user)
    _, key = apitoken_create(user=user, name="bench", scopes=["trade"])
    client = Client(HTTP_HOST="localhost", HTTP_AUTHORIZATION=f"Token {key}")
    order = {"exchange": "NFO", "tradingsymbol": option["tradingsymbol"], "transaction_type": "BUY",
             "order_type": "MARKET", "quantity": option["lot_size"], "product": "NRML"}  # fmt: skip
    body = orjson.dumps({"account_id": account.pk, **order})
    kite = KiteConnect(api_key=API_KEY, access_token=ACCESS_TOKEN, root=api_root)

    db = {"queries": 0, "s": 0.0}

    def timed_query(execute, sql, params, many, context):
        t0 = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            db["s"] += time.perf_counter() - t0
            db["queries"] += 1

    profiler = cProfile.Profile() if args.profile else None

    def ours() -> None:
        if profiler is not None:
            profiler.enable()
        response = client.post("/api/v1/orders", body, content_type="application/json",
                               HTTP_IDEMPOTENCY_KEY=uuid.uuid4().hex)  # fmt: skip
        if profiler is not None:
            profiler.disable()
        assert response.status_code == 201, response.content[:400]
        assert orjson.loads(response.content)["orders"][0]["kite_order_id"]

    def bare() -> None:
        assert kite.place_order(variety="regular", tag=uuid.uuid4().hex[:20], **order)

    for _ in range(args.warmup):
        ours()
        bare()
    if profiler is not None:
        profiler.clear()
    wall = {"ours": [], "bare": []}
    cpu = {"ours": 0.0, "bare": 0.0}
    sim_cpu = {"ours": 0.0, "bare": 0.0}
    with connection.execute_wrapper(timed_query):
        next_at = time.monotonic()
        for _ in range(args.orders):
            next_at += args.interval_ms / 1000.0
            for name, fn in (("ours", ours), ("bare", bare)):
                s0, c0, t0 = cpu_s(sim.pid), time.process_time(), time.perf_counter()
                fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name] += time.process_time() - c0
                sim_cpu[name] += cpu_s(sim.pid) - s0
            time.sleep(max(0.0, next_at - time.monotonic()))
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        sync_commit = cursor.fetchone()[0]

    if profiler is not None:
        profiler.dump_stats(args.profile)
    n = args.orders
    p = {k: (pct(v, 50) * 1000, pct(v, 99) * 1000) for k, v in wall.items()}
    overhead = p["ours"][1] - p["bare"][1]
    print(f"tickerproj orders benchmark  ({platform.python_version()}, {os.cpu_count()} cores, "
          f"{pinning}, load {os.getloadavg()[0]:.1f})")  # fmt: skip
    print(f"place -> accepted, {n} MARKET orders each, interleaved, one pair per "
          f"{args.interval_ms:.0f} ms, against kitesim")
    for name, label in (("ours", "ours: POST /api/v1/orders"), ("bare", "bare kiteconnect place_order")):
        print(f"  {label:32s} p50 {p[name][0]:6.2f} ms  p99 {p[name][1]:6.2f} ms  "
              f"CPU/order {cpu[name] / n * 1000:5.2f} ms here + {sim_cpu[name] / n * 1000:5.2f} ms simulator")
    print(f"  ratio ours/bare: p50 {p['ours'][0] / p['bare'][0]:.2f}x, p99 {p['ours'][1] / p['bare'][1]:.2f}x")
    print(f"  ours, per order: {db['queries'] / n:.1f} SQL statements, {db['s'] / n * 1000:.2f} ms "
          f"waiting on PostgreSQL (synchronous_commit={sync_commit})")
    print(f"  overhead at p99: {overhead:+.2f} ms (target <= {TARGET_OVERHEAD_P99_MS:.0f} ms: "
          f"{'met' if overhead <= TARGET_OVERHEAD_P99_MS else 'NOT met'})")  # fmt: skip


if __name__ == "__main__":
    main()
