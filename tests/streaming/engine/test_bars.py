"""Underlying 1-minute bars: OHLC and volume from ticks, gaps marked, closing, persistence."""

from __future__ import annotations

import datetime as dt

import orjson
import pytest

from streaming import schema
from streaming.engine import store
from streaming.engine.bars import Bar, BarAggregator
from streaming.greeks import IST
from streaming.models import UnderlyingBar
from subscriptions.models import Instrument
from tests.streaming.engine.builders import NIFTY_INDEX, NOW_S, tick, ticks

RELIANCE = 738561
T0 = int(NOW_S)  # 10:00:00 IST, a minute boundary
assert T0 % 60 == 0
M0 = T0 // 60


def index_tick(price, ts, *, length=32):
    return tick(NIFTY_INDEX, price, length=length, ts=ts)


def equity_tick(price, ts, volume):
    return tick(RELIANCE, price, ts=ts, volume=volume)


def aggregator(**kwargs):
    kwargs.setdefault("clock", lambda: NOW_S)
    return BarAggregator({NIFTY_INDEX: "NIFTY", RELIANCE: "RELIANCE"}, **kwargs)


def test_ohlc_and_tick_count_of_a_minute_closed_by_the_next_minutes_tick():
    agg = aggregator()
    assert agg.ingest(ticks(index_tick(100.0, T0 + 1), index_tick(103.0, T0 + 10)), is_mock=False) == []
    assert agg.ingest(ticks(index_tick(99.5, T0 + 30), index_tick(101.0, T0 + 59)), is_mock=False) == []
    (bar,) = agg.ingest(index_tick(102.0, T0 + 60), is_mock=False)
    assert bar == Bar(NIFTY_INDEX, "NIFTY", T0, 100.0, 103.0, 99.5, 101.0, 0, 4, False, False)
    assert agg.open_bars()[NIFTY_INDEX]["open"] == 102.0


def test_volume_is_the_change_of_the_cumulative_volume():
    agg = aggregator()
    agg.ingest(ticks(equity_tick(2500.0, T0 + 5, 1000), equity_tick(2501.0, T0 + 20, 1500)), is_mock=False)
    agg.ingest(equity_tick(2502.0, T0 + 40, 2300), is_mock=False)
    (first,) = agg.ingest(equity_tick(2503.0, T0 + 65, 2600), is_mock=False)
    # The first bar after start counts from its first tick: its own trades are unknown.
    assert first.volume == 2300 - 1000
    agg.ingest(equity_tick(2504.0, T0 + 90, 3000), is_mock=False)
    (second,) = agg.ingest(equity_tick(2505.0, T0 + 125, 3100), is_mock=False)
    assert second.volume == 3000 - 2300
    assert (second.open, second.close, second.ticks) == (2503.0, 2504.0, 2)


def test_quote_packets_without_volume_do_not_disturb_it():
    agg = aggregator()
    agg.ingest(ticks(equity_tick(2500.0, T0 + 5, 1000), tick(RELIANCE, 2501.0, length=8)),
               is_mock=False, received_epoch_s=T0 + 10)
    (bar,) = agg.ingest(equity_tick(2503.0, T0 + 65, 1600), is_mock=False)
    assert (bar.volume, bar.ticks, bar.close) == (0, 2, 2501.0)


def test_minutes_without_ticks_between_two_bars_are_gap_bars():
    agg = aggregator()
    agg.ingest(index_tick(100.0, T0 + 5), is_mock=True)
    closed = agg.ingest(index_tick(101.0, T0 + 3 * 60 + 1), is_mock=True)
    assert [(b.start_epoch_s - T0, b.is_gap) for b in closed] == [(0, False), (60, True), (120, True)]
    gap = closed[1]
    assert (gap.open, gap.high, gap.low, gap.close, gap.volume, gap.ticks) == (None, None, None, None, 0, 0)
    assert gap.is_mock is True
    assert orjson.loads(gap.item())["open"] is None


def test_no_gaps_across_days_or_before_the_first_bar():
    close_1529 = int(dt.datetime(2026, 11, 20, 15, 29, 30, tzinfo=IST).timestamp())
    open_0915 = int(dt.datetime(2026, 11, 23, 9, 15, 10, tzinfo=IST).timestamp())
    agg = aggregator()
    assert agg.ingest(index_tick(100.0, close_1529), is_mock=False) == []
    closed = agg.ingest(index_tick(101.0, open_0915), is_mock=False)
    assert [b.is_gap for b in closed] == [False]


def test_the_clock_closes_a_bar_after_its_minute_and_the_grace():
    agg = aggregator(grace_s=3.0)
    agg.ingest(index_tick(100.0, T0 + 30), is_mock=False)
    assert agg.close_due(T0 + 62.9) == []
    (bar,) = agg.close_due(T0 + 63.0)
    assert (bar.start_epoch_s, bar.close) == (T0, 100.0)
    assert agg.open_bars() == {}
    # A late tick for the closed minute is dropped and counted...
    assert agg.ingest(index_tick(99.0, T0 + 59), is_mock=False) == []
    assert agg.late_ticks == 1
    # ...and the next minute with ticks after a quiet one brings its gap.
    closed = agg.ingest(index_tick(101.0, T0 + 150), is_mock=False)
    assert closed == [Bar(NIFTY_INDEX, "NIFTY", T0 + 60, None, None, None, None, 0, 0, True, False)]


def test_live_and_mock_never_share_a_bar():
    agg = aggregator()
    agg.ingest(index_tick(100.0, T0 + 5), is_mock=True)
    (mock_bar,) = agg.ingest(index_tick(200.0, T0 + 6), is_mock=False)
    assert (mock_bar.is_mock, mock_bar.open, mock_bar.close, mock_bar.ticks) == (True, 100.0, 100.0, 1)
    closed = agg.ingest(index_tick(201.0, T0 + 185), is_mock=False)
    assert [(b.is_mock, b.is_gap, b.open) for b in closed] == [(False, False, 200.0), (False, True, None), (False, True, None)]


def test_packets_without_a_timestamp_use_the_receipt_time():
    agg = aggregator()
    agg.ingest(index_tick(100.0, 0, length=28), is_mock=False, received_epoch_s=T0 + 10.5)
    (bar,) = agg.ingest(index_tick(101.0, 0, length=28), is_mock=False, received_epoch_s=T0 + 61.0)
    assert bar.start_epoch_s == T0


def test_one_batch_spanning_tokens_and_minutes():
    agg = aggregator()
    batch = ticks(
        index_tick(100.0, T0 + 1),
        equity_tick(2500.0, T0 + 2, 10),
        index_tick(102.0, T0 + 50),
        index_tick(105.0, T0 + 61),
        equity_tick(2490.0, T0 + 3, 20),
        index_tick(104.0, T0 + 62),
        tick(12345, 1.0, ts=T0),  # not a bar source
    )
    closed = agg.ingest(batch, is_mock=False)
    assert closed == [Bar(NIFTY_INDEX, "NIFTY", T0, 100.0, 102.0, 100.0, 102.0, 0, 2, False, False)]
    assert agg.open_bars()[NIFTY_INDEX]["close"] == 104.0
    assert agg.open_bars()[RELIANCE]["close"] == 2490.0


def test_set_sources_keeps_open_bars_of_kept_tokens():
    agg = aggregator()
    agg.ingest(ticks(index_tick(100.0, T0 + 1), equity_tick(2500.0, T0 + 2, 10)), is_mock=False)
    agg.set_sources({NIFTY_INDEX: "NIFTY"})
    assert set(agg.open_bars()) == {NIFTY_INDEX}
    assert agg.ingest(equity_tick(2501.0, T0 + 70, 20), is_mock=False) == []
    assert len(agg.ingest(index_tick(101.0, T0 + 70), is_mock=False)) == 1


def test_a_bar_as_json_and_as_a_row():
    bar = Bar(NIFTY_INDEX, "NIFTY", T0, 1.0, 2.0, 0.5, 1.5, 7, 3, False, True)
    item = orjson.loads(bar.item())
    assert tuple(item) == schema.BAR_FIELDS
    assert item["start_ts"] == T0 * 1000 and item["is_mock"] is True
    row = bar.row()
    assert row["instrument_id"] == NIFTY_INDEX
    assert row["start"] == dt.datetime.fromtimestamp(T0, tz=dt.UTC)
    assert row["tick_count"] == 3


@pytest.fixture
def nifty_index_row(db):
    return Instrument.objects.create(
        instrument_token=NIFTY_INDEX, exchange_token=1001, tradingsymbol="NIFTY 50", name="NIFTY 50",
        instrument_type="EQ", segment="INDICES", exchange="NSE",
    )


def test_closed_bars_and_gaps_are_stored(nifty_index_row):
    agg = aggregator()
    agg.ingest(index_tick(100.0, T0 + 5), is_mock=False)
    closed = agg.ingest(ticks(index_tick(101.0, T0 + 125), index_tick(99.0, T0 + 130)), is_mock=False)
    closed += agg.close_due(T0 + 200)
    assert store.bars_save(bars=[b.row() for b in closed]) == 3
    stored = list(UnderlyingBar.objects.filter(instrument_id=NIFTY_INDEX).order_by("start"))
    assert [(b.start.timestamp() - T0, b.is_gap, b.open, b.low) for b in stored] == [
        (0, False, 100.0, 100.0),
        (60, True, None, None),
        (120, False, 101.0, 99.0),
    ]
    # Closing the same minute again (a restarted engine) updates the row, never duplicates it.
    again = Bar(NIFTY_INDEX, "NIFTY", T0 + 120, 101.0, 103.0, 99.0, 102.0, 0, 5, False, False)
    store.bars_save(bars=[again.row()])
    assert UnderlyingBar.objects.filter(instrument_id=NIFTY_INDEX).count() == 3
    assert UnderlyingBar.objects.get(instrument_id=NIFTY_INDEX, start=again.row()["start"]).high == 103.0


@pytest.mark.django_db(transaction=True)
async def test_bars_are_stored_off_the_event_loop():
    await store.run_db(
        lambda: Instrument.objects.create(
            instrument_token=NIFTY_INDEX, exchange_token=1001, tradingsymbol="NIFTY 50",
            name="NIFTY 50", instrument_type="EQ", segment="INDICES", exchange="NSE",
        )
    )
    bar = Bar(NIFTY_INDEX, "NIFTY", T0, 1.0, 2.0, 0.5, 1.5, 0, 3, False, True)
    assert await store.run_db(store.bars_save, bars=[bar.row()]) == 1
    count = await store.run_db(lambda: UnderlyingBar.objects.filter(is_mock=True).count())
    assert count == 1
