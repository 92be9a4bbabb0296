"""The engine's database reads: one unreadable secret takes out its account, not the engine."""

import asyncio
import os
import threading

import pytest
from cryptography.fernet import Fernet
from structlog.testing import capture_logs

from accounts.models import KiteAccount
from accounts.services import UNREADABLE_CIPHER_ERROR
from streaming.engine import store
from streaming.engine.store import world_load
from streaming.engine.universe import UNIVERSE_FIELDS, InstrumentUniverse
from subscriptions.models import Instrument
from tests.helpers import async_wait_until
from tests.streaming.engine.builders import nifty_rows

pytestmark = pytest.mark.django_db


def test_an_undecryptable_access_token_makes_only_its_account_unstreamable(settings):
    good = KiteAccount.objects.create(label="good", api_key="k1", access_token="tok-good")
    keys = list(settings.FIELD_ENCRYPTION_KEYS)
    # Stored under a key the engine does not have (a lost or mistyped key).
    settings.FIELD_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    lost = KiteAccount.objects.create(label="lost", api_key="k2", access_token="tok-lost-secret")
    settings.FIELD_ENCRYPTION_KEYS = keys

    with capture_logs() as logs:
        world = world_load()

    rows = {a.label: a for a in world.accounts}
    assert rows["good"].streamable and rows["good"].access_token == "tok-good"
    assert not rows["lost"].streamable
    assert rows["lost"].access_token == ""
    assert rows["lost"].status == KiteAccount.Status.ERROR
    lost.refresh_from_db(fields=["status", "last_error"])
    assert lost.status == KiteAccount.Status.ERROR
    assert lost.last_error == UNREADABLE_CIPHER_ERROR
    good.refresh_from_db(fields=["status"])
    assert good.status == KiteAccount.Status.ACTIVE
    events = [e for e in logs if e["event"] == "engine.account_secret_unreadable"]
    assert [e["account"] for e in events] == ["lost"]
    assert "tok-lost-secret" not in repr(logs)

    # The next load does not try (or log) again: the account is in error until fixed.
    with capture_logs() as logs:
        world = world_load()
    assert not {a.label: a for a in world.accounts}["lost"].streamable
    assert not [e for e in logs if e["event"] == "engine.account_secret_unreadable"]


async def test_a_hung_database_pins_only_the_engines_database_threads():
    """Database calls that never return (a frozen PostgreSQL) use up the engine's few
    database threads, not the loop's default executor: pure work in threads goes on."""
    release = threading.Event()
    default_workers = min(32, (os.cpu_count() or 1) + 4)
    hung = [asyncio.ensure_future(store.run_db(release.wait, timeout=30))
            for _ in range(default_workers + 1)]
    try:
        await async_wait_until(
            lambda: sum(t.name.startswith("engine-db") for t in threading.enumerate())
            >= store.DB_THREADS, timeout_s=10, what="the database threads busy",
        )
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "pure work"), timeout=10) == "pure work"
        db_threads = [t for t in threading.enumerate() if t.name.startswith("engine-db")]
        assert len(db_threads) == store.DB_THREADS
    finally:
        release.set()
        await asyncio.gather(*hung)


def test_instrument_rows_carry_the_universe_columns_with_repeated_values_shared():
    """The engine keeps these rows between reloads: at 100k instruments their size counts."""
    for i, row in enumerate(nifty_rows()):
        Instrument.objects.create(exchange_token=i, **row)
    tokens = [row["instrument_token"] for row in nifty_rows()]

    rows = store.instruments_load(tokens=tokens)

    assert sorted(r["instrument_token"] for r in rows) == sorted(tokens)
    assert all(tuple(r) == UNIVERSE_FIELDS for r in rows)
    options = [r for r in rows if r["instrument_type"] in ("CE", "PE")]
    assert len({id(r["name"]) for r in options}) == 1
    assert len({id(r["expiry"]) for r in options}) == 2  # one object per expiry date
    # The universe they build is the one the full rows build.
    assert InstrumentUniverse.from_rows(rows).tokens.tolist() == sorted(tokens)
