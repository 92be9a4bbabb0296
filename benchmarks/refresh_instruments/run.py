"""instruments_refresh on a 100k-row Kite-like dump into PostgreSQL: insert, update, unchanged.

References measured side by side in the same run:
- parsing: kiteconnect's own ``KiteConnect._parse_instruments`` (no validation) against our
  validated ``parse_instruments_csv`` on the same bytes;
- writing: per-row ``Instrument.objects.update_or_create`` (the obvious ORM loop), timed on
  a sample and compared per row against the batched upsert.

Run from the repository root (PostgreSQL on 127.0.0.1, trust auth; the benchmark creates and
migrates its own database ``bench_refresh_instruments``):

    uv run python benchmarks/refresh_instruments/run.py [--rows 100000] [--reference-rows 5000]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

BENCH_DB = "bench_refresh_instruments"
os.environ.setdefault("DATABASE_URL", f"postgres://postgres@127.0.0.1:5432/{BENCH_DB}")
os.environ.setdefault("SECRET_KEY", "benchmark-only-secret-key")
os.environ.setdefault("FIELD_ENCRYPTION_KEYS", "mm3JPTf9TRR7OBOOigZVYZMNBLNeIIxHivuB6kCvdHE=")
os.environ.setdefault("LOG_LEVEL", "WARNING")
os.environ.setdefault("REDIS_URL", "")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tickerproj.settings")

TARGET_S = 30.0
UNDERLYINGS = ("NIFTY", "BANKNIFTY", "FINNIFTY", "MIDCPNIFTY", "SENSEX", "RELIANCE", "HDFCBANK",
               "INFY", "TCS", "ICICIBANK", "SBIN", "AXISBANK")


def ensure_database() -> None:
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [BENCH_DB]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{BENCH_DB}"')


def kite_like_dump(rows: int, *, price_seed: int = 0) -> bytes:
    """A Kite-format CSV: NSE equities, then NFO futures and weekly CE/PE chains."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["instrument_token", "exchange_token", "tradingsymbol", "name", "last_price",
                     "expiry", "strike", "tick_size", "lot_size", "instrument_type", "segment",
                     "exchange"])
    written = 0
    first_expiry = dt.date(2026, 11, 24)
    for i in range(min(2000, rows // 50)):
        token = 1_000_000 + i
        writer.writerow([token * 256 + 1, token, f"EQ{i:05d}", f"EQUITY {i}",
                         f"{100 + (i + price_seed) % 900}.5", "", "0.0", "0.05", "1", "EQ", "NSE", "NSE"])
        written += 1
    token = 5_000_000
    week = 0
    while written < rows:
        expiry = first_expiry + dt.timedelta(weeks=week)
        for u, name in enumerate(UNDERLYINGS):
            base = 1000 * (u + 2)
            writer.writerow([token * 256 + 2, token, f"{name}{expiry:%y%b%d}FUT".upper(), name,
                             f"{base + price_seed}.0", expiry.isoformat(), "0.0", "0.05", "25", "FUT",
                             "NFO-FUT", "NFO"])
            token += 1
            written += 1
            for k in range(200):
                strike = base + 10 * (k - 100)
                for kind in ("CE", "PE"):
                    if written >= rows:
                        break
                    writer.writerow([token * 256 + 2, token, f"{name}{expiry:%y%b%d}{strike}{kind}".upper(),
                                     name, f"{(k * 7 + price_seed) % 500}.05", expiry.isoformat(),
                                     f"{strike}.0", "0.05", "25", kind, "NFO-OPT", "NFO"])
                    token += 1
                    written += 1
            if written >= rows:
                break
        week += 1
    return buf.getvalue().encode()


class DumpSource:
    """Serves a prepared dump the way KiteRestClient.instruments does: parsed and validated."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def instruments(self, exchange=None):
        from streaming.kite.rest import parse_instruments_csv

        return parse_instruments_csv(self.raw)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--reference-rows", type=int, default=5_000)
    args = parser.parse_args()

    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection, transaction
    from kiteconnect import KiteConnect

    from streaming.kite.rest import parse_instruments_csv
    from subscriptions.models import Instrument, Subscription
    from subscriptions.services import INSTRUMENT_FIELDS, instruments_refresh

    call_command("migrate", verbosity=0)
    Subscription.objects.all().delete()
    Instrument.objects.all().delete()
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cpus, "
          f"PostgreSQL {connection.cursor().connection.info.server_version}")

    raw = kite_like_dump(args.rows)
    raw_updated = kite_like_dump(args.rows, price_seed=3)
    print(f"dump: {args.rows} rows, {len(raw) / 1e6:.1f} MB")

    kite = KiteConnect("bench")
    _, kc_parse_s = timed(lambda: kite._parse_instruments(raw))
    parsed, our_parse_s = timed(lambda: parse_instruments_csv(raw))
    print(f"parse   kiteconnect (no validation) {kc_parse_s:6.2f} s   "
          f"ours (validated) {our_parse_s:6.2f} s   ratio ours/kiteconnect {our_parse_s / kc_parse_s:.2f}")

    runs = []
    for label, dump in (("insert", raw), ("update", raw_updated), ("unchanged", raw_updated)):
        result, seconds = timed(lambda dump=dump: instruments_refresh(client=DumpSource(dump), force=True))
        runs.append((label, result, seconds))
        print(f"refresh {label:9s} {seconds:6.2f} s  {args.rows / seconds:9.0f} rows/s   "
              f"created {result.created} updated {result.updated} unchanged {result.unchanged}")
    assert Instrument.objects.count() == args.rows

    # Reference: the per-row ORM loop, on a sample into an empty table, then projected.
    Instrument.objects.all().delete()
    sample = parsed[: args.reference_rows]

    def per_row() -> None:
        with transaction.atomic():
            for row in sample:
                Instrument.objects.update_or_create(
                    instrument_token=row.instrument_token,
                    defaults={name: getattr(row, name) for name in INSTRUMENT_FIELDS},
                )

    _, ref_s = timed(per_row)
    ref_rate = len(sample) / ref_s
    print(f"reference per-row update_or_create: {len(sample)} rows in {ref_s:.2f} s = {ref_rate:.0f} rows/s "
          f"(projected {args.rows / ref_rate:.0f} s for {args.rows})")
    for label, _, seconds in runs:
        print(f"  {label:9s} speed-up over the reference: {args.rows / seconds / ref_rate:5.1f}x")
    worst = max(seconds for label, _, seconds in runs if label != "unchanged")
    print(f"target: {args.rows} rows under {TARGET_S:.0f} s -> slowest write run {worst:.2f} s: "
          f"{'PASS' if worst < TARGET_S else 'FAIL'}")
    Instrument.objects.all().delete()


if __name__ == "__main__":
    main()
