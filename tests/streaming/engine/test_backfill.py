"""Gap backfill: a stall of minutes (the market's and the engine's clock jumped, never waited
for) leaves gap bars that a real Celery worker fills from the simulator's historical candles,
marked ``backfilled`` and sent to ``bars.<NAME>``; a minute the history lacks stays a gap; a live
bar is never overwritten; the shared rate limiter keeps Kite's 3 historical requests/s."""

import datetime as dt
import time

import orjson
import pytest
from django.utils import timezone

from streaming import schema
from streaming.engine.store import bars_save, run_db
from streaming.greeks import IST
from streaming.kite.rest import KiteRateLimiter, KiteRestClient
from streaming.market import SyntheticMarket
from streaming.models import UnderlyingBar
from streaming.nse_calendar import previous_trading_day_on_or_before, session_open_epoch_s
from streaming.services import bars_backfill
from streaming.sim.simulator import KiteSimulator, SimulatorThread
from streaming.tasks import backfill_bars
from subscriptions.models import Instrument
from tests.helpers import async_wait_until
from tests.streaming.engine.runtime_helpers import (
    InProcessEngine,
    instruments_from_market,
    make_account,
    subscribe,
)
from tests.subscriptions.conftest import celery_worker  # noqa: F401  (a fixture, used by name)

pytestmark = pytest.mark.django_db(transaction=True)

MINUTE_S = 60


def last_session_open_s() -> float:
    """09:15 IST of the last trading day before today: its minutes are history whatever today is."""
    today = dt.datetime.now(IST).date()
    return session_open_epoch_s(previous_trading_day_on_or_before(today - dt.timedelta(days=1),
                                                                  frozenset()))


class SteppedClock:
    """Wall-clock seconds from a chosen start; ``advance`` jumps it (minutes in no time)."""

    def __init__(self, start_s: float) -> None:
        self._offset = start_s - time.time()

    def __call__(self) -> float:
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        self._offset += seconds


def rows(token: int) -> dict[int, UnderlyingBar]:
    return {int(b.start.timestamp()): b for b in UnderlyingBar.objects.filter(instrument_id=token)}


def spot_tokens() -> dict[str, int]:
    return dict(Instrument.objects.filter(segment="INDICES").values_list("tradingsymbol", "instrument_token"))


@pytest.fixture
def backfill_settings(settings):
    settings.BACKFILL_MIN_AGE_S = 0
    settings.BACKFILL_LOOKBACK_H = 24 * 15  # back to the last trading day, whatever today is
    return settings


async def test_a_stall_leaves_gaps_that_the_worker_backfills_and_marks(
    celery_worker, backfill_settings  # noqa: F811
):
    minute0 = last_session_open_s() + 60 * MINUTE_S  # 10:15 IST
    clock = SteppedClock(minute0 + 50)
    market = SyntheticMarket(seed=0, now_fn=clock)
    await run_db(lambda: instruments_from_market(market))
    tokens = await run_db(spot_tokens)
    nifty, bank = tokens["NIFTY 50"], tokens["NIFTY BANK"]
    await run_db(lambda: subscribe([nifty, bank]))
    await run_db(lambda: make_account("acc1", api_key="k1", access_token="tok-acc1"))
    queued = []

    def request_backfill() -> None:  # as runticker's, keeping the results to wait on
        queued.append(backfill_bars.apply_async())

    async with InProcessEngine(
        accounts={"acc1": "k1"}, market=market, clock=clock,
        sim_options={"clock": clock, "enforce_rate_limits": True},
        build_options={"request_backfill": request_backfill},
    ) as h:
        backfill_settings.KITE_API_ROOT = h.sim.http_url
        bars_channel = await h.layer.new_channel()
        await h.layer.group_add(schema.bars_group("NIFTY"), bars_channel)

        await async_wait_until(lambda: h.sim.ticks_sent > 0, timeout_s=60)
        clock.advance(MINUTE_S)  # 10:16: the 10:15 bar closes on its ticks
        await async_wait_until(lambda: queued and queued[0].ready(), timeout_s=90)
        assert queued[0].get() == {"requests": 0, "failed_requests": 0, "filled": 0, "lacked": 0}

        h.sim.omit_history(nifty, minute0 + 3 * MINUTE_S, minute0 + 3 * MINUTE_S)  # Kite lacks 10:18
        h.sim.stall("k1")
        clock.advance(4 * MINUTE_S)  # four minutes silent: 10:17, 10:18, 10:19 get no tick
        h.sim.resume()

        def filled() -> bool:
            got = rows(nifty)
            return all(m in got and (got[m].backfilled or got[m].backfill_checked_at)
                       for m in range(int(minute0) + 2 * MINUTE_S, int(minute0) + 5 * MINUTE_S, MINUTE_S))

        await async_wait_until(lambda: len(queued) >= 2, timeout_s=90)
        await async_wait_until(lambda: run_db(filled), timeout_s=90)
        await async_wait_until(lambda: all(r.ready() for r in queued), timeout_s=90)
        runs = [r.get() for r in queued[1:]]
        assert sum(r.get("requests", 0) for r in runs) == 2
        assert sum(r.get("filled", 0) for r in runs) == 5 and sum(r.get("lacked", 0) for r in runs) == 1
        assert not any(r.get("failed_requests") for r in runs)

        nifty_rows = await run_db(lambda: rows(nifty))
        for m in (0, 1):  # the live bars, untouched
            bar = nifty_rows[int(minute0) + m * MINUTE_S]
            assert bar.tick_count > 0 and not bar.backfilled and not bar.is_gap
        for m in (2, 4):
            bar = nifty_rows[int(minute0) + m * MINUTE_S]
            assert bar.backfilled and not bar.is_gap and bar.tick_count == 0 and bar.close > 0
        lacked = nifty_rows[int(minute0) + 3 * MINUTE_S]
        assert lacked.is_gap and not lacked.backfilled and lacked.close is None
        assert lacked.backfill_checked_at is not None
        bank_rows = await run_db(lambda: rows(bank))
        assert all(bank_rows[int(minute0) + m * MINUTE_S].backfilled for m in (2, 3, 4))
        # One request per instrument and day, and the simulator (enforcing Kite's 3/s) refused none.
        assert h.sim.rest_requests["market.historical"] == 2

        published = {}
        deadline = time.monotonic() + 30
        while len(published) < 2 and time.monotonic() < deadline:
            message = await h.layer.receive(bars_channel)
            item = orjson.loads(message["item"])
            if item["backfilled"]:
                published[item["start_ts"] // 1000] = item
        assert sorted(published) == [int(minute0) + 2 * MINUTE_S, int(minute0) + 4 * MINUTE_S]
        assert tuple(next(iter(published.values()))) == schema.BAR_FIELDS

        again = backfill_bars.apply_async()
        await async_wait_until(again.ready, timeout_s=60)
        assert again.get()["requests"] == 0  # idempotent: the lacked minute is not asked again


def test_backfill_never_overwrites_a_live_bar_and_keeps_the_rate_limit(redis_client, backfill_settings):
    open_s = last_session_open_s()
    market = SyntheticMarket(seed=0, extra_underlyings=7, now_fn=lambda: open_s + 6 * 3600)
    instruments_from_market(market)
    tokens = sorted(spot_tokens().values())
    assert len(tokens) == 9
    m0 = int(open_s) + 30 * MINUTE_S

    def bar(token, minute, *, gap=False, close=100.0):
        return {"instrument_id": token, "start": dt.datetime.fromtimestamp(minute, tz=dt.UTC),
                "open": None if gap else close, "high": None if gap else close,
                "low": None if gap else close, "close": None if gap else close, "volume": 0,
                "tick_count": 0 if gap else 5, "is_gap": gap, "is_mock": False, "backfilled": False}

    for token in tokens:  # a live bar, three gap minutes, a live bar
        bars_save(bars=[bar(token, m0), *(bar(token, m0 + k * MINUTE_S, gap=True) for k in (1, 2, 3)),
                        bar(token, m0 + 4 * MINUTE_S)])
    # The engine's live bar for one gap minute lands before the backfill runs.
    bars_save(bars=[bar(tokens[0], m0 + 2 * MINUTE_S, close=123.45)])
    # Holes with no row at all (a takeover): 5 minutes between two live bars.
    bars_save(bars=[bar(tokens[1], m0 + 10 * MINUTE_S)])

    simulator = KiteSimulator(market=market, step_market=False, enforce_rate_limits=True)
    simulator.register_account(api_key="k1", api_secret="s", access_token="t1")
    with SimulatorThread(simulator) as sim:
        client = KiteRestClient(api_key="k1", access_token="t1", api_root=sim.http_url,
                                rate_limiter=KiteRateLimiter(redis_client=redis_client))
        since = dt.datetime.fromtimestamp(open_s, tz=dt.UTC)
        until = timezone.now()
        started = time.monotonic()
        result = bars_backfill(client=client, since=since, until=until, now=timezone.now)
        elapsed_s = time.monotonic() - started
        assert result.failed_requests == 0 and result.requests == len(tokens)
        # 9 requests at 3/s: the limiter spaced them (the simulator answers in milliseconds).
        assert elapsed_s >= (len(tokens) - 1) / 3.0
        served = sim.call(lambda: simulator.rest_requests["market.historical"])
        assert result.lacked == 0
        assert len(result.filled) == 3 * len(tokens) - 1 + 5

        live = rows(tokens[0])[m0 + 2 * MINUTE_S]
        assert (live.close, live.tick_count, live.backfilled) == (123.45, 5, False)
        holes = rows(tokens[1])
        assert all(holes[m0 + k * MINUTE_S].backfilled for k in range(5, 10))
        assert rows(tokens[2])[m0 + MINUTE_S].backfilled

        # The engine's gap bar for a backfilled minute (a retry after a database outage) changes
        # nothing; its live bar replaces the backfilled one.
        bars_save(bars=[bar(tokens[2], m0 + MINUTE_S, gap=True)])
        assert rows(tokens[2])[m0 + MINUTE_S].backfilled
        bars_save(bars=[bar(tokens[2], m0 + MINUTE_S, close=99.0)])
        replaced = rows(tokens[2])[m0 + MINUTE_S]
        assert (replaced.close, replaced.backfilled) == (99.0, False)

        again = bars_backfill(client=client, since=since, until=until, now=timezone.now)
        assert again.requests == 0
        assert sim.call(lambda: simulator.rest_requests["market.historical"]) == served
        client.close()


async def test_the_engine_asks_for_a_backfill_after_live_gaps_or_a_first_bar_never_for_mock():
    from channels.layers import InMemoryChannelLayer

    from streaming.engine.bars import Bar
    from streaming.engine.barsink import BarSink
    from streaming.engine.metrics import EngineMetrics
    from streaming.engine.publisher import Publisher
    from tests.streaming.engine.builders import NIFTY_INDEX
    from tests.streaming.engine.test_barsink import MINUTE_S as M0
    from tests.streaming.engine.test_barsink import nifty_index

    await run_db(nifty_index)
    asked = []

    async def nothing_due():
        return []

    sink = BarSink(publisher=Publisher(InMemoryChannelLayer()), metrics=EngineMetrics(),
                   close_due=nothing_due, on_gaps=lambda: asked.append(True))

    def bar(k: int, *, gap: bool = False, mock: bool = False) -> Bar:
        price = None if gap else 100.0
        return Bar(NIFTY_INDEX, "NIFTY", M0 + k * MINUTE_S, price, price, price, price, 0,
                   0 if gap else 3, gap, mock)

    for closed, expected in (
        ([bar(0)], 1),  # the first live bar since start: a takeover or restart may have left a hole
        ([bar(1)], 1),
        ([bar(2, gap=True), bar(3)], 2),  # a live gap
        ([bar(4, gap=True, mock=True), bar(5, mock=True)], 2),  # mock: nothing to ask Kite
    ):
        sink.add(closed)
        await sink.step()
        assert len(asked) == expected, closed
