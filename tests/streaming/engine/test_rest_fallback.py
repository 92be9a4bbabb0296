"""REST fallback: while an account's socket is stalled (and then reconnecting), its instruments
are polled with Kite's quote API through the real engine and simulator, published with IV and
Greeks and ``rest_fallback: true``, within Kite's 1 quote request/s; polling stops when the
socket is back and the flag goes; quote errors are counted, never raised."""

import time

import pytest

from streaming import schema
from streaming.engine.store import run_db
from streaming.market import SyntheticMarket
from streaming.models import UnderlyingBar
from subscriptions.models import Instrument
from tests.helpers import async_wait_until
from tests.streaming.engine.runtime_helpers import (
    InProcessEngine,
    instruments_from_market,
    make_account,
    subscribe,
)

pytestmark = pytest.mark.django_db(transaction=True)

AFTER_S = 1.0
WATCHDOG_S = 4.0


@pytest.fixture
def nifty():
    """The NIFTY index, its nearest future and 10 options of that expiry, streamed by acc1."""
    instruments_from_market(SyntheticMarket(seed=0))
    index = Instrument.objects.get(tradingsymbol="NIFTY 50")
    future = Instrument.objects.filter(name="NIFTY", instrument_type="FUT").order_by("expiry").first()
    options = list(
        Instrument.objects.filter(name="NIFTY", expiry=future.expiry, instrument_type__in=("CE", "PE"))
        .order_by("strike")[10:20]
    )
    subscribe([index.instrument_token, future.instrument_token, *(o.instrument_token for o in options)])
    make_account("acc1", api_key="k1", access_token="tok-acc1")
    return {
        "tokens": {index.instrument_token, future.instrument_token, *(o.instrument_token for o in options)},
        "options": {o.instrument_token for o in options},
        "groups": (schema.underlying_group("NIFTY"), schema.chain_group("NIFTY", future.expiry)),
    }


def errors(engine, outcome: str) -> float:
    return engine.metrics.rest_fallback_requests.labels("acc1", outcome)._value.get()


async def test_a_stall_is_bridged_by_quote_polling_flagged_until_the_socket_is_back(nifty):
    async with InProcessEngine(
        accounts={"acc1": "k1"}, rest_fallback_after_s=AFTER_S, watchdog_s=WATCHDOG_S,
    ) as h:
        listener = await h.listen(*nifty["groups"])
        tokens = nifty["tokens"]
        await listener.until(lambda: tokens <= set(listener.latest), timeout_s=60, what="first snapshots")
        assert not any(s["rest_fallback"] for s in listener.latest.values())
        assert h.sim.rest_requests.get("market.quote", 0) == 0

        h.sim.stall("k1")
        stalled_at = time.monotonic()
        listener.latest.clear()
        await listener.until(
            lambda: tokens <= {t for t, s in listener.latest.items() if s["rest_fallback"]},
            timeout_s=60, what="every instrument flagged rest_fallback",
        )
        first_flagged = min(listener.received_at[t] for t in tokens)
        # Not before the configured delay (the socket was silent, not yet dead).
        assert first_flagged - stalled_at >= AFTER_S - 0.3
        # IV and Greeks as usual, from the polled quotes.
        assert all(listener.latest[t]["iv"] is not None or listener.latest[t]["flags"]
                   for t in nifty["options"])
        assert any(listener.latest[t]["iv"] is not None for t in nifty["options"])

        # Stalled long enough for the watchdog to drop the socket: reconnecting, still polled.
        await async_wait_until(
            lambda: any(c.reconnects or c.state != "connected"
                        for _, health in h.engine.connections.connection_health().values()
                        for c in health.connections if c.instruments),
            timeout_s=60,
        )
        polls_before = h.sim.rest_requests.get("market.quote", 0)
        window_start = time.monotonic()
        await async_wait_until(lambda: h.sim.rest_requests.get("market.quote", 0) >= polls_before + 3,
                               timeout_s=60)
        # Kite's limit held: calls arrive at most at 1/s per api_key (the limiter paces them
        # 1.05 s apart; arrival jitter on a loaded machine is why this counts, not spaces).
        assert errors(h.engine, "error") == 0
        calls = h.sim.rest_requests["market.quote"] - polls_before
        assert calls <= (time.monotonic() - window_start) / 1.0 + 1

        h.sim.resume()
        await listener.until(
            lambda: all(not listener.latest[t]["rest_fallback"] for t in tokens)
            and h.engine.rest_fallback.polling == {},
            timeout_s=60, what="the flag cleared once the socket is back",
        )
        stopped = h.sim.rest_requests["market.quote"]
        await listener.drain(3 * AFTER_S)
        assert h.sim.rest_requests["market.quote"] - stopped <= 1  # at most one call in flight
        assert not any(listener.latest[t]["rest_fallback"] for t in tokens)
        # The polled quotes made no bars: only ticks do (stalled minutes stay gaps).
        assert await run_db(lambda: UnderlyingBar.objects.filter(tick_count=0, is_gap=False).count()) == 0


async def test_quote_errors_are_counted_and_polling_goes_on(nifty):
    async with InProcessEngine(
        accounts={"acc1": "k1"}, rest_fallback_after_s=AFTER_S, watchdog_s=30.0,
    ) as h:
        listener = await h.listen(*nifty["groups"])
        tokens = nifty["tokens"]
        await listener.until(lambda: tokens <= set(listener.latest), timeout_s=60, what="first snapshots")
        h.sim.fail_next("market.quote", status=500, times=2)
        h.sim.fail_next("market.quote", status=403, error_type="TokenException", times=1)
        h.sim.stall("k1")
        listener.latest.clear()
        await listener.until(
            lambda: tokens <= {t for t, s in listener.latest.items() if s["rest_fallback"]},
            timeout_s=60, what="flagged snapshots after the failed calls",
        )
        assert errors(h.engine, "error") == 3
        assert errors(h.engine, "ok") >= 1
        assert h.engine.supervisor.state("rest_fallback").state == "running"
        h.sim.resume()


@pytest.fixture
def two_accounts():
    """acc1 streams 700 options (two quote calls' worth), acc2 20 others."""
    market = SyntheticMarket(seed=0, extra_underlyings=2)
    instruments_from_market(market)
    options = list(Instrument.objects.filter(instrument_type__in=("CE", "PE"))
                   .order_by("instrument_token").values_list("instrument_token", flat=True))
    acc1 = make_account("acc1", api_key="k1", access_token="tok-acc1")
    acc2 = make_account("acc2", api_key="k2", access_token="tok-acc2")
    subscribe(options[:700], pinned=acc1)
    subscribe(options[700:720], pinned=acc2)
    return market, acc1.pk


async def test_a_stalled_accounts_instruments_are_polled_on_every_accounts_key(two_accounts):
    market, acc1 = two_accounts
    async with InProcessEngine(accounts={"acc1": "k1", "acc2": "k2"}, market=market,
                               rest_fallback_after_s=AFTER_S, watchdog_s=30.0) as h:
        await async_wait_until(
            lambda: len(h.sim.subscriptions("k1")) == 700 and len(h.sim.subscriptions("k2")) == 20,
            timeout_s=60,
        )
        h.sim.stall("k1")
        await async_wait_until(lambda: errors(h.engine, "ok") >= 1, timeout_s=60)
        started = time.monotonic()
        ok2 = h.engine.metrics.rest_fallback_requests.labels("acc2", "ok")
        await async_wait_until(lambda: ok2._value.get() >= 2, timeout_s=60)
        elapsed_s = time.monotonic() - started
        assert set(h.engine.rest_fallback.polling) == {acc1}  # acc2's socket is fine
        for label in ("acc1", "acc2"):  # each key within Kite's 1 call/s
            calls = sum(h.engine.metrics.rest_fallback_requests.labels(label, o)._value.get()
                        for o in ("ok", "error"))
            assert calls <= elapsed_s + 2, label
        h.sim.resume()
        await async_wait_until(lambda: h.engine.rest_fallback.polling == {}, timeout_s=60)
